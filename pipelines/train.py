"""``earthgpt train CONFIG`` / ``python -m pipelines.train CONFIG``: the training job's entry point as a module (what
Ray job submissions and the KubeRay RayJob run). The job itself lives in :mod:`pipelines.training`."""

from __future__ import annotations

from pipelines import training
from pipelines.training import *  # noqa: F403 - the job's public names, for code that imports them from here
from pipelines.training.export import DS_TAG, MODEL_DIR, TRAINER_STATE
from pipelines.training.recipe import build_model
from pipelines.training.records import source_sizes

_build_model = build_model  # the name benchmarks/gpu_train_check.py imports

__all__ = [*training.__all__, "DS_TAG", "MODEL_DIR", "TRAINER_STATE", "build_model", "source_sizes"]  # noqa: PLE0604

if __name__ == "__main__":
    # run through the importable module: Ray pickles the worker functions by module name, not as ``__main__``
    from pipelines.training.job import cli as _cli

    raise SystemExit(_cli())
