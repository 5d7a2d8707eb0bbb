"""Using the archive job's results: tables as GeoDataFrames (eager or dask), embeddings as xarray, similar tiles,
pictures of tiles and scenes, and a run report.

Entry points::

    from pipelines.results import open_outputs
    out = open_outputs("demo-out/outputs")
    ships = out.detections(label="ship", min_confidence=0.5, bbox=(8.9, 44.4, 9.0, 44.5))

and the ``earthgpt similar``, ``earthgpt render`` and ``earthgpt report`` commands. Only committed units are ever
read (see :mod:`pipelines.archive.ledger`); ``docs/querying.md`` answers common questions with them.
"""

from __future__ import annotations

from pipelines.results.outputs import Outputs, open_outputs

__all__ = ["Outputs", "open_outputs"]
