"""Shared fixtures: real local servers, started once per test run on free loopback ports.

- ``s3``: moto S3 server (request-recording), its env set for GDAL ``/vsis3/``, s3fs, pyarrow and boto3.
- ``pgstac``: stac-fastapi-pgstac on a throw-away PostgreSQL + PostGIS cluster.
- ``rustac_server``: factory for in-memory ``rustac serve`` STAC APIs.
- ``ray_local``: one local Ray instance sized for a 2-core box.

Tiers: unmarked tests are fast unit tests; ``integration`` needs servers or Ray; ``slow`` trains; ``gpu`` needs CUDA.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# No model hub, no accelerator probing noise: set before anything imports transformers or deepspeed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default; it sees a run's reports, checkpoints, failures and
# end only at a poll. The toy models' steps take a tenth of a second, so the tests' training runs were mostly that
# wait (the worker-kill test: 82 s at 2 s, 59 s at 0.25 s). Ray passes it from the driver to the controller and the
# workers; the nodes of cluster/local/up.sh get it from the environment the test starts them with.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# The venv's own tools first on PATH, as in an activated venv and on the nodes of cluster/local/up.sh. DeepSpeed
# JIT-builds its ops with the first `ninja` on PATH, and two ninja versions (the venv's, the system's) each read the
# other's build log as a changed command: every switch between them rebuilt `deepspeed_shm_comm` (about a minute).
_VENV_BIN = str(Path(sys.executable).parent)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, os.environ.get("PATH", "")])

from tests.harness.servers import (  # noqa: E402
    HarnessError,
    PgStacServer,
    RustacServer,
    S3Server,
    start_pgstac,
    start_rustac,
    start_s3,
)

# Fixtures that start Ray in the test process or a local multi-node cluster.
_RAY_FIXTURES = frozenset({"ray_local", "cluster"})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that start Ray (here, in a child process or as a local cluster) run one after another, in collection
    # order, in one pytest-xdist worker (`--dist loadgroup`): two Ray instances at once on a 2-core machine time out
    # at node start. The other tests spread over the workers. Without xdist the group mark is inert.
    for item in items:
        if "ray" in item.keywords or _RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("ray"))
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_runtest_setup(item: pytest.Item) -> None:
    # in an xdist worker with --dist loadgroup, a grouped test's node id carries its group ("...@ray"); with a pytest
    # / pytest-xdist pair that drops it, tests would start Ray in two workers at once and flake: fail them, saying why
    grouped = getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group")
    if grouped and "@" not in item.nodeid:
        pytest.fail(
            "pytest-xdist did not keep this test in the one worker that runs Ray (pytest-dev/pytest-xdist#1386, "
            "pytest >= 9.2): install the pytest pinned in pyproject.toml (make setup), or run without -n",
            pytrace=False,
        )


def _start(starter: Callable, *args):  # type: ignore[no-untyped-def]
    try:
        return starter(*args)
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A real S3-compatible server; its client env is set in ``os.environ`` for the whole session."""
    server = _start(start_s3)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def pgstac() -> Iterator[PgStacServer]:
    """A real STAC API (stac-fastapi-pgstac) with full CQL2 filter and sort support."""
    server = _start(start_pgstac)
    server.add_queryable("eo:cloud_cover", "number")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rustac_server() -> Iterator[Callable[[list[dict], list[dict]], str]]:
    """Factory: ``rustac_server(collections, items) -> url`` of a fresh in-memory STAC API."""
    started: list[RustacServer] = []

    def make(collections: list[dict], items: list[dict]) -> str:
        server = _start(start_rustac, collections, items)
        started.append(server)
        return server.url

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """One local Ray instance for the session (2 CPUs, 256 MiB object store).

    The ``s3`` server is always started first, so Ray workers inherit its environment (the job writes its outputs
    from Ray tasks; a worker started before the S3 environment existed could not reach it).
    """
    request.getfixturevalue("s3")
    import ray

    from pipelines.raylocal import init_ray

    # "local": never attach to a cluster started with `ray start` on this machine; on 127.0.0.1 like the jobs' Ray.
    # On a loaded machine Ray's node start (30 s, fixed in Ray) can time out: a failed start is retried.
    for attempt in range(3):
        try:
            init_ray("local", num_cpus=2, object_store_memory=256 * 2**20, logging_level="warning",
                     log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
