#!/usr/bin/env bash
# Stop the local multi-node Ray cluster started by up.sh (every Ray process of this user on this machine).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
if [ -x "$repo/.venv/bin/ray" ]; then export PATH="$repo/.venv/bin:$PATH"; fi
RAY_AUTH_MODE=token ray stop --force >/dev/null 2>&1 || true
echo "ray cluster down"
