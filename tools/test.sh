#!/usr/bin/env bash
# Install everything the tests need (a venv with the dev extra, the mosquitto broker and
# its clients from Debian when missing), then lint, type-check and run the tests.
#   tools/test.sh            the suite (minutes)
#   tools/test.sh --soak     the long endurance tests only
#   tools/test.sh -k name    any other arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$(repo_root)"

missing=()
have_mosquitto || missing+=(mosquitto)
command -v mosquitto_rr >/dev/null 2>&1 || missing+=(mosquitto-clients)
if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
ensure_venv dev

marker="not soak"
if [ "${1:-}" = "--soak" ]; then marker="soak"; shift; fi

echo "==> ruff"
.venv/bin/ruff check agent compressor tests tools
echo "==> mypy (strict)"
.venv/bin/mypy
echo "==> pytest -m '$marker'"
exec .venv/bin/python -m pytest -m "$marker" "$@"
