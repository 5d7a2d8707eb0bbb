"""The toy world's chip annotations -> MMRS-1M-format instruction JSONs (one file per task and split).

``catalogs.toyworld.generate_toyworld`` writes ``annotations.jsonl`` (one record per 64-px chip: ``image``,
``sensor``, ``split``, ``size``, ``scene_class``, ``caption``, ``objects`` with chip pixel boxes and region captions).
This module turns each chip into
LLaVA-style records whose questions and answers come from ``earthgpt.tasks`` (``build_prompt`` / ``format_answer``),
the same templates the inference job prompts with, so a model trained on these files answers the job's prompts.

Files written (``{task}`` below, ``{split}`` = ``train`` / ``val``): ``toyworld_det_{split}.json`` (detection),
``toyworld_cls_{split}.json`` (scene class), ``toyworld_count_vqa_{split}.json`` (object count as VQA),
``toyworld_rsvg_{split}.json`` (grounding, for chips where a class occurs exactly once),
``toyworld_cap_{split}.json`` (one-sentence image caption), ``toyworld_region_cap_{split}.json`` (one record per object:
its box in the question, its region caption as the answer) and ``toyworld_multiturn_{split}.json`` (classification
then detection in one conversation). Chips of a world generated before captions existed have none: the caption files
then get no records. Image paths stay relative
to the toy world's root, as in MMRS-1M; pass that root as the source's ``image_root``.

Usage: ``python -m pipelines.mmrs WORLD_DIR [--out DIR] [--tasks det,cls,...]``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from earthgpt.data import normalise_sensor
from earthgpt.tasks import build_prompt, format_answer

TASK_FILES: dict[str, str] = {
    "det": "detect",
    "cls": "classify",
    "count_vqa": "vqa",
    "rsvg": "ground",
    "cap": "caption",
    "region_cap": "region_caption",
    "multiturn": "",
}
"""File tag -> ``earthgpt.tasks`` task (multi-turn files carry a task per turn, none per record)."""


def _human(question: str) -> dict[str, str]:
    return {"from": "human", "value": "<image>\n" + question}


def _gpt(answer: str) -> dict[str, str]:
    return {"from": "gpt", "value": answer}


def chip_records(
    chip: Mapping[str, Any], tags: Sequence[str] = tuple(TASK_FILES)
) -> Iterator[tuple[str, dict]]:
    """The instruction records of one annotated chip, as ``(file tag, record)`` pairs.

    Args:
        chip: One ``annotations.jsonl`` record.
        tags: Which files to make records for (keys of :data:`TASK_FILES`).

    Yields:
        ``(tag, record)``; a tag yields nothing where the chip has no such question (grounding needs a class that
        occurs exactly once; caption files need the chip's ``caption`` / the object's ``caption``).
    """
    sensor = normalise_sensor(chip.get("sensor"))
    width, height = (int(v) for v in chip["size"])
    hw = (height, width)
    objects = [{"label": o["label"], "box": [float(v) for v in o["box"]]} for o in chip.get("objects", [])]
    base = {"image": chip["image"], "sensor": sensor, "split": chip.get("split", "train")}
    stem = Path(chip["image"]).stem
    detect_q = build_prompt("detect", sensor)
    detect_a = format_answer("detect", objects, hw)
    classify_q = build_prompt("classify", sensor)
    for tag in tags:
        if tag == "det":
            yield (
                tag,
                {
                    **base,
                    "id": f"{stem}-det",
                    "task": "detect",
                    "conversations": [_human(detect_q), _gpt(detect_a)],
                },
            )
        elif tag == "cls":
            yield tag, {**base, "id": f"{stem}-cls", "task": "classify",
                        "conversations": [_human(classify_q), _gpt(chip["scene_class"])]}  # fmt: skip
        elif tag == "count_vqa":
            question = build_prompt("vqa", sensor, question="How many objects are there in this image?")
            yield tag, {**base, "id": f"{stem}-count", "task": "vqa",
                        "conversations": [_human(question), _gpt(str(len(objects)))]}  # fmt: skip
        elif tag == "rsvg":
            counts = Counter(o["label"] for o in objects)
            for label in sorted(lab for lab, n in counts.items() if n == 1):
                box = next(o["box"] for o in objects if o["label"] == label)
                question = build_prompt("ground", sensor, description=f"the {label}")
                yield tag, {**base, "id": f"{stem}-rsvg-{label}", "task": "ground",
                            "conversations": [_human(question), _gpt(format_answer("ground", box, hw))]}  # fmt: skip
        elif tag == "cap":
            if chip.get("caption"):
                yield tag, {**base, "id": f"{stem}-cap", "task": "caption",
                            "conversations": [_human(build_prompt("caption", sensor)),
                                              _gpt(format_answer("caption", chip["caption"]))]}  # fmt: skip
        elif tag == "region_cap":
            for k, (obj, raw) in enumerate(zip(objects, chip.get("objects", []), strict=True)):
                if not raw.get("caption"):
                    continue
                question = build_prompt("region_caption", sensor, box=obj["box"], image_hw=hw)
                yield tag, {**base, "id": f"{stem}-region-{k}", "task": "region_caption",
                            "conversations": [_human(question),
                                              _gpt(format_answer("region_caption", raw["caption"]))]}  # fmt: skip
        elif tag == "multiturn":
            yield tag, {**base, "id": f"{stem}-multi",
                        "conversations": [_human(classify_q), _gpt(chip["scene_class"]),
                                          {"from": "human", "value": detect_q}, _gpt(detect_a)]}  # fmt: skip
        else:
            raise ValueError(f"unknown file tag {tag!r}; known: {sorted(TASK_FILES)}")


def read_annotations(path: str | Path) -> Iterator[dict[str, Any]]:
    """Streams the chip records of an ``annotations.jsonl`` file."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def write_mmrs(
    world_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    tags: Iterable[str] = tuple(TASK_FILES),
    annotations: str | Path | None = None,
) -> dict[str, Path]:
    """Writes the MMRS-1M-format JSON files of a toy world.

    Args:
        world_dir: The toy world's root (holds ``annotations.jsonl`` and ``chips/``).
        out_dir: Where to write (default ``{world_dir}/mmrs``).
        tags: Which files (keys of :data:`TASK_FILES`).
        annotations: The annotations file, default ``{world_dir}/annotations.jsonl``.

    Returns:
        ``{"det_train": path, "det_val": path, ...}``: every file written, with its record count in the name's
        JSON (a file is written for each tag and split that has records).
    """
    world = Path(world_dir)
    out = Path(out_dir) if out_dir is not None else world / "mmrs"
    out.mkdir(parents=True, exist_ok=True)
    tag_list = list(tags)
    buckets: dict[str, list[dict[str, Any]]] = {}
    for chip in read_annotations(annotations or world / "annotations.jsonl"):
        for tag, record in chip_records(chip, tag_list):
            buckets.setdefault(f"{tag}_{record['split']}", []).append(record)
    written = {}
    for key, records in sorted(buckets.items()):
        path = out / f"toyworld_{key}.json"
        path.write_text(json.dumps(records, separators=(",", ":")) + "\n", encoding="utf-8")
        written[key] = path
    return written


def cli(argv: list[str] | None = None) -> int:
    """``python -m pipelines.mmrs WORLD_DIR [--out DIR] [--tasks det,cls]``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.mmrs", description=__doc__.splitlines()[0])
    parser.add_argument("world_dir", help="toy world root (holds annotations.jsonl)")
    parser.add_argument("--out", default=None, help="output folder (default WORLD_DIR/mmrs)")
    parser.add_argument(
        "--tasks", default=",".join(TASK_FILES), help=f"file tags, from {','.join(TASK_FILES)}"
    )
    args = parser.parse_args(argv)
    tags = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tags) - set(TASK_FILES))
    if unknown:
        parser.error(f"unknown --tasks {unknown}; choose from {sorted(TASK_FILES)}")
    for key, path in write_mmrs(args.world_dir, args.out, tags=tags).items():
        n = len(json.loads(path.read_text()))
        print(f"{key:<20} {n:>7} records  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
