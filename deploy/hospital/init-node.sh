#!/bin/sh
# The init service of deploy/hospital/docker-compose.yml: creates the hospital's node, once.
#
#   docker compose run --rm init --id hosp-a --name 示范区人民医院 --url https://hrx.hosp-a.example
#
# hrx node init makes the node in $HRX_NODE_DIR (keys, node.toml, the database schema,
# enrollment.json for the consortium authority) on the db service's database
# ($INIT_DATABASE_URL: its password goes to keys/database.password, not node.toml); then a
# token for Prometheus is made in keys/metrics.token (the web service's metrics.token_file).
# Running it again finishes what an earlier run left undone and changes nothing else.
set -eu

DIR="${HRX_NODE_DIR:-/srv/hrx/node}"
umask 027
if [ -s "$DIR/enrollment.json" ]; then
    echo "init: $DIR holds a node already"
elif [ -e "$DIR/node.toml" ]; then
    echo "init: $DIR holds an unfinished node (node.toml but no enrollment.json): an earlier" \
        "init was interrupted. Empty $DIR (nothing in it is in use yet) and run init again." >&2
    exit 1
else
    hrx node init --dir "$DIR" --db "$INIT_DATABASE_URL" "$@"
fi

token="$DIR/keys/metrics.token"
if [ ! -s "$token" ]; then
    (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > "$token.part")
    mv "$token.part" "$token"
    echo "init: made $token: give it to Prometheus (its credentials_file)"
fi
echo "init: next, send $DIR/enrollment.json to the consortium authority (docs/operations.md)"
