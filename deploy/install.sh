#!/bin/sh
# deploy/install.sh: install one meerkat role on this machine (docs/DEPLOY.md walks through it).
#
#   sudo deploy/install.sh broker      --bundle fleet-pilot/broker            # on the broker host
#   sudo deploy/install.sh coordinator --bundle fleet-pilot/coordinator       # on the coordinator host
#   sudo deploy/install.sh client      --bundle fleet-pilot/devices/jetson-01 # on each device
#
# broker:      OUT/broker -> /etc/mosquitto/meerkat, owned root:mosquitto, secrets 0640 (Mosquitto 2 drops
#              to the mosquitto user before it reads them: a 0600 root file is a broker that will not start),
#              store/ owned by mosquitto; prints the include line for /etc/mosquitto/conf.d.
# coordinator: venv in PREFIX (default /opt/meerkat), user meerkat, /etc/meerkat (root:meerkat 0750, files
#              0640), /var/lib/meerkat/coordinator (meerkat 0750), the systemd unit (not enabled).
# client:      the same with /var/lib/meerkat/client and meerkat-client.service.
#
# torch: when the venv can already import torch (a Jetson / CUDA box: create PREFIX/.venv and install your
# platform's torch first) it is kept; only when no torch is importable is the CPU torch (TORCH_SPEC,
# TORCH_PIP_ARGS) installed, and the script says which happened. Re-running is safe: files are replaced,
# existing users, venvs, state and a config you already edited (model_dir/mask/data) are kept.
# It refuses (exit 2) a venv whose Python the service user cannot run (e.g. one built from a pyenv Python
# under /root): the message names the interpreter and the fix (PYTHON=/usr/bin/python3).
#
# Options (each also an environment variable):
#   --prefix DIR      MEERKAT_PREFIX   install location (default /opt/meerkat; venv in DIR/.venv)
#   --bundle DIR      MEERKAT_BUNDLE   the provisioned directory for this role (`meerkat provision`)
#   --user NAME       MEERKAT_USER     service user (default meerkat; created when missing and running as root)
#   --no-useradd      MEERKAT_NO_USERADD=1   never create users (the user must exist)
#   --root DIR        MEERKAT_ROOT     install under DIR instead of / and rewrite the paths in the units and
#                                      configs to match (a self-contained tree: tests, trying it out)
#   --reuse-venv DIR  MEERKAT_REUSE_VENV   no pip: PREFIX/.venv becomes a link to this existing venv (tests)
#   --force-config    MEERKAT_FORCE_CONFIG=1  overwrite an installed client.toml / coordinator.toml too
set -eu

ROLE=""
PREFIX=${MEERKAT_PREFIX:-/opt/meerkat}
BUNDLE=${MEERKAT_BUNDLE:-}
SVC_USER=${MEERKAT_USER:-meerkat}
NO_USERADD=${MEERKAT_NO_USERADD:-0}
ROOT=${MEERKAT_ROOT:-}
REUSE_VENV=${MEERKAT_REUSE_VENV:-}
FORCE_CONFIG=${MEERKAT_FORCE_CONFIG:-0}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        broker|coordinator|client) [ -z "$ROLE" ] || die "one role per run (got $ROLE and $1)"; ROLE=$1 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --bundle) BUNDLE=${2:?--bundle needs a directory}; shift ;;
        --user) SVC_USER=${2:?--user needs a name}; shift ;;
        --no-useradd) NO_USERADD=1 ;;
        --root) ROOT=${2:?--root needs a directory}; shift ;;
        --reuse-venv) REUSE_VENV=${2:?--reuse-venv needs a directory}; shift ;;
        --force-config) FORCE_CONFIG=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (roles: broker, coordinator, client; --help)" ;;
    esac
    shift
done
[ -n "$ROLE" ] || die "which role? broker, coordinator or client (--help)"
[ -n "$BUNDLE" ] || die "--bundle: the provisioned directory for '$ROLE' is required (meerkat provision --out OUT)"
[ -d "$BUNDLE" ] || die "--bundle $BUNDLE: no such directory"
ROOT=${ROOT%/}
if [ -n "$ROOT" ]; then mkdir -p "$ROOT"; ROOT=$(cd "$ROOT" && pwd); fi

ETC=$ROOT/etc/meerkat
VARLIB=$ROOT/var/lib/meerkat
UNITDIR=$ROOT/etc/systemd/system
VENV=$ROOT$PREFIX/.venv
IS_ROOT=0; [ "$(id -u)" = 0 ] && IS_ROOT=1

