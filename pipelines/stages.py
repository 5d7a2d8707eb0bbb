"""The archive job's stages: small callables over column batches (dicts of numpy arrays), one per step.

The path of a tile, top to bottom::

    scene row ──ReadStage──▶ tile rows (image bytes, valid fraction, status)        Ray CPU tasks
              ──ModelStage─▶ + answers per task, log-probs, pooled embedding        Ray actor pool (GPUs)
              ──ParseStage─▶ + caption, class label, boxes in tile/scene/CRS/WGS84   Ray CPU tasks
              ──SceneAssembler (driver)─▶ per scene: NMS, table rows, tile-grid arrays

Each stage declares the columns it reads (``needs``) and adds (``adds``), builds heavy state once in ``__init__``,
and is called on a hand-built batch in the tests, without Ray. Rows carry explicit ids (``scene_key``, ``tile_id``):
Ray does not keep order. A tile's ``status`` is ``ok`` (goes through every stage), ``skipped`` (too little valid
data; recorded, not sent to the model), ``failed`` (this tile's read, model or parse step raised) or ``scene_failed``
(one row standing for all ``n_planned`` tiles of a scene that could not be opened).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import shapely

from catalogs.errors import SceneError
from catalogs.scene import Scene
from catalogs.tiling import plan_tiles
from pipelines.georef import (
    nms_per_scene,
    pixel_boxes_to_crs_polygons,
    pixel_boxes_to_wgs84,
    pixel_to_crs_boxes,
    tile_to_scene_boxes,
    to_wgs84,
    touches_inner_edge,
)
from pipelines.sinks import SceneGrid, embeddings_group

Batch = dict[str, np.ndarray]

# catalogs names sensors by what the archive holds; the model's prompts name the image kind
MODEL_SENSOR = {"optical": "optical", "sar": "sar", "thermal": "infrared"}

_ERROR_COLUMNS = ("error_stage", "error_type", "error_message", "error_asset", "error_href")


def scene_key(collection: str, scene_id: str) -> str:
    """The id a scene's rows carry through the stages: ``<collection>/<scene_id>``."""
    return f"{collection}/{scene_id}"


