"""The oracle test: a perfect model (ground-truth answers written with ``format_answer``) through the real read,
parse, georeference and NMS path lands every toy-world object within one pixel of its ground-truth footprint."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest

from earthgpt.tasks import format_answer
from pipelines.archive.source import source_batch
from pipelines.archive.stages import AssemblySettings, ParseStage, ReadStage, SceneCollector, assemble_scene

TILE, OVERLAP = 64, 24  # overlap above the largest toy object (20 px): each object lies whole in some tile


def _oracle_answers(batch: dict[str, np.ndarray], truth: gpd.GeoDataFrame) -> dict[str, np.ndarray]:
    """What a perfect model answers for each tile: every visible object part, boxed in tile pixels."""
    n = len(batch["tile_id"])
    boxes = np.array(truth["pixel_box"].tolist(), dtype=float).reshape(-1, 4)
    answers = []
    for i in range(n):
        r0, c0 = batch["row_off"][i], batch["col_off"][i]
        h, w = batch["win_h"][i], batch["win_w"][i]
        visible = []
        for (x1, y1, x2, y2), label in zip(boxes, truth["label"], strict=True):
            cx1, cy1 = max(x1, c0) - c0, max(y1, r0) - r0
            cx2, cy2 = min(x2, c0 + w) - c0, min(y2, r0 + h) - r0
            if cx2 > cx1 and cy2 > cy1:
                visible.append((label, cx1, cy1, cx2, cy2))
        answers.append(format_answer("detect", visible, (int(h), int(w))))
    out = {k: v for k, v in batch.items() if k != "image"}
    out["answer_detect"] = np.array(answers, dtype=object)
    out["logprob_detect"] = np.zeros(n, dtype=np.float32)
    out["vqa_json"] = np.array(["[]"] * n, dtype=object)
    out["embedding"] = np.array([b""] * n, dtype=object)
    return out


@pytest.mark.parametrize("index", [0, 1, 2], ids=["optical", "sar", "thermal"])
def test_oracle_detections_land_within_one_pixel_of_ground_truth(world, world_scenes, index):
    scene = world_scenes[index]
    truth = gpd.read_parquet(world.ground_truth_path)
    truth = truth[truth["scene_id"] == scene.id].reset_index(drop=True)
    if truth.empty:
        pytest.skip(f"{scene.id} has no objects")
    reader = ReadStage(TILE, OVERLAP, min_valid_fraction=0.0)
    parse = ParseStage(["detect"])
    collector = SceneCollector()
    settings = AssemblySettings(("detect",), (), 0.5, 0.7, (("run_id", "r"), ("unit_id", "u"), ("output_key", "k")),
                                "oracle", TILE)
    done = []
    for block in reader(source_batch([scene])):
        done += collector.add(parse(_oracle_answers(block, truth)))
    (result,) = [assemble_scene(rows, settings) for _, rows in done]
    assert result.committed

    got = np.array([[r["scene_x1"], r["scene_y1"], r["scene_x2"], r["scene_y2"]] for r, _ in result.detection_rows])
    want = np.array(truth["pixel_box"].tolist(), dtype=float)
    assert len(got) == len(want), f"{len(got)} detections after NMS for {len(want)} objects"
    # match each object to its nearest detection; every pair within one pixel on every edge
    dist = np.abs(want[:, None, :] - got[None, :, :]).max(axis=2)
    nearest = dist.argmin(axis=1)
    assert len(set(nearest.tolist())) == len(want), "two objects matched one detection"
    assert dist[np.arange(len(want)), nearest].max() <= 1.0
    labels = [result.detection_rows[j][0]["label"] for j in nearest]
    assert labels == list(truth["label"])

    # the WGS84 footprints agree too: Hausdorff distance within one pixel, measured in the scene CRS
    res = abs(scene.transform[0])
    det_geoms = gpd.GeoSeries([result.detection_rows[j][1] for j in nearest], crs=4326).to_crs(scene.crs)
    gt_geoms = truth.geometry.to_crs(scene.crs)
    hausdorff = det_geoms.hausdorff_distance(gt_geoms, align=False)
    assert hausdorff.max() <= res, hausdorff.max() / res
    crs_boxes = np.array([[r["crs_minx"], r["crs_miny"], r["crs_maxx"], r["crs_maxy"]]
                          for r, _ in (result.detection_rows[j] for j in nearest)])
    np.testing.assert_allclose(crs_boxes, np.array(truth["crs_box"].tolist()), atol=res)
