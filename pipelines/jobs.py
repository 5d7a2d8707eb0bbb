"""Control jobs on a Ray cluster through its Jobs API: ``earthgpt jobs list|status|logs|stop``.

``earthgpt submit`` starts jobs; these commands watch and end them, from any machine that reaches the cluster's
dashboard port (``--address``, default ``RAY_API_SERVER_ADDRESS`` or ``http://127.0.0.1:8265``). Token
authentication is handled by Ray's client (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).

Exit codes: ``status`` and ``logs --follow`` mirror the job's state (0 SUCCEEDED, 1 FAILED or STOPPED, 3 still
PENDING/RUNNING); ``stop`` exits 0 once the job is STOPPED; 2 for no cluster at the address, a missing token or an
unknown job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
NOT_FINISHED = 3
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def cluster_errors() -> tuple[type[BaseException], ...]:
    """What the Jobs API client raises for a cluster-side problem, reported as one line rather than a traceback:
    no cluster at the address, a missing or wrong token, an unknown job id."""
    from ray.exceptions import AuthenticationError

    return (ConnectionError, RuntimeError, AuthenticationError)


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for the cluster whose dashboard is at ``address``."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def job_state(jobs: Any, job_id: str) -> str:
    """The job's state as a plain string (``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED``, ``STOPPED``)."""
    return str(jobs.get_job_status(job_id)).split(".")[-1]


def follow(jobs: Any, job_id: str, *, timeout: float | None = None, out: Any = None) -> str:
    """Print the job's logs as they come until it ends (or ``timeout`` seconds pass); return its final state.

    On timeout the job is left running and its current state is returned.
    """
    out = out or sys.stdout

    async def _tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(_tail(), timeout))
    except TimeoutError:
        return job_state(jobs, job_id)
    # the log stream closes when the driver exits; the state follows a moment later
    deadline = time.monotonic() + 30
    while (state := job_state(jobs, job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def wait_until_finished(jobs: Any, job_id: str, timeout: float = 60.0) -> str:
    """Poll the job's state until it is terminal or ``timeout`` passes; return the last state seen."""
    deadline = time.monotonic() + timeout
    while (state := job_state(jobs, job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    return state


def exit_code(state: str) -> int:
    """Shell exit code for a job state: 0 SUCCEEDED, 1 FAILED/STOPPED, 3 not finished."""
    return EXIT_CODES.get(state, NOT_FINISHED)


def _list(jobs: Any, args: argparse.Namespace) -> int:
    rows = sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0)
    if args.state:
        rows = [j for j in rows if str(j.status).split(".")[-1] in args.state]
    print(f"{'SUBMISSION ID':<30} {'STATE':<10} {'KIND':<6} {'STARTED (UTC)':<20} ENTRYPOINT")
    for j in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(j.start_time / 1000)) if j.start_time else "-"
        kind = (j.metadata or {}).get("earthgpt.kind", "-")
        state = str(j.status).split(".")[-1]
        print(f"{j.submission_id or j.job_id or '-':<30} {state:<10} {kind:<6} {started:<20} {j.entrypoint}")
    return 0


def _status(jobs: Any, args: argparse.Namespace) -> int:
    info = jobs.get_job_info(args.job_id)
    state = str(info.status).split(".")[-1]
    if args.json:
        data = info.model_dump() if hasattr(info, "model_dump") else info.dict()
        print(json.dumps(data, default=str))
    else:
        print(f"{args.job_id}: {state}" + (f" ({info.message})" if info.message else ""))
    return exit_code(state)


def _logs(jobs: Any, args: argparse.Namespace) -> int:
    if args.follow:
        return exit_code(follow(jobs, args.job_id, timeout=args.timeout))
    sys.stdout.write(jobs.get_job_logs(args.job_id))
    return 0


def _stop(jobs: Any, args: argparse.Namespace) -> int:
    if not jobs.stop_job(args.job_id):
        state = job_state(jobs, args.job_id)
        print(f"{args.job_id}: already {state}")
        return exit_code(state)
    if not args.wait:
        print(f"{args.job_id}: stop requested")
        return 0
    state = wait_until_finished(jobs, args.job_id, timeout=args.timeout or 60.0)
    print(f"{args.job_id}: {state}")
    return 0 if state == "STOPPED" else exit_code(state)  # stopped as asked; else it ended (or not) on its own


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt jobs {list,status,logs,stop} [JOB_ID] [--address URL]``."""
    parser = argparse.ArgumentParser(prog="earthgpt jobs", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", DEFAULT_ADDRESS),
                        help="the cluster's dashboard / Jobs API address (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="jobs known to the cluster, oldest first")
    p.add_argument("--state", action="append", choices=["PENDING", "RUNNING", *TERMINAL],
                   help="only jobs in this state (repeatable)")
    p = sub.add_parser("status", parents=[common], help="a job's state; the exit code mirrors it")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print everything the cluster knows of the job, as JSON")
    p = sub.add_parser("logs", parents=[common], help="a job's logs so far, or --follow them until it ends")
    p.add_argument("job_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends; exit code mirrors it")
    p.add_argument("--timeout", type=float, help="with --follow: give up after this many seconds")
    p = sub.add_parser("stop", parents=[common], help="stop a job (its driver and tasks)")
    p.add_argument("job_id")
    p.add_argument("--no-wait", dest="wait", action="store_false", help="return once the stop is requested")
    p.add_argument("--timeout", type=float, help="seconds to wait for the job to end (default 60)")
    args = parser.parse_args(argv)
    try:
        jobs = client(args.address)
        return {"list": _list, "status": _status, "logs": _logs, "stop": _stop}[args.command](jobs, args)
    except cluster_errors() as exc:
        print(f"earthgpt jobs {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
