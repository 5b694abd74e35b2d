# Shared by tools/quickstart.sh and tools/test.sh: find Python, make .venv, install
# Debian packages when missing. Sourced, not run.

repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd; }

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; raise SystemExit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "edge-agent needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# ensure_venv EXTRAS: create .venv and install the project with EXTRAS, once per change of
# pyproject.toml.
ensure_venv() {
  local extras="$1" python stamp want
  python=$(find_python) || return 1
  if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv with $python"
    "$python" -m venv .venv || {
      echo "python venv failed: on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
      return 1; }
  fi
  stamp=.venv/.edge-agent-installed
  want="$(sha256sum pyproject.toml | cut -c1-16) $extras"
  have="$(cat "$stamp" 2>/dev/null || true)"
  # The dev extra includes every other one.
  if [ "$have" != "$want" ] && [ "$have" != "${want% *} dev" ]; then
    echo "==> installing edge-agent[$extras] into .venv (first run takes a minute)"
    quiet_pip install --upgrade pip || return 1
    quiet_pip install -e ".[$extras]" || { echo "installing edge-agent[$extras] failed" >&2; return 1; }
    echo "$want" > "$stamp"
  fi
}

# quiet_pip ARGS...: pip without the noise of setuptools' deprecation banners; keeps pip's
# exit status.
quiet_pip() {
  local out status=0
  out=$(.venv/bin/python -m pip --quiet "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -vE '^WARNING: Location|BuildBackendWarning|^ *(!!|\*+)? *$|corresp|join\(|editable|Please|See https|By 20|project.license|name as your package|WheelFile' >&2 || true
  return $status
}

# apt_install PKG...: install Debian packages when we may (root, or sudo without a password).
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"
    else echo "cannot install $* (need root or passwordless sudo)" >&2; return 1; fi
  fi
  command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install $* yourself" >&2; return 1; }
  echo "==> installing Debian packages: $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null 2>&1 ||
  { $sudo apt-get update -qq >/dev/null 2>&1 &&
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
