#!/bin/sh
# TRIAL ONLY: the bootstrap service of deploy/trial/docker-compose.yml, run before the nodes
# start. It plays every party of a consortium on one host: it creates three hospital nodes
# (keys, node.toml, their PostgreSQL schemas), the authority's key, the pseudonym secret and a
# signed roster, and joins every node. A real consortium splits these steps between the
# hospitals and an authority working offline (deploy/README.md, docs/operations.md).
#
# Run it again at any time: after success it changes nothing (it stops when roster.json is
# there), and after a failure or a kill at any step it takes up where it stopped. Each step is
# skipped when what it makes is there, and what it makes appears whole: files are written
# aside and renamed into place, and a half-made node is emptied and made again.
set -eu

ROOT="${HRX_ROOT:-/srv/hrx}"
AUTHORITY="$ROOT/consortium"
DB_HOST="${HRX_DB_HOST:-db}"
DB_USER="${HRX_DB_USER:-hrx}"
DB_PASSWORD="${HRX_DB_PASSWORD:-hrx}"
DB_SUFFIX="${HRX_DB_SUFFIX:-}"  # appended to each database's name (tests use their own)
CONSORTIUM="${HRX_CONSORTIUM:-示范区医共体}"
HERE=$(dirname "$0")
NODES="hosp-a hosp-b hosp-c"

if [ -f "$AUTHORITY/roster.json" ]; then
    echo "bootstrap: $AUTHORITY/roster.json exists; the consortium is set up already"
    exit 0
fi
mkdir -p "$AUTHORITY"
chmod 700 "$AUTHORITY"

# 1. The nodes. hrx node init writes enrollment.json last: a directory without it (or with an
#    empty one) is what an interrupted init left, and is made again from nothing (the node has
#    not joined anything yet; its database is migrated again, which changes nothing).
for spec in "hosp-a|示范区人民医院|hosp_a" "hosp-b|示范区中医院|hosp_b" "hosp-c|示范区社区卫生服务中心|hosp_c"; do
    id=${spec%%|*}
    rest=${spec#*|}
    name=${rest%%|*}
    database=${rest#*|}
    if [ ! -s "$ROOT/$id/enrollment.json" ]; then
        if [ -d "$ROOT/$id" ]; then
            find "$ROOT/$id" -mindepth 1 -delete
        fi
        hrx node init --dir "$ROOT/$id" --id "$id" --name "$name" --port 8080 \
            --url "http://$id:8080" \
            --db "postgresql://$DB_USER:$DB_PASSWORD@$DB_HOST:5432/$database$DB_SUFFIX"
    fi
done

# 2. The pseudonym secret: made once, aside, then renamed.
if [ ! -f "$AUTHORITY/consortium.key" ]; then
    rm -f "$AUTHORITY/consortium.key.part"
    hrx consortium secret --out "$AUTHORITY/consortium.key.part"
    mv "$AUTHORITY/consortium.key.part" "$AUTHORITY/consortium.key"
fi

# 3. The authority's key and the signed roster, made together in signing/ and renamed into
#    place. Until roster.json.new exists no node has joined, so no node trusts the authority's
#    key yet, and both may be made again.
if [ ! -f "$AUTHORITY/roster.json.new" ]; then
    rm -rf "$AUTHORITY/signing"
    mkdir -m 700 "$AUTHORITY/signing"
    hrx consortium roster --authority-key "$AUTHORITY/signing/authority.pem" --quorum 2 \
        --consortium "$CONSORTIUM" --members-info "$HERE/members-info.json" \
        --out "$AUTHORITY/signing/roster.json" \
        "$ROOT/hosp-a/enrollment.json" "$ROOT/hosp-b/enrollment.json" "$ROOT/hosp-c/enrollment.json"
    mv "$AUTHORITY/signing/authority.pem" "$AUTHORITY/authority.pem"
    mv "$AUTHORITY/signing/roster.json" "$AUTHORITY/roster.json.new"
    rmdir "$AUTHORITY/signing"
fi

# 4. The joins. A node has joined when its ledger holds this roster (its export has the
#    roster file's line). Its copy of the secret is put in place before it joins, so a join
#    cut short after storing the roster leaves nothing undone.
for id in $NODES; do
    if hrx ledger export --dir "$ROOT/$id" | grep -qxF -f "$AUTHORITY/roster.json.new"; then
        continue
    fi
    secret="$ROOT/$id/keys/consortium.key"
    if [ ! -f "$secret" ]; then
        rm -f "$secret.part"
        (umask 077 && cp "$AUTHORITY/consortium.key" "$secret.part")
        mv "$secret.part" "$secret"
    fi
    hrx node join --dir "$ROOT/$id" --roster "$AUTHORITY/roster.json.new" \
        --secret "$secret" --authority "$AUTHORITY/authority.pem"
done
mv "$AUTHORITY/roster.json.new" "$AUTHORITY/roster.json"
echo "bootstrap: three nodes joined $CONSORTIUM"