def _columns(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> Batch:
    out: Batch = {}
    for name in names:
        values = [r[name] for r in rows]
        if values and isinstance(values[0], bytes):
            arr = np.empty(len(values), dtype=object)
            arr[:] = values
            out[name] = arr
        else:
            out[name] = np.asarray(values)
    return out


def _error_fields(exc: BaseException, stage: str) -> dict[str, str]:
    if isinstance(exc, SceneError):
        return {
            "error_stage": exc.stage or stage, "error_type": exc.error_type, "error_message": exc.message,
            "error_asset": exc.asset or "", "error_href": exc.href or "",
        }
    return {"error_stage": stage, "error_type": type(exc).__name__, "error_message": str(exc)[:2000],
            "error_asset": "", "error_href": ""}


def _no_error() -> dict[str, str]:
    return dict.fromkeys(_ERROR_COLUMNS, "")


def decode_image(buf: bytes, height: int, width: int) -> np.ndarray:
    """A tile image from its row bytes: ``(3, H, W)`` float32 in [0, 1]."""
    return np.frombuffer(buf, dtype=np.float32).reshape(3, int(height), int(width))


# --------------------------------------------------------------------------------------------------------- read


class ReadStage:
    """Scene rows → tile rows: plan the tiles, open the scene once, read every window through its sensor recipe.

    Runs as a Ray task per scene (a generator: tiles leave in blocks of ``tiles_per_block`` while the rest are
    read, so a large scene never sits whole in memory). Tiles with less than ``min_valid_fraction`` valid pixels
    are marked ``skipped`` and carry no image.

    Args:
        tile_size: Tile side in pixels.
        overlap: Pixels shared by neighbouring tiles.
        min_valid_fraction: Below this share of valid pixels a tile is skipped.
        tiles_per_block: Tiles per output batch.
    """

    needs = ("scene_key", "scene")
    adds = (
        "scene_key", "tile_id", "row", "col", "row_off", "col_off", "win_h", "win_w", "n_planned", "status",
        "skip_reason", "valid_fraction", "sensor", "image", "image_h", "image_w", *_ERROR_COLUMNS,
    )

    def __init__(self, tile_size: int, overlap: int, min_valid_fraction: float, tiles_per_block: int = 16) -> None:
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.min_valid_fraction = float(min_valid_fraction)
        self.tiles_per_block = max(1, int(tiles_per_block))

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        from catalogs.io import configure_gdal

        configure_gdal()  # idempotent; a Ray worker is a fresh process that did not run the job's entry point
        for key, scene_json in zip(batch["scene_key"], batch["scene"], strict=True):
            yield from self._read_scene(str(key), Scene.model_validate_json(str(scene_json)))

    def _row(self, key: str, scene: Scene, n_planned: int, **fields: Any) -> dict[str, Any]:
        row = {
            "scene_key": key, "tile_id": "", "row": -1, "col": -1, "row_off": -1, "col_off": -1, "win_h": 0,
            "win_w": 0, "n_planned": n_planned, "status": "ok", "skip_reason": "", "valid_fraction": math.nan,
            "sensor": scene.sensor, "image": b"", "image_h": 0, "image_w": 0, **_no_error(),
        }
        row.update(fields)
        return row

    def _read_scene(self, key: str, scene: Scene) -> Iterator[Batch]:
        from catalogs.io import SceneReader

        try:
            tiles = plan_tiles(scene.height, scene.width, self.tile_size, self.overlap)
        except (SceneError, ValueError) as exc:
            yield _columns([self._row(key, scene, 0, status="scene_failed", **_error_fields(exc, "plan"))],
                           self.adds)
            return
        n = len(tiles)
        reader = SceneReader(scene)
        try:
            reader.open()
            _ = reader.stretch  # one overview read per scene, before the first window
        except SceneError as exc:
            reader.close()
            yield _columns([self._row(key, scene, n, status="scene_failed", **_error_fields(exc, "open"))], self.adds)
            return
        rows: list[dict[str, Any]] = []
        try:
            for tile in tiles:
                win = tile.window
                base = {"tile_id": tile.tile_id, "row": tile.row, "col": tile.col, "row_off": int(win.row_off),
                        "col_off": int(win.col_off), "win_h": int(win.height), "win_w": int(win.width)}
                try:
                    img = reader.read(win, allow_empty=True)
                except SceneError as exc:
                    rows.append(self._row(key, scene, n, status="failed", **base, **_error_fields(exc, "read")))
                else:
                    vf = float(img.valid_fraction)
                    if vf < self.min_valid_fraction:
                        reason = f"valid fraction {vf:.3f} < {self.min_valid_fraction}"
                        rows.append(self._row(key, scene, n, status="skipped", skip_reason=reason,
                                              valid_fraction=vf, **base))
                    else:
                        image = np.ascontiguousarray(img.image, dtype=np.float32)
                        rows.append(self._row(key, scene, n, valid_fraction=vf, image=image.tobytes(),
                                              image_h=image.shape[1], image_w=image.shape[2], **base))
                if len(rows) >= self.tiles_per_block:
                    yield _columns(rows, self.adds)
                    rows = []
        finally:
            reader.close()
        if rows:
            yield _columns(rows, self.adds)


# -------------------------------------------------------------------------------------------------------- model


class ModelStage:
    """Tile rows → answers: one EarthGPT replica per actor asks every task of every ``ok`` tile.

    Images are encoded once per batch; all tasks' prompts (``image_index``) and the pooled visual embedding
    (``InferenceEngine.embed``) reuse those visual tokens. A batch whose model call raises marks its tiles ``failed`` (stage ``model``); the
    actor lives on.

    Args:
        model: Preset name or checkpoint folder.
        engine: ``plain`` or ``deepspeed``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        tp_size: Tensor-parallel degree (DeepSpeed).
        kernel_inject: DeepSpeed kernel injection (GPU).
        tasks: Tasks to ask (``caption``, ``detect``, ``classify``).
        vqa: Extra questions.
        max_new_tokens: Generation budget per answer.
        seed: Weight seed for presets.
        torch_threads: Intra-op threads per actor (1 on small shared machines).
    """

    needs = ("status", "sensor", "image", "image_h", "image_w")

    def __init__(
        self,
        model: str,
        engine: str = "plain",
        dtype: str = "float32",
        tp_size: int = 1,
        kernel_inject: bool = False,
        tasks: Sequence[str] = ("caption", "detect"),
        vqa: Sequence[str] = (),
        max_new_tokens: int = 96,
        seed: int = 0,
        torch_threads: int | None = 1,
    ) -> None:
        import torch

        from earthgpt.engine import InferenceEngine

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.tasks = list(tasks)
        self.vqa = list(vqa)
        self.max_new_tokens = int(max_new_tokens)
        self.engine = InferenceEngine.from_pretrained(
            model, seed=seed, kind=engine, dtype=getattr(torch, dtype), tp_size=tp_size, kernel_inject=kernel_inject
        )

    @property
    def adds(self) -> tuple[str, ...]:
        """Answer columns per task, the VQA answers and the embedding."""
        return (*(c for t in self.tasks for c in (f"answer_{t}", f"logprob_{t}")), "vqa_json", "embedding")

    def _prompts(self, sensor: str) -> list[str]:
        from earthgpt.tasks import build_prompt

        model_sensor = MODEL_SENSOR.get(sensor, "optical")
        prompts = [build_prompt(t, model_sensor) for t in self.tasks]
        return prompts + [build_prompt("vqa", model_sensor, question=q) for q in self.vqa]

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["status"])
        out: Batch = {k: v for k, v in batch.items() if k != "image"}
        answers = {t: [""] * n for t in self.tasks}
        logprobs = {t: [math.nan] * n for t in self.tasks}
        vqa: list[list[str]] = [[] for _ in range(n)]
        embeddings: list[bytes] = [b""] * n
        status = [str(s) for s in batch["status"]]
        errors = {c: [str(v) for v in batch[c]] for c in _ERROR_COLUMNS}
        todo = [i for i in range(n) if status[i] == "ok"]
        if todo:
            try:
                images = [decode_image(batch["image"][i], batch["image_h"][i], batch["image_w"][i]) for i in todo]
                prompts: list[str] = []
                index: list[int] = []
                for j, i in enumerate(todo):
                    for prompt in self._prompts(str(batch["sensor"][i])):
                        prompts.append(prompt)
                        index.append(j)
                # encode the batch once; every task's prompt and the pooled embedding reuse the visual tokens
                features = self.engine.encode_images(images)
                gens = self.engine.generate(images, prompts, max_new_tokens=self.max_new_tokens, image_index=index,
                                            image_features=features)
                per_tile = len(self.tasks) + len(self.vqa)
                for j, i in enumerate(todo):
                    mine = gens[j * per_tile : (j + 1) * per_tile]
                    for t, gen in zip(self.tasks, mine, strict=False):
                        answers[t][i] = gen.text
                        logprobs[t][i] = gen.mean_logprob
                    vqa[i] = [g.text for g in mine[len(self.tasks) :]]
                emb = self.engine.embed(image_features=features)
                for j, i in enumerate(todo):
                    embeddings[i] = np.ascontiguousarray(emb[j], dtype=np.float32).tobytes()
            except Exception as exc:  # one bad batch must not end the run: record it, keep the actor
                fields = _error_fields(exc, "model")
                for i in todo:
                    status[i] = "failed"
                    for c in _ERROR_COLUMNS:
                        errors[c][i] = fields[c]
        for t in self.tasks:
            out[f"answer_{t}"] = np.asarray(answers[t], dtype=object)
            out[f"logprob_{t}"] = np.asarray(logprobs[t], dtype=np.float32)
        out["vqa_json"] = np.asarray([json.dumps(v) for v in vqa], dtype=object)
        emb_col = np.empty(n, dtype=object)
        emb_col[:] = embeddings
        out["embedding"] = emb_col
        out["status"] = np.asarray(status, dtype=object)
        for c in _ERROR_COLUMNS:
            out[c] = np.asarray(errors[c], dtype=object)
        return out


