"""Start or join Ray for a job: a local instance listens on 127.0.0.1 only.

A plain ``ray.init()`` on Linux starts a single-node instance whose GCS, raylet, workers and agents (the metrics
export port included) listen on every interface, under the machine's network address: anyone who can reach the
machine can talk to them. Ray turns a ``127.0.0.1`` node address into the machine's address unless it runs in its
single-machine mode, so :func:`init_ray` starts the local instance in that mode: every socket it opens is on
loopback, and the dashboard is off. A cluster (``RAY_ADDRESS``, ``ray.address`` in a job config) is joined as it is;
who can reach it is the cluster's configuration (``cluster/``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    # Ray reads this switch once, at import, into ray._private.ray_constants; in single-machine mode the node address
    # is the loopback address, which makes every Ray process bind to it. Restored afterwards: once a node exists Ray
    # takes the address from it, and a later connection to a real cluster must see the normal setting.
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def init_ray(address: str | None = None, **kwargs: Any) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local instance bound to 127.0.0.1.

    Does nothing when Ray is already initialised in this process.

    Args:
        address: A cluster to join; None: ``RAY_ADDRESS`` if set, else start a local instance.
        **kwargs: Passed to ``ray.init``. Sizing arguments (``num_cpus``, ``object_store_memory``, ``_system_config``)
            are dropped when joining a cluster, which refuses them.

    Returns:
        Whether this call started (or joined) Ray, i.e. whether the caller should ``ray.shutdown()`` it.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs.setdefault("include_dashboard", False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        for key in ("num_cpus", "num_gpus", "object_store_memory", "_system_config", "resources"):
            kwargs.pop(key, None)
        ray.init(address=address, **kwargs)
        return True
    if kwargs.get("include_dashboard"):
        kwargs.setdefault("dashboard_host", LOOPBACK)
    with _single_machine_mode():
        ray.init(address="local", **kwargs)
    return True
