#!/usr/bin/env bash
# Try the README on a fresh Debian 12, as a newcomer and an operator would: build a root
# with debootstrap, boot it with systemd as PID 1 (systemd-nspawn -b), and run there the
# README's two commands as a user without sudo and as root, Ctrl-C on the quick start and
# the lines it prints, then "Running as a service" (broker, install-service, enable --now,
# a model push, reload, a failed reload, no broker, the Nagle warning, stop), and the
# tests again with the service installed. Prints a summary; exits 1 when a check failed.
#
#   sudo tools/fresh_debian.sh [--workdir DIR] [--reuse-base] [--keep]
#
# Needs root, and debootstrap and systemd-container from Debian (installed with apt-get
# when missing). The machine's apt and pip configuration, the PIP_* variables and its CA
# trust are copied into the root, so that it reaches the same registries; local folders
# that pip's configuration names (find-links, file:// indexes) are bound read-only.
# Two boots: the first shares the host's network (registries; tests on free loopback
# ports only); the second has loopback only (--private-network), where Debian's mosquitto
# owns 127.0.0.1:1883 and the installed service runs against it.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
workdir=/var/tmp/edge-agent-fresh
reuse_base=0
keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --workdir) workdir=$2; shift 2 ;;
    --reuse-base) reuse_base=1; shift ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--workdir DIR] [--reuse-base] [--keep]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "fresh_debian.sh needs root (debootstrap, systemd-nspawn)" >&2; exit 2; }

say() { printf '==> %s\n' "$*"; }

if ! command -v debootstrap >/dev/null 2>&1 || ! command -v systemd-nspawn >/dev/null 2>&1; then
  say "installing debootstrap and systemd-container"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container >/dev/null
fi

mirror() {
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

base=$workdir/base
root=$workdir/root
out=$workdir/out
mkdir -p "$workdir"
if [ $reuse_base = 0 ] || [ ! -e "$base/.complete" ]; then
  rm -rf "$base"
  say "debootstrap bookworm into $base from $(mirror) (a few minutes)"
  start=$SECONDS
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,python3,ca-certificates \
    bookworm "$base" "$(mirror)" > "$workdir/debootstrap.log" 2>&1 ||
    { tail -20 "$workdir/debootstrap.log" >&2; exit 1; }
  touch "$base/.complete"
  say "debootstrap took $((SECONDS - start)) s"
fi
rm -rf "$root" "$out"
cp -a "$base" "$root"
mkdir -p "$out"
chmod 1777 "$out"

say "copying the machine's apt and pip configuration and CA trust into the root"
rm -f "$root/etc/apt/sources.list"
cp -a /etc/apt/. "$root/etc/apt/"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
home_pip="$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)/.config/pip/pip.conf"
if [ -f "$home_pip" ]; then
  mkdir -p "$root/etc/xdg/pip"
  cp "$home_pip" "$root/etc/xdg/pip/pip.conf"  # for every user of the root
fi
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
if [ -d /usr/local/share/ca-certificates ]; then
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
mkdir -p "$root/etc/edge-agent-fresh"
env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE)=' |
  sed 's/^\([^=]*\)=\(.*\)$/\1='"'"'\2'"'"'/' > "$root/etc/edge-agent-fresh/registry.env" || true
