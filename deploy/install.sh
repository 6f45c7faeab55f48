#!/usr/bin/env bash
# Install riklet as a systemd service (what `make install-system` runs); idempotent.
#
#   deploy/install.sh [--prefix /opt/riklet] [--root DIR] [--python python3] [--wheel FILE]
#   deploy/install.sh --uninstall [--prefix /opt/riklet] [--root DIR]
#
# Installs:
#   PREFIX/venv/                       a virtualenv holding riklet from its wheel: --wheel FILE
#                                      (`make dist` makes one), else one built from this checkout
#                                      (pip wheel; the build hook generates the gRPC code and
#                                      compiles the shim into it)
#   PREFIX/supervisord.conf            a copy of the one in the wheel (which `riklet run` uses by
#                                      default), for `supervisorctl -c PREFIX/supervisord.conf`
#   PREFIX/README.md
#   /etc/riklet/riklet.yaml            deploy/riklet.yaml (every key commented), only when absent
#   /etc/systemd/system/riklet.service deploy/riklet.service, pointing into PREFIX
#   /usr/local/bin/riklet, rikletctl   wrappers giving the service's environment (RIKLET_RUN_DIR,
#                                      RIKLET_STATE_DIR, RIKLET_CONFIG), so that `riklet config
#                                      show` and rikletctl see what the service sees
# and runs `systemctl daemon-reload` when systemd is running.
#
# --root DIR prefixes every destination (a staged install: tests, image builds); the files still
# name the final paths (/opt/riklet, /etc/riklet...), and nothing outside DIR is touched.
# --uninstall removes the unit, the wrappers and PREFIX (stopping the service first); it keeps
# /etc/riklet and /var/lib/riklet. Workloads keep running: delete the pods first if you want
# them gone.

set -euo pipefail

PREFIX=/opt/riklet
ROOT=
PYTHON=python3
UNINSTALL=0
WHEEL=
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MARKER="installed by riklet's deploy/install.sh"

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#*=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$2; shift 2 ;;
        --wheel=*) WHEEL=${1#*=}; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        -h|--help) usage 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path, got '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
[ -n "$PREFIX" ] || die "--prefix must not be /"
case "$PREFIX" in *[[:space:]\|\&]*) die "--prefix must not hold spaces, '|' or '&'" ;; esac
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
fi
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    die "run as root (or give --root DIR for a staged install)"
fi

DEST=$ROOT$PREFIX
VENV=$DEST/venv
ETC=$ROOT/etc/riklet
UNIT=$ROOT/etc/systemd/system/riklet.service
BIN=$ROOT/usr/local/bin
# systemctl only on the real root, and only when systemd runs (not in containers, chroots, CI).
SYSTEMD=0
if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    SYSTEMD=1
fi

# A wrapper we wrote (or nothing) may be replaced or removed; another program's file never is.
ours() { [ ! -e "$1" ] && [ ! -L "$1" ] || grep -qs "$MARKER" "$1"; }

uninstall() {
    # Only a directory this script made: never rm -rf a prefix that merely exists.
    if [ -e "$DEST" ] && [ ! -e "$DEST/.riklet-install" ]; then
        die "$DEST was not made by install.sh (no .riklet-install): nothing removed"
    fi
    if [ "$SYSTEMD" = 1 ] && [ -e "$UNIT" ]; then
        say "stopping and disabling riklet.service"
        systemctl disable --now riklet.service || true
    fi
    rm -f "$UNIT"
    [ "$SYSTEMD" = 0 ] || systemctl daemon-reload
    for name in riklet rikletctl; do
        if [ -e "$BIN/$name" ] && ours "$BIN/$name"; then rm -f "$BIN/$name"; fi
    done
    rm -rf "$DEST"
    say "removed riklet.service and $DEST; kept $ROOT/etc/riklet and $ROOT/var/lib/riklet"
    say "workloads started by the agent keep running; delete them with rikletctl before uninstalling if you want them gone"
}

if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi

# 1. The virtualenv (kept across runs; pip upgrades riklet in it).
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (--python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); riklet needs 3.11 or later"
if [ -e "$DEST" ] && [ ! -e "$DEST/.riklet-install" ] && [ -n "$(ls -A "$DEST")" ]; then
    die "$DEST exists, is not empty and was not made by install.sh: pick another --prefix"
