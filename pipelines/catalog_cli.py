"""``earthgpt catalog``: STAC catalog tools.

- ``earthgpt catalog toyworld OUT --scenes N --seed S [--chips-per-scene K] [--preview]`` generates the toy-world
  archive (COGs, STAC items, ground truth, chips + ``annotations.jsonl``) and the MMRS-1M instruction JSONs for it.
- ``earthgpt catalog ingest SOURCE --collection ID --out DIR [--pgstac-dsn DSN]`` builds STAC items for a folder or
  ``s3://`` prefix of COGs and writes NDJSON + collection JSON (and loads them into pgstac).

The MMRS-1M instruction JSONs are written by :mod:`pipelines.mmrs`, not by ``catalogs`` (which may not import the
model package): the same :mod:`earthgpt.tasks` templates format training targets and parse inference answers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys


def _toyworld(ns: argparse.Namespace) -> int:
    from catalogs.toyworld import generate_toyworld

    world = generate_toyworld(
        ns.out, scenes=ns.scenes, seed=ns.seed, chips_per_scene=ns.chips_per_scene, chip_size=ns.chip_size,
        preview=ns.preview, href_base=ns.href_base,
    )
    print(f"toy world: {len(world.scene_ids)} scenes, {world.n_objects} objects, {world.n_chips} chips "
          f"in {world.seconds:.1f} s -> {world.root}")
    if not ns.no_instructions:
        from pipelines.mmrs import write_mmrs

        paths = write_mmrs(world.root, world.root / "mmrs", annotations=world.annotations_path)
        print(f"MMRS-1M instructions: {', '.join(sorted(paths))} -> {world.root / 'mmrs'}")
    if world.preview_path:
        print(f"preview: {world.preview_path}")
    return 0


def _ingest(ns: argparse.Namespace) -> int:
    from catalogs.ingest import ingest

    when = dt.datetime.fromisoformat(ns.datetime.replace("Z", "+00:00")) if ns.datetime else None
    if when is not None and when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    result = ingest(
        ns.source, ns.out, collection=ns.collection, sensor=ns.sensor, pattern=ns.pattern, datetime=when,
        pgstac_dsn=ns.pgstac_dsn,
    )
    print(f"ingest: {result.count} items -> {result.items_path}, {result.collection_path}"
          + ("; loaded into pgstac" if ns.pgstac_dsn else ""))
    for err in result.errors:
        print(f"  skipped {err['item_id']}: {err['error_type']}: {err['message']}", file=sys.stderr)
    return 0 if result.count or not result.errors else 1


def _parser() -> argparse.ArgumentParser:
    from catalogs.ingest import DEFAULT_PATTERN

    parser = argparse.ArgumentParser(prog="earthgpt catalog", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)

    toy = sub.add_parser("toyworld", help="generate the seeded multi-sensor toy-world archive")
    toy.add_argument("out", help="output folder")
    toy.add_argument("--scenes", type=int, default=6, help="number of scenes (sensors take turns)")
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--chips-per-scene", type=int, default=400, help="training chips per training scene")
    toy.add_argument("--chip-size", type=int, default=64)
    toy.add_argument("--href-base", default=None, help="asset href prefix for the items, e.g. s3://bucket/world")
    toy.add_argument("--preview", action="store_true", help="write preview.png: one chip per sensor with boxes")
    toy.add_argument("--no-instructions", action="store_true", help="do not write the MMRS-1M JSONs")
    toy.set_defaults(run=_toyworld)

    ing = sub.add_parser("ingest", help="build STAC items for a folder or s3:// prefix of COGs")
    ing.add_argument("source", help="local folder or s3://bucket/prefix")
    ing.add_argument("--collection", required=True, help="collection id (its recipe gives sensor and band defaults)")
    ing.add_argument("--out", required=True, help="folder for items.ndjson and collection.json")
    ing.add_argument("--sensor", choices=["optical", "sar", "thermal"], default=None)
    ing.add_argument("--pattern", default=DEFAULT_PATTERN, help="file-name regex with groups scene, band [, date]")
    ing.add_argument("--datetime", default=None, help="acquisition time for files without one (ISO 8601)")
    ing.add_argument("--pgstac-dsn", default=None, help="also upsert into this pgstac database")
    ing.set_defaults(run=_ingest)
    return parser


def cli(argv: list[str]) -> int:
    """Run ``earthgpt catalog`` with ``argv`` (the arguments after ``catalog``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = _parser().parse_args(argv)
    return int(ns.run(ns))
