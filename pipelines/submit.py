"""Submit the archive job or the training job to a Ray cluster through the Ray Jobs API.

``earthgpt submit run CONFIG --address http://HEAD:8265`` validates the config here first (a bad config is refused
before anything reaches the cluster, naming the field), then submits ``python -m pipelines.infer CONFIG`` as a Ray
job and follows its logs until it ends; the exit code mirrors the job's final state (0 SUCCEEDED, 1 FAILED or
STOPPED, 124 when ``--timeout`` stopped it). ``--no-wait`` returns after submission and prints the job id; watch or
end it with ``earthgpt jobs status|logs|stop``.

The cluster's nodes need this package and its dependencies. Either the project's image (cluster/image/), or the
official ``rayproject/ray`` image plus a runtime env built here: ``--ship-code`` uploads this checkout's packages
(``py_modules``), ``--pip-deps`` has Ray install the project's requirements on the nodes, ``--runtime-env FILE`` adds
any other runtime-env fields. Configs and data are referenced by paths the cluster can read (``s3://`` or a shared
disk).

Token authentication (Ray's default for new clusters) is handled by Ray's client: it reads ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import jobs as job_control

# Settings that tell GDAL, s3fs and pyarrow where the object store is; safe to forward to a cluster.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING",
    "AWS_REGION", "AWS_DEFAULT_REGION", "GDAL_DISABLE_READDIR_ON_OPEN",
)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
JOBS = {"run": "pipelines.infer", "train": "pipelines.train"}
PACKAGES = ("earthgpt", "catalogs", "pipelines")
DISTRIBUTION = "earthgpt-archive"
TIMEOUT_EXIT = 124


def validate(kind: str, config: str) -> None:
    """Parse and validate ``config`` for ``kind`` (``run`` | ``train``) here, before any cluster work.

    Raises:
        ValueError: the config is invalid; the message names the fields.
    """
    if kind == "run":
        from pipelines.archive.config import load_config as load_infer
    else:
        from pipelines.train_config import load_config as load_infer  # type: ignore[assignment]
    load_infer(config)


def job_spec(
    kind: str,
    config: str,
    *,
    job_args: list[str] | None = None,
    forward_credentials: bool = False,
    pip: list[str] | None = None,
    env: dict[str, str] | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for one job (pure; unit-testable).

    Args:
        kind: ``run`` (archive inference) or ``train`` (instruction tuning).
        config: Config path as the cluster sees it (absolute, or ``s3://``-free local path on shared disk).
        job_args: Extra arguments for the job's own CLI (e.g. ``["--max-items", "10"]``).
        forward_credentials: Also forward ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` from this shell
            (for clusters without an instance role; they travel in the job's runtime env).
        pip: Extra pip requirements installed into the job's runtime env.
        env: Extra environment variables for the job.
        runtime_env: A Ray runtime env to start from (``py_modules``, ``working_dir``, ``pip``, ...); the
            forwarded settings, ``env`` and ``pip`` are added to it.
    """
    if kind not in JOBS:
        raise ValueError(f"kind must be one of {sorted(JOBS)}, got {kind!r}")
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    runtime_env = dict(runtime_env or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars.update({k: os.environ[k] for k in names if os.environ.get(k)})
    env_vars.update(env or {})
    runtime_env["env_vars"] = env_vars
    if pip:
        runtime_env["pip"] = [*_pip_list(runtime_env.get("pip")), *pip]
    argv = " ".join([f"python -m {JOBS[kind]}", _quote(config), *map(_quote, job_args or [])])
    return {"entrypoint": argv, "runtime_env": runtime_env, "metadata": {"earthgpt.kind": kind}}


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def _pip_list(pip: Any) -> list[str]:
    if pip is None:
        return []
    if isinstance(pip, dict):  # the {"packages": [...], "pip_check": ...} form
        return list(pip.get("packages") or [])
    return list(pip)


def checkout_runtime_env() -> dict[str, Any]:
    """A Ray runtime env that carries this checkout's code to a cluster running the official ``rayproject/ray`` image.

    Add the project's requirements with ``pip`` (:func:`project_requirements`) when the image lacks them.

    Returns:
        ``{"py_modules": [...the three package folders...], "excludes": [...]}``.
    """
    modules = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} not found: run from a checkout or an install of {DISTRIBUTION}")
        modules.append(str(Path(next(iter(spec.submodule_search_locations))).resolve()))
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"]}


def project_requirements() -> list[str]:
    """The project's runtime requirements (no extras), without Ray (a cluster brings its own)."""
    from packaging.requirements import Requirement

    reqs = []
    for line in importlib.metadata.requires(DISTRIBUTION) or []:
        req = Requirement(line)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        if req.name.lower() == "ray":
            continue
        reqs.append(str(req))
    return reqs


