"""Each stage on hand-built batches, without Ray: read (real COGs), model (tiny preset), parse, assemble."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely

from catalogs.scene import Scene
from catalogs.tiling import plan_tiles
from earthgpt.tasks import format_answer
from pipelines.archive.source import source_batch
from pipelines.archive.stages import (
    AssemblySettings,
    MissingColumns,
    ModelStage,
    ParseStage,
    ReadStage,
    SceneCollector,
    assemble_scene,
    check_chain,
    decode_image,
    scene_key,
    scene_meta,
)

IDS = (("run_id", "r"), ("unit_id", "u"), ("output_key", "k"))


def _settings(tasks: tuple[str, ...]) -> AssemblySettings:
    return AssemblySettings(tasks, (), 0.5, 0.7, IDS, "tiny", 64)


def _scene_batch(scenes: list[Scene]) -> dict[str, np.ndarray]:
    return source_batch(scenes)


def _concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assemble(collector: SceneCollector, batch: dict[str, np.ndarray], tasks: tuple[str, ...]) -> list:
    return [assemble_scene(rows, _settings(tasks)) for _, rows in collector.add(batch)]


def test_read_stage_emits_every_planned_tile_once(world_scenes):
    scene = world_scenes[0]
    stage = ReadStage(tile_size=64, overlap=16, min_valid_fraction=0.5, tiles_per_block=10)
    blocks = list(stage(_scene_batch([scene])))
    assert all(len(b["tile_id"]) <= 10 for b in blocks) and len(blocks) > 1  # streamed in blocks
    out = _concat(blocks)
    planned = plan_tiles(scene.height, scene.width, 64, 16)
    assert sorted(out["tile_id"]) == sorted(t.tile_id for t in planned)
    assert set(out["n_planned"]) == {len(planned)}
    ok = out["status"] == "ok"
    skipped = out["status"] == "skipped"
    assert ok.sum() + skipped.sum() == len(planned) and ok.sum() > 0
    assert all(len(b) == 0 for b in out["image"][skipped])
    assert all(r.startswith("valid fraction") for r in out["skip_reason"][skipped])
    i = int(np.flatnonzero(ok)[0])
    img = decode_image(out["image"][i], out["image_h"][i], out["image_w"][i])
    assert img.shape == (3, 64, 64) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1


def test_read_stage_turns_an_unopenable_scene_into_one_failed_row(world_scenes, tmp_path):
    scene = world_scenes[1]
    ref = scene.recipe.reference_band
    gone = scene.bands[ref].model_copy(update={"href": (tmp_path / "missing.tif").as_uri()})
    broken = scene.model_copy(update={"bands": {**scene.bands, ref: gone}})
    out = _concat(list(ReadStage(64, 0, 0.5)(_scene_batch([broken]))))
    assert list(out["status"]) == ["scene_failed"] and json.loads(out["meta"][0])["id"] == scene.id
    assert out["n_planned"][0] == len(plan_tiles(scene.height, scene.width, 64, 0))
    assert out["error_type"][0] == "AssetNotFound" and out["error_stage"][0] == "open"


@pytest.fixture(scope="module")
def tiny_stage():
    return ModelStage("tiny", tasks=["caption", "detect", "classify"], vqa=["Is there water?"], max_new_tokens=6)


def test_model_stage_answers_ok_tiles_and_passes_others_through(world_scenes, tiny_stage):
    blocks = list(ReadStage(64, 0, 0.5, tiles_per_block=6)(_scene_batch([world_scenes[2]])))
    batch = blocks[0]
    batch["status"][1] = "skipped"
    out = tiny_stage(batch)
    assert "image" not in out
    n = len(batch["status"])
    for col in ("answer_caption", "logprob_caption", "answer_detect", "answer_classify", "vqa_json", "embedding"):
        assert len(out[col]) == n
    assert out["answer_caption"][1] == "" and math.isnan(out["logprob_caption"][1]) and out["embedding"][1] == b""
    ok = [i for i in range(n) if out["status"][i] == "ok"]
    assert all(out["logprob_detect"][i] <= 0 for i in ok)
    dim = tiny_stage.engine.config.text_config.hidden_size
    assert all(len(out["embedding"][i]) == 4 * dim for i in ok)
    assert all(len(json.loads(out["vqa_json"][i])) == 1 for i in ok)


def test_model_stage_records_a_failing_batch_instead_of_raising(world_scenes, tiny_stage):
    batch = next(iter(ReadStage(64, 0, 0.0, tiles_per_block=3)(_scene_batch([world_scenes[0]]))))
    batch["image_h"] = np.full_like(batch["image_h"], 7)  # bytes no longer match the shape
    out = tiny_stage(batch)
    assert set(out["status"]) == {"failed"} and set(out["error_stage"]) == {"model"}


def test_model_stage_splits_a_failing_batch_and_fails_only_the_bad_tile(world_scenes, tiny_stage):
    batch = next(iter(ReadStage(64, 0, 0.0, tiles_per_block=4)(_scene_batch([world_scenes[0]]))))
    assert len(batch["status"]) == 4 and set(batch["status"]) == {"ok"}
    batch["image"][2] = batch["image"][2][:100]  # one tile's bytes no longer match its shape: its batch raises
    out = tiny_stage(batch)
    assert list(out["status"]) == ["ok", "ok", "failed", "ok"]
    assert out["error_type"][2] == "ModelError" and out["error_stage"][2] == "model"
    assert "ValueError" in out["error_message"][2]  # the original exception's type is kept in the message
    assert all(out["answer_caption"][i] and len(out["embedding"][i]) for i in (0, 1, 3))


def test_read_stage_refuses_scenes_no_tile_could_use(world_scenes):
    from catalogs.errors import UnsupportedScene

    scene = world_scenes[0]
    stage = ReadStage(64, 0, 0.5)
    claims_1x1 = scene.model_copy(update={"shape": (1, 1)})  # the item says proj:shape [1, 1]
    out = _concat(list(stage(_scene_batch([claims_1x1]))))
    assert list(out["status"]) == ["scene_failed"] and out["error_type"][0] == "UnsupportedScene"
    assert "proj:shape [1, 1] contradicts the raster header" in out["error_message"][0]
    with pytest.raises(UnsupportedScene, match="1 x 1 pixels: no tile can hold the 2048 valid pixels"):
        stage._check_grid(claims_1x1, (1, 1))


def _answered(scene: Scene, tiles: list[tuple[int, int]], answers: list[str], size: int = 64) -> dict[str, np.ndarray]:
    """A model-stage output batch for hand-picked tiles of ``scene`` with given detection answers."""
    n = len(tiles)
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    return {
        "scene_key": np.array([scene_key(scene.collection, scene.id)] * n), "tile_id": obj([f"t{i}" for i in range(n)]),
        "row": np.arange(n), "col": np.zeros(n, int), "row_off": np.array([r for r, _ in tiles]),
        "col_off": np.array([c for _, c in tiles]), "win_h": np.full(n, size), "win_w": np.full(n, size),
        "n_planned": np.full(n, n), "status": obj(["ok"] * n), "skip_reason": obj([""] * n),
        "valid_fraction": np.ones(n), "sensor": obj([scene.sensor] * n), "image_h": np.full(n, size),
        "image_w": np.full(n, size), "answer_detect": obj(answers), "logprob_detect": np.full(n, -0.1),
        "answer_caption": obj(["a harbour"] * n), "logprob_caption": np.full(n, -0.5), "vqa_json": obj(["[]"] * n),
        "embedding": obj([np.arange(4, dtype=np.float32).tobytes()] * n),
        "meta": obj([json.dumps(scene_meta(scene))] + [""] * (n - 1)), "crs": obj([scene.crs] * n),
        "transform_json": obj([json.dumps(list(scene.transform))] * n), "scene_h": np.full(n, scene.height),
        "scene_w": np.full(n, scene.width),
        **{c: obj([""] * n) for c in ("error_stage", "error_type", "error_message", "error_asset", "error_href")},
    }


def test_parse_stage_georeferences_boxes(world_scenes):
    scene = world_scenes[0]
    answer = format_answer("detect", [("ship", 10, 20, 26, 30)], (64, 64))
    batch = _answered(scene, [(128, 64)], [answer])
    out = ParseStage(["caption", "detect"])(batch)
    assert out["caption"][0] == "a harbour" and out["boxes_parsed"][0] == 1 and out["boxes_malformed"][0] == 0
    (det,) = json.loads(out["boxes_json"][0])
    np.testing.assert_allclose(det["tile"], [10, 20, 26, 30], atol=0.33)
    np.testing.assert_allclose(det["scene"], [74, 148, 90, 158], atol=0.33)
    a, _, c, _, e, f = scene.transform
    np.testing.assert_allclose(det["crs"], [c + a * det["scene"][0], f + e * det["scene"][3],
                                            c + a * det["scene"][2], f + e * det["scene"][1]])
    poly = shapely.from_wkb(det["wkb"])
    assert poly.is_valid and shapely.box(*scene.bbox).contains(poly)
    assert det["confidence"] == pytest.approx(math.exp(-0.1))
    footprint = shapely.from_wkb(out["footprint_wkb"][0])
    assert footprint.contains(poly)


def test_assembler_dedups_across_overlapping_tiles_and_builds_rows(world_scenes):
    scene = world_scenes[0]
    # one ship at scene pixels [60, 100, 76, 110], seen whole by tile (64, 32) and cut by tile (64, 64)
    whole = format_answer("detect", [("ship", 60 - 32, 100 - 64, 76 - 32, 110 - 64)], (64, 64))
    cut = format_answer("detect", [("ship", 0, 100 - 64, 12, 110 - 64)], (64, 64))
    batch = _answered(scene, [(64, 32), (64, 64)], [whole, cut])
    parsed = ParseStage(["caption", "detect"])(batch)
    (result,) = _assemble(SceneCollector(), parsed, ("caption", "detect"))
    assert result.committed and result.tiles_written == 2 and result.tiles_planned == 2
    assert len(result.detection_rows) == 1
    rec, geom = result.detection_rows[0]
    assert rec["tile_id"] == "t0" and rec["label"] == "ship" and geom.is_valid
    np.testing.assert_allclose([rec["scene_x1"], rec["scene_y1"], rec["scene_x2"], rec["scene_y2"]],
                               [60, 100, 76, 110], atol=0.33)
    tiles = {r["tile_id"]: r for r, _ in result.tile_rows}
    assert tiles["t0"]["detections"] == 1 and tiles["t1"]["detections"] == 0 and tiles["t1"]["boxes_parsed"] == 1
    assert result.scene_row["detections"] == 1 and result.scene_row["tiles_written"] == 2
    assert result.grid is not None and result.grid.embedding.shape[-1] == 4


def test_assembler_waits_for_all_tiles_and_commits_a_scene_without_its_failed_tile(world_scenes):
    scene = world_scenes[0]
    batch = _answered(scene, [(0, 0), (0, 64), (64, 0)], ["There are no objects."] * 3)
    key = batch["scene_key"][0]
    parsed = ParseStage(["detect"])(batch)
    parsed["status"][2] = "failed"
    parsed["error_stage"][2], parsed["error_type"][2], parsed["error_message"][2] = "read", "CorruptRaster", "bad"
    collector = SceneCollector()
    first = {k: v[:2] for k, v in parsed.items()}
    rest = {k: v[2:] for k, v in parsed.items()}
    assert _assemble(collector, first, ("detect",)) == [] and collector.pending == [key]
    (result,) = _assemble(collector, rest, ("detect",))
    # the failed tile is an errors row; the others are committed (each planned tile once, as a row or an error)
    assert result.committed and result.tiles_failed == 1 and result.tiles_written == 2
    assert [rec["tile_id"] for rec, _ in result.tile_rows] == ["t0", "t1"]
    (err, _), = result.error_rows
    assert err["tile_id"] == "t2" and err["error_type"] == "CorruptRaster" and err["stage"] == "read"
    assert result.summary()["tiles_failed"] == 1 and result.scene_row is not None
    emb = result.grid.embedding  # the failed tile keeps its cell in the grid, as NaN
    assert emb.shape[:2] == (2, 2) and np.isnan(emb[1, 0]).all() and not np.isnan(emb[0, 0]).any()


def test_assembler_does_not_commit_a_scene_whose_every_tile_failed(world_scenes):
    batch = _answered(world_scenes[0], [(0, 0), (0, 64)], ["There are no objects."] * 2)
    parsed = ParseStage(["detect"])(batch)
    parsed["status"][:] = "failed"
    parsed["error_type"][:] = "ModelError"
    (result,) = _assemble(SceneCollector(), parsed, ("detect",))
    assert not result.committed and result.tiles_failed == 2 and len(result.error_rows) == 2
    assert result.tile_rows == [] and result.scene_row is None


def test_assembler_counts_an_unopenable_scene_as_all_tiles_failed(world_scenes):
    scene = world_scenes[0]
    batch = _answered(scene, [(0, 0)], [""])
    batch["status"][0] = "scene_failed"
    batch["n_planned"][0] = 49
    batch["error_type"][0] = "AssetNotFound"
    (result,) = _assemble(SceneCollector(), batch, ("detect",))
    assert not result.committed and result.tiles_planned == 49 and result.tiles_failed == 49
    assert result.error_rows[0][0]["tile_id"] is None and result.error_rows[0][1] is not None


def test_collector_counts_a_repeated_tile_row_once(world_scenes):
    scene = world_scenes[0]
    batch = _answered(scene, [(0, 0), (0, 64)], ["There are no objects."] * 2)
    parsed = ParseStage(["detect"])(batch)
    collector = SceneCollector()
    first = {k: v[:1] for k, v in parsed.items()}
    assert _assemble(collector, first, ("detect",)) == []
    assert _assemble(collector, first, ("detect",)) == []  # the same tile again (a retried task) is not a new one
    (result,) = _assemble(collector, {k: v[1:] for k, v in parsed.items()}, ("detect",))
    assert result.tiles_written == 2 and len(result.tile_rows) == 2


def test_parse_stage_scores_each_box_by_its_own_tokens(world_scenes):
    scene = world_scenes[0]
    answer = format_answer("detect", [("ship", 10, 10, 20, 20), ("ship", 40, 40, 50, 50)], (64, 64))
    batch = _answered(scene, [(0, 0)], [answer])
    # hand-made tokens: one per character; the second box's characters are far less likely
    second = answer.index(";") + 1
    ends = list(range(1, len(answer) + 1))
    logprobs = [-0.01 if k < second else -2.0 for k in range(len(answer))]
    batch["tokens_detect"] = np.array([json.dumps([ends, logprobs])], dtype=object)
    (first_box, second_box) = json.loads(ParseStage(["detect"])(batch)["boxes_json"][0])
    assert first_box["confidence"] == pytest.approx(math.exp(-0.01))
    assert second_box["confidence"] == pytest.approx(math.exp(-2.0), rel=0.05)


def test_a_missing_column_is_named_with_its_stage(world_scenes):
    batch = _answered(world_scenes[0], [(0, 0)], ["There are no objects."])
    del batch["transform_json"]
    with pytest.raises(MissingColumns, match="ParseStage needs columns \\['transform_json'\\]"):
        ParseStage(["detect"])(batch)
    with pytest.raises(MissingColumns, match="ParseStage needs columns"):
        check_chain(["scene_key", "status"], [ParseStage(["detect"])])


def test_parse_stage_refuses_answers_that_are_not_utf8_or_parse_to_nothing(world_scenes):
    tiles = [(0, 0), (0, 64), (64, 0), (64, 64), (128, 0)]
    batch = _answered(world_scenes[0], tiles, ["There are no objects."] * 5)
    batch["answer_caption"][0] = b"\xff\xfe a harbour"  # raw bytes that are not UTF-8
    batch["answer_caption"][1] = b"\xff\xfe".decode("utf-8", "surrogateescape") + "a harbour"  # lone surrogates
    batch["answer_caption"][2] = "a harbour \ufffd"  # a byte-level decode's replacement character
    batch["answer_caption"][3], batch["answer_detect"][3] = "", "%%%% ###"  # nothing to parse in either
    batch["answer_caption"][4] = ""  # an empty caption beside a real "no objects" answer is an answer
    out = ParseStage(["caption", "detect"])(batch)
    assert list(out["status"]) == ["failed"] * 4 + ["ok"]
    assert set(out["error_type"][:4]) == {"ParseError"} and set(out["error_stage"][:4]) == {"parse"}
    assert "not valid UTF-8" in out["error_message"][0] and "\\xff" in out["error_message"][0]
    assert "not valid UTF-8" in out["error_message"][1] and "U+FFFD" in out["error_message"][2]
    assert "parse to nothing" in out["error_message"][3]