# -------------------------------------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class SceneGeo:
    """What the parse stage needs of a scene to georeference its tiles."""

    crs: str
    transform: tuple[float, float, float, float, float, float]
    height: int
    width: int


class ParseStage:
    """Answers → structured, georeferenced results per tile.

    Caption and class label from their answers; detection boxes parsed in tile pixels (padding undone by
    ``earthgpt.tasks.parse_answer``), shifted to scene pixels, mapped to the scene CRS and to WGS84 polygons, and
    flagged when a tile edge inside the scene cuts them (for the per-scene NMS). The tile footprint is added as a
    WGS84 polygon. A row whose parsing raises becomes ``failed`` (stage ``parse``).

    Args:
        tasks: The tasks the model stage answered.
        scenes: ``scene_key -> SceneGeo`` of the scenes in this wave.
    """

    needs = ("scene_key", "status", "row_off", "col_off", "win_h", "win_w", "image_h", "image_w")
    adds = ("caption", "class_label", "boxes_json", "boxes_parsed", "boxes_malformed", "footprint_wkb")

    def __init__(self, tasks: Sequence[str], scenes: Mapping[str, SceneGeo]) -> None:
        self.tasks = list(tasks)
        self.scenes = dict(scenes)

    def __call__(self, batch: Batch) -> Batch:
        from earthgpt.tasks import parse_answer

        n = len(batch["scene_key"])
        out = dict(batch)
        caption = [""] * n
        label = [""] * n
        boxes_json = ["[]"] * n
        parsed = np.zeros(n, dtype=np.int32)
        malformed = np.zeros(n, dtype=np.int32)
        footprint: list[bytes] = [b""] * n
        status = [str(s) for s in batch["status"]]
        errors = {c: [str(v) for v in batch[c]] for c in _ERROR_COLUMNS}
        for i in range(n):
            if status[i] not in ("ok", "skipped"):
                continue
            geo = self.scenes[str(batch["scene_key"][i])]
            r0, c0 = int(batch["row_off"][i]), int(batch["col_off"][i])
            wh, ww = int(batch["win_h"][i]), int(batch["win_w"][i])
            try:
                tile_box = np.array([[c0, r0, c0 + ww, r0 + wh]], dtype=np.float64)
                footprint[i] = shapely.to_wkb(pixel_boxes_to_wgs84(tile_box, geo.transform, geo.crs, 8)[0])
                if status[i] != "ok":
                    continue
                hw = (int(batch["image_h"][i]), int(batch["image_w"][i]))
                if "caption" in self.tasks:
                    caption[i] = parse_answer("caption", str(batch["answer_caption"][i])).text
                if "classify" in self.tasks:
                    label[i] = parse_answer("classify", str(batch["answer_classify"][i])).label or ""
                if "detect" in self.tasks:
                    det = parse_answer("detect", str(batch["answer_detect"][i]), hw)
                    parsed[i], malformed[i] = len(det.boxes), det.n_malformed
                    conf = float(np.exp(batch["logprob_detect"][i])) if len(det.boxes) else math.nan
                    boxes_json[i] = json.dumps(self._georef(det.boxes, conf, (r0, c0), hw, geo))
            except Exception as exc:  # model text never raises in parse_answer; this guards georef edge cases
                status[i] = "failed"
                fields = _error_fields(exc, "parse")
                for c in _ERROR_COLUMNS:
                    errors[c][i] = fields[c]
        out["caption"] = np.asarray(caption, dtype=object)
        out["class_label"] = np.asarray(label, dtype=object)
        out["boxes_json"] = np.asarray(boxes_json, dtype=object)
        out["boxes_parsed"] = parsed
        out["boxes_malformed"] = malformed
        fp = np.empty(n, dtype=object)
        fp[:] = footprint
        out["footprint_wkb"] = fp
        out["status"] = np.asarray(status, dtype=object)
        for c in _ERROR_COLUMNS:
            out[c] = np.asarray(errors[c], dtype=object)
        return out

    @staticmethod
    def _georef(boxes: Sequence[Any], confidence: float, off: tuple[int, int], hw: tuple[int, int],
                geo: SceneGeo) -> list[dict[str, Any]]:
        if not boxes:
            return []
        tile_boxes = np.array([b.as_tuple() for b in boxes], dtype=np.float64)
        scene_boxes = tile_to_scene_boxes(tile_boxes, col_off=off[1], row_off=off[0])
        crs_boxes = pixel_to_crs_boxes(scene_boxes, geo.transform)
        # boxes in text carry two decimals of the (padded) tile side: up to 1 % of it off the true edge
        cut = touches_inner_edge(tile_boxes, hw, off, (geo.height, geo.width), tolerance=max(1.0, max(hw) / 100))
        wgs84 = to_wgs84(pixel_boxes_to_crs_polygons(scene_boxes, geo.transform, 2), geo.crs)
        return [
            {
                "label": b.label, "confidence": confidence, "tile": tile_boxes[k].tolist(),
                "scene": scene_boxes[k].tolist(), "crs": crs_boxes[k].tolist(), "cut": bool(cut[k]),
                "wkb": shapely.to_wkb(wgs84[k], hex=True),
            }
            for k, b in enumerate(boxes)
        ]


