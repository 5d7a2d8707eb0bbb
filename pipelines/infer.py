"""``python -m pipelines.infer CONFIG``: the archive job's entry point as a module (what Ray job submissions, the
KubeRay manifests and the schedules run). The job itself lives in :mod:`pipelines.archive.job`."""

from __future__ import annotations

import sys

from pipelines.archive.job import cli, run

__all__ = ["cli", "run"]

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
