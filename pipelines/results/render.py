"""``earthgpt render SCENE_ID [--tile TILE_ID]``: a PNG of a tile or a whole scene with its detections and captions.

The pixels are read through the same sensor recipe the model saw (:class:`catalogs.io.SceneReader`: band decoding,
SAR dB, stretch), from the scene's STAC item. The item is found through the ``runs`` row of the run that wrote the
scene (its catalog: the embedded items file or the STAC API URL, and its allowed asset prefixes), or given with
``--item``. A scene larger than ``--max-side`` pixels is read decimated, from its COG overviews.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.cli import add_root_argument
from pipelines.results.outputs import Outputs

COLOURS = {"ship": "#ff3b30", "building": "#ffcc00", "airplane": "#34c759", "vehicle": "#0a84ff",
           "storage tank": "#bf5af2"}


def label_colour(label: str) -> str:
    """A fixed colour per label (magenta for labels not listed)."""
    return COLOURS.get(label, "#ff00ff")


def find_item(outputs: Outputs, scene: pd.Series, item: str | Mapping[str, Any] | None = None
              ) -> tuple[dict[str, Any], list[str]]:
    """The scene's STAC item and the asset prefixes its run allowed.

    Args:
        outputs: The output root.
        scene: The scene's ``scenes`` row.
        item: An item dict or a path to an item JSON, overriding the run's catalog.

    Returns:
        The item dict and the allowed asset href prefixes (empty: the default policy).

    Raises:
        KeyError: When the run's catalog does not hold the item.
    """
    runs = outputs.runs(columns=["run_id", "config"], run=str(scene["run_id"]))
    config = json.loads(str(runs.iloc[0]["config"])) if len(runs) else {}
    catalog = config.get("catalog") or {}
    prefixes = list(catalog.get("asset_prefixes") or [])
    scene_id, collection = str(scene["scene_id"]), str(scene["collection"])
    if item is not None:
        found = dict(item) if isinstance(item, Mapping) else json.loads(Path(item).read_text())
        return found, prefixes
    embedded = catalog.get("embedded") or {}
    if embedded.get("items"):
        from catalogs.ingest import read_ndjson

        for candidate in read_ndjson(embedded["items"]):
            if candidate.get("id") == scene_id and candidate.get("collection", collection) == collection:
                return candidate, prefixes
    elif catalog.get("url"):
        from catalogs.search import open_client

        search = open_client(catalog["url"]).search(ids=[scene_id], collections=[collection], max_items=1)
        for candidate in search.items_as_dicts():
            return candidate, prefixes
    raise KeyError(f"scene: no STAC item {collection}/{scene_id} in the catalog of run {scene['run_id']} "
                   f"({embedded.get('items') or catalog.get('url') or 'unknown'}); pass --item ITEM.json")


def open_reader(outputs: Outputs, scene: pd.Series, item: str | Mapping[str, Any] | None = None) -> Any:
    """An unopened :class:`catalogs.io.SceneReader` for a committed scene (use it as a context manager)."""
    from catalogs.hrefs import HrefPolicy
    from catalogs.io import SceneReader
    from catalogs.scene import Scene

    found, prefixes = find_item(outputs, scene, item)
    policy = HrefPolicy.for_roots(*prefixes) if prefixes else HrefPolicy()
    return SceneReader(Scene.from_item(found, href_policy=policy))


def _text(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _boxes(ax: Any, dets: pd.DataFrame, x0: float, y0: float, scale: float, fontsize: float) -> None:
    from matplotlib.patches import Rectangle

    for d in dets.itertuples(index=False):
        x1, y1 = (d.scene_x1 - x0) / scale, (d.scene_y1 - y0) / scale
        x2, y2 = (d.scene_x2 - x0) / scale, (d.scene_y2 - y0) / scale
        colour = label_colour(str(d.label))
        ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour))
        conf = "" if pd.isna(d.confidence) else f" {float(d.confidence):.2f}"
        ax.text(x1 - 0.5, y1 - 1, f"{d.label}{conf}", color=colour, fontsize=fontsize, va="bottom",
                bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.5, "linewidth": 0})


def render(
    outputs: Outputs,
    scene_id: str,
    out: str | Path,
    *,
    tile: str | None = None,
    collection: str | None = None,
    output_key: str | None = None,
    item: str | Mapping[str, Any] | None = None,
    max_side: int = 1600,
    dpi: int = 110,
) -> Path:
    """Draw a tile or a whole scene with its detection boxes (label, confidence) and the tile captions.

    Args:
        outputs: The output root.
        scene_id: The scene.
        out: The PNG to write.
        tile: A tile id: draw that tile's window only (boxes of every detection overlapping it).
        collection: The scene's collection, if its id is committed in several.
        output_key: The output key, if the scene was processed under several.
        item: The scene's STAC item (dict or JSON path), when the run's catalog cannot be reached.
        max_side: A scene whose longer side exceeds this is read decimated from its overviews.
        dpi: Resolution of the PNG.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rasterio.windows import Window

    row = outputs.scene_row(scene_id, collection=collection, output_key=output_key)
    ids = {"scene": scene_id, "collection": str(row["collection"]), "output_key": str(row["output_key"])}
    tiles = outputs.tiles(columns=["tile_id", "row_off", "col_off", "width", "height", "status", "caption",
                                   "class_label", "vqa_questions", "vqa_answers"], **ids)
    dets = outputs.detections(columns=["tile_id", "label", "confidence", "scene_x1", "scene_y1", "scene_x2",
                                       "scene_y2"], **ids)
    with open_reader(outputs, row, item) as reader:
        if tile is not None:
            match = tiles[tiles["tile_id"] == tile]
            if match.empty:
                raise KeyError(f"tile: {scene_id} has no tile {tile!r}")
            t = match.iloc[0]
            x0, y0, w, h = int(t["col_off"]), int(t["row_off"]), int(t["width"]), int(t["height"])
            image = reader.read(Window(x0, y0, w, h), allow_empty=True).image
            scale = 1.0
            dets = dets[(dets["scene_x2"] > x0) & (dets["scene_x1"] < x0 + w)
                        & (dets["scene_y2"] > y0) & (dets["scene_y1"] < y0 + h)]
            title = f"{scene_id} / {tile}  ({row['sensor']}, {pd.Timestamp(row['datetime']):%Y-%m-%d})"
            lines = [f"status: {t['status']}", f"caption: {_text(t['caption'])}",
                     f"class: {_text(t['class_label'])}"]
            questions = t["vqa_questions"] if t["vqa_questions"] is not None else []
            answers = t["vqa_answers"] if t["vqa_answers"] is not None else []
            lines += [f"Q: {q}  A: {a}" for q, a in zip(questions, answers, strict=False)]
        else:
            h_full, w_full = reader.shape
            if max(h_full, w_full) > max_side:
                tile_image = reader.read_overview(max_side)
                scale = max(h_full, w_full) / max(tile_image.image.shape[1:])
            else:
                tile_image = reader.read(Window(0, 0, w_full, h_full), allow_empty=True)
                scale = 1.0
            image, x0, y0 = tile_image.image, 0, 0
            title = (f"{scene_id}  ({row['sensor']}, {row['crs']}, {pd.Timestamp(row['datetime']):%Y-%m-%d})"
                     + (f"  overview 1:{scale:.1f}" if scale > 1 else ""))
            ok = tiles[tiles["status"] == "ok"]
            by_label = Counter(dets["label"].astype(str))
            lines = [f"tiles: {len(ok)} answered, {int((tiles['status'] == 'skipped').sum())} skipped",
                     "detections: " + (", ".join(f"{k} {v}" for k, v in sorted(by_label.items())) or "none"),
                     "", "tile captions (most frequent):"]
            lines += [f"  {n:>3} x  {str(c)[:60]}" for c, n in Counter(ok["caption"].astype(str)).most_common(14)]
    height_in = max(4.0, min(10.0, image.shape[1] / dpi * 1.4))
    fig, (ax, text) = plt.subplots(1, 2, figsize=(height_in * 1.9, height_in),
                                   gridspec_kw={"width_ratios": [1.1, 1]})
    ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation="nearest")
    _boxes(ax, dets, x0, y0, scale, fontsize=7 if tile is not None else 5)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, wrap=True)
    text.set_axis_off()
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt render SCENE_ID [--tile TILE_ID] --root ROOT --out PNG``."""
    parser = argparse.ArgumentParser(
        prog="earthgpt render",
        description="A PNG of a tile or a whole scene, read through the sensor recipe the model saw, with detection "
        "boxes (label, confidence) and tile captions.",
    )
    parser.add_argument("scene", help="scene id")
    parser.add_argument("--tile", help="draw only this tile (e.g. r0002_c0005)")
    add_root_argument(parser)
    parser.add_argument("--out", help="PNG to write (default: SCENE[_TILE].png)")
    parser.add_argument("--collection", help="the scene's collection, if its id is in several")
    parser.add_argument("--output-key", help="the output key, if the scene was processed under several")
    parser.add_argument("--item", help="the scene's STAC item JSON (if the run's catalog is not reachable)")
    parser.add_argument("--max-side", type=int, default=1600, help="scenes larger than this are read from overviews")
    args = parser.parse_args(argv)
    out = args.out or f"{args.scene}{'_' + args.tile if args.tile else ''}.png"
    try:
        path = render(Outputs(args.root), args.scene, out, tile=args.tile, collection=args.collection,
                      output_key=args.output_key, item=args.item, max_side=args.max_side)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"earthgpt render: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
