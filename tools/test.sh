#!/usr/bin/env bash
# Install everything the tests need (a venv with the dev extra; the mosquitto broker and its
# clients: from apt as root, else Debian's packages unpacked into .venv without root; and
# systemd-analyze from apt as root), then
# lint, type-check and run the tests.
#   tools/test.sh            the suite (minutes)
#   tools/test.sh --soak     the long endurance tests only
#   tools/test.sh -k name    any other arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$(repo_root)"

ensure_venv dev
ensure_mosquitto
ensure_systemd_analyze
# Launchers for an unpacked mosquitto live in .venv/bin; the tests call mosquitto_rr and
# mosquitto_passwd by name.
PATH="$(pwd)/.venv/bin:$PATH"
# Hermetic: nothing from an installed service's environment (its state directory, notify
# socket, credentials) or from the caller's agent settings reaches the tests.
unset STATE_DIRECTORY NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID CREDENTIALS_DIRECTORY
while IFS= read -r name; do unset "$name"; done < <(compgen -e | grep '^EDGE_AGENT_' || true)

marker="not soak"
if [ "${1:-}" = "--soak" ]; then marker="soak"; shift; fi

echo "==> ruff"
.venv/bin/ruff check agent compressor tests tools
echo "==> mypy (strict)"
.venv/bin/mypy
echo "==> pytest -m '$marker'"
exec .venv/bin/python -m pytest -m "$marker" "$@"