fi
mkdir -p "$DEST"
echo "$MARKER; --prefix $PREFIX" > "$DEST/.riklet-install"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# 2. The wheel: the one given, or one built from a clean copy of the checkout (no build/ nor
# egg-info left in the checkout, none of its generated files taken). Its build hook generates
# the gRPC code (and containerd's API stubs when their .proto files are found: the system's Go
# tree, or the one the checkout's `make containerd-api` unpacked) and compiles the shim (gcc,
# libc6-dev).
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
if [ -z "$WHEEL" ]; then
    mkdir "$STAGE/src" "$STAGE/dist"
    cp -R "$SRC/pyproject.toml" "$SRC/setup.py" "$SRC/MANIFEST.in" "$SRC/README.md" "$SRC/LICENSE" \
        "$SRC/supervisord.conf" "$SRC/deploy" "$SRC/common" "$SRC/services" "$SRC/cli" "$STAGE/src/"
    find "$STAGE/src" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$STAGE"/src/common/pb/*_pb2*.py* "$STAGE/src/common/pb/ctrd" "$STAGE/src/common/INSTALLED" \
        "$STAGE/src/services/manager/process/riklet-shim"
    if [ -z "${RIKLET_CONTAINERD_API:-}" ] && [ -d "$SRC/.cache/containerd-api/usr/share/gocode/src" ]; then
        export RIKLET_CONTAINERD_API="$SRC/.cache/containerd-api/usr/share/gocode/src"
    fi
    say "building riklet's wheel (pip wheel)"
    "$VENV/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$STAGE/dist" "$STAGE/src"
    WHEEL=$(ls "$STAGE"/dist/riklet-*.whl)
fi
[ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
say "installing $(basename "$WHEEL") into $VENV (pip)"
# --force-reinstall --no-deps first: a rebuilt wheel of the same version replaces the old one.
"$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$WHEEL"
"$VENV/bin/python" -m pip install --quiet "$WHEEL"

# 3. What the wheel carries. -I: import the installed riklet, never a checkout in the current
# directory.
if ! "$VENV/bin/python" -I -c 'import common.pb.containerd as c, sys; sys.exit(not c.available())'; then
    say "note: this wheel has no containerd API stubs (build it after 'make containerd-api' in the" \
        "checkout); process pods work, pods with an image fail until then"
fi

# 4. supervisord.conf: a copy of the wheel's (`riklet run` reads that one by default).
CONF=$("$VENV/bin/python" -I -c 'from services import launcher; print(launcher.PACKAGED_CONF)')
sed -e "1i ; $MARKER: a copy of the package's services/supervisord.conf (what riklet run uses by default)." \
    "$CONF" > "$DEST/supervisord.conf.new"
mv -f "$DEST/supervisord.conf.new" "$DEST/supervisord.conf"
cp "$SRC/README.md" "$DEST/README.md"

# 5. The configuration file: an operator's file is never overwritten.
mkdir -p "$ETC"
if [ -e "$ETC/riklet.yaml" ]; then
    say "kept $ETC/riklet.yaml"
else
    install -m 0644 "$SRC/deploy/riklet.yaml" "$ETC/riklet.yaml"
    say "installed $ETC/riklet.yaml (every setting commented out)"
fi

# 6. The unit, pointing into PREFIX.
mkdir -p "$(dirname "$UNIT")"
sed "s|/opt/riklet|$PREFIX|g" "$SRC/deploy/riklet.service" > "$UNIT.new"
chmod 0644 "$UNIT.new"
mv -f "$UNIT.new" "$UNIT"

# 7. Wrappers on PATH with the service's environment.
mkdir -p "$BIN"
for name in riklet rikletctl; do
    if ! ours "$BIN/$name"; then
        say "note: $BIN/$name exists and is not ours: left alone (use $PREFIX/venv/bin/$name)"
        continue
    fi
    cat > "$BIN/$name.new" <<EOF
#!/bin/sh
# $MARKER: $name with riklet.service's environment.
: "\${RIKLET_RUN_DIR:=/run/riklet}" "\${RIKLET_STATE_DIR:=/var/lib/riklet}" "\${RIKLET_CONFIG:=/etc/riklet/riklet.yaml}"
export RIKLET_RUN_DIR RIKLET_STATE_DIR RIKLET_CONFIG
exec $PREFIX/venv/bin/$name "\$@"
EOF
    chmod 0755 "$BIN/$name.new"
    mv -f "$BIN/$name.new" "$BIN/$name"
done

# 8. A staged install: the venv's scripts name the final path, not the staging one.
if [ -n "$ROOT" ]; then
    grep -rlI --null -F "$DEST/venv" "$VENV/bin" | xargs -0 -r sed -i "s|$DEST/venv|$PREFIX/venv|g"
fi

if [ "$SYSTEMD" = 1 ]; then
    systemctl daemon-reload
fi

say "done: riklet in $DEST, unit $UNIT, configuration $ETC/riklet.yaml"
if [ -n "$ROOT" ]; then
    say "staged under $ROOT: nothing outside it was touched (no systemctl)"
elif [ "$SYSTEMD" = 1 ]; then
    echo
    echo "Next:"
    echo "  systemctl enable --now riklet"
    echo "  systemctl status riklet"
    echo "  journalctl -u riklet -f"
    echo "  riklet config show"
else
    say "systemd is not running here: no daemon-reload. Where it runs: systemctl daemon-reload &&" \
        "systemctl enable --now riklet"
fi
