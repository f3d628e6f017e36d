#!/bin/sh
# Install mreaper as a systemd service: a virtualenv in PREFIX (default /opt/mreaper),
# the unit and its slice in /etc/systemd/system (ExecStart= pointing into PREFIX), and a
# default /etc/mreaper/mreaper.toml (root-owned, 0644) unless one exists.  See
# docs/systemd.md.
#
#   contrib/install.sh [--prefix DIR] [--python PYTHON] [--wheel FILE] [--unit-dir DIR]
#                      [--conf-dir DIR] [--no-enable] [--no-start]
#   contrib/install.sh --uninstall [--prefix DIR] [--unit-dir DIR]
#
# --wheel installs a built wheel with no index (offline); otherwise pip builds this
# source tree (which fetches hatchling from the package index).  Idempotent: run it
# again to upgrade; an existing configuration is kept and only checked.
# PREFIX is the installer's own: it must be new or empty (or an earlier install), and
# it is marked as created by install.sh; --uninstall removes only a marked PREFIX.
set -eu

PREFIX=/opt/mreaper
PYTHON=python3
WHEEL=
UNIT_DIR=/etc/systemd/system
CONF_DIR=/etc/mreaper
ENABLE=1
START=1
UNINSTALL=0
MARKER_NAME=.created-by-mreaper-install.sh
SRC=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
    --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
    --unit-dir) UNIT_DIR=${2:?--unit-dir needs a directory}; shift 2 ;;
    --conf-dir) CONF_DIR=${2:?--conf-dir needs a directory}; shift 2 ;;
    --no-enable) ENABLE=0; shift ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (it writes $PREFIX, $UNIT_DIR and $CONF_DIR)"
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path: $PREFIX" ;; esac
PREFIX=${PREFIX%/}   # "/opt/mreaper/" and "/opt/mreaper" are one prefix; "/" becomes ""
[ -n "$PREFIX" ] || die "--prefix /: the root directory is never a prefix"
MARKER="$PREFIX/$MARKER_NAME"
have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; }
# The marker says install.sh created PREFIX: a regular file (not a symlink someone put
# there to point elsewhere) in a real directory.
marked() { [ -d "$PREFIX" ] && [ ! -L "$PREFIX" ] && [ -f "$MARKER" ] && [ ! -L "$MARKER" ]; }

if [ "$UNINSTALL" = 1 ]; then
  # Never rm -rf a directory install.sh did not create: `--prefix /usr/local` must not
  # wipe /usr/local.
  marked || die "refusing to remove $PREFIX: it has no $MARKER_NAME, so install.sh did not create it (nothing was removed)"
  if have_systemd; then
    systemctl disable --now mreaper.service 2>/dev/null || true
  fi
  # the unit only if it is this install's (ExecStart= into PREFIX), else another's
  if grep -qxF "ExecStart=$PREFIX/bin/mreaper run" "$UNIT_DIR/mreaper.service" 2>/dev/null; then
    rm -f "$UNIT_DIR/mreaper.service" "$UNIT_DIR/mreaper.slice"
    say "removed $UNIT_DIR/mreaper.service and mreaper.slice"
  else
    say "kept $UNIT_DIR/mreaper.service: it does not run $PREFIX/bin/mreaper"
  fi
  have_systemd && systemctl daemon-reload
  rm -rf "$PREFIX"
  say "removed $PREFIX; $CONF_DIR is kept"
  exit 0
fi

# Root runs what PREFIX holds (ExecStart=), so PREFIX and every directory above it must
# be root's and writable by no one else: another user who could write there could swap
# the files, or the directory itself.  A sticky directory above it (/tmp) is fine: others
# cannot rename or remove what root made in it.
check_root_only() {
  dir=$PREFIX
  while [ -n "$dir" ]; do
    if [ -e "$dir" ]; then
      # shellcheck disable=SC2046
      set -- $(stat -L -c '%u %a' "$dir")
      perm=$(( 0$2 ))
      [ "$1" = 0 ] || die "refusing $PREFIX: $dir is owned by uid $1, not root (root would run what another user can replace)"
      if [ $(( perm & 0022 )) -ne 0 ] && { [ "$dir" = "$PREFIX" ] || [ $(( perm & 01000 )) -eq 0 ]; }; then
        die "refusing $PREFIX: $dir is writable by group or others (mode $2; root would run what another user can replace)"
      fi
    fi
    [ "$dir" = / ] && break
    dir=$(dirname "$dir")
  done
}

