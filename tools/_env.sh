# Shared by tools/quickstart.sh and tools/test.sh: find Python, make .venv (rebuilt when
# broken), get mosquitto: from apt when we may (root or passwordless sudo), else Debian's
# packages unpacked into .venv/debian without root. Sourced, not run.

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

# may_apt: true when apt-get install can run here (root, or sudo without a password).
may_apt() {
  command -v apt-get >/dev/null 2>&1 || return 1
  [ "$(id -u)" -eq 0 ] && return 0
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null
}

# apt_install PKG...: install Debian packages when we may (root, or sudo without a password).
apt_install() {
  local sudo=""
  if ! may_apt; then
    echo "cannot install $* (needs apt-get and root or passwordless sudo)" >&2; return 1
  fi
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  echo "==> installing Debian packages: $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
    >/dev/null 2>&1 ||
  { $sudo apt-get update -qq >/dev/null 2>&1 &&
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
}

# debian_unpack DIR PKG...: Debian's packages PKG, and those of their dependencies that are
# not installed, fetched with `apt-get download` and unpacked under DIR with `dpkg-deb -x`.
# Needs no root: nothing is installed system-wide, no maintainer script runs.
debian_unpack() {
  local dest="$1" name dep status
  shift
  local wanted=() queue=("$@") seen=" " debs="$dest/debs"
  command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 ||
    { echo "no apt-get/dpkg-deb: install $* yourself" >&2; return 1; }
  # The packages, and the shared libraries they need that are not installed (the first of
  # each set of alternatives); the rest (adduser, debconf) only serves maintainer scripts.
  while [ ${#queue[@]} -gt 0 ]; do
    name=${queue[0]}
    queue=("${queue[@]:1}")
    [[ "$seen" == *" $name "* ]] && continue
    seen+="$name "
    wanted+=("$name")
    while read -r dep; do
      [[ "$dep" == lib* ]] || continue
      status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$dep" 2>/dev/null || true)
      [ "${status:0:2}" = "ii" ] || queue+=("$dep")
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
               --no-replaces --no-enhances "$name" 2>/dev/null |
             awk '/Depends:/ { if (!alt) print $2; alt = ($1 ~ /^\|/) }')
  done
  [ ${#wanted[@]} -gt 0 ] || wanted=("$@")
  mkdir -p "$debs"
  if ! (cd "$debs" && apt-get download -qq "${wanted[@]}" >/dev/null 2>&1); then
    echo "apt-get download ${wanted[*]} failed: this machine's package lists may be missing" \
         "(as root: apt-get update), or install $* as root" >&2
    return 1
  fi
  local deb
  for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$dest/root"; done
}

# ensure_venv EXTRAS: create .venv and install the project with EXTRAS, once per change of
# pyproject.toml. A venv without a working pip (a python3-venv that was missing when it was
# made) is made again.
ensure_venv() {
  local extras="$1" python stamp want have
  python=$(find_python) || return 1
  if [ -e .venv ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "==> .venv is broken (no working python or pip): making it again"
    rm -rf .venv
  fi
  if [ ! -e .venv ]; then
    make_venv "$python" || return 1
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

# make_venv PYTHON: .venv with pip. Debian's Python needs python3.X-venv for that: installed
# with apt when we may; else pip comes from Debian's python3-pip-whl, unpacked without root.
make_venv() {
  local python="$1" version wheel
  echo "==> creating .venv with $python"
  if "$python" -m venv .venv >/dev/null 2>&1 && .venv/bin/python -m pip --version >/dev/null 2>&1; then
    return 0
  fi
  rm -rf .venv
  version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if may_apt && apt_install "python$version-venv" && "$python" -m venv .venv; then
    return 0
  fi
  rm -rf .venv
  echo "==> no python$version-venv and no root: pip from Debian's python3-pip-whl, unpacked into .venv/debian"
  "$python" -m venv --without-pip .venv && debian_unpack .venv/debian python3-pip-whl || {
    rm -rf .venv
    echo "cannot make a venv: as root, apt-get install python$version-venv" >&2
    return 1; }
  wheel=$(ls .venv/debian/root/usr/share/python-wheels/pip-*.whl 2>/dev/null | head -n1)
  [ -n "$wheel" ] && .venv/bin/python "$wheel/pip" install --quiet --no-index "$wheel" || {
    rm -rf .venv; echo "cannot bootstrap pip into .venv from $wheel" >&2; return 1; }
}

# quiet_pip ARGS...: pip without the noise of setuptools' deprecation banners; keeps pip's
# exit status.
quiet_pip() {
  local out status=0
  out=$(.venv/bin/python -m pip --quiet "$@" 2>&1) || status=$?
  printf '%s\n' "$out" | grep -vE '^WARNING: Location|BuildBackendWarning|^ *(!!|\*+)? *$|corresp|join\(|editable|Please|See https|By 20|project.license|name as your package|WheelFile' >&2 || true
  return $status
}

# ensure_systemd_analyze: `systemd-analyze verify` checks the shipped unit in the tests.
# From apt (package systemd) when it is missing and we may; never fatal: without root it is
# not unpacked (it needs systemd's own shared library), and those tests then skip.
ensure_systemd_analyze() {
  command -v systemd-analyze >/dev/null 2>&1 && return 0
  if may_apt && apt_install systemd && command -v systemd-analyze >/dev/null 2>&1; then
    return 0
  fi
  echo "(no systemd-analyze: the unit-verification tests will skip)" >&2
  return 0
}

have_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

# ensure_mosquitto: the broker and its clients (mosquitto_rr, mosquitto_passwd). Installed
# ones first; else apt (root, sudo); else Debian's packages unpacked into .venv/debian with
# small launchers in .venv/bin (the agent and the tests look there). Needs .venv.
ensure_mosquitto() {
  if have_mosquitto && command -v mosquitto_rr >/dev/null 2>&1; then return 0; fi
  if [ -x .venv/bin/mosquitto ] && [ -x .venv/bin/mosquitto_rr ]; then return 0; fi
  if may_apt; then
    apt_install mosquitto mosquitto-clients && return 0
  fi
  echo "==> no root: Debian's mosquitto packages go into .venv/debian (apt-get download, dpkg-deb -x)"
  debian_unpack .venv/debian mosquitto mosquitto-clients || return 1
  local root libs="" dir exe
  root="$(pwd)/.venv/debian/root"
  for dir in "$root"/usr/lib/*-linux-gnu* "$root"/lib/*-linux-gnu*; do
    [ -d "$dir" ] && libs="$libs${libs:+:}$dir"
  done
  for exe in "$root"/usr/sbin/mosquitto "$root"/usr/bin/mosquitto_*; do
    [ -x "$exe" ] || continue
    # exec keeps the process (and the parent-death signal the agent sets on its broker).
    printf '#!/bin/sh\n# %s, unpacked from Debian by tools/_env.sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
      "$(basename "$exe")" "$libs" "$exe" > ".venv/bin/$(basename "$exe")"
    chmod 755 ".venv/bin/$(basename "$exe")"
  done
  local status=0
  .venv/bin/mosquitto -h >/dev/null 2>&1 || status=$?
  # Its usage text exits 3; a missing library would be 127.
  [ $status -eq 0 ] || [ $status -eq 3 ] || {
    echo "the unpacked mosquitto does not run (status $status); install mosquitto as root" >&2
    return 1; }
}
