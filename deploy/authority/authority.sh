#!/bin/sh
# The consortium authority's tooling, for its offline workstation (never a hospital's host):
# the authority's key, the pseudonym secret and the signed rosters all stay in DIR, on that
# machine (DIR on encrypted storage, backed up to a second encrypted medium kept apart).
#
#   authority.sh DIR secret
#       once for the consortium: DIR/consortium.key, the pseudonym secret (mode 0600); never
#       made again (running this again only says it is there)
#   authority.sh DIR roster --quorum Q [--consortium NAME] [--members-info FILE] ENROLLMENT...
#       the next roster version, signed: DIR/rosters/roster-vN.json (N = 1, then the newest + 1:
#       it replaces the newest, whose name it keeps unless --consortium says otherwise). The
#       first run also makes the authority's key, DIR/authority.pem (mode 0600), and its
#       public half, DIR/authority.pub.pem
#
# What goes to each hospital (docs/operations.md, "The consortium authority"):
#   rosters/roster-vN.json and authority.pub.pem   public: any channel, compare the key's
#                                                   fingerprint by phone on the first join
#   consortium.key                                  secret: on the first join only, by hand on
#                                                   an encrypted medium, never by e-mail
#   authority.pem                                   never: it stays here
#
# Needs hrx (the consortium commands) and openssl. Each file appears whole (written aside,
# then renamed), so an interrupted run is simply run again.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 DIR secret | $0 DIR roster --quorum Q [--consortium NAME] [--members-info FILE] ENROLLMENT..." >&2
    exit 2
fi
DIR=$1
ACTION=$2
shift 2
umask 077
mkdir -p "$DIR/rosters"

case "$ACTION" in
secret)
    if [ -f "$DIR/consortium.key" ]; then
        echo "$DIR/consortium.key exists: the consortium has its secret (it is never replaced)"
        exit 0
    fi
    rm -f "$DIR/consortium.key.part"
    hrx consortium secret --out "$DIR/consortium.key.part"
    mv "$DIR/consortium.key.part" "$DIR/consortium.key"
    echo "give $DIR/consortium.key to each hospital on its first join, by hand, encrypted"
    ;;
roster)
    newest=""
    newest_version=0
    for file in "$DIR"/rosters/roster-v*.json; do
        [ -f "$file" ] || continue
        number=${file##*/roster-v}
        number=${number%.json}
        if [ "$number" -gt "$newest_version" ]; then
            newest_version=$number
            newest=$file
        fi
    done
    # the key is made aside with the first roster and renamed into place whole
    rm -rf "$DIR/signing"
    mkdir "$DIR/signing"
    key="$DIR/authority.pem"
    [ -f "$key" ] || key="$DIR/signing/authority.pem"
    if [ -n "$newest" ]; then
        hrx consortium roster --authority-key "$key" --previous "$newest" \
            --out "$DIR/signing/roster.json" "$@"
    else
        hrx consortium roster --authority-key "$key" --out "$DIR/signing/roster.json" "$@"
    fi
    version=$(grep -o '"version":[0-9]*' "$DIR/signing/roster.json" | cut -d: -f2)
    if [ "$key" != "$DIR/authority.pem" ]; then
        mv "$key" "$DIR/authority.pem"
    fi
    chmod 644 "$DIR/signing/roster.json"
    mv "$DIR/signing/roster.json" "$DIR/rosters/roster-v$version.json"
    rmdir "$DIR/signing"
    if [ ! -f "$DIR/authority.pub.pem" ]; then
        openssl pkey -in "$DIR/authority.pem" -pubout -out "$DIR/authority.pub.pem.part"
        chmod 644 "$DIR/authority.pub.pem.part"
        mv "$DIR/authority.pub.pem.part" "$DIR/authority.pub.pem"
    fi
    echo "signed $DIR/rosters/roster-v$version.json; give it (and $DIR/authority.pub.pem) to every member"
    echo "fingerprint of the authority's key, to compare by phone:"
    openssl pkey -pubin -in "$DIR/authority.pub.pem" -outform DER | openssl dgst -sha256 -r | cut -c1-64
    ;;
*)
    echo "$0: no action $ACTION (secret or roster)" >&2
    exit 2
    ;;
esac
