"""The archive job's stages: small callables over column batches (dicts of numpy arrays), one per step.

The path of a tile, top to bottom::

    scene row ──ReadStage──▶ tile rows (image bytes, valid fraction, status)        Ray CPU tasks
              ──ModelStage─▶ + answers per task, log-probs, pooled embedding        Ray actor pool (GPUs)
              ──ParseStage─▶ + caption, class label, boxes in tile/scene/CRS/WGS84   Ray CPU tasks
              ──SceneCollector (driver: gathers a scene's rows, nothing else)
              ──assemble_scene─▶ per scene: NMS, table rows, tile-grid arrays      Ray CPU tasks

Each stage declares the columns it reads (``needs``) and adds (``adds``), builds heavy state once in ``__init__``,
and is called on a hand-built batch in the tests, without Ray. :func:`check_columns` checks a batch against a
stage's ``needs`` (a missing column is a clear error naming the stage, not a ``KeyError`` three stages later), and
:func:`check_chain` checks a whole chain before any work starts. Rows carry explicit ids (``scene_key``, ``tile_id``):
Ray does not keep order. A tile's ``status`` is ``ok`` (goes through every stage), ``skipped`` (too little valid
data; recorded, not sent to the model), ``failed`` (this tile's read, model or parse step raised) or ``scene_failed``
(one row standing for all ``n_planned`` tiles of a scene that could not be opened).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import shapely

from catalogs.errors import ModelError, ParseError, SceneError
from catalogs.hrefs import redact_text, redact_url
from catalogs.scene import Scene
from catalogs.tiling import plan_tiles
from pipelines.archive.georef import (
    nms_per_scene,
    pixel_boxes_to_crs_polygons,
    pixel_boxes_to_wgs84,
    pixel_to_crs_boxes,
    tile_to_scene_boxes,
    to_wgs84,
    touches_inner_edge,
)
from pipelines.archive.source import scene_key
from pipelines.archive.store import SceneGrid, embeddings_group

__all__ = ["scene_key"]  # re-exported: stages and tests name scenes by it

Batch = dict[str, np.ndarray]

# catalogs names sensors by what the archive holds; the model's prompts name the image kind
MODEL_SENSOR = {"optical": "optical", "sar": "sar", "thermal": "infrared"}

_ERROR_COLUMNS = ("error_stage", "error_type", "error_message", "error_asset", "error_href")
_MODEL_LOADS = 0  # models built in this process (an actor is a process: > 1 would mean a reload)
_PLAN_KEYS = ("decoding", "decode_batch", "prefill_batch", "memory_bytes", "memory_source", "oom_halvings", "dtype",
              "cuda_graphs")


class MissingColumns(KeyError):
    """A stage got a batch without a column it needs."""


def check_columns(stage: Any, batch: Mapping[str, Any]) -> None:
    """Raise :class:`MissingColumns` when ``batch`` lacks any of ``stage.needs``.

    Raises:
        MissingColumns: Naming the stage and the columns.
    """
    missing = [c for c in getattr(stage, "needs", ()) if c not in batch]
    if missing:
        raise MissingColumns(f"{type(stage).__name__} needs columns {missing}; the batch has {sorted(batch)}")


def check_chain(first_columns: Sequence[str], stages: Sequence[Any]) -> None:
    """Check that every stage's ``needs`` are provided by the columns before it (source columns + ``adds``).

    Args:
        first_columns: Columns of the rows entering the first stage.
        stages: The stages (classes or instances) in order; ``adds`` may be a property, so pass instances where
            it is one.

    Raises:
        MissingColumns: Naming the first stage whose input lacks a column.
    """
    have = set(first_columns)
    for stage in stages:
        missing = [c for c in getattr(stage, "needs", ()) if c not in have]
        if missing:
            name = stage.__name__ if isinstance(stage, type) else type(stage).__name__
            raise MissingColumns(f"{name} needs columns {missing} that no earlier stage adds")
        adds = getattr(stage, "adds", ())
        have |= set(adds if isinstance(adds, (tuple, list)) else ())


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


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def scene_meta(scene: Scene) -> dict[str, Any]:
    """What assembly needs to know of a scene, as JSON-able values (it travels in the ``meta`` column)."""
    return {
        "collection": scene.collection, "id": scene.id, "datetime": _iso(scene.datetime),
        "updated": _iso(scene.updated), "geometry": scene.geometry, "sensor": scene.sensor, "crs": scene.crs,
        "height": scene.height, "width": scene.width, "transform": list(scene.transform or ()),
    }


def decode_image(buf: bytes, height: int, width: int) -> np.ndarray:
    """A tile image from its row bytes: ``(3, H, W)`` float32 in [0, 1]."""
    return np.frombuffer(buf, dtype=np.float32).reshape(3, int(height), int(width))


# --------------------------------------------------------------------------------------------------------- read


class ReadStage:
    """Scene rows → tile rows: plan the tiles, open the scene once, read every window through its sensor recipe.

    Runs as a Ray task per scene (a generator: tiles leave in blocks of ``tiles_per_block`` while the rest are
    read, so a large scene never sits whole in memory). Tiles with less than ``min_valid_fraction`` valid pixels
    are marked ``skipped`` and carry no image. A source row that could not become a scene (its error columns set)
    becomes one ``scene_failed`` row. The scene's description (``meta``: ids, times, grid, footprint) rides on the
    scene's first tile row only; every row carries the grid the parse stage georeferences with.

    Args:
        tile_size: Tile side in pixels.
        overlap: Pixels shared by neighbouring tiles.
        min_valid_fraction: Below this share of valid pixels a tile is skipped.
        tiles_per_block: Tiles per output batch.
    """

    needs = ("scene_key", "scene", "meta", *_ERROR_COLUMNS)
    adds = (
        "scene_key", "tile_id", "row", "col", "row_off", "col_off", "win_h", "win_w", "n_planned", "status",
        "skip_reason", "valid_fraction", "sensor", "image", "image_h", "image_w", "meta", "crs", "transform_json",
        "scene_h", "scene_w", *_ERROR_COLUMNS,
    )

    def __init__(self, tile_size: int, overlap: int, min_valid_fraction: float, tiles_per_block: int = 16) -> None:
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.min_valid_fraction = float(min_valid_fraction)
        self.tiles_per_block = max(1, int(tiles_per_block))

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        from catalogs.io import configure_gdal

        configure_gdal()  # idempotent; a Ray worker is a fresh process that did not run the job's entry point
        check_columns(self, batch)
        for i, key in enumerate(batch["scene_key"]):
            meta = json.loads(str(batch["meta"][i]))
            if str(batch["error_type"][i]):  # the item did not become a scene: one row stands for it
                row = self._base(str(key), None, meta, 0)
                row.update(status="scene_failed", **{c: str(batch[c][i]) for c in _ERROR_COLUMNS})
                yield _columns([row], self.adds)
                continue
            yield from self._read_scene(str(key), Scene.model_validate_json(str(batch["scene"][i])), meta)

    def _base(self, key: str, scene: Scene | None, meta: dict[str, Any], n_planned: int) -> dict[str, Any]:
        return {
            "scene_key": key, "tile_id": "", "row": -1, "col": -1, "row_off": -1, "col_off": -1, "win_h": 0,
            "win_w": 0, "n_planned": n_planned, "status": "ok", "skip_reason": "", "valid_fraction": math.nan,
            "sensor": scene.sensor if scene else "", "image": b"", "image_h": 0, "image_w": 0,
            "meta": json.dumps(meta), "crs": (scene.crs or "") if scene else "",
            "transform_json": json.dumps(list(scene.transform or (1, 0, 0, 0, 1, 0))) if scene else "[]",
            "scene_h": scene.height if scene else 0, "scene_w": scene.width if scene else 0, **_no_error(),
        }

    def _check_grid(self, scene: Scene, header_shape: tuple[int, int]) -> None:
        """Refuse a scene no tile of which could ever be used: a grid the item and its raster disagree on (an item
        claiming ``proj:shape [1, 1]`` for a 512² raster), or one too small to hold ``min_valid_fraction`` of a tile.

        Raises:
            UnsupportedScene: Naming the sizes.
        """
        from catalogs.errors import UnsupportedScene

        if (scene.height, scene.width) != tuple(header_shape):
            raise UnsupportedScene(
                f"item proj:shape {[scene.height, scene.width]} contradicts the raster header "
                f"({header_shape[0]} x {header_shape[1]} pixels)", item_id=scene.id, stage="plan",
            )
        needed = max(1, math.ceil(self.min_valid_fraction * self.tile_size**2))
        if scene.height * scene.width < needed:
            raise UnsupportedScene(
                f"the scene is {scene.height} x {scene.width} pixels: no tile can hold the {needed} valid pixels "
                f"that tiling.min_valid_fraction ({self.min_valid_fraction}) of a {self.tile_size}-px tile needs",
                item_id=scene.id, stage="plan",
            )

    def _read_scene(self, key: str, scene: Scene, source_meta: dict[str, Any]) -> Iterator[Batch]:
        from catalogs.io import SceneReader

        meta = {**source_meta, **scene_meta(scene)}
        first: dict[str, Any] | None = self._base(key, scene, meta, 0)
        rest = {**(first or {}), "meta": ""}  # the scene's description rides on its first row only

        def row(n_planned: int, **fields: Any) -> dict[str, Any]:
            nonlocal first
            out = {**(first or rest), "n_planned": n_planned, **fields}
            first = None
            return out

        try:
            tiles = _lazy_tiles(scene.height, scene.width, self.tile_size, self.overlap)
        except (SceneError, ValueError) as exc:
            yield _columns([row(0, status="scene_failed", **_error_fields(exc, "plan"))], self.adds)
            return
        n = len(tiles)
        reader = SceneReader(scene)
        try:
            reader.open()
            self._check_grid(scene, reader.shape)
            _ = reader.stretch  # one overview read per scene, before the first window
        except SceneError as exc:
            reader.close()
            yield _columns([row(n, status="scene_failed", **_error_fields(exc, "open"))], self.adds)
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
                    rows.append(row(n, status="failed", **base, **_error_fields(exc, "read")))
                else:
                    vf = float(img.valid_fraction)
                    if vf < self.min_valid_fraction:
                        reason = f"valid fraction {vf:.3f} < {self.min_valid_fraction}"
                        rows.append(row(n, status="skipped", skip_reason=reason, valid_fraction=vf, **base))
                    else:
                        image = np.ascontiguousarray(img.image, dtype=np.float32)
                        rows.append(row(n, valid_fraction=vf, image=image.tobytes(), image_h=image.shape[1],
                                        image_w=image.shape[2], **base))
                if len(rows) >= self.tiles_per_block:
                    yield _columns(rows, self.adds)
                    rows = []
        finally:
            reader.close()
        if rows:
            yield _columns(rows, self.adds)


class _lazy_tiles(Sequence[Any]):  # noqa: N801 - used like plan_tiles
    """:func:`catalogs.tiling.plan_tiles` without the list: a header claiming 200,000 x 200,000 pixels plans ~10^7
    tiles, which are counted and made one at a time, never held together."""

    def __init__(self, height: int, width: int, size: int, overlap: int) -> None:
        self._rows = [t.window.row_off for t in plan_tiles(height, size, size, overlap)]
        self._cols = [t.window.col_off for t in plan_tiles(size, width, size, overlap)]
        self._size = size

    def __len__(self) -> int:
        return len(self._rows) * len(self._cols)

    def __getitem__(self, k: Any) -> Any:
        from rasterio.windows import Window

        from catalogs.tiling import Tile

        i, j = divmod(int(k), len(self._cols))
        if not 0 <= i < len(self._rows):
            raise IndexError(k)
        return Tile(row=i, col=j, window=Window(col_off=self._cols[j], row_off=self._rows[i], width=self._size,
                                                height=self._size))


# -------------------------------------------------------------------------------------------------------- model


class ModelStage:
    """Tile rows → answers: one EarthGPT replica per actor asks every task of every ``ok`` tile.

    Images are encoded once per batch; all tasks' prompts (``image_index``) and the pooled visual embedding
    (``InferenceEngine.embed``) reuse those visual tokens. A batch whose model call raises is split in halves and
    retried until the tile that fails is alone; that tile is marked ``failed`` (``ModelError``, stage ``model``),
    its batch-mates are answered, and the actor lives on. Out of memory is not a failure: the tiles are split in
    halves and retried (down to one tile; this batch and later ones keep the smaller size), so no tile is lost to a
    batch that did not fit; each row's ``batch_plan`` (JSON) says what the engine planned (decode / prefill batches
    from the memory budget, see ``InferenceEngine.batch_plan``), the tiles per model call and the halvings so far. The
    model is built once per actor, in ``__init__``; a remote
    ``model`` (``s3://...``) is first copied to the node's cache (once per node, see
    :func:`earthgpt.weights.fetch_model`). Every row says which actor answered it and how many times that actor's
    process has loaded a model (``actor_id``, ``model_loads``): the job's proof that nothing reloads.

    Args:
        model: Preset name or checkpoint folder.
        engine: ``plain`` or ``deepspeed``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        tp_size: Tensor-parallel degree (DeepSpeed).
        kernel_inject: DeepSpeed kernel injection (GPU).
        cuda_graphs: Decode steps replayed as CUDA graphs (GPU, ``tp_size`` 1).
        tasks: Tasks to ask (``caption``, ``detect``, ``classify``).
        vqa: Extra questions.
        max_new_tokens: Generation budget per answer.
        seed: Weight seed for presets.
        torch_threads: Intra-op threads per actor (1 on small shared machines).
        storage_options: fsspec options for a remote ``model``.
    """

    needs = ("status", "sensor", "image", "image_h", "image_w", *_ERROR_COLUMNS)

    def __init__(
        self,
        model: str,
        engine: str = "plain",
        dtype: str = "float32",
        tp_size: int = 1,
        kernel_inject: bool = False,
        cuda_graphs: bool = False,
        tasks: Sequence[str] = ("caption", "detect"),
        vqa: Sequence[str] = (),
        max_new_tokens: int = 96,
        seed: int = 0,
        torch_threads: int | None = 1,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        import os
        import uuid

        import torch

        from earthgpt.engine import InferenceEngine
        from earthgpt.weights import fetch_model, is_remote

        global _MODEL_LOADS
        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.tasks = list(tasks)
        self.vqa = list(vqa)
        self.max_new_tokens = int(max_new_tokens)
        if is_remote(model):
            model = str(fetch_model(model, storage_options=dict(storage_options or {})))
        self.engine = InferenceEngine.from_pretrained(
            model, seed=seed, kind=engine, dtype=getattr(torch, dtype), tp_size=tp_size, kernel_inject=kernel_inject,
            cuda_graphs=cuda_graphs,
        )
        _MODEL_LOADS += 1
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.ready_at = time.time()  # when this actor could answer its first tile (model built)
        self.tile_batch: int | None = None  # tiles per model call once a batch ran out of memory (None: all)
        self.tile_oom_halvings = 0

    @property
    def adds(self) -> tuple[str, ...]:
        """Answer columns per task, the VQA answers, the embedding, the detection tokens and the actor counters."""
        return (*(c for t in self.tasks for c in (f"answer_{t}", f"logprob_{t}")), "vqa_json", "embedding",
                "tokens_detect", "actor_id", "model_loads", "actor_ready_at", "batch_plan")

    def _batch_plan(self) -> str:
        plan = {k: v for k, v in self.engine.batch_plan.items() if k in _PLAN_KEYS}
        return json.dumps({**plan, "tile_batch": self.tile_batch, "tile_oom_halvings": self.tile_oom_halvings})

    def _prompts(self, sensor: str) -> list[str]:
        from earthgpt.tasks import build_prompt

        model_sensor = MODEL_SENSOR.get(sensor, "optical")
        prompts = [build_prompt(t, model_sensor) for t in self.tasks]
        return prompts + [build_prompt("vqa", model_sensor, question=q) for q in self.vqa]

    def __call__(self, batch: Batch) -> Batch:
        check_columns(self, batch)
        n = len(batch["status"])
        out: Batch = {k: v for k, v in batch.items() if k != "image"}
        tokens_detect = [""] * n
        answers = {t: [""] * n for t in self.tasks}
        logprobs = {t: [math.nan] * n for t in self.tasks}
        vqa: list[list[str]] = [[] for _ in range(n)]
        embeddings: list[bytes] = [b""] * n
        status = [str(s) for s in batch["status"]]
        errors = {c: [str(v) for v in batch[c]] for c in _ERROR_COLUMNS}
        todo = [i for i in range(n) if status[i] == "ok"]
        size = self.tile_batch or max(len(todo), 1)
        pending = [todo[k : k + size] for k in range(0, len(todo), size)]
        while pending:  # out of memory halves the batch size; any other failure splits until the bad tile is alone
            part = pending.pop(0)
            if self.tile_batch and len(part) > self.tile_batch:  # cut after an earlier halving
                pending[:0] = [part[k : k + self.tile_batch] for k in range(0, len(part), self.tile_batch)]
                continue
            try:
                images = [decode_image(batch["image"][i], batch["image_h"][i], batch["image_w"][i]) for i in part]
                prompts: list[str] = []
                index: list[int] = []
                for j, i in enumerate(part):
                    for prompt in self._prompts(str(batch["sensor"][i])):
                        prompts.append(prompt)
                        index.append(j)
                # encode the batch once; every task's prompt and the pooled embedding reuse the visual tokens
                features = self.engine.encode_images(images)
                gens = self.engine.generate(images, prompts, max_new_tokens=self.max_new_tokens, image_index=index,
                                            image_features=features)
                per_tile = len(self.tasks) + len(self.vqa)
                for j, i in enumerate(part):
                    mine = gens[j * per_tile : (j + 1) * per_tile]
                    for t, gen in zip(self.tasks, mine, strict=False):
                        answers[t][i] = gen.text
                        logprobs[t][i] = gen.mean_logprob
                        if t == "detect":  # per-box confidences need each token's place in the text
                            ends = self.engine.processor.answer_token_ends(gen.token_ids)
                            tokens_detect[i] = json.dumps([ends, [round(x, 5) for x in gen.token_logprobs]])
                    vqa[i] = [g.text for g in mine[len(self.tasks) :]]
                emb = self.engine.embed(image_features=features)
                for j, i in enumerate(part):
                    embeddings[i] = np.ascontiguousarray(emb[j], dtype=np.float32).tobytes()
            except Exception as exc:  # one bad tile must not fail its batch, nor end the run: keep the actor
                from earthgpt.engine import is_out_of_memory

                if is_out_of_memory(exc) and len(part) > 1:
                    # too big for the device: halve it (later batches too) and retry, losing no tile
                    self.tile_batch = max(1, len(part) // 2)
                    self.tile_oom_halvings += 1
                    del exc
                    self.engine.release_memory()
                    pending.insert(0, part)
                    continue
                if len(part) > 1:
                    half = len(part) // 2
                    pending[:0] = [part[:half], part[half:]]
                    continue
                fields = _error_fields(ModelError(f"{type(exc).__name__}: {str(exc)[:2000]}"), "model")
                for i in part:
                    status[i] = "failed"
                    for c in _ERROR_COLUMNS:
                        errors[c][i] = fields[c]
        for t in self.tasks:
            out[f"answer_{t}"] = np.asarray(answers[t], dtype=object)
            out[f"logprob_{t}"] = np.asarray(logprobs[t], dtype=np.float32)
        out["vqa_json"] = np.asarray([json.dumps(v) for v in vqa], dtype=object)
        out["tokens_detect"] = np.asarray(tokens_detect, dtype=object)
        out["actor_id"] = np.asarray([self.actor_id] * n, dtype=object)
        out["model_loads"] = np.full(n, _MODEL_LOADS, dtype=np.int32)
        out["actor_ready_at"] = np.full(n, self.ready_at, dtype=np.float64)
        out["batch_plan"] = np.asarray([self._batch_plan()] * n, dtype=object)
        emb_col = np.empty(n, dtype=object)
        emb_col[:] = embeddings
        out["embedding"] = emb_col
        out["status"] = np.asarray(status, dtype=object)
        for c in _ERROR_COLUMNS:
            out[c] = np.asarray(errors[c], dtype=object)
        return out


# -------------------------------------------------------------------------------------------------------- parse


@dataclass(frozen=True)
class _Geo:
    crs: str
    transform: tuple[float, ...]
    height: int
    width: int


class ParseStage:
    """Answers → structured, georeferenced results per tile.

    Caption and class label from their answers; detection boxes parsed in tile pixels (padding undone by
    ``earthgpt.tasks.parse_answer``), shifted to scene pixels, mapped to the scene CRS and to WGS84 polygons, and
    flagged when a tile edge inside the scene cuts them (for the per-scene NMS). Each box's ``confidence`` is
    ``exp`` of the mean log-probability of the tokens that wrote its coordinates
    (:func:`earthgpt.tasks.span_confidence`). The tile footprint is added as a WGS84 polygon. A row whose parsing
    raises becomes ``failed`` (stage ``parse``), and so does a tile whose answers are not valid UTF-8 text or all
    parse to nothing (``ParseError``): such text never reaches the tables.

    Args:
        tasks: The tasks the model stage answered.
    """

    needs = ("scene_key", "status", "row_off", "col_off", "win_h", "win_w", "image_h", "image_w", "crs",
             "transform_json", "scene_h", "scene_w", *_ERROR_COLUMNS)
    adds = ("caption", "class_label", "boxes_json", "boxes_parsed", "boxes_malformed", "footprint_wkb")

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)

    def __call__(self, batch: Batch) -> Batch:
        from earthgpt.tasks import parse_answer

        check_columns(self, batch)

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
            geo = _Geo(str(batch["crs"][i]), tuple(json.loads(str(batch["transform_json"][i]))),
                       int(batch["scene_h"][i]), int(batch["scene_w"][i]))
            r0, c0 = int(batch["row_off"][i]), int(batch["col_off"][i])
            wh, ww = int(batch["win_h"][i]), int(batch["win_w"][i])
            try:
                tile_box = np.array([[c0, r0, c0 + ww, r0 + wh]], dtype=np.float64)
                footprint[i] = shapely.to_wkb(pixel_boxes_to_wgs84(tile_box, geo.transform, geo.crs, 8)[0])
                if status[i] != "ok":
                    continue
                hw = (int(batch["image_h"][i]), int(batch["image_w"][i]))
                self._check_text(batch, i)
                if "caption" in self.tasks:
                    caption[i] = parse_answer("caption", str(batch["answer_caption"][i])).text
                if "classify" in self.tasks:
                    label[i] = parse_answer("classify", str(batch["answer_classify"][i])).label or ""
                if "detect" in self.tasks:
                    det = parse_answer("detect", str(batch["answer_detect"][i]), hw)
                    parsed[i], malformed[i] = len(det.boxes), det.n_malformed
                    boxes_json[i] = json.dumps(self._georef(det.boxes, self._confidences(batch, i, det), (r0, c0),
                                                            hw, geo))
                if not (caption[i] or label[i] or parsed[i] or malformed[i] or self._said_none(batch, i)):
                    raise ParseError("the model's answers parse to nothing: " + ", ".join(
                        f"{t} {str(batch[f'answer_{t}'][i])[:80]!r}" for t in self.tasks))
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

    def _check_text(self, batch: Batch, i: int) -> None:
        """Refuse answers that are not valid UTF-8 text (raw bytes, lone surrogates, U+FFFD from a byte-level
        decode): parquet would reject them, and nothing readable can be parsed from them."""
        for t in self.tasks:
            value = batch[f"answer_{t}"][i]
            try:
                text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                text.encode("utf-8")
                bad = "\ufffd" in text
            except (UnicodeDecodeError, UnicodeEncodeError) as exc:
                raise ParseError(f"answer to {t} is not valid UTF-8 ({exc.reason} at byte {exc.start}): "
                                 f"{ascii(value)[:120]}") from exc
            if bad:
                raise ParseError(f"answer to {t} holds bytes that are not UTF-8 (U+FFFD): {ascii(value)[:120]}")
            if isinstance(value, bytes):
                batch[f"answer_{t}"][i] = text

    def _said_none(self, batch: Batch, i: int) -> bool:
        """Whether the detection answer is the template's "none" sentence (an empty parse that is an answer)."""
        if "detect" not in self.tasks:
            return False
        from earthgpt.tasks import format_answer

        none = format_answer("detect", [], (1, 1)).rstrip(".").lower()
        return str(batch["answer_detect"][i]).strip().rstrip(".").lower().startswith(none)

    @staticmethod
    def _confidences(batch: Batch, i: int, det: Any) -> list[float]:
        from earthgpt.tasks import span_confidence

        tokens = str(batch["tokens_detect"][i]) if "tokens_detect" in batch else ""
        if tokens:
            ends, logprobs = json.loads(tokens)
            return span_confidence(det.box_spans, ends, logprobs)
        # no per-token log-probabilities (another model stage): the answer's own confidence for every box
        return [float(np.exp(batch["logprob_detect"][i]))] * len(det.boxes)

    @staticmethod
    def _georef(boxes: Sequence[Any], confidences: Sequence[float], off: tuple[int, int], hw: tuple[int, int],
                geo: _Geo) -> list[dict[str, Any]]:
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
                "label": b.label, "confidence": confidences[k], "tile": tile_boxes[k].tolist(),
                "scene": scene_boxes[k].tolist(), "crs": crs_boxes[k].tolist(), "cut": bool(cut[k]),
                "wkb": shapely.to_wkb(wgs84[k], hex=True),
            }
            for k, b in enumerate(boxes)
        ]


