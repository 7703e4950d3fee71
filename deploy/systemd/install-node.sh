#!/bin/sh
# Set up one hrx node to run under systemd, as root, once hrx is installed in /opt/hrx
# (python3 -m venv /opt/hrx && /opt/hrx/bin/pip install 'CHECKOUT[fast-bls]'):
#
#   deploy/systemd/install-node.sh ID NAME URL DATABASE [PORT]
#   deploy/systemd/install-node.sh hosp-a 示范区人民医院 https://hrx.hosp-a.example \
#       postgresql://hrx@/hosp_a
#
# 1. the system user hrx (no login, no home of its own), if there is none;
# 2. /srv/hrx (root:hrx, 0750) and the node's directory /srv/hrx/ID (hrx:hrx, 0750);
# 3. hrx node init as hrx, so that node.toml (0640) and keys/ (0700, its keys 0600) belong to
#    hrx: the node on DATABASE (postgresql://hrx@/hosp_a reaches the local PostgreSQL over its
#    socket as the role hrx, without a password; a password in the URL goes to
#    keys/database.password, not node.toml), serving on 127.0.0.1:PORT (default 8080) at URL;
# 4. keys/metrics.token (0600, hrx), the token Prometheus sends (hrx-web@.service reads it);
# 5. the units hrx-web@, hrx-replicate@, hrx-hl7@ and hrx-pacs@ in /etc/systemd/system.
#
# Running it again finishes what an earlier run left undone and changes nothing else. It
# enables no unit: the node joins its consortium first (docs/operations.md, "Install with
# systemd").
set -eu

if [ $# -lt 4 ] || [ $# -gt 5 ]; then
    echo "usage: $0 ID NAME URL DATABASE [PORT]" >&2
    exit 2
fi
ID=$1
NAME=$2
URL=$3
DATABASE=$4
PORT=${5:-8080}
HRX=/opt/hrx/bin/hrx
DIR=/srv/hrx/$ID
HERE=$(dirname "$0")

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: run as root (it creates a user and hands it its directory)" >&2
    exit 1
fi
if [ ! -x "$HRX" ]; then
    echo "$0: $HRX is missing: install hrx in /opt/hrx first" >&2
    exit 1
fi

# 1. the user
if ! getent passwd hrx >/dev/null; then
    useradd --system --user-group --home-dir /srv/hrx --no-create-home \
        --shell /usr/sbin/nologin --comment "hrx node" hrx
fi

# 2. the directories
install -d -o root -g hrx -m 0750 /srv/hrx
install -d -o hrx -g hrx -m 0750 "$DIR"

# 3. the node, made by its user
umask 027
if [ -s "$DIR/enrollment.json" ]; then
    echo "$DIR holds a node already"
elif [ -e "$DIR/node.toml" ]; then
    echo "$0: $DIR holds an unfinished node (node.toml but no enrollment.json): an earlier" \
        "init was interrupted. Empty $DIR (nothing in it is in use yet) and run this again." >&2
    exit 1
else
    runuser -u hrx -- "$HRX" node init --dir "$DIR" --id "$ID" --name "$NAME" --url "$URL" \
        --port "$PORT" --db "$DATABASE"
fi

# 4. the scrape token
if [ ! -s "$DIR/keys/metrics.token" ]; then
    runuser -u hrx -- sh -c 'umask 077 && "$1" -c "import secrets; print(secrets.token_urlsafe(32))" > "$2.part" && mv "$2.part" "$2"' \
        sh /opt/hrx/bin/python3 "$DIR/keys/metrics.token"
fi

# 5. the units
for unit in hrx-web@.service hrx-replicate@.service hrx-hl7@.service hrx-pacs@.service; do
    install -m 0644 "$HERE/$unit" "/etc/systemd/system/$unit"
done
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi

echo "node $ID set up in $DIR, owned by hrx. Next (docs/operations.md):"
echo "  send $DIR/enrollment.json to the consortium authority; with what it gives back:"
echo "  install -o hrx -g hrx -m 0600 consortium.key $DIR/keys/consortium.key"
echo "  install -o hrx -g hrx -m 0644 -t $DIR roster-v1.json authority.pub.pem"
echo "  runuser -u hrx -- $HRX node join --dir $DIR --roster $DIR/roster-v1.json \\"
echo "      --secret $DIR/keys/consortium.key --authority $DIR/authority.pub.pem"
echo "  systemctl enable --now hrx-web@$ID hrx-replicate@$ID"
