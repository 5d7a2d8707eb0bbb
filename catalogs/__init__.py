"""STAC scenes and raster IO for the archive pipeline. Imports no model code and no Ray.

The path of a tile, module by module:

1. :mod:`catalogs.search` — ``search_scenes(url, collections=, bbox=, datetime=, filter=, updated_since=)`` pages
   lazily through a STAC API (pystac-client, retries, CQL2 client-side where the API cannot filter).
2. :mod:`catalogs.scene` — ``Scene.from_item(item, href_policy=)``: grid, bands and the collection's recipe;
   :mod:`catalogs.hrefs` refuses asset hrefs outside the allowed schemes/prefixes.
3. :mod:`catalogs.recipes` — per-collection YAML under ``catalogs/collections/``: DN → physical values → three
   channels in [0, 1] + valid mask (optical reflectance, SAR dB, thermal Kelvin).
4. :mod:`catalogs.tiling` — ``plan_tiles(height, width, size, overlap)``: windows, edges shifted inward.
5. :mod:`catalogs.io` — ``configure_gdal()`` once per process; ``SceneReader(scene)`` opens each band once and
   ``read(window)`` returns a ``TileImage`` (local paths and ``s3://`` via ``/vsis3/`` alike).
6. :mod:`catalogs.errors` — typed ``SceneError`` subclasses a job records as ``errors`` rows.

How each asset href is reached (Planetary Computer SAS signing, requester-pays and per-store S3 endpoints and
credentials) is :mod:`catalogs.access`, driven by ``catalogs/stores.yaml``; :mod:`catalogs.check` reads one window of a
few items (``earthgpt catalog check``). The supported public collections and their set-up: ``docs/catalogs.md``.

Also: :mod:`catalogs.ingest` (STAC items for COG folders / S3 prefixes, pgstac loading) and :mod:`catalogs.toyworld`
(the seeded multi-sensor demo archive with ground truth and training chips).
"""