# ----------------------------------------------------------------------------------------------------- assemble


@dataclass
class SceneResult:
    """Everything one finished scene contributes to the outputs.

    ``committed`` is False when the scene could not be opened or every tile failed: then only its ``errors`` rows
    are written. With some tiles failed (``tiles_failed``) the other tiles are committed and the failed ones are
    ``errors`` rows; either way the next run tries the whole scene again (see docs/outputs.md).
    """

    meta: dict[str, Any]
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
    def key(self) -> str:
        """``<collection>/<scene_id>``."""
        return scene_key(self.collection, self.scene_id)

    @property
    def collection(self) -> str:
        """STAC collection id."""
        return str(self.meta.get("collection") or "")

    @property
    def scene_id(self) -> str:
        """STAC item id."""
        return str(self.meta.get("id") or "")

    @property
    def date(self) -> str:
        """Acquisition date (``YYYY-MM-DD``, UTC): the partition of the scene's rows; ``unknown`` without one."""
        t = _time(self.meta.get("datetime"))
        return t.strftime("%Y-%m-%d") if t else "unknown"

    @property
    def updated(self) -> datetime | None:
        """The item's STAC ``updated``."""
        return _time(self.meta.get("updated"))

    @property
    def detections(self) -> int:
        """Detections kept after NMS."""
        return len(self.detection_rows)

    def summary(self) -> dict[str, Any]:
        """The few numbers the driver keeps of a scene (its rows stay in the object store)."""
        return {
            "key": self.key, "collection": self.collection, "scene_id": self.scene_id, "date": self.date,
            "updated": self.updated, "committed": self.committed, "tiles_planned": self.tiles_planned,
            "tiles_written": self.tiles_written, "tiles_skipped": self.tiles_skipped,
            "tiles_failed": self.tiles_failed, "detections": self.detections,
            "labels": [rec["label"] for rec, _ in self.detection_rows], "errors": len(self.error_rows),
            "first_error": dict(self.error_rows[0][0]) if self.error_rows else None,
            "prev_date": self.meta.get("prev_date"), "prev_unit": self.meta.get("prev_unit"),
        }