# ----------------------------------------------------------------------------------------------------- assemble


@dataclass
class SceneResult:
    """Everything one finished scene contributes to the outputs.

    ``committed`` is False when any of its tiles failed (or it could not be opened): then only its ``errors``
    rows are written, and the next run tries the scene again.
    """

    scene: Scene
    committed: bool
    tiles_planned: int
    tiles_written: int = 0
    tiles_skipped: int = 0
    tiles_failed: int = 0
    scene_row: dict[str, Any] | None = None
    tile_rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    detection_rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    error_rows: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    grid: SceneGrid | None = None

    @property
    def detections(self) -> int:
        """Detections kept after NMS."""
        return len(self.detection_rows)


class SceneAssembler:
    """Driver-side last step: gathers a scene's tile rows as they stream in; when all ``n_planned`` tiles are
    there, runs cross-tile NMS and builds the scene's table rows and tile-grid arrays.

    Args:
        scenes: ``scene_key -> Scene`` of the wave.
        tasks: Tasks answered.
        vqa: VQA questions asked.
        nms_iou: IoU threshold of the per-scene NMS.
        containment: Containment threshold for boxes cut by tile edges.
        ids: Columns every row gets (``run_id``, ``unit_id``, ``output_key``).
        model: The model name, for the ``scenes`` table.
        tile_size: Tile side (for the grid's coordinates).
    """

    def __init__(
        self,
        scenes: Mapping[str, Scene],
        tasks: Sequence[str],
        vqa: Sequence[str],
        nms_iou: float,
        containment: float,
        ids: Mapping[str, str],
        model: str,
        tile_size: int,
    ) -> None:
        self.scenes = dict(scenes)
        self.tasks = list(tasks)
        self.vqa = list(vqa)
        self.nms_iou = nms_iou
        self.containment = containment
        self.ids = dict(ids)
        self.model = model
        self.tile_size = tile_size
        self._pending: dict[str, list[dict[str, Any]]] = {}
        self._expected: dict[str, int] = {}

    @property
    def pending(self) -> list[str]:
        """Keys of scenes with some but not all tiles received."""
        return list(self._pending)

    def add(self, batch: Batch) -> list[SceneResult]:
        """Take one batch of parsed tile rows; return the scenes it completed."""
        done: list[SceneResult] = []
        names = list(batch)
        n = len(batch["scene_key"])
        for i in range(n):
            row = {k: batch[k][i] for k in names}
            key = str(row["scene_key"])
            self._pending.setdefault(key, []).append(row)
            if str(row["status"]) == "scene_failed":
                self._expected[key] = 1
            else:
                self._expected.setdefault(key, int(row["n_planned"]))
            if len(self._pending[key]) >= self._expected[key]:
                done.append(self.finish(key, self._pending.pop(key)))
                self._expected.pop(key)
        return done

    def finish(self, key: str, rows: list[dict[str, Any]]) -> SceneResult:
        """Build a scene's outputs from all its tile rows."""
        scene = self.scenes[key]
        now = datetime.now(timezone.utc)
        footprint = shapely.geometry.shape(scene.geometry) if scene.geometry else None
        common = {**self.ids, "scene_id": scene.id, "datetime": scene.datetime}
        if len(rows) == 1 and str(rows[0]["status"]) == "scene_failed":
            row = rows[0]
            n = int(row["n_planned"])
            result = SceneResult(scene=scene, committed=False, tiles_planned=n, tiles_failed=n)
            result.error_rows.append((self._error(common, row, None, now), footprint))
            return result
        rows.sort(key=lambda r: (int(r["row"]), int(r["col"])))
        planned = int(rows[0]["n_planned"])
        failed = [r for r in rows if str(r["status"]) == "failed"]
        result = SceneResult(scene=scene, committed=not failed, tiles_planned=planned)
        if failed:
            result.tiles_failed = planned
            for r in failed:
                result.error_rows.append((self._error(common, r, str(r["tile_id"]), now), _wkb(r["footprint_wkb"])
                                          or footprint))
            return result
        result.tiles_written = sum(1 for r in rows if str(r["status"]) == "ok")
        result.tiles_skipped = sum(1 for r in rows if str(r["status"]) == "skipped")
        kept = self._nms(rows)
        kept_per_tile: dict[str, int] = {}
        for k, (tile_id, det) in enumerate(kept):
            kept_per_tile[tile_id] = kept_per_tile.get(tile_id, 0) + 1
            tx1, ty1, tx2, ty2 = det["tile"]
            sx1, sy1, sx2, sy2 = det["scene"]
            cx1, cy1, cx2, cy2 = det["crs"]
            result.detection_rows.append((
                {**common, "tile_id": tile_id, "detection_id": k, "label": det["label"],
                 "confidence": det["confidence"], "tile_x1": tx1, "tile_y1": ty1, "tile_x2": tx2, "tile_y2": ty2,
                 "scene_x1": sx1, "scene_y1": sy1, "scene_x2": sx2, "scene_y2": sy2, "crs": scene.crs,
                 "crs_minx": cx1, "crs_miny": cy1, "crs_maxx": cx2, "crs_maxy": cy2},
                shapely.from_wkb(det["wkb"]),
            ))
        for r in rows:
            ok = str(r["status"]) == "ok"
            record = {
                **common, "tile_id": str(r["tile_id"]), "row": int(r["row"]), "col": int(r["col"]),
                "col_off": int(r["col_off"]), "row_off": int(r["row_off"]), "width": int(r["win_w"]),
                "height": int(r["win_h"]), "status": str(r["status"]),
                "skip_reason": str(r["skip_reason"]) or None, "valid_fraction": _nan_none(r["valid_fraction"]),
            }
            if ok:
                record.update(self._answers(r, kept_per_tile.get(str(r["tile_id"]), 0)))
            result.tile_rows.append((record, _wkb(r["footprint_wkb"])))
        result.grid = self._grid(scene, rows)
        result.scene_row = {
            **common, "updated": scene.updated, "sensor": scene.sensor, "crs": scene.crs,
            "height": scene.height, "width": scene.width, "transform": list(scene.transform or ()),
            "tiles_planned": planned, "tiles_written": result.tiles_written, "tiles_skipped": result.tiles_skipped,
            "detections": len(kept), "embeddings_group": embeddings_group(scene.collection, scene.id),
            "model": self.model, "processed_at": now,
        }
        return result

    def _answers(self, r: Mapping[str, Any], n_detections: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "caption" in self.tasks:
            out["caption"] = str(r["caption"])
            out["caption_logprob"] = _nan_none(r["logprob_caption"])
        if "classify" in self.tasks:
            out["class_label"] = str(r["class_label"]) or None
            out["class_logprob"] = _nan_none(r["logprob_classify"])
        if "detect" in self.tasks:
            out["detect_logprob"] = _nan_none(r["logprob_detect"])
            out["boxes_parsed"] = int(r["boxes_parsed"])
            out["boxes_malformed"] = int(r["boxes_malformed"])
            out["detections"] = n_detections
        if self.vqa:
            out["vqa_questions"] = list(self.vqa)
            out["vqa_answers"] = json.loads(str(r["vqa_json"]))
        return out

    def _nms(self, rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        dets = [(str(r["tile_id"]), d) for r in rows if str(r["status"]) == "ok"
                for d in json.loads(str(r["boxes_json"]))]
        if not dets:
            return []
        boxes = np.array([d["scene"] for _, d in dets], dtype=np.float64)
        scores = np.array([d["confidence"] for _, d in dets], dtype=np.float64)
        keep = nms_per_scene(
            boxes, np.nan_to_num(scores, nan=0.0), [d["label"] for _, d in dets],
            cut_by_tile_edge=np.array([d["cut"] for _, d in dets]), iou_threshold=self.nms_iou,
            containment_threshold=self.containment, containment_margin=max(1.0, self.tile_size / 100),
        )
        return [dets[k] for k in keep]

    def _grid(self, scene: Scene, rows: Sequence[Mapping[str, Any]]) -> SceneGrid:
        row_offs = sorted({int(r["row_off"]) for r in rows})
        col_offs = sorted({int(r["col_off"]) for r in rows})
        dim = next((len(r["embedding"]) // 4 for r in rows if len(r.get("embedding", b"")) > 0), 0)
        emb = np.full((len(row_offs), len(col_offs), dim), np.nan, dtype=np.float32)
        valid = np.full((len(row_offs), len(col_offs)), np.nan, dtype=np.float32)
        row_index = {off: i for i, off in enumerate(row_offs)}
        col_index = {off: j for j, off in enumerate(col_offs)}
        for r in rows:
            i, j = row_index[int(r["row_off"])], col_index[int(r["col_off"])]
            valid[i, j] = float(r["valid_fraction"])
            buf = r.get("embedding", b"")
            if dim and len(buf):
                emb[i, j] = np.frombuffer(buf, dtype=np.float32)
        return SceneGrid(
            collection=scene.collection, scene_id=scene.id, crs=scene.crs or "", transform=scene.transform or (),
            rows=np.array(row_offs), cols=np.array(col_offs), tile_size=self.tile_size, embedding=emb,
            valid_fraction=valid, attrs={k: v for k, v in self.ids.items()},
        )

    @staticmethod
    def _error(common: Mapping[str, Any], r: Mapping[str, Any], tile_id: str | None, now: datetime) -> dict[str, Any]:
        return {
            **common, "tile_id": tile_id, "stage": str(r["error_stage"]), "error_type": str(r["error_type"]),
            "message": str(r["error_message"]), "asset": str(r["error_asset"]) or None,
            "href": str(r["error_href"]) or None, "occurred_at": now,
        }


def _wkb(buf: Any) -> Any:
    return shapely.from_wkb(bytes(buf)) if buf is not None and len(buf) else None


def _nan_none(value: Any) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v
