#!/usr/bin/env bash
# Idempotent set-up: Debian packages (PostgreSQL 15 + PostGIS 3; chromium, which opens run reports headless in the
# tests), a virtualenv in .venv with the project and its test/dev extras. A second run only checks that everything
# is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_apt=()
command -v pg_ctlcluster >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
[ -f /usr/share/postgresql/15/extension/postgis.control ] || need_apt+=(postgresql-15-postgis-3)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: Debian packages missing (${need_apt[*]}); integration tests that need them will fail or skip" >&2
  fi
fi

stamp="$VENV/.setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: environment up to date ($VENV)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {
  # The pip configuration on these machines names optional local indexes; their "ignored" notices are noise.
  "$VENV/bin/pip" install -q "$@" 2> >(grep -v "is neither a file nor a directory" >&2)
}
# uv installs the same versions as pip in a fraction of the time (it resolves once and unpacks in parallel: about
# 30 s instead of 4 minutes for this project). It does not read pip's configuration, so the indexes and local
# wheel folders pip is configured with (pip.conf or PIP_* variables) are handed over. Without uv, pip does it all.
uv_install() {
  local args=() key value
  while IFS='=' read -r key value; do
    value=${value#\'}; value=${value%\'}
    [ -n "$value" ] || continue
    case "$key" in
      *.find-links) for v in $value; do [ -e "$v" ] || [[ "$v" == *://* ]] && args+=(--find-links "$v"); done ;;
      *.index-url) args+=(--index-url "$value") ;;
      *.constraint) for v in $value; do [ -f "$v" ] && args+=(--constraint "$v"); done ;;
      *.extra-index-url)
        for v in $value; do
          if [[ "$v" == file://* ]] && [ ! -d "${v#file://}" ]; then continue; fi
          args+=(--extra-index-url "$v")
        done ;;
    esac
  done < <("$VENV/bin/pip" config list 2>/dev/null)
  # Like pip, the newest version found on any index wins (uv's default stops at the first index that has the name),
  # and the installed modules are byte-compiled (uv's default is not to). Without .pyc files, and with
  # PYTHONDONTWRITEBYTECODE set as on CI machines, every new process (each Ray worker, each job, each test
  # subprocess) compiles torch, Ray and transformers from source again: about 6 s more per process, twice the
  # test suite's time.
  UV_LINK_MODE=copy "$VENV/bin/uv" pip install -q --python "$VENV/bin/python" --index-strategy unsafe-best-match \
    --compile-bytecode "${args[@]}" "$@"
}
# CPU build of torch (from local disk where pip is configured so); a bare `torch` would pull a multi-GB CUDA build.
if pip_install uv && uv_install -e ".[dev]" torch==2.13.0; then
  :
else
  echo "setup: uv unavailable or failed; installing with pip" >&2
  pip_install --upgrade pip
  pip_install torch==2.13.0
  pip_install -e ".[dev]" torch==2.13.0
fi
echo "$want" > "$stamp"
echo "setup: environment ready ($VENV)"
