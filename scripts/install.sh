#!/usr/bin/env bash
# Set up epipe-trace on Debian 12+/Ubuntu 22.04+: distro bcc + bpftool, a venv
# that sees the system bcc, the project in it, `epipe-trace` on root's PATH.
# Idempotent: a second run checks and changes nothing.
set -euo pipefail

PREFIX=${EPIPE_TRACE_PREFIX:-/opt/epipe-trace}
VENV="$PREFIX/venv"
BIN_LINK=/usr/local/bin/epipe-trace
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_PKGS=(python3-bpfcc bpftool python3-venv python3-pip)

say() { printf 'install: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "install: run as root (sudo scripts/install.sh): it installs packages and $BIN_LINK" >&2
    exit 2
fi
if ! command -v apt-get >/dev/null; then
    echo "install: this script supports Debian/Ubuntu (apt-get); install bcc's python3 bindings and bpftool by hand" >&2
    exit 2
fi

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Ubuntu ships bpftool in linux-tools; accept any bpftool on PATH
if [[ " ${missing[*]-} " == *" bpftool "* ]] && command -v bpftool >/dev/null; then
    missing=("${missing[@]/bpftool}")
fi
missing=(${missing[@]+"${missing[@]}"})
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "system packages present"
fi

# bcc is installed for the distribution's python3: the venv must use that one
SYS_PY=/usr/bin/python3
"$SYS_PY" -c 'import bcc' 2>/dev/null || { echo "install: $SYS_PY cannot import bcc after installing python3-bpfcc" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV (with system site-packages, for bcc)"
    mkdir -p "$PREFIX"
    "$SYS_PY" -m venv --system-site-packages "$VENV"
fi

# reinstall only when the source changed
stamp="$VENV/.epipe-trace-source"
hash=$(cd "$SRC" && find tracer bpf pyproject.toml -type f \( -name '*.py' -o -name '*.c' -o -name '*.h' -o -name '*.toml' \) -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ] || ! "$VENV/bin/python" -c 'import tracer, click, tabulate, pytest' 2>/dev/null; then
    say "installing epipe-trace and its Python dependencies into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$SRC[test]"
    echo "$hash" > "$stamp"
else
    say "epipe-trace in $VENV is up to date"
fi

if [ "$(readlink -f "$BIN_LINK" 2>/dev/null)" != "$VENV/bin/epipe-trace" ]; then
    ln -sf "$VENV/bin/epipe-trace" "$BIN_LINK"
    say "linked $BIN_LINK"
fi
say "done: run 'sudo epipe-trace doctor'"
