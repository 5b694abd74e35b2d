#!/usr/bin/env bash
# Quick start: install edge-agent into .venv, start it with the demo model on a private
# broker on loopback, send it one request and show the answer, then keep serving until
# Ctrl-C (or exit right after the answer with --once).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$(repo_root)"

trap 'echo "quickstart: \"$BASH_COMMAND\" failed with status $?" >&2' ERR

once=0
[ "${1:-}" = "--once" ] && once=1

# mosquitto gives MQTT 5 (and mosquitto_rr); without it the agent falls back to amqtt,
# an in-process MQTT 3.1.1 broker from PyPI.
if ! have_mosquitto || ! command -v mosquitto_rr >/dev/null 2>&1; then
  apt_install mosquitto mosquitto-clients ||
    echo "(continuing without mosquitto: the embedded amqtt broker speaks MQTT 3.1.1 only)"
fi
ensure_venv broker

port=1883
if .venv/bin/python -c "from agent.broker import port_in_use; raise SystemExit(not port_in_use('127.0.0.1', $port))"; then
  port=$(.venv/bin/python -c "from agent.broker import free_port; print(free_port())")
  echo "==> port 1883 is taken (another broker?); the quick-start broker uses $port"
fi
device=demo
log=.quickstart.log
rm -f "$log"

echo "==> starting: edge-agent run --embedded-broker --mqtt-port $port --device-id $device"
.venv/bin/edge-agent run --embedded-broker --mqtt-port "$port" --device-id "$device" \
  --models-dir models --log-format console 2> >(tee "$log" >&2) &
agent=$!
stop_agent() {
  local status=$?
  kill -TERM "$agent" 2>/dev/null && wait "$agent" 2>/dev/null
  return "$status"
}
trap stop_agent EXIT
trap 'exit 130' INT TERM

for _ in $(seq 100); do
  grep -q "broker_connected" "$log" 2>/dev/null && break
  kill -0 $agent 2>/dev/null || { echo "the agent exited; see above" >&2; exit 1; }
  sleep 0.1
done

echo
echo "==> asking the agent which digit tools/requests/digits.json shows:"
.venv/bin/edge-agent infer digits tools/requests/digits.json --mqtt-port "$port" --device-id "$device"
echo
echo "The agent keeps serving. Try, from another terminal:"
echo "  .venv/bin/edge-agent infer digits tools/requests/digits.npz --mqtt-port $port --device-id $device"
echo "  .venv/bin/edge-agent status --mqtt-port $port --device-id $device"
if grep -q "kind=mosquitto" "$log"; then
  echo "  mosquitto_rr -p $port -t edge/$device/infer/digits -e edge/reply/me -m \"\$(cat tools/requests/digits.json)\""
fi
[ $once = 1 ] && exit 0
echo "Ctrl-C stops it."
wait $agent