def _time(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


# columns assembly reads; the image was dropped by the model stage, everything else of a tile row is small
ASSEMBLY_COLUMNS = (
    "scene_key", "tile_id", "row", "col", "row_off", "col_off", "win_h", "win_w", "n_planned", "status",
    "skip_reason", "valid_fraction", "meta", "footprint_wkb", "boxes_json", "boxes_parsed", "boxes_malformed",
    "caption", "class_label", "vqa_json", "embedding", *_ERROR_COLUMNS,
)


class SceneCollector:
    """Driver side: gathers each scene's tile rows as they stream in and hands back complete scenes.

    It holds only the rows of scenes in flight (Ray Data's backpressure bounds them) and does no work on them:
    assembly runs in a Ray task (:func:`assemble_scene`). A tile row seen twice (a retried task) counts once.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, dict[str, Any]]] = {}
        self._expected: dict[str, int] = {}

    @property
    def pending(self) -> list[str]:
        """Keys of scenes with some but not all tiles received."""
        return list(self._rows)

    def add(self, batch: Batch) -> list[tuple[str, list[dict[str, Any]]]]:
        """Take one batch of parsed tile rows; return ``(scene_key, rows)`` of the scenes it completed."""
        done: list[tuple[str, list[dict[str, Any]]]] = []
        names = [c for c in batch if c in ASSEMBLY_COLUMNS or c.startswith(("answer_", "logprob_"))]
        for i in range(len(batch["scene_key"])):
            row = {k: batch[k][i] for k in names}
            key = str(row["scene_key"])
            scene = self._rows.setdefault(key, {})
            scene[str(row["tile_id"]) or "#scene"] = row
            if str(row["status"]) == "scene_failed":
                self._expected[key] = 1
            else:
                self._expected.setdefault(key, int(row["n_planned"]))
            if len(scene) >= self._expected[key]:
                done.append((key, list(self._rows.pop(key).values())))
                self._expected.pop(key)
        return done


@dataclass(frozen=True)
class AssemblySettings:
    """What assembling a scene needs besides its rows.

    Attributes:
        tasks: Tasks answered.
        vqa: VQA questions asked.
        nms_iou: IoU threshold of the per-scene NMS.
        containment: Containment threshold for boxes cut by tile edges.
        ids: Columns every row gets (``run_id``, ``output_key``; ``unit_id`` is set when the unit closes).
        model: The model name, for the ``scenes`` table.
        tile_size: Tile side (for the grid's coordinates).
    """

    tasks: tuple[str, ...]
    vqa: tuple[str, ...]
    nms_iou: float
    containment: float
    ids: tuple[tuple[str, str], ...]
    model: str
    tile_size: int


def assemble_scene(rows: list[dict[str, Any]], settings: AssemblySettings) -> SceneResult:
    """Build a scene's outputs from all its tile rows: cross-tile NMS, table rows, tile-grid arrays.

    Runs in a Ray task (CPU), never in the driver; pure otherwise, so tests call it directly.

    Args:
        rows: Every tile row of the scene (one ``scene_failed`` row for a scene that could not be read).
        settings: Tasks, NMS thresholds, ids.

    Returns:
        The scene's result; ``committed`` is False when any tile failed.
    """
    meta = next((json.loads(str(r["meta"])) for r in rows if str(r.get("meta") or "")), None)
    if meta is None:
        raise ValueError(f"scene {rows[0]['scene_key'] if rows else '?'}: no row carries the scene's meta")
    ids = dict(settings.ids)
    now = datetime.now(timezone.utc)
    footprint = shapely.geometry.shape(meta["geometry"]) if meta.get("geometry") else None
    common = {**ids, "scene_id": str(meta.get("id") or ""), "datetime": _time(meta.get("datetime"))}
    if len(rows) == 1 and str(rows[0]["status"]) == "scene_failed":
        row = rows[0]
        n = int(row["n_planned"])
        result = SceneResult(meta=meta, committed=False, tiles_planned=n, tiles_failed=n)
        result.error_rows.append((_error(common, row, None, now), footprint))
        return result
    rows = sorted(rows, key=lambda r: (int(r["row"]), int(r["col"])))
    planned = int(rows[0]["n_planned"])
    failed = [r for r in rows if str(r["status"]) == "failed"]
    # a failed tile is an errors row; the scene's other tiles are committed all the same (and the whole scene is
    # tried again next run, its new version replacing this one): a scene with no tile left is not committed
    result = SceneResult(meta=meta, committed=len(failed) < len(rows), tiles_planned=planned)
    result.tiles_failed = len(failed)
    for r in failed:
        result.error_rows.append((_error(common, r, str(r["tile_id"]), now), _wkb(r["footprint_wkb"]) or footprint))
    if not result.committed:
        return result
    grid_rows = rows  # the tile grid keeps a failed tile's cell (NaN)
    rows = [r for r in rows if str(r["status"]) != "failed"]
    result.tiles_written = sum(1 for r in rows if str(r["status"]) == "ok")
    result.tiles_skipped = sum(1 for r in rows if str(r["status"]) == "skipped")
    kept = _nms(rows, settings)
    kept_per_tile: dict[str, int] = {}
    for k, (tile_id, det) in enumerate(kept):
        kept_per_tile[tile_id] = kept_per_tile.get(tile_id, 0) + 1
        tx1, ty1, tx2, ty2 = det["tile"]
        sx1, sy1, sx2, sy2 = det["scene"]
        cx1, cy1, cx2, cy2 = det["crs"]
        result.detection_rows.append((
            {**common, "tile_id": tile_id, "detection_id": k, "label": det["label"],
             "confidence": _nan_none(det["confidence"]), "tile_x1": tx1, "tile_y1": ty1, "tile_x2": tx2,
             "tile_y2": ty2, "scene_x1": sx1, "scene_y1": sy1, "scene_x2": sx2, "scene_y2": sy2,
             "crs": meta.get("crs"), "crs_minx": cx1, "crs_miny": cy1, "crs_maxx": cx2, "crs_maxy": cy2},
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
            record.update(_answers(r, kept_per_tile.get(str(r["tile_id"]), 0), settings))
        result.tile_rows.append((record, _wkb(r["footprint_wkb"])))
    output_key = ids.get("output_key", "")
    result.grid = _grid(meta, grid_rows, settings, output_key)
    result.scene_row = {
        **common, "updated": _time(meta.get("updated")), "sensor": meta.get("sensor"), "crs": meta.get("crs"),
        "height": meta.get("height"), "width": meta.get("width"), "transform": list(meta.get("transform") or ()),
        "tiles_planned": planned, "tiles_written": result.tiles_written, "tiles_skipped": result.tiles_skipped,
        "detections": len(kept), "embeddings_group": embeddings_group(output_key, result.collection, result.scene_id),
        "model": settings.model, "processed_at": now,
    }
    return result


def _answers(r: Mapping[str, Any], n_detections: int, settings: AssemblySettings) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "caption" in settings.tasks:
        out["caption"] = str(r["caption"])
        out["caption_logprob"] = _nan_none(r["logprob_caption"])
    if "classify" in settings.tasks:
        out["class_label"] = str(r["class_label"]) or None
        out["class_logprob"] = _nan_none(r["logprob_classify"])
    if "detect" in settings.tasks:
        out["detect_logprob"] = _nan_none(r["logprob_detect"])
        out["boxes_parsed"] = int(r["boxes_parsed"])
        out["boxes_malformed"] = int(r["boxes_malformed"])
        out["detections"] = n_detections
    if settings.vqa:
        out["vqa_questions"] = list(settings.vqa)
        out["vqa_answers"] = json.loads(str(r["vqa_json"]))
    return out


def _nms(rows: Sequence[Mapping[str, Any]], settings: AssemblySettings) -> list[tuple[str, dict[str, Any]]]:
    dets = [(str(r["tile_id"]), d) for r in rows if str(r["status"]) == "ok"
            for d in json.loads(str(r["boxes_json"]))]
    if not dets:
        return []
    boxes = np.array([d["scene"] for _, d in dets], dtype=np.float64)
    scores = np.array([np.nan if d["confidence"] is None else d["confidence"] for _, d in dets], dtype=np.float64)
    keep = nms_per_scene(
        boxes, np.nan_to_num(scores, nan=0.0), [d["label"] for _, d in dets],
        cut_by_tile_edge=np.array([d["cut"] for _, d in dets]), iou_threshold=settings.nms_iou,
        containment_threshold=settings.containment, containment_margin=max(1.0, settings.tile_size / 100),
    )
    return [dets[k] for k in keep]


def _grid(meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], settings: AssemblySettings,
          output_key: str) -> SceneGrid:
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
        if dim and len(buf) and str(r["status"]) != "failed":  # a failed tile: NaN, whatever it carries
            emb[i, j] = np.frombuffer(buf, dtype=np.float32)
    return SceneGrid(
        collection=str(meta.get("collection") or ""), scene_id=str(meta.get("id") or ""),
        crs=str(meta.get("crs") or ""), transform=tuple(meta.get("transform") or ()), rows=np.array(row_offs),
        cols=np.array(col_offs), tile_size=settings.tile_size, embedding=emb, valid_fraction=valid,
        attrs=dict(settings.ids), output_key=output_key,
    )


def _error(common: Mapping[str, Any], r: Mapping[str, Any], tile_id: str | None, now: datetime) -> dict[str, Any]:
    return {
        **common, "tile_id": tile_id, "stage": str(r["error_stage"]), "error_type": str(r["error_type"]),
        # a message quotes what failed (GDAL names the signed URL): no signature or credential reaches a table
        "message": redact_text(str(r["error_message"])), "asset": str(r["error_asset"]) or None,
        "href": redact_url(str(r["error_href"])) or None, "occurred_at": now,
    }


def _wkb(buf: Any) -> Any:
    return shapely.from_wkb(bytes(buf)) if buf is not None and len(buf) else None


def _nan_none(value: Any) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v
