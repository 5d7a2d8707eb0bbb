"""``earthgpt report RUN_ID|latest --root ROOT``: one self-contained HTML page about a run.

What was processed and found, how sure, what failed: counts by label, sensor and date; errors by type with example
messages; a footprint map of processed scenes coloured by detections per km² and of failed scenes; throughput over
time; a gallery of the most confident detections per label (chips read through the sensor recipe). Every figure is
rendered here (matplotlib) and inlined as a ``data:`` PNG: the page loads nothing, so it opens from a scheduler's
link, an object store or a mail attachment alike.

By default the page is written next to the outputs, ``<root>/reports/report-<run_id>.html`` (local or S3).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from pipelines.cli import add_root_argument, default_root
from pipelines.results.outputs import Outputs

REPORTS_DIR = "reports"
EQUAL_AREA = "EPSG:6933"  # WGS 84 / NSIDC EASE-Grid 2.0 Global: areas in m² anywhere


@dataclass
class RunData:
    """The committed rows of one run, and its ``runs`` row (``None`` when the process was killed)."""

    run_id: str
    run: pd.Series | None
    scenes: Any
    tiles: pd.DataFrame
    detections: Any
    errors: Any
    history: pd.DataFrame


def load_run(outputs: Outputs, run: str = "latest") -> RunData:
    """Read what one run committed (scenes, tile statuses, detections, errors) and the recent runs.

    Raises:
        KeyError: No run of that id (or no run at all, for ``latest``).
    """
    run_id = outputs.latest_run if run == "latest" else run
    if run_id is None:
        raise KeyError(f"run: no run recorded under {outputs.root}")
    runs = outputs.runs()
    row = runs[runs["run_id"] == run_id]
    scenes = outputs.scenes(run=run_id)
    if row.empty and scenes.empty:
        known = ", ".join(runs.sort_values("started_at")["run_id"].tail(5)) or "none"
        raise KeyError(f"run: no run {run_id!r} under {outputs.root} (latest: {known})")
    tiles = pd.DataFrame(outputs.tiles(columns=["scene_id", "status"], run=run_id))
    return RunData(
        run_id=run_id, run=row.iloc[0] if len(row) else None, scenes=scenes,
        tiles=tiles.drop(columns="geometry", errors="ignore"), detections=outputs.detections(run=run_id),
        errors=outputs.errors(run=run_id),
        history=pd.DataFrame(runs.drop(columns="geometry")).sort_values("started_at").tail(30),
    )


# --------------------------------------------------------------------------------------------------------- figures


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _clusters(geoms: Any, cell: float = 10.0) -> list[np.ndarray]:
    """Indices of footprints grouped by the 10° cell of their centroid (one map panel per group)."""
    b = geoms.bounds  # bbox centres: good enough to group footprints, and no geographic-centroid warning
    cx = np.floor(((b["minx"] + b["maxx"]) / 2).to_numpy() / cell)
    cy = np.floor(((b["miny"] + b["maxy"]) / 2).to_numpy() / cell)
    keys = pd.Series(list(zip(cx, cy, strict=True)))
    return [np.flatnonzero(keys == k) for k in keys.value_counts().index]


def footprint_map(data: RunData, max_panels: int = 6) -> str | None:
    """Processed scenes coloured by detections per km², failed scenes hatched red; one panel per region."""
    import geopandas as gpd
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    scenes = data.scenes[data.scenes.geometry.notna()].copy()
    committed = set(zip(scenes["collection"], scenes["scene_id"], strict=True))
    errors = data.errors[data.errors.geometry.notna()]
    failed = errors[np.array([(c, s) not in committed for c, s in zip(errors["collection"], errors["scene_id"],
                                                                       strict=True)], dtype=bool)]
    failed = failed.dissolve(by=["collection", "scene_id"]).reset_index() if len(failed) else failed
    if scenes.empty and failed.empty:
        return None
    scenes["km2"] = scenes.geometry.to_crs(EQUAL_AREA).area / 1e6
    scenes["per_km2"] = scenes["detections"].astype(float) / scenes["km2"].where(scenes["km2"] > 0)
    both = gpd.GeoDataFrame(
        pd.concat([scenes[["geometry"]].assign(kind="ok"), failed[["geometry"]].assign(kind="failed")],
                  ignore_index=True), geometry="geometry", crs=4326)
    groups = _clusters(both.geometry)[:max_panels]
    norm = Normalize(vmin=0.0, vmax=max(1e-9, float(np.nan_to_num(scenes["per_km2"].max()))))
    cmap = colormaps["viridis"]
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols + 1.2, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_axis_off()
    n_ok = len(scenes)
    for ax, idx in zip(axes.flat, groups, strict=False):
        ok_idx, bad_idx = idx[idx < n_ok], idx[idx >= n_ok] - n_ok
        if len(ok_idx):
            part = scenes.iloc[ok_idx]
            part.plot(ax=ax, color=[cmap(norm(v)) for v in np.nan_to_num(part["per_km2"])], edgecolor="black",
                      linewidth=0.6, alpha=0.85)
        if len(bad_idx):
            failed.iloc[bad_idx].plot(ax=ax, facecolor="none", edgecolor="#d70015", hatch="///", linewidth=1.2)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        x1, y1, x2, y2 = both.geometry.iloc[idx].total_bounds
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ax.set_title(f"around {cy:.1f}°, {cx:.1f}°", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=axes.ravel().tolist(), shrink=0.8,
                 label="detections per km²")
    fig.suptitle(f"{n_ok} processed scenes (colour), {len(failed)} failed (red hatch)", fontsize=9)
    return _png(fig)


def throughput_chart(data: RunData) -> str | None:
    """Tiles committed over the run's time (per scene, by ``processed_at``), and tiles/s of recent runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenes = data.scenes.sort_values("processed_at")
    history = data.history[data.history["tiles_per_s"].notna()] if len(data.history) else data.history
    if scenes.empty and history.empty:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
    if len(scenes):
        start = data.run["started_at"] if data.run is not None else scenes["processed_at"].min()
        minutes = (scenes["processed_at"] - start).dt.total_seconds() / 60
        a.step(np.r_[0.0, minutes.to_numpy()], np.r_[0, scenes["tiles_written"].cumsum().to_numpy()], where="post")
        a.set_xlabel("minutes since the run started")
        a.set_ylabel("tiles committed")
        a.set_title(f"run {data.run_id}", fontsize=8)
    if len(history):
        labels = [str(r)[:15] for r in history["run_id"]]
        colours = ["#0a84ff" if r == data.run_id else "#8e8e93" for r in history["run_id"]]
        b.bar(range(len(history)), history["tiles_per_s"], color=colours)
        b.set_xticks(range(len(history)), labels, rotation=60, fontsize=6, ha="right")
        b.set_ylabel("tiles / s")
        b.set_title("recent runs (this one in blue)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def gallery(outputs: Outputs, data: RunData, per_label: int = 6, chip: int = 96) -> dict[str, list[tuple[str, str]]]:
    """The most confident detections per label as ``(data URI or "", caption)``; each scene's raster opened once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    from rasterio.windows import Window

    from pipelines.results.render import label_colour, open_reader

    dets = data.detections
    if dets.empty:
        return {}
    top = (dets.sort_values(["confidence", "scene_id", "detection_id"], ascending=[False, True, True])
           .groupby("label", sort=True).head(per_label))
    chips: dict[int, tuple[str, str]] = {}
    scenes = data.scenes.set_index(["collection", "scene_id"])
    for (collection, scene_id), group in top.groupby(["collection", "scene_id"], sort=False):
        try:
            with open_reader(outputs, _scene_series(scenes, collection, scene_id)) as reader:
                for idx, d in group.iterrows():
                    cx, cy = (d["scene_x1"] + d["scene_x2"]) / 2, (d["scene_y1"] + d["scene_y2"]) / 2
                    side = int(max(chip // 2, 3 * max(d["scene_x2"] - d["scene_x1"], d["scene_y2"] - d["scene_y1"])))
                    x0, y0 = int(cx - side / 2), int(cy - side / 2)
                    image = reader.read(Window(x0, y0, side, side), allow_empty=True).image
                    fig = plt.figure(figsize=(chip / 96, chip / 96))
                    ax = fig.add_axes((0, 0, 1, 1))
                    ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1), interpolation="nearest")
                    ax.add_patch(Rectangle((d["scene_x1"] - x0 - 0.5, d["scene_y1"] - y0 - 0.5),
                                           d["scene_x2"] - d["scene_x1"], d["scene_y2"] - d["scene_y1"],
                                           fill=False, lw=1.0, ec=label_colour(str(d["label"]))))
                    ax.set_axis_off()
                    chips[idx] = (_png(fig), "")
        except Exception as exc:  # a gallery chip is a nicety: say why it is missing, keep the report
            for idx in group.index:
                chips[idx] = ("", f"image not available: {type(exc).__name__}: {exc}"[:160])
    out: dict[str, list[tuple[str, str]]] = {}
    for idx, d in top.iterrows():
        uri, why = chips.get(idx, ("", "image not available"))
        caption = f"{d['scene_id']} {d['tile_id']} · {float(d['confidence']):.2f}" + (f" · {why}" if why else "")
        out.setdefault(str(d["label"]), []).append((uri, caption))
    return out


def _scene_series(scenes: pd.DataFrame, collection: str, scene_id: str) -> pd.Series:
    row = scenes.loc[(collection, scene_id)]
    row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
    return pd.concat([row, pd.Series({"collection": collection, "scene_id": scene_id})])


# ------------------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d1d1f;max-width:1280px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} .status{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px}
.s-ok{background:#d1f5d3} .s-ok_with_errors{background:#fff1c2} .s-failed,.s-interrupted,.s-killed{background:#ffd6d6}
.cards{display:flex;flex-wrap:wrap;gap:10px} .card{border:1px solid #ddd;border-radius:8px;padding:8px 14px;min-width:120px}
.card .n{font-size:24px;font-weight:600} .card .l{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px;margin:4px 16px 8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f5f5f7} td.n{text-align:right;font-variant-numeric:tabular-nums}
.tables{display:flex;flex-wrap:wrap;align-items:flex-start} img.fig{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:8px} figure{margin:0;width:150px;font-size:11px;color:#444}
figure img{width:144px;height:144px;image-rendering:pixelated;border:1px solid #ccc}
.missing{width:144px;height:144px;background:#eee;display:flex;align-items:center;justify-content:center}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value))


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str, caption: str = "") -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{v}</td>' if isinstance(v, (int, np.integer)) else f"<td>{_e(v)}</td>"
                         for v in row) + "</tr>"
        for row in rows
    )
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f'<table id="{table_id}">{cap}<tr>{head}</tr>{body}</table>'


def _card(key: str, label: str, n: int) -> str:
    return f'<div class="card" id="count-{key}"><div class="n">{n}</div><div class="l">{_e(label)}</div></div>'


def counts(data: RunData) -> dict[str, int]:
    """The headline counts, from the committed tables (the ``runs`` row is the run's own claim, shown apart)."""
    committed = set(zip(data.scenes["collection"], data.scenes["scene_id"], strict=True))
    failed = {(c, s) for c, s in zip(data.errors["collection"], data.errors["scene_id"], strict=True)} - committed
    status = data.tiles["status"].astype(str) if len(data.tiles) else pd.Series(dtype=str)
    return {
        "scenes": len(data.scenes), "scenes-failed": len(failed), "tiles": int((status == "ok").sum()),
        "tiles-skipped": int((status == "skipped").sum()), "detections": len(data.detections),
        "errors": len(data.errors),
    }


def build_report(outputs: Outputs, run: str = "latest", *, per_label: int = 6, with_gallery: bool = True) -> str:
    """The whole HTML page for one run (self-contained: figures are inlined PNGs, no scripts, no links out).

    Args:
        outputs: The output root.
        run: A run id or ``latest``.
        per_label: Gallery chips per label.
        with_gallery: Read raster chips for the gallery (needs the run's catalog and assets).

    Returns:
        The page.
    """
    data = load_run(outputs, run)
    r = data.run
    status = str(r["status"]) if r is not None else "killed"
    n = counts(data)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>EarthGPT run {_e(data.run_id)}"
             f"</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>EarthGPT run <code>{_e(data.run_id)}</code> "
                 f"<span class='status s-{_e(status)}' id='run-status'>{_e(status)}</span></h1>")
    if r is not None:
        parts.append(
            f"<div class='meta'>{_e(r['started_at'])} → {_e(r['finished_at'])} · {float(r['wall_s']):.1f} s · "
            f"model {_e(r['model'])} ({_e(r['engine'])}) · tasks {_e(', '.join(list(r['tasks'] if r['tasks'] is not None else [])))} · "
            f"output key {_e(r['output_key'])} · {_e(outputs.root)}</div>")
    else:
        parts.append("<div class='meta'>no <code>runs</code> row: the process was killed; below is what its "
                     "committed units hold</div>")
    parts.append("<h2>Summary</h2><div class='tables'><div class='cards'>" + "".join([
        _card("scenes", "scenes processed", n["scenes"]), _card("scenes-failed", "scenes failed", n["scenes-failed"]),
        _card("tiles", "tiles answered", n["tiles"]), _card("tiles-skipped", "tiles skipped", n["tiles-skipped"]),
        _card("detections", "detections", n["detections"]), _card("errors", "errors", n["errors"]),
    ]) + "</div></div>")
    if r is not None:
        fields = ["scenes_matched", "scenes_skipped", "scenes_processed", "scenes_failed", "tiles_planned",
                  "tiles_written", "tiles_skipped", "tiles_failed", "detections", "errors", "units_committed",
                  "files_folded"]
        # a column added later (files_folded) is null in the rows of runs written before it
        parts.append(_table(["field", "value"], [[f, int(r[f])] for f in fields if f in r and pd.notna(r[f])],
                            "run-row",
                            "the run's own record (runs row)"))

    # counts by label / sensor / date
    dets, scenes = data.detections, data.scenes
    sensor_of = dict(zip(scenes["collection"], scenes["sensor"], strict=True))
    by_label = dets.groupby("label").agg(n=("label", "size"), conf=("confidence", "mean")).sort_index() \
        if len(dets) else pd.DataFrame(columns=["n", "conf"])
    label_rows = [[lab, int(v.n), f"{v.conf:.2f}"] for lab, v in by_label.iterrows()]
    det_sensor = dets["collection"].map(sensor_of) if len(dets) else pd.Series(dtype=str)
    sensors = sorted(set(sensor_of.values()))
    sensor_rows = [[s, int((scenes["sensor"] == s).sum()), int(scenes.loc[scenes["sensor"] == s, "tiles_written"]
                    .sum()), int((det_sensor == s).sum())] for s in sensors]
    dates = sorted(set(scenes["date"].astype(str)) | set(dets["date"].astype(str)))
    date_rows = [[d, int((scenes["date"].astype(str) == d).sum()), int((dets["date"].astype(str) == d).sum())]
                 for d in dates]
    parts.append("<h2>Counts</h2><div class='tables'>"
                 + _table(["label", "detections", "mean confidence"], label_rows, "by-label", "by label")
                 + _table(["sensor", "scenes", "tiles", "detections"], sensor_rows, "by-sensor", "by sensor")
                 + _table(["date", "scenes", "detections"], date_rows, "by-date", "by acquisition date")
                 + "</div>")

    # errors
    errs = data.errors
    if len(errs):
        rows = []
        for (etype, stage), g in errs.groupby(["error_type", "stage"], sort=True):
            examples = list(dict.fromkeys(f"{s}: {m}" for s, m in zip(g["scene_id"], g["message"], strict=True)))
            rows.append([etype, stage, len(g), g["scene_id"].nunique(), " | ".join(e[:160] for e in examples[:3])])
        parts.append("<h2>Errors</h2>" + _table(["error type", "stage", "rows", "scenes", "example messages"], rows,
                                                "errors"))
    else:
        parts.append("<h2>Errors</h2><p id='errors'>none</p>")

    # figures
    for title, uri, fid in (("Footprints", footprint_map(data), "map"), ("Throughput", throughput_chart(data),
                                                                          "throughput")):
        parts.append(f"<h2>{title}</h2>" + (f"<img class='fig' id='{fid}' alt='{title}' src='{uri}'>" if uri
                                              else "<p>nothing to draw</p>"))

    # gallery
    if with_gallery:
        chips = gallery(outputs, data, per_label)
        parts.append("<h2>Most confident detections</h2>")
        if not chips:
            parts.append("<p>no detections</p>")
        for label, items in chips.items():
            figs = "".join(
                (f"<figure><img alt='{_e(label)}' src='{uri}'>" if uri else "<figure><div class='missing'>—</div>")
                + f"<figcaption>{_e(cap)}</figcaption></figure>" for uri, cap in items)
            parts.append(f"<h3>{_e(label)}</h3><div class='gallery' data-label='{_e(label)}'>{figs}</div>")
    parts.append(f"<p class='meta'>written {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC by earthgpt report"
                 "</p></body></html>")
    return "".join(parts)


def write_report(outputs: Outputs, run: str = "latest", out: str | None = None, **kwargs: Any) -> str:
    """Build the page and write it to ``out`` (a local path), or next to the outputs by default.

    Returns:
        Where it was written (a path or URL).
    """
    page = build_report(outputs, run, **kwargs)
    if out is not None:
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(page)
        return out
    run_id = outputs.latest_run if run == "latest" else run
    rel = f"{REPORTS_DIR}/report-{run_id}.html"
    outputs.store.write_bytes(rel, page.encode("utf-8"))
    return outputs.store.url(rel)


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt report RUN_ID|latest --root ROOT [--out FILE]``."""
    parser = argparse.ArgumentParser(
        prog="earthgpt report",
        description="One self-contained HTML page about a run: counts, errors, footprint map, throughput, and the "
        "most confident detections. Written next to the outputs (ROOT/reports/) unless --out is given.",
    )
    parser.add_argument("run", nargs="?", default="latest", help="run id, or latest (default)")
    add_root_argument(parser, default_from_env=False, extra="the config's output.root, else")
    parser.add_argument("--config", help="a job config (YAML): report on its output.root, with its storage options")
    parser.add_argument("--out", help="write the page here (a local file) instead of ROOT/reports/")
    parser.add_argument("--per-label", type=int, default=6, help="gallery chips per label (default %(default)s)")
    parser.add_argument("--no-gallery", action="store_true", help="do not read rasters for the gallery")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    root = args.root
    if args.config:
        from pipelines.archive.config import ConfigError, load_config

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"earthgpt report: invalid config {args.config}: {exc}", file=sys.stderr)
            return 2
        root = root or config.output.root
        options = dict(config.output.storage_options)
    root = root or default_root()
    try:
        where = write_report(Outputs(root, options), args.run, args.out, per_label=args.per_label,
                             with_gallery=not args.no_gallery)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        print(f"earthgpt report: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(where)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
