#!/usr/bin/env bash
# Stop the local multi-node Ray cluster started by up.sh, and only it: its processes are found by its temp dir and
# GCS port, then stopped with all their descendants. (`ray stop --force` would also kill every other Ray instance
# of this user on the machine, e.g. a job's own local `ray.init()`.)
set -uo pipefail
gcs_port=${EARTHGPT_RAY_PORT:-26379}
temp_dir=${EARTHGPT_RAY_TEMP_DIR:-/tmp/earthgpt-ray}

descendants() {
  local pid
  for pid in "$@"; do
    echo "$pid"
    # shellcheck disable=SC2046
    descendants $(pgrep -P "$pid" 2>/dev/null)
  done
}

roots=$(pgrep -f -- "${temp_dir}/session_|--(gcs-)?address=[^ ]*:${gcs_port}( |$)" 2>/dev/null | grep -vx "$$" || true)
pids=$(descendants $roots | sort -u)
if [ -n "$pids" ]; then
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    alive=$(for p in $pids; do kill -0 "$p" 2>/dev/null && echo "$p"; done)
    [ -z "$alive" ] && break
    sleep 0.5
  done
  [ -n "${alive:-}" ] && kill -KILL $alive 2>/dev/null || true
fi
echo "ray cluster down"