# paths as the installed files must name them: unchanged on a real install, under ROOT otherwise
rewrite() {
    sed -e "s#/opt/meerkat/#$ROOT$PREFIX/#g" -e "s#/etc/meerkat/#$ROOT/etc/meerkat/#g" \
        -e "s#/etc/meerkat\"#$ROOT/etc/meerkat\"#g" -e "s#/var/lib/meerkat/#$ROOT/var/lib/meerkat/#g" \
        -e "s#=/var/lib/meerkat\$#=$ROOT/var/lib/meerkat#" "$1"
}

ensure_user() {  # $1 user, $2 home
    if id "$1" >/dev/null 2>&1; then return 0; fi
    [ "$NO_USERADD" = 1 ] && die "user $1 does not exist (and --no-useradd was given)"
    [ "$IS_ROOT" = 1 ] || die "user $1 does not exist; run as root to create it, or pass --user $(id -un) --no-useradd"
    useradd --system --home-dir "$2" --no-create-home --shell /usr/sbin/nologin "$1"
    say "created system user $1"
}

# chown only as root; a non-root test install keeps the caller as owner (the modes are still set)
own() {  # $1 owner:group, rest paths
    o=$1; shift
    if [ "$IS_ROOT" = 1 ]; then chown "$o" "$@"; fi
}

install_broker() {
    dest=$ROOT/etc/mosquitto/meerkat
    for f in mosquitto.conf passwd acl ca.crt server.crt server.key crl.pem; do
        [ -f "$BUNDLE/$f" ] || die "--bundle $BUNDLE has no $f: give OUT/broker from meerkat provision"
    done
    group=mosquitto
    if ! getent group "$group" >/dev/null 2>&1; then
        [ "$IS_ROOT" = 1 ] && die "group mosquitto missing: install Mosquitto 2.x first (apt-get install mosquitto)"
        group=$(id -gn)
    fi
    mkdir -p "$dest/store"
    chmod 0750 "$dest"; own "root:$group" "$dest"
    chmod 0700 "$dest/store"; own "$group:$group" "$dest/store"
    named=$(sed -n 's#^password_file \(.*\)/passwd$#\1#p' "$BUNDLE/mosquitto.conf")
    [ -n "$named" ] || die "$BUNDLE/mosquitto.conf has no password_file line: not from meerkat provision?"
    # the conf names its files by fleet.toml's broker_dir: point them at where they are installed
    sed "s#$named/#$dest/#g" "$BUNDLE/mosquitto.conf" > "$dest/mosquitto.conf.new"
    chmod 0644 "$dest/mosquitto.conf.new" && mv -f "$dest/mosquitto.conf.new" "$dest/mosquitto.conf"
    for f in acl ca.crt server.crt crl.pem; do
        install -m 0644 "$BUNDLE/$f" "$dest/$f.new" && mv -f "$dest/$f.new" "$dest/$f"
    done
    for f in passwd server.key; do  # secrets: readable by the broker's group, nobody else
        install -m 0640 "$BUNDLE/$f" "$dest/$f.new" && mv -f "$dest/$f.new" "$dest/$f"
    done
    for f in mosquitto.conf acl ca.crt server.crt crl.pem passwd server.key; do own "root:$group" "$dest/$f"; done
    say "broker files in $dest (root:$group, secrets 0640, store/ $group 0700)"
    # Debian's mosquitto.service runs /etc/mosquitto/mosquitto.conf: a drop-in points it at the fleet's conf
    dropin=$ROOT/etc/systemd/system/mosquitto.service.d
    mkdir -p "$dropin"
    printf '[Service]\nExecStart=\nExecStart=/usr/sbin/mosquitto -c %s/mosquitto.conf\n' "$dest" > "$dropin/meerkat.conf"
    say "mosquitto.service now runs $dest/mosquitto.conf ($dropin/meerkat.conf): systemctl daemon-reload && systemctl restart mosquitto"
}

