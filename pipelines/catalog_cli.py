"""``earthgpt catalog``: STAC catalog tools.

- ``earthgpt catalog toyworld OUT --scenes N --seed S [--chips-per-scene K] [--preview]`` generates the toy-world
  archive (COGs, STAC items, ground truth, chips + ``annotations.jsonl``) and the MMRS-1M instruction JSONs for it.
- ``earthgpt catalog ingest SOURCE --collection ID --out DIR [--pgstac-dsn DSN]`` builds STAC items for a folder or
  ``s3://`` prefix of COGs and writes NDJSON + collection JSON (and loads them into pgstac).

The MMRS-1M answers are written here, not in ``catalogs`` (which may not import the model package): the same
:mod:`earthgpt.tasks` templates format training targets and parse inference answers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# catalogs names the thermal-infrared sensor "thermal"; the task templates call it "infrared".
TASK_SENSOR = {"optical": "optical", "sar": "sar", "thermal": "infrared"}


def _caption(record: dict[str, Any]) -> str:
    from earthgpt.tasks import SENSOR_NOUNS, count_phrase

    noun = SENSOR_NOUNS[TASK_SENSOR[record["sensor"]]]
    counts = Counter(o["label"] for o in record["objects"])
    place = record["scene_class"]
    article = "an" if place[0] in "aeiou" else "a"
    text = f"{'An' if noun[0] in 'aeiou' else 'A'} {noun} of {article} {place} area"
    if counts:
        text += " with " + " and ".join(count_phrase(n, label) for label, n in sorted(counts.items()))
    return text + "."


def write_mmrs_instructions(annotations_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write MMRS-1M-format (LLaVA-style) instruction JSONs for the chips of ``annotations.jsonl``.

    One file per task and split: ``toyworld_{cls,cap,det,vg}_{train,val}.json``. Each record is
    ``{"id", "image", "sensor", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}]}``; ``image`` is the chip path relative to the folder of ``annotations_path``
    (the toy-world root: pass it as the image root). Tasks:

    - ``cls``: scene classification (the chip's scene class);
    - ``cap``: a caption with the objects counted (``... of a harbor area with 3 ships.``);
    - ``det``: detection of all objects, boxes in the padded-square normalised form;
    - ``vg``: visual grounding for every label that occurs exactly once in a chip (``the ship``).

    Args:
        annotations_path: The toy world's ``annotations.jsonl``.
        out_dir: Folder for the JSON files (created).

    Returns:
        ``{"{task}_{split}": path}`` of the files written.
    """
    from earthgpt.tasks import build_prompt, format_answer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[str, list[dict[str, Any]]] = {}

    def add(task: str, rec: dict[str, Any], prompt: str, answer: str) -> None:
        key = f"{task}_{rec['split']}"
        rows = records.setdefault(key, [])
        rows.append({
            "id": f"{Path(rec['image']).stem}-{task}-{len(rows)}",
            "image": rec["image"],
            "sensor": rec["sensor"],
            "conversations": [
                {"from": "human", "value": "<image>\n" + prompt},
                {"from": "gpt", "value": answer},
            ],
        })

    with open(annotations_path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            sensor = TASK_SENSOR[rec["sensor"]]
            hw = rec["size"]
            boxes = [{"label": o["label"], "bbox": o["box"]} for o in rec["objects"]]
            add("cls", rec, build_prompt("classify", sensor), format_answer("classify", rec["scene_class"]))
            add("cap", rec, build_prompt("caption", sensor), format_answer("caption", _caption(rec)))
            add("det", rec, build_prompt("detect", sensor), format_answer("detect", boxes, hw))
            counts = Counter(o["label"] for o in rec["objects"])
            for obj in rec["objects"]:
                if counts[obj["label"]] == 1:
                    prompt = build_prompt("ground", sensor, description=f"the {obj['label']}")
                    add("vg", rec, prompt, format_answer("ground", {"label": obj["label"], "bbox": obj["box"]}, hw))
    paths: dict[str, Path] = {}
    for key, rows in sorted(records.items()):
        path = out / f"toyworld_{key}.json"
        path.write_text(json.dumps(rows))
        paths[key] = path
    return paths


def _toyworld(ns: argparse.Namespace) -> int:
    from catalogs.toyworld import generate_toyworld

    world = generate_toyworld(
        ns.out, scenes=ns.scenes, seed=ns.seed, chips_per_scene=ns.chips_per_scene, chip_size=ns.chip_size,
        preview=ns.preview, href_base=ns.href_base,
    )
    print(f"toy world: {len(world.scene_ids)} scenes, {world.n_objects} objects, {world.n_chips} chips "
          f"in {world.seconds:.1f} s -> {world.root}")
    if not ns.no_instructions:
        try:
            paths = write_mmrs_instructions(world.annotations_path, world.root / "mmrs")
        except ImportError as exc:  # the model package is optional for catalog work
            print(f"MMRS-1M instructions not written ({exc})", file=sys.stderr)
        else:
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
