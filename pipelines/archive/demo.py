"""``earthgpt demo``: the whole product on one machine, from nothing.

1. Build the toy-world archive (COGs, STAC items, ground truth) under ``--out`` (reused when already there).
2. Run the archive job from ``configs/infer/demo.yaml``: the catalog served by an in-memory STAC API that the job
   starts, caption + detect on local Ray with the demo model, outputs under ``--out/outputs``.
3. Print a summary and write ``quicklook.png``: one scene with its detections and captions.

Running it again reuses the archive and the outputs: every scene is already committed, so the job skips them and
says why (delete ``--out`` to start over).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "infer" / "demo.yaml"
TOY_MODEL = REPO / "models" / "earthgpt-toy"


def _banner(lines: list[str]) -> str:
    width = max(len(line) for line in lines) + 4
    return "\n".join(["!" * width, *(f"! {line.ljust(width - 4)} !" for line in lines), "!" * width])


def _choose_model(requested: str | None) -> tuple[str, bool]:
    """The demo model: ``--model``, else the trained toy model if present, else a random tiny preset."""
    if requested:
        return requested, False
    if (TOY_MODEL / "config.json").is_file():
        return str(TOY_MODEL), False
    return "tiny", True


def _build_world(out: Path, scenes: int, seed: int, say: Any) -> Path:
    from catalogs.toyworld import generate_toyworld

    root = out / "toyworld"
    if (root / "stac" / "items.ndjson").is_file():
        say(f"[1/3] toy world: reusing {root}")
        return root
    say(f"[1/3] toy world: generating {scenes} scenes (optical, SAR, thermal) under {root} ...")
    world = generate_toyworld(root, scenes=scenes, seed=seed, chips_per_scene=8, href_base=root.as_uri())
    say(f"      {len(world.scene_ids)} scenes, {world.n_objects} planted objects, {world.seconds:.1f} s")
    return root


def write_quicklook(output_root: str, world_root: Path, path: Path) -> Path | None:
    """A PNG of the scene with the most detections: its image, detection boxes with labels, and its captions.

    Args:
        output_root: The job's output root.
        world_root: The toy world folder (to read the scene's COGs).
        path: Where to write the PNG.

    Returns:
        The path, or ``None`` when no scene was committed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from rasterio.windows import Window

    from catalogs.hrefs import HrefPolicy
    from catalogs.io import SceneReader
    from catalogs.scene import Scene
    from catalogs.toyworld import load_items
    from pipelines.archive.store import OutputStore, read_table

    store = OutputStore(output_root)
    scenes = read_table(store, "scenes")
    if scenes.empty:
        return None
    best = scenes.sort_values(["detections", "scene_id"], ascending=[False, True]).iloc[0]
    items = {item["id"]: item for item in load_items(world_root / "stac" / "items.ndjson")}
    scene = Scene.from_item(items[best["scene_id"]],
                            href_policy=HrefPolicy.for_roots((world_root / "cogs").as_uri()))
    with SceneReader(scene) as reader:
        image = reader.read(Window(0, 0, scene.width, scene.height), allow_empty=True).image
    dets = read_table(store, "detections")
    dets = dets[dets["scene_id"] == scene.id]
    tiles = read_table(store, "tiles")
    tiles = tiles[(tiles["scene_id"] == scene.id) & (tiles["status"] == "ok")]

    fig, (ax, text) = plt.subplots(1, 2, figsize=(14, 7.5), gridspec_kw={"width_ratios": [1.1, 1]})
    ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
    colours = {"ship": "#ff3b30", "building": "#ffcc00", "airplane": "#34c759", "vehicle": "#0a84ff"}
    for _, d in dets.iterrows():
        x1, y1, x2, y2 = (float(d[k]) for k in ("scene_x1", "scene_y1", "scene_x2", "scene_y2"))
        colour = colours.get(str(d["label"]), "#ff00ff")
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour))
        ax.text(x1, y1 - 1, str(d["label"]), color=colour, fontsize=6, va="bottom")
    ax.set_title(f"{scene.id}  ({scene.sensor}, {scene.crs}, {scene.datetime:%Y-%m-%d})", fontsize=10)
    ax.set_axis_off()
    by_label = Counter(dets["label"].astype(str))
    captions = Counter(tiles["caption"].astype(str)).most_common(12)
    lines = [
        f"tiles with answers: {len(tiles)}",
        "detections (after cross-tile NMS): " + (", ".join(f"{k} {v}" for k, v in sorted(by_label.items())) or "none"),
        "",
        "most frequent tile captions:",
        *(f"  {n:>3} x  {c[:100] or '(empty)'}" for c, n in captions),
    ]
    text.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, wrap=True)
    text.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt demo [--out DIR]``: build the toy world, run the job on it locally, summarise, draw a quicklook."""
    parser = argparse.ArgumentParser(prog="earthgpt demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-out", help="folder for the toy world and the outputs (default %(default)s)")
    parser.add_argument("--scenes", type=int, default=6, help="toy-world scenes to generate (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="toy-world seed")
    parser.add_argument("--model", help="preset name or checkpoint folder (default: models/earthgpt-toy if "
                        "present, else a randomly initialised tiny model)")
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, flush=True)

    t0 = time.perf_counter()
    out = Path(args.out).absolute()
    world_root = _build_world(out, args.scenes, args.seed, say)

    from pipelines.archive.config import ConfigError, load_config
    from pipelines.archive.job import run

    model, random_weights = _choose_model(args.model)
    collections = sorted((world_root / "stac" / "collections").glob("*.json"))
    overrides = {
        "catalog.embedded.collections": [str(p) for p in collections],
        "catalog.embedded.items": str(world_root / "stac" / "items.ndjson"),
        "catalog.collections": [p.stem for p in collections],
        "catalog.asset_prefixes": [(world_root / "cogs").as_uri()],
        "model.name_or_path": model,
        "output.root": str(out / "outputs"),
    }
    try:
        config = load_config(DEMO_CONFIG, overrides)
    except ConfigError as exc:
        print(f"earthgpt demo: {exc}", file=sys.stderr)
        return 2
    if random_weights:
        say(_banner([
            "NO TRAINED DEMO MODEL: models/earthgpt-toy/ is missing.",
            "Running a RANDOMLY INITIALISED tiny EarthGPT instead: captions are gibberish and",
            "detections (if any) are noise. Everything else - catalog, tiling, Ray, georeferencing,",
            "NMS, GeoParquet, Zarr, commits - is the real pipeline. Train the toy model with the",
            "training job (pipelines/train.py) to see real answers.",
        ]))
    say(f"[2/3] archive job: model {model}, tasks {', '.join(config.tasks)}, tiles {config.tiling.size} px "
        f"(overlap {config.tiling.overlap}); catalog served by rustac; local Ray")
    summary = run(config, say=lambda line: say("      " + line))

    say("[3/3] quicklook")
    png = write_quicklook(summary.output_root, world_root, out / "quicklook.png")
    say(f"      {png}" if png else "      (no committed scene to draw)")
    say("")
    say("\n".join(summary.lines()))
    for line in caption_lines(summary.output_root):
        say(line)
    if random_weights:
        say("  model    RANDOM tiny EarthGPT (no trained demo model found)")
    say(f"  total    {time.perf_counter() - t0:.1f} s")
    say("")
    say("next:")
    say(f'  earthgpt query "SELECT label, count(*) FROM detections GROUP BY ALL" --root {summary.output_root}')
    say(f'  earthgpt query "SELECT collection, count(*), avg(valid_fraction) FROM tiles GROUP BY ALL" '
        f"--root {summary.output_root}")
    group = _first_group(summary.output_root)
    if group:  # a committed scene's arrays: its `scenes.embeddings_group` under embeddings.zarr
        say(f"  python -c \"import xarray as xr; print(xr.open_zarr('{summary.output_root}/embeddings.zarr/{group}'))\"")
    return 0 if summary.status.startswith("ok") else 1


def caption_lines(root: str, n: int = 5) -> list[str]:
    """A few of the run's tile captions: the most frequent ones, then those of tiles with the most detections."""
    from pipelines.archive.store import OutputStore, read_table

    tiles = read_table(OutputStore(root), "tiles", columns=["scene_id", "tile_id", "caption", "detections"])
    tiles = tiles[tiles["caption"].notna() & (tiles["caption"].astype(str) != "")]
    if not len(tiles):
        return []
    frequent = Counter(tiles["caption"].astype(str)).most_common(n)
    busy = tiles.sort_values("detections", ascending=False).head(n)
    return [
        "  captions (most frequent):",
        *(f"    {k:>4} x  {c}" for c, k in frequent),
        "  captions of the tiles with the most detections:",
        *(f"    {r.scene_id}/{r.tile_id} ({int(r.detections)} kept):  {r.caption}" for r in busy.itertuples()),
    ]


def _first_group(root: str) -> str | None:
    from pipelines.archive.store import OutputStore, read_table

    scenes = read_table(OutputStore(root), "scenes", columns=["embeddings_group"])
    return str(scenes["embeddings_group"].iloc[0]) if len(scenes) else None


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
