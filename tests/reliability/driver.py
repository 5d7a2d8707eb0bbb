"""``python -m tests.reliability.driver TRUTH [earthgpt run arguments]``: the archive job's own command line
(:func:`pipelines.archive.job.cli`, exit codes and all) with the oracle model stage, so the chaos suite can kill and
rerun a real driver process without model time. ``TRUTH`` is the toy world's ``ground_truth.parquet``."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq

from pipelines.archive.job import cli
from tests.pipelines.oracle import oracle_stage


def main(argv: list[str]) -> int:
    truth = pq.read_table(argv[0], columns=["collection", "scene_id", "label", "pixel_box"]).to_pylist()
    return cli(argv[1:], model_stage=oracle_stage(truth))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