def submit(address: str, spec: dict[str, Any], *, wait: bool = True, timeout: float | None = None) -> tuple[str, str]:
    """Submit ``spec`` to the Jobs API at ``address``; optionally follow its logs until it ends.

    Args:
        address: The cluster's dashboard / Jobs API URL.
        spec: Keyword arguments of ``JobSubmissionClient.submit_job`` (see :func:`job_spec`).
        wait: Follow the job's logs until it ends.
        timeout: While waiting, stop the job after this many seconds.

    Returns:
        ``(job_id, state)``; state is ``PENDING``/``RUNNING`` when not waiting, ``TIMEOUT`` when the job was stopped
        for running past ``timeout``.
    """
    client = job_control.client(address)
    job_id = _submit_when_ready(client, spec)
    if not wait:
        return job_id, job_control.job_state(client, job_id)
    state = job_control.follow(client, job_id, timeout=timeout)
    if state not in job_control.TERMINAL:
        client.stop_job(job_id)
        job_control.wait_until_finished(client, job_id)
        return job_id, "TIMEOUT"
    return job_id, state


def _submit_when_ready(client: Any, spec: dict[str, Any], patience: float = 120.0) -> str:
    """Submit, waiting while the head's job agent is still starting (a cluster that has just come up answers
    "No available agent to submit job" for a few seconds)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return str(client.submit_job(**spec))
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt submit {run|train} CONFIG --address URL [--no-wait] [runtime env options] [-- JOB ARGS]``."""
    parser = argparse.ArgumentParser(
        prog="earthgpt submit",
        description="Submit the archive job (run) or the training job (train) to a Ray cluster's Jobs API.",
    )
    parser.add_argument("kind", choices=sorted(JOBS))
    parser.add_argument("config", help="job config (YAML); validated here before submission")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", job_control.DEFAULT_ADDRESS),
                        help="the cluster's dashboard / Jobs API address (default: %(default)s)")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=True,
                      help="follow the logs until the job ends; exit code mirrors its state (default)")
    wait.add_argument("--no-wait", dest="wait", action="store_false",
                      help="return after submission, printing the job id")
    parser.add_argument("--timeout", type=float, help="while waiting, stop the job after this many seconds")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="pass AWS keys from this shell to the job (clusters without an instance role)")
    parser.add_argument("--ship-code", action="store_true",
                        help="upload this checkout's packages with the job (official rayproject/ray image)")
    parser.add_argument("--pip-deps", action="store_true",
                        help="have Ray pip-install the project's requirements on the nodes")
    parser.add_argument("--runtime-env", metavar="FILE", help="a Ray runtime env (YAML/JSON) to start from")
    parser.add_argument("--pip", action="append", help="extra pip requirement for the job's runtime env")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job env var")
    parser.epilog = "Arguments after `--` go to the job's own CLI (e.g. `-- --max-items 10`)."
    argv = list(sys.argv[1:] if argv is None else argv)
    job_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    config = str(Path(args.config).absolute())
    try:
        validate(args.kind, config)
    except ValueError as exc:
        print(f"earthgpt submit: invalid config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    bad_env = [item for item in args.env if "=" not in item]
    if bad_env:
        parser.error(f"--env expects KEY=VALUE, got {bad_env[0]!r}")
    env = dict(item.split("=", 1) for item in args.env)
    base: dict[str, Any] = {}
    if args.runtime_env:
        import yaml

        base = yaml.safe_load(Path(args.runtime_env).read_text()) or {}
    if args.ship_code:
        shipped = checkout_runtime_env()
        base["py_modules"] = [*(base.get("py_modules") or []), *shipped["py_modules"]]
        base["excludes"] = [*(base.get("excludes") or []), *shipped["excludes"]]
    pip = [*(project_requirements() if args.pip_deps else []), *(args.pip or [])]
    spec = job_spec(args.kind, config, job_args=job_args, forward_credentials=args.forward_credentials,
                    pip=pip or None, env=env, runtime_env=base)
    try:
        job_id, state = submit(args.address, spec, wait=args.wait, timeout=args.timeout)
    except job_control.cluster_errors() as exc:
        print(f"earthgpt submit: {exc}", file=sys.stderr)
        return 2
    print(f"earthgpt submit: job {job_id} {state}")
    if not args.wait:
        return 0
    return TIMEOUT_EXIT if state == "TIMEOUT" else job_control.exit_code(state)


if __name__ == "__main__":
    raise SystemExit(cli())