install_venv() {
    mkdir -p "$ROOT$PREFIX/docs" && cp "$SRC"/docs/*.md "$ROOT$PREFIX/docs/"
    if [ -n "$REUSE_VENV" ]; then
        [ -x "$REUSE_VENV/bin/meerkat" ] || die "--reuse-venv $REUSE_VENV has no bin/meerkat"
        if [ -e "$VENV" ] && [ ! -L "$VENV" ]; then die "$VENV is a real venv: --reuse-venv would replace it"; fi
        rm -f "$VENV"; ln -s "$(cd "$REUSE_VENV" && pwd)" "$VENV"
        say "reusing the environment $REUSE_VENV (no pip)"
        return 0
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        say "keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') (already importable in $VENV)"
    else
        say "no torch importable in $VENV: installing the CPU torch ($TORCH_SPEC $TORCH_PIP_ARGS)"
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q $TORCH_PIP_ARGS "$TORCH_SPEC"
    fi
    "$VENV/bin/python" -m pip install -q "$SRC"
    say "meerkat $("$VENV/bin/meerkat" --version) in $VENV"
}

memory_max() {  # $1 client.toml -> MemoryMax: memory_budget_gib (default 4.0) + 2 GiB, in MiB
    budget=$(awk -F= '/^[ \t]*memory_budget_gib[ \t]*=/ { v = $2; sub(/#.*/, "", v); gsub(/[ \t"]/, "", v); print v; exit }' "$1" 2>/dev/null)
    awk -v b="${budget:-4.0}" 'BEGIN { if (b + 0 <= 0) b = 4.0; printf "%dM\n", (b + 2) * 1024 }'
}

# The service runs $VENV/bin/python as $SVC_USER: a venv built from an interpreter under root's home (pyenv,
# a conda in /root) installs fine and fails at every start with "Permission denied". Run it as that user now.
check_python_for_user() {  # $1 user
    venv_real=$(cd -P "$VENV" && pwd)
    py=$venv_real/bin/python
    base=$(readlink -f "$py")
    if [ "$(id -un)" = "$1" ]; then
        as_user=""
    elif [ "$IS_ROOT" = 1 ] && command -v runuser >/dev/null 2>&1; then
        as_user="runuser -u $1 --"
    elif [ "$IS_ROOT" = 1 ] && command -v setpriv >/dev/null 2>&1; then
        as_user="setpriv --reuid=$1 --regid=$(id -g "$1") --init-groups"
    else
        say "WARNING: cannot switch to user $1 to check that it can run $py (not root, or no runuser/setpriv)"
        return 0
    fi
    # sh execs the interpreter after the switch: setpriv itself may still look the path up with root's rights
    # shellcheck disable=SC2086,SC2016
    if ! (cd / && $as_user sh -c 'exec "$0" -c "import shared"' "$py") >/dev/null 2>&1; then
        die "the service user $1 cannot run $py (the interpreter is $base) or import meerkat with it: make the" \
            "venv from a Python every user can execute, e.g. rm -rf $VENV && PYTHON=/usr/bin/python3 $0 ..." \
            "(or chmod o+rx the directories above $base)"
    fi
    say "user $1 can run $py (interpreter $base)"
}

install_service() {  # $1 coordinator|client
    role=$1
    if [ "$role" = coordinator ]; then toml=coordinator.toml; else toml=client.toml; fi
    [ -f "$BUNDLE/$toml" ] || die "--bundle $BUNDLE has no $toml: give OUT/$([ "$role" = client ] && echo devices/ID || echo coordinator)"
    ensure_user "$SVC_USER" /var/lib/meerkat
    group=$(id -gn "$SVC_USER")
    install_venv
    check_python_for_user "$SVC_USER"
    mkdir -p "$ETC" "$VARLIB/$role" "$UNITDIR"
    chmod 0750 "$ETC"; own "root:$group" "$ETC"
    chmod 0755 "$VARLIB"
    chmod 0750 "$VARLIB/$role"; own "$SVC_USER:$group" "$VARLIB/$role"
    for f in "$BUNDLE"/*; do
        name=$(basename "$f")
        [ -f "$f" ] || continue
        if [ "$name" = "$toml" ] && [ -f "$ETC/$name" ] && [ "$FORCE_CONFIG" != 1 ]; then
            say "keeping $ETC/$name (edited already? --force-config replaces it)"
            continue
        fi
        case "$name" in
            *.toml) rewrite "$f" > "$ETC/$name.new" ;;
            *) cp "$f" "$ETC/$name.new" ;;
        esac
        chmod 0640 "$ETC/$name.new"; own "root:$group" "$ETC/$name.new"
        mv -f "$ETC/$name.new" "$ETC/$name"
    done
    unit=meerkat-$role.service
    memmax=$(memory_max "$ETC/$toml")
    rewrite "$SRC/deploy/$unit" | sed -e "s/^User=meerkat\$/User=$SVC_USER/" -e "s/^Group=meerkat\$/Group=$group/" \
        -e "s/^MemoryMax=.*/MemoryMax=$memmax/" > "$UNITDIR/$unit.new"
    chmod 0644 "$UNITDIR/$unit.new" && mv -f "$UNITDIR/$unit.new" "$UNITDIR/$unit"
    say "$role: config in $ETC (root:$group 0640), state in $VARLIB/$role ($SVC_USER 0750), unit $UNITDIR/$unit"
    say "next: fill in model_dir/mask$([ "$role" = client ] && echo /data) in $ETC/$toml, then" \
        "$ROOT$PREFIX/.venv/bin/meerkat $role --config $ETC/$toml --check, then systemctl enable --now $unit"
    if [ -z "$ROOT" ] && [ "$IS_ROOT" = 1 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
}

case "$ROLE" in
    broker) install_broker ;;
    *) install_service "$ROLE" ;;
esac
