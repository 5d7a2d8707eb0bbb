#!/usr/bin/env bash
# Start a real multi-node Ray cluster on this machine: one head node and N worker nodes, each its own raylet with
# its own ports, so jobs submitted to it really cross node boundaries (object transfer, scheduling by resource).
#
#   cluster/local/up.sh [WORKERS]        # default 1 worker node; prints the dashboard (Jobs API) address
#   cluster/local/down.sh
#
# Token authentication is on (RAY_AUTH_MODE=token); the token lives in ~/.ray/auth_token (created if missing), and
# clients on this machine (`ray job submit`, `earthgpt submit`) find it there. Ports: head GCS 26379, dashboard
# 28265; override with EARTHGPT_RAY_PORT / EARTHGPT_DASHBOARD_PORT. Every other port of every node is derived from
# the GCS port, never Ray's defaults: another Ray instance on this machine (e.g. a local `ray.init()`) already holds
# those, and a head whose job agent cannot bind answers "No available agent to submit job".
#
# Every node listens on 127.0.0.1 only. Ray turns a 127.0.0.1 node address into the machine's network address (and
# then binds its servers, the metrics export port included, to every interface) unless it runs in its single-machine
# mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which in turn refuses to start worker nodes; so the nodes start in that
# mode (every process of the cluster, job drivers included, inherits it), and worker nodes through `ray_start`, which
# lets `ray start --address` run in it and keeps the 127.0.0.1 it is given.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
workers=${1:-1}
gcs_port=${EARTHGPT_RAY_PORT:-26379}
dash_port=${EARTHGPT_DASHBOARD_PORT:-28265}
cpus_per_node=${EARTHGPT_CPUS_PER_NODE:-1}
store=$((${EARTHGPT_OBJECT_STORE_MB:-200} * 1024 * 1024))
temp_dir=${EARTHGPT_RAY_TEMP_DIR:-/tmp/earthgpt-ray}

# Job entrypoints run `python`: make it the project's interpreter on every node.
if [ -x "$repo/.venv/bin/python" ]; then export PATH="$repo/.venv/bin:$PATH"; fi
export RAY_AUTH_MODE=token RAY_USAGE_STATS_ENABLED=0 DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1
[ -s "$HOME/.ray/auth_token" ] || ray get-auth-token --generate >/dev/null
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

ray_start() {
  python - "$@" <<'PY'
import sys

import ray._private.ray_constants as constants
import ray._private.services as services

constants.ENABLE_RAY_CLUSTER = True  # let `ray start --address` add a node; the node itself keeps the mode
services.resolve_ip_for_localhost = lambda host: host  # keep --node-ip-address=127.0.0.1 as given
from ray.scripts.scripts import main

sys.argv = ["ray", "start", *sys.argv[1:]]
sys.exit(main())
PY
}

ray start --head --node-ip-address=127.0.0.1 --port="$gcs_port" --num-cpus="$cpus_per_node" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dash_port" --ray-client-server-port=$((gcs_port + 1)) \
  --object-store-memory="$store" --min-worker-port=30000 --max-worker-port=30199 \
  --node-manager-port=$((gcs_port + 21)) --object-manager-port=$((gcs_port + 22)) \
  --dashboard-agent-listen-port=$((gcs_port + 23)) --dashboard-agent-grpc-port=$((gcs_port + 24)) \
  --metrics-export-port=$((gcs_port + 25)) --runtime-env-agent-port=$((gcs_port + 26)) \
  --temp-dir="$temp_dir" --disable-usage-stats >/dev/null

for i in $(seq 1 "$workers"); do
  base=$((gcs_port + 20 + 10 * i))
  ray_start --address="127.0.0.1:$gcs_port" --node-ip-address=127.0.0.1 --num-cpus="$cpus_per_node" \
    --object-store-memory="$store" --node-manager-port=$base --object-manager-port=$((base + 1)) \
    --dashboard-agent-listen-port=$((base + 2)) --dashboard-agent-grpc-port=$((base + 3)) \
    --metrics-export-port=$((base + 4)) --runtime-env-agent-port=$((base + 5)) \
    --min-worker-port=$((30000 + 200 * i)) --max-worker-port=$((30199 + 200 * i)) \
    --resources="{\"worker_node\": 1}" >/dev/null
done

# Wait until every node has registered.
for _ in $(seq 1 60); do
  alive=$(ray list nodes --address="127.0.0.1:$gcs_port" --filter "state=ALIVE" --format json 2>/dev/null \
    | python -c "import json,sys; print(len(json.load(sys.stdin)))" 2>/dev/null || echo 0)
  [ "$alive" -ge $((workers + 1)) ] && break
  sleep 1
done
echo "ray cluster up: $((workers + 1)) nodes, GCS 127.0.0.1:$gcs_port, Jobs API http://127.0.0.1:$dash_port"
echo "(ray's own CLI against the GCS, e.g. ray status / ray list nodes, needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:"
echo " the nodes run in Ray's single-machine mode, which keeps every socket on 127.0.0.1)"
