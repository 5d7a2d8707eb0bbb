"""``earthgpt catalog``: STAC catalog tools.

- ``earthgpt catalog toyworld OUT --scenes N --seed S [--chips-per-scene K] [--preview]`` generates the toy-world
  archive (COGs, STAC items, ground truth, chips + ``annotations.jsonl``) and the MMRS-1M instruction JSONs for it.
- ``earthgpt catalog ingest SOURCE --collection ID --out DIR [--pgstac-dsn DSN]`` builds STAC items for a folder or
  ``s3://`` prefix of COGs and writes NDJSON + collection JSON (and loads them into pgstac).
- ``earthgpt catalog collections [--recipes DIR]`` lists the supported collections: sensor, bands (with units),
  composite and the catalogs that publish them.
- ``earthgpt catalog check URL --collection C [--bbox W S E N] [--datetime I] [--limit N]`` fetches a few items,
  builds scenes, reads one window from each and prints what it saw (run it before a nightly job).

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


def _recipes(dirs: list[str] | None):  # type: ignore[no-untyped-def]
    from catalogs.recipes import builtin_recipes, load_recipes

    return load_recipes(*dirs) if dirs else builtin_recipes()


def _collections(ns: argparse.Namespace) -> int:
    table = _recipes(ns.recipes)
    if ns.json:
        import json

        rows = [{"collection": cid, "sensor": r.sensor, "composite": r.composite, "composites": list(r.composites),
                 "bands": {n: b.units for n, b in r.bands.items()},
                 "refused": r.refuse.model_dump() if r.refuse else None,
                 "sources": [s.model_dump() for s in r.sources if s.collection == cid]}
                for cid, r in sorted(table.items())]
        print(json.dumps(rows, indent=2))
        return 0
    for cid, recipe in sorted(table.items()):
        composite = recipe.composite or recipe.description
        if recipe.refuse is not None:
            composite = f"REFUSED ({recipe.refuse.reason.split(',')[0]}); use {', '.join(recipe.refuse.suggest)}"
        by_unit: dict[str, list[str]] = {}
        for name, band in recipe.bands.items():
            by_unit.setdefault(band.units or "DN", []).append(name)
        print(f"{cid}  [{recipe.sensor}]  {composite}")
        if recipe.composites and recipe.refuse is None:
            print(f"    also:    {'; '.join(recipe.composites)}")
        bands = "; ".join(", ".join(names) + f" ({unit})" for unit, names in by_unit.items())
        print(f"    bands:   {bands}")
        sources = [f"{s.name} <{s.stac_url}> via {s.access}" for s in recipe.sources if s.collection == cid]
        for i, source in enumerate(sources or ["local (no public source)"]):
            print(f"    {'source:' if i == 0 else '':<8} {source}")
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _check(ns: argparse.Namespace) -> int:
    from catalogs.check import check_items
    from catalogs.hrefs import HrefPolicy
    from catalogs.search import search_items

    schemes = {"s3", "https", *ns.allow_scheme}
    policy = HrefPolicy(allowed_schemes=frozenset(schemes), allowed_prefixes=tuple(ns.allow_prefix))
    items = list(search_items(ns.url, collections=[ns.collection], bbox=ns.bbox, datetime=ns.datetime,
                              max_items=ns.limit))
    if not items:
        print(f"check: no items in {ns.collection!r} at {ns.url} for this search", file=sys.stderr)
        return 1
    results = check_items(items, href_policy=policy, recipes=_recipes(ns.recipes), window_size=ns.window)
    for r in results:
        if not r.ok:
            err = r.error or {}
            print(f"{r.item_id}: FAILED {err.get('error_type')} at {err.get('stage')}: {err.get('message')}")
            continue
        shape = r.shape or (0, 0)
        print(f"{r.item_id}: {r.crs} grid {shape[0]}x{shape[1]} @ {_fmt(r.resolution)} m; window {r.window} "
              f"valid {100 * (r.valid_fraction or 0):.1f} %")
        for note in r.notes:
            print(f"  note: {note}")
        for b in r.bands:
            print(f"  {b.name:<7} asset {b.key:<9} via {b.via}{' (' + b.store + ')' if b.store else ''}: "
                  f"DN*{b.scale:g}{b.offset:+g}, nodata {b.nodata}; p2/median/p98 {_fmt(b.p2)} / {_fmt(b.median)} / "
                  f"{_fmt(b.p98)} {b.unit or ''}")
    failed = sum(not r.ok for r in results)
    print(f"check: {len(results) - failed} of {len(results)} items read")
    return 0 if failed == 0 else 1


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

    col = sub.add_parser("collections", help="list the supported collections (sensor, bands, composite, source)")
    col.add_argument("--recipes", action="append", default=None, help="folder of extra recipe YAMLs (repeatable)")
    col.add_argument("--json", action="store_true", help="print JSON instead of a table")
    col.set_defaults(run=_collections)

    chk = sub.add_parser("check", help="read one window from a few items of a collection; print what was seen")
    chk.add_argument("url", help="STAC API root")
    chk.add_argument("--collection", required=True)
    chk.add_argument("--bbox", type=float, nargs=4, metavar=("WEST", "SOUTH", "EAST", "NORTH"), default=None)
    chk.add_argument("--datetime", default=None, help="RFC 3339 instant or interval")
    chk.add_argument("--limit", type=int, default=3, help="items to check")
    chk.add_argument("--window", type=int, default=256, help="side of the window read from each scene (pixels)")
    chk.add_argument("--recipes", action="append", default=None, help="folder of extra recipe YAMLs (repeatable)")
    chk.add_argument("--allow-scheme", action="append", default=[], help="also allow this href scheme (e.g. http)")
    chk.add_argument("--allow-prefix", action="append", default=[], help="only read hrefs under these prefixes")
    chk.set_defaults(run=_check)
    return parser


def cli(argv: list[str]) -> int:
    """Run ``earthgpt catalog`` with ``argv`` (the arguments after ``catalog``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ns = _parser().parse_args(argv)
    return int(ns.run(ns))
