#!/bin/sh
# The docker-compose bootstrap service: run once, before the nodes start. It creates each
# hospital node (keys, node.toml, its PostgreSQL schema), the consortium authority's key, the
# pseudonym secret and a signed roster, and joins every node to the consortium. Running it
# again changes nothing (it stops when the roster exists), so `docker compose up` may repeat it.
#
# In a real consortium these steps are split between parties: each hospital runs `hrx node
# init` and sends its enrollment.json; the authority signs the roster; each hospital runs
# `hrx node join` (see the operator guide, docs/operations.md).
set -eu

ROOT="${HRX_ROOT:-/srv/hrx}"
AUTHORITY="$ROOT/consortium"
DB_HOST="${HRX_DB_HOST:-db}"
DB_USER="${HRX_DB_USER:-hrx}"
DB_PASSWORD="${HRX_DB_PASSWORD:-hrx}"
DB_SUFFIX="${HRX_DB_SUFFIX:-}"  # appended to each database's name (tests use their own)
CONSORTIUM="${HRX_CONSORTIUM:-示范区医共体}"
HERE=$(dirname "$0")

if [ -f "$AUTHORITY/roster.json" ]; then
    echo "bootstrap: $AUTHORITY/roster.json exists; the consortium is set up already"
    exit 0
fi
mkdir -p "$AUTHORITY"

# id|name|database
for spec in "hosp-a|示范区人民医院|hosp_a" "hosp-b|示范区中医院|hosp_b" "hosp-c|示范区社区卫生服务中心|hosp_c"; do
    id=${spec%%|*}
    rest=${spec#*|}
    name=${rest%%|*}
    database=${rest#*|}
    if [ ! -f "$ROOT/$id/node.toml" ]; then
        hrx node init --dir "$ROOT/$id" --id "$id" --name "$name" --port 8080 \
            --url "http://$id:8080" \
            --db "postgresql://$DB_USER:$DB_PASSWORD@$DB_HOST:5432/$database$DB_SUFFIX"
    fi
done

hrx consortium secret --out "$AUTHORITY/consortium.key"
hrx consortium roster --authority-key "$AUTHORITY/authority.pem" --quorum 2 \
    --consortium "$CONSORTIUM" --members-info "$HERE/members-info.json" \
    --out "$AUTHORITY/roster.json.new" \
    "$ROOT/hosp-a/enrollment.json" "$ROOT/hosp-b/enrollment.json" "$ROOT/hosp-c/enrollment.json"
for id in hosp-a hosp-b hosp-c; do
    hrx node join --dir "$ROOT/$id" --roster "$AUTHORITY/roster.json.new" \
        --secret "$AUTHORITY/consortium.key" --authority "$AUTHORITY/authority.pem"
done
mv "$AUTHORITY/roster.json.new" "$AUTHORITY/roster.json"
echo "bootstrap: three nodes joined $CONSORTIUM"