binds=()
for path in $( (cat /etc/pip.conf "$home_pip" 2>/dev/null; env | grep '^PIP_') |
               grep -oE '(file://)?/[^ ,;"]+' | sed 's|^file://||' | sort -u); do
  while [ ! -d "$path" ] && [ "$path" != / ]; do path=$(dirname "$path"); done
  # A file:// index (…/simple) may link to files beside it: bind its parent.
  [ "$(basename "$path")" = simple ] && path=$(dirname "$path")
  case "$path" in /|/etc|/etc/*|/usr|/usr/*|/root|/home) continue ;; esac
  binds+=("--bind-ro=$path")
done

say "a user without sudo (newbie), and the project for root and for newbie"
chroot "$root" useradd -m -s /bin/bash newbie
for home in root home/newbie; do
  mkdir -p "$root/$home/edge-agent"
  (cd "$repo" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) |
    tar -xf - -C "$root/$home/edge-agent"
done
chroot "$root" chown -R newbie:newbie /home/newbie/edge-agent
echo edge-fresh > "$root/etc/hostname"
# What Debian's installer writes and debootstrap does not: localhost must resolve.
printf '127.0.0.1\tlocalhost\n127.0.1.1\tedge-fresh\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
  > "$root/etc/hosts"

# --- what runs inside, at each boot, as a oneshot unit that powers off when done ---
cat > "$root/usr/local/sbin/edge-agent-fresh-check" <<'INSIDE'
#!/bin/bash
# Runs inside the fresh root; phase "online" (shared network) or "offline" (loopback only).
set -uo pipefail
set -a; . /etc/edge-agent-fresh/registry.env; set +a
export LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
phase=$(cat /etc/edge-agent-fresh/phase)
summary=/out/summary.txt
result() { printf '%-4s %-44s %s\n' "$1" "$2" "${3:-}" | tee -a "$summary"; }
now() { date +%s%N; }
took() { local ms=$(( ($(date +%s%N) - $1) / 1000000 )); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }
as_user() {  # as_user CMD...: a clean login-like environment for newbie, no sudo
  runuser -u newbie -- env -i HOME=/home/newbie USER=newbie LOGNAME=newbie LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin $(sed 's/'"'"'//g' /etc/edge-agent-fresh/registry.env) \
    bash -c "cd ~/edge-agent && $*"
}
as_root() { bash -c "cd /root/edge-agent && $*"; }
pytest_line() { grep -aE '^=+ .*(passed|failed|error).* in [0-9.]+s' "$1" | tail -n1 | tr -d '='; }

readme_lines() {  # the README's lines to try after the quick start
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"keeps serving while it\s.*?```sh\n(.*?)```", text, re.S)
print(block.group(1) if block else "", end="")
PY
}

quickstart_once() {  # who: user|root
  local who=$1 log=/out/$1-quickstart.log t status=0
  t=$(now)
  "as_$who" "tools/quickstart.sh --once" > "$log" 2>&1 || status=$?
  if [ $status = 0 ] && grep -q "answered by variant fp32" "$log"; then
    result PASS "$who: tools/quickstart.sh --once" "$(took "$t")"
  else
    result FAIL "$who: tools/quickstart.sh --once" "status $status, see $log"
  fi
}

quickstart_ctrl_c() {  # the README's lines while it serves, then a real Ctrl-C
  local who=$1 log=/out/$1-quickstart-ctrl-c.log pidfile=/tmp/quickstart-$1.pid dir pid line i
  dir=/root/edge-agent; [ "$who" = user ] && dir=/home/newbie/edge-agent
  rm -f "$pidfile" "$pidfile.status"
  # A session and process group of its own, as a terminal gives a foreground job.
  "as_$who" "exec setsid /usr/local/bin/edge-fresh-bg $pidfile $log bash tools/quickstart.sh" &
  for i in $(seq 600); do grep -qs "Ctrl-C stops it." "$log" && break; sleep 0.5; done
  pid=$(cat "$pidfile" 2>/dev/null || true)
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    # Without root the README's mosquitto_rr is the unpacked one in .venv/bin.
    if "as_$who" "PATH=\$PWD/.venv/bin:\$PATH timeout 60 $line" >> "/out/$who-readme-lines.log" 2>&1; then
      result PASS "$who: README line" "${line:0:60}..."
    else
      result FAIL "$who: README line" "${line:0:60}... (see /out/$who-readme-lines.log)"
    fi
  done < <(readme_lines "$dir/README.md")
  if [ -z "$pid" ]; then result FAIL "$who: Ctrl-C on the quick start" "it did not start"; return; fi
  kill -INT -- "-$pid"  # what Ctrl-C does: SIGINT to the whole foreground process group
  for i in $(seq 120); do [ -e "$pidfile.status" ] && break; sleep 0.5; done
  wait
  if [ "$(cat "$pidfile.status" 2>/dev/null)" = 0 ] && grep -q "agent_stopping.*reason=SIGINT" "$log" &&
     grep -q "agent_stopped" "$log"; then
    result PASS "$who: Ctrl-C on the quick start" "exit 0, agent_stopping reason=SIGINT, agent_stopped"
  else
    result FAIL "$who: Ctrl-C on the quick start" "exit $(cat "$pidfile.status" 2>/dev/null), see $log"
  fi
}

test_suite() {  # who, pytest arguments...
  local who=$1 log=/out/$1-test.log t status=0
  shift
  t=$(now)
  "as_$who" "tools/test.sh $*" > "$log" 2>&1 || status=$?
  if [ $status = 0 ]; then result PASS "$who: tools/test.sh $*" "$(pytest_line "$log"), $(took "$t")"
  else result FAIL "$who: tools/test.sh $*" "status $status: $(pytest_line "$log") (see $log)"; fi
}

status_text() { systemctl show -p StatusText --value edge-agent.service; }
wait_status() {  # wait_status SECONDS REGEX
  local i
  for i in $(seq $(($1 * 2))); do status_text | grep -qE "$2" && return 0; sleep 0.5; done
  return 1
}
check() {  # check NAME CMD...: PASS when CMD succeeds
  local name=$1; shift
  if "$@" >> /out/service.log 2>&1; then result PASS "$name"; else result FAIL "$name" "see /out/service.log"; fi
}

online() {
  result INFO "machine" "$(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 --version), systemd $(systemctl --version | awk 'NR==1{print $2}')"
  as_user "python3 -m venv /tmp/probe-venv >/dev/null 2>&1" && result INFO "python3-venv" "present" ||
    result INFO "python3-venv" "missing (as on a fresh Debian)"
  quickstart_once user
  quickstart_ctrl_c user
  test_suite user
  quickstart_once root
  quickstart_ctrl_c root
  test_suite root
  # "Running as a service", the steps that need the registries: the broker, the venv.
  {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients &&
    python3 -m venv /opt/edge-agent &&
    /opt/edge-agent/bin/pip install --quiet /root/edge-agent
  } > /out/service-online.log 2>&1 &&
    result PASS "root: mosquitto; venv /opt/edge-agent; pip install" ||
    result FAIL "root: mosquitto; venv /opt/edge-agent; pip install" "see /out/service-online.log"
}

offline() {
  local t device config=/etc/edge-agent/config.toml
  device=$(cat /proc/sys/kernel/hostname)
  check "mosquitto active on 127.0.0.1:1883 (loopback only)" systemctl is-active mosquitto.service
  /opt/edge-agent/bin/edge-agent install-service > /out/install-service.log 2>&1 &&
    result PASS "install-service" "$(grep -c . /out/install-service.log) lines" ||
    result FAIL "install-service" "see /out/install-service.log"
  check "install-service placed the mosquitto snippet" test -f /etc/mosquitto/conf.d/edge-agent-tuning.conf
  check "install-service left /var/lib/edge-agent to systemd" test ! -e /var/lib/edge-agent
  systemctl restart mosquitto.service
  systemctl daemon-reload
  t=$(now)
  if timeout 120 systemctl enable --now edge-agent.service >> /out/service.log 2>&1; then
    result PASS "systemctl enable --now edge-agent" "$(took "$t"): $(status_text)"
  else
    result FAIL "systemctl enable --now edge-agent" "$(took "$t"): $(status_text)"
  fi
  check "no DynamicUser migration at first start" bash -c '! journalctl -b -q | grep -qi "migrat"'
  cp -r /root/edge-agent/models/digits /var/lib/edge-agent/models/
  wait_status 60 'digits=fp32' && result PASS "push models/digits: STATUS" "$(status_text)" ||
    result FAIL "push models/digits: STATUS" "$(status_text)"
  check "infer against the service" timeout 60 /opt/edge-agent/bin/edge-agent infer digits \
    /root/edge-agent/tools/requests/digits.json --device-id "$device"
  check "mosquitto_rr against the service" timeout 30 mosquitto_rr -W 10 -t "edge/$device/infer/digits" \
    -e edge/reply/fresh -m "$(cat /root/edge-agent/tools/requests/digits.json)"
  journalctl -b -q _SYSTEMD_UNIT=edge-agent.service -o cat > /out/journal.txt
  local bad
  bad=$(python3 -c '
import json, sys
bad = 0
for line in open("/out/journal.txt"):
    try: json.loads(line)
    except ValueError: bad += 1; print(line.rstrip()[:200], file=sys.stderr)
print(bad)' 2>> /out/service.log)
  [ "$bad" = 0 ] && result PASS "journal: only JSON lines" "$(wc -l < /out/journal.txt) lines" ||
    result FAIL "journal: only JSON lines" "$bad other line(s), see /out/service.log"
  grep -q '"broker_round_trip"' /out/journal.txt && result PASS "broker round trip measured, not slow" \
    "$(grep -o '"median_ms": [0-9.]*' /out/journal.txt | head -n1)" ||
    result FAIL "broker round trip measured, not slow" "$(grep -o '"event": "broker_round_trip[a-z_]*"' /out/journal.txt)"
  # Reload: a good one, then invalid TOML (refused, and STATUS says so), then good again.
  cp "$config" /tmp/config.good
  check "systemctl reload" systemctl reload edge-agent.service
  echo "this is = not [valid toml" >> "$config"
  systemctl reload edge-agent.service
  sleep 2
  status_text | grep -q "^reload failed" && result PASS "failed reload: STATUS says so" "$(status_text | cut -c1-90)" ||
    result FAIL "failed reload: STATUS says so" "$(status_text)"
  check "still active after a failed reload" systemctl is-active edge-agent.service
  cp /tmp/config.good "$config"
  systemctl reload edge-agent.service
  wait_status 20 '^serving' && result PASS "reload after the fix" "$(status_text | cut -c1-60)" ||
    result FAIL "reload after the fix" "$(status_text)"
  # No broker: start must not hang; STATUS says it waits; it connects when the broker is back.
  systemctl stop mosquitto.service
  t=$(now)
  timeout 120 systemctl restart edge-agent.service
  result "$(status_text | grep -q 'waiting for the broker' && echo PASS || echo FAIL)" \
    "restart without a broker returns" "$(took "$t"): $(status_text | cut -c1-70)"
  systemctl start mosquitto.service
  wait_status 60 'connected' && result PASS "broker back: connected" "$(status_text | cut -c1-60)" ||
    result FAIL "broker back: connected" "$(status_text)"
  # The Nagle trap: Debian's mosquitto without the snippet; the agent warns with the fix.
  mv /etc/mosquitto/conf.d/edge-agent-tuning.conf /tmp/
  systemctl restart mosquitto.service
  systemctl restart edge-agent.service
  sleep 5
  journalctl -b -q _SYSTEMD_UNIT=edge-agent.service -o cat | grep '"broker_round_trip_slow"' | tail -n1 > /out/nagle.txt
  [ -s /out/nagle.txt ] && result PASS "untuned mosquitto: slow round trip warned" \
    "$(grep -o '"median_ms": [0-9.]*' /out/nagle.txt)" ||
    result FAIL "untuned mosquitto: slow round trip warned" "no broker_round_trip_slow"
  mv /tmp/edge-agent-tuning.conf /etc/mosquitto/conf.d/
  systemctl restart mosquitto.service
  # Hermetic: the tests and the quick start, with the service installed, touch none of it.
  local before after
  before=$(sha256sum /var/lib/private/edge-agent/state.json 2>/dev/null)
  quickstart_once user
  test_suite user "-k 'defaults_serve_a_first_run or systemds_state_directory or no_config_file'"
  test_suite root "-k 'defaults_serve_a_first_run or systemds_state_directory or no_config_file or state'"
  after=$(sha256sum /var/lib/private/edge-agent/state.json 2>/dev/null)
  [ "$before" = "$after" ] && result PASS "service state.json untouched by tests" ||
    result FAIL "service state.json untouched by tests" "it changed"
  t=$(now)
  check "systemctl stop edge-agent" systemctl stop edge-agent.service
  journalctl -b -q _SYSTEMD_UNIT=edge-agent.service -o cat | tail -n5 | grep -q '"agent_stopped"' &&
    result PASS "stopped cleanly" "$(took "$t")" || result FAIL "stopped cleanly" "no agent_stopped"
}

echo "--- phase $phase" >> "$summary"
"$phase"
INSIDE
chmod 755 "$root/usr/local/sbin/edge-agent-fresh-check"
cat > "$root/usr/local/bin/edge-fresh-bg" <<'BG'
#!/bin/bash
# edge-fresh-bg PIDFILE LOG CMD...: CMD with its output in LOG; its status in PIDFILE.status.
# Started under setsid, so $$ leads the process group that a Ctrl-C would reach.
pidfile=$1 log=$2
shift 2
echo $$ > "$pidfile"
status=0
"$@" > "$log" 2>&1 || status=$?
echo "$status" > "$pidfile.status"
BG
chmod 755 "$root/usr/local/bin/edge-fresh-bg"
cat > "$root/etc/systemd/system/edge-agent-fresh-check.service" <<'UNIT'
[Unit]
Description=edge-agent: the fresh-machine check
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/edge-agent-fresh-check
ExecStopPost=/bin/systemctl poweroff --no-block
TimeoutStartSec=infinity
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/edge-agent-fresh-check.service \
  "$root/etc/systemd/system/multi-user.target.wants/edge-agent-fresh-check.service"

boot() {  # boot PHASE [nspawn options...]
  local phase=$1 start=$SECONDS
  shift
  echo "$phase" > "$root/etc/edge-agent-fresh/phase"
  say "booting the root ($phase), systemd as PID 1; log: $workdir/boot-$phase.log"
  timeout 5400 systemd-nspawn -q -b -D "$root" --register=no --keep-unit --machine=edge-fresh \
    --resolv-conf=copy-host --bind="$out:/out" "${binds[@]}" "$@" \
    > "$workdir/boot-$phase.log" 2>&1 < /dev/null || true
  say "$phase phase took $((SECONDS - start)) s"
}

boot online
boot offline --private-network

echo
echo "=== fresh Debian 12 check: summary ($out/summary.txt; logs in $out)"
cat "$out/summary.txt"
[ $keep = 1 ] || rm -rf "$root"
! grep -q '^FAIL' "$out/summary.txt"