# 1. the virtualenv and the package, in a PREFIX install.sh creates (or created before)
check_root_only
if [ -e "$PREFIX" ] || [ -L "$PREFIX" ]; then
  if ! marked; then
    [ -d "$PREFIX" ] && [ ! -L "$PREFIX" ] || die "$PREFIX exists and is not a directory"
    if [ -n "$(ls -A "$PREFIX")" ]; then
      # an install from before the marker: a venv with our command and nothing else
      extra=$(ls -A "$PREFIX" | grep -vxE 'bin|include|lib|lib64|share|pyvenv.cfg' || true)
      if [ -n "$extra" ] || [ ! -f "$PREFIX/pyvenv.cfg" ] || [ ! -x "$PREFIX/bin/mreaper" ]; then
        die "refusing to install into $PREFIX: it is not empty and install.sh did not create it (no $MARKER_NAME); give a new directory with --prefix"
      fi
      say "$PREFIX: an earlier install.sh venv, marked now"
    fi
  fi
else
  # mkdir, not install -d: it fails if someone made PREFIX meanwhile
  mkdir -p "$(dirname "$PREFIX")" && mkdir -m 0755 "$PREFIX" || die "cannot create $PREFIX"
  check_root_only
fi
[ -f "$MARKER" ] || echo "mreaper contrib/install.sh created this directory; 'install.sh --uninstall --prefix $PREFIX' removes it whole." > "$MARKER"
if [ ! -x "$PREFIX/bin/python" ]; then
  "$PYTHON" -m venv "$PREFIX" || die "cannot create a venv with $PYTHON (Debian: apt-get install python3-venv)"
fi
if [ -n "$WHEEL" ]; then
  [ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
  "$PREFIX/bin/pip" install --quiet --no-index --force-reinstall --no-deps "$WHEEL"
else
  "$PREFIX/bin/pip" install --quiet --upgrade "$SRC"
fi
"$PREFIX/bin/mreaper" --version >/dev/null || die "$PREFIX/bin/mreaper does not run"
install -D -m 0644 "$SRC/docs/systemd.md" "$PREFIX/share/doc/mreaper/systemd.md"

# 2. the unit and its slice, with ExecStart= pointing into PREFIX
install -d -m 0755 "$UNIT_DIR"
sed -e "s|^ExecStart=.*|ExecStart=$PREFIX/bin/mreaper run|" \
    -e "s|file:///opt/mreaper/|file://$PREFIX/|" \
    "$SRC/contrib/systemd/mreaper.service" > "$UNIT_DIR/mreaper.service.tmp"
chmod 0644 "$UNIT_DIR/mreaper.service.tmp"
mv "$UNIT_DIR/mreaper.service.tmp" "$UNIT_DIR/mreaper.service"
install -m 0644 "$SRC/contrib/systemd/mreaper.slice" "$UNIT_DIR/mreaper.slice"
say "unit: $UNIT_DIR/mreaper.service (ExecStart=$PREFIX/bin/mreaper run)"

# 3. the configuration: the built-in defaults, written out, unless one exists
install -d -m 0755 -o root -g root "$CONF_DIR"
if [ -e "$CONF_DIR/mreaper.toml" ]; then
  "$PREFIX/bin/mreaper" config --config "$CONF_DIR/mreaper.toml" >/dev/null \
    || die "$CONF_DIR/mreaper.toml is invalid (see above); fix it before starting"
  say "kept $CONF_DIR/mreaper.toml (valid)"
else
  tmp="$CONF_DIR/.mreaper.toml.tmp"
  empty="$CONF_DIR/.empty.toml.tmp"
  : > "$empty"  # an empty configuration: the built-in defaults (root's, not writable by others)
  chmod 0600 "$empty"
  {
    echo "# mreaper configuration, written by contrib/install.sh.  Every value below is the"
    echo "# built-in default, commented out so that it follows the installed version: uncomment"
    echo "# and edit a line to change it, then: systemctl reload mreaper.  Check a change with"
    echo "#   $PREFIX/bin/mreaper config --config $CONF_DIR/mreaper.toml"
    echo "# Rules: [[rule]] tables, see docs/systemd.md and README.md."
    "$PREFIX/bin/mreaper" config --config "$empty" \
      | sed -e '/^# effective configuration/d' -e 's/^\([a-z_]* = \)/# \1/'
  } > "$tmp"
  rm -f "$empty"
  chown root:root "$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$CONF_DIR/mreaper.toml"
  say "wrote $CONF_DIR/mreaper.toml (the built-in defaults)"
fi

# 4. systemd
if have_systemd; then
  systemctl daemon-reload
  if command -v systemd-analyze >/dev/null 2>&1; then
    systemd-analyze verify "$UNIT_DIR/mreaper.service" || die "systemd-analyze verify failed"
  fi
  [ "$ENABLE" = 1 ] && systemctl enable mreaper.service
  if [ "$START" = 1 ]; then
    systemctl restart mreaper.service
    systemctl --no-pager status mreaper.service | head -n 5 || true
  fi
else
  say "systemd is not running here: unit installed, not enabled or started"
fi
