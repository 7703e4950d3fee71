#!/usr/bin/env sh
# The system packages the tests need beyond Python's: Debian's chromium (the portal's browser
# tests drive it with Playwright), Orthanc with its DICOMweb plugin (the PACS the DICOMweb
# adapter's tests sync from), docker-compose (it validates the compose files under deploy/; no
# Docker engine is needed or used), nginx (the TLS proxy example is run for real) and systemd's
# systemd-analyze (it checks the units under deploy/systemd/), and a C compiler with OpenSSL's
# headers (the verifier's compiled part, ledger/_speedups.c, which its tests hold to the Python
# path, is built by `pip install`). Installs only what is missing;
# needs root (or sudo). Also SMART Fetch, an independent FHIR Bulk Data client the export tests
# run, into a virtual environment of its own (its dependencies are not hrx's).
set -eu
clients="${XDG_CACHE_HOME:-$HOME/.cache}/hrx-test-clients"
if [ ! -x "$clients/smart-fetch/bin/smart-fetch" ]; then
    echo "installing smart-fetch into $clients/smart-fetch"
    python3 -m venv "$clients/smart-fetch"
    "$clients/smart-fetch/bin/pip" install --quiet --disable-pip-version-check \
        'smart-fetch>=1.0,<2' 2>"$clients/install.log" || {
        cat "$clients/install.log"
        exit 1
    }
fi
missing=""
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
[ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v docker-compose >/dev/null 2>&1 || missing="$missing docker-compose"
[ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v systemd-analyze >/dev/null 2>&1 || missing="$missing systemd"
command -v gcc >/dev/null 2>&1 || missing="$missing gcc"
[ -e /usr/include/openssl/sha.h ] || missing="$missing libssl-dev"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
echo "installing Debian packages:$missing"
# shellcheck disable=SC2086
$SUDO apt-get install -y -q $missing >/dev/null || {
    $SUDO apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q $missing >/dev/null
}
