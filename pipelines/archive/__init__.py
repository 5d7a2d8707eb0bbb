"""The archive job: STAC items → tiles → EarthGPT → GeoParquet tables and Zarr arrays, incremental.

The path of a tile, one module per step (read :mod:`pipelines.archive.job` top to bottom first):

- :mod:`~pipelines.archive.config` — the job config, validated once at the entry point; the output key.
- :mod:`~pipelines.archive.source` — the STAC search split into disjoint windows, one read task each; items →
  scene rows, committed scenes skipped, bad items recorded.
- :mod:`~pipelines.archive.stages` — the Ray Data stages (read tiles, model actors, parse) and scene assembly
  (cross-tile NMS, rows, tile grids), each a small class or function with declared columns.
- :mod:`~pipelines.archive.georef` — pixel boxes to scene CRS and WGS84, antimeridian splits, NMS.
- :mod:`~pipelines.archive.store` — the output root: GeoParquet tables and Zarr groups.
- :mod:`~pipelines.archive.ledger` — commit units, recovery, the committed-scene index, watermarks.
- :mod:`~pipelines.archive.lease` — one run per output key: the lease in the output store, its heartbeat and fence.
- :mod:`~pipelines.archive.job` — the run: one streaming execution, commits while the model works on.
- :mod:`~pipelines.archive.demo` — ``earthgpt demo``: the toy world through the whole job.
"""
