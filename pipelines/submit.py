"""Submit the archive job or the training job to a Ray cluster through the Ray Jobs API.

``earthgpt submit run CONFIG --address http://HEAD:8265`` validates the config here first (a bad config is refused
before anything reaches the cluster, naming the field), then submits ``python -m pipelines.infer CONFIG`` as a Ray
job and, unless ``--no-wait``, follows its logs until it ends. The cluster's nodes must have this package installed
(the image, or ``--pip``); configs and data are referenced by paths the cluster can read (``s3://`` or a shared disk).

Token authentication (Ray's default for new clusters) is handled by Ray's client: it reads ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# Settings that tell GDAL, s3fs and pyarrow where the object store is; safe to forward to a cluster.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING",
    "AWS_REGION", "AWS_DEFAULT_REGION", "GDAL_DISABLE_READDIR_ON_OPEN",
)
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
JOBS = {"run": "pipelines.infer", "train": "pipelines.train"}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def validate(kind: str, config: str) -> None:
    """Parse and validate ``config`` for ``kind`` (``run`` | ``train``) here, before any cluster work.

    Raises:
        ValueError: the config is invalid; the message names the fields.
    """
    if kind == "run":
        from pipelines.config import load_config as load_infer
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
    """
    if kind not in JOBS:
        raise ValueError(f"kind must be one of {sorted(JOBS)}, got {kind!r}")
    names = FORWARDED_ENV + (CREDENTIAL_ENV if forward_credentials else ())
    env_vars = {k: os.environ[k] for k in names if os.environ.get(k)}
    env_vars.update(env or {})
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    argv = " ".join([f"python -m {JOBS[kind]}", _quote(config), *map(_quote, job_args or [])])
    return {"entrypoint": argv, "runtime_env": runtime_env, "metadata": {"earthgpt.kind": kind}}


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def submit(address: str, spec: dict[str, Any], *, wait: bool = True, timeout: float | None = None) -> tuple[str, str]:
    """Submit ``spec`` to the Jobs API at ``address``; optionally stream logs until the job ends.

    Returns:
        ``(job_id, status)``; status is ``PENDING``/``RUNNING`` when not waiting.
    """
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    job_id = _submit_when_ready(client, spec)
    if not wait:
        return job_id, str(client.get_job_status(job_id))
    deadline = None if timeout is None else time.monotonic() + timeout
    printed = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in TERMINAL:
            return job_id, status
        if deadline is not None and time.monotonic() > deadline:
            client.stop_job(job_id)
            return job_id, "TIMEOUT"
        time.sleep(1.0)


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
    """``earthgpt submit {run|train} CONFIG --address URL [--no-wait] [-- JOB ARGS]``."""
    parser = argparse.ArgumentParser(
        prog="earthgpt submit",
        description="Submit the archive job (run) or the training job (train) to a Ray cluster's Jobs API.",
    )
    parser.add_argument("kind", choices=sorted(JOBS))
    parser.add_argument("config", help="job config (YAML); validated here before submission")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                        help="the cluster's dashboard / Jobs API address (default: %(default)s)")
    parser.add_argument("--no-wait", action="store_true", help="return after submission instead of following logs")
    parser.add_argument("--timeout", type=float, help="stop the job after this many seconds of waiting")
    parser.add_argument("--forward-credentials", action="store_true",
                        help="pass AWS keys from this shell to the job (clusters without an instance role)")
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
    env = dict(item.split("=", 1) for item in args.env)
    spec = job_spec(args.kind, config, job_args=job_args, forward_credentials=args.forward_credentials,
                    pip=args.pip, env=env)
    job_id, status = submit(args.address, spec, wait=not args.no_wait, timeout=args.timeout)
    print(f"earthgpt submit: job {job_id} {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


if __name__ == "__main__":
    raise SystemExit(cli())
