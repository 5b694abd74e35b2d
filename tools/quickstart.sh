#!/usr/bin/env bash
# Quick start: install edge-agent into .venv, start it with the demo model on a private
# broker on a free loopback port, send it one request and show the answer, then keep
# serving until Ctrl-C (or exit right after the answer with --once).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$(repo_root)"

trap 'echo "quickstart: \"$BASH_COMMAND\" failed with status $?" >&2' ERR

once=0
[ "${1:-}" = "--once" ] && once=1

ensure_venv broker
# mosquitto gives MQTT 5 (and mosquitto_rr); without it the agent falls back to amqtt,
# an in-process MQTT 3.1.1 broker from PyPI.
ensure_mosquitto ||
  echo "(continuing without mosquitto: the embedded amqtt broker speaks MQTT 3.1.1 only)"

# A port of our own, whatever listens on 1883 (Debian's mosquitto does once installed):
# printed in the lines below, and kept in .quickstart.port for the README's lines.
port=$(.venv/bin/python -c "from agent.broker import free_port; print(free_port())")
echo "$port" > .quickstart.port
device=demo
log=.quickstart.log
: > "$log"

echo "==> starting: edge-agent run --embedded-broker --mqtt-port $port --device-id $device"
# No --config and no EDGE_AGENT_CONFIG: an installed service's file and state stay its own.
env -u EDGE_AGENT_CONFIG .venv/bin/edge-agent run --embedded-broker --mqtt-port "$port" \
  --device-id "$device" --models-dir models --log-format console 2> "$log" &
agent=$!
# Ctrl-C reaches every process of the terminal's group. The agent stops cleanly on it; the
# log follower ignores it, so the agent's last lines (agent_stopped) are still shown. It
# ends by itself once the agent has exited.
(trap '' INT; exec tail -n +1 -s 0.1 -f --pid="$agent" "$log" >&2) &
follower=$!

stop_agent() {
  local status=0
  trap - INT TERM EXIT
  kill -TERM "$agent" 2>/dev/null || true  # a no-op after Ctrl-C: the agent has it already
  wait "$agent" || status=$?
  wait "$follower" 2>/dev/null || true
  exit "$status"
}
trap stop_agent INT TERM EXIT

for _ in $(seq 600); do
  grep -q "broker_connected" "$log" 2>/dev/null && break
  kill -0 $agent 2>/dev/null || { echo "the agent exited; see above" >&2; exit 1; }
  sleep 0.1
done

echo
echo "==> asking the agent which digit tools/requests/digits.json shows:"
.venv/bin/edge-agent infer digits tools/requests/digits.json --mqtt-port "$port" --device-id "$device"
echo
echo "The agent keeps serving on port $port (also in .quickstart.port). Try, from another terminal:"
echo "  .venv/bin/edge-agent infer digits tools/requests/digits.npz --mqtt-port $port --device-id $device"
echo "  .venv/bin/edge-agent status --mqtt-port $port --device-id $device"
if grep -q "kind=mosquitto" "$log"; then
  rr=mosquitto_rr
  command -v mosquitto_rr >/dev/null 2>&1 || rr=.venv/bin/mosquitto_rr
  echo "  $rr -W 10 -h 127.0.0.1 -p $port -t edge/$device/infer/digits -e edge/reply/me -m \"\$(cat tools/requests/digits.json)\""
fi
[ $once = 1 ] && exit 0
echo "Ctrl-C stops it."
status=0
wait "$agent" || status=$?  # Ctrl-C interrupts this wait and runs stop_agent instead
trap - INT TERM EXIT
wait "$follower" 2>/dev/null || true
exit "$status"
