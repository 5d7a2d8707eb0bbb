"""Georeferencing (pixel → CRS → WGS84, antimeridian) and cross-tile NMS."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st
from pyproj import Transformer

from pipelines.archive.georef import (
    box_iou,
    nms_per_scene,
    pixel_boxes_to_crs_polygons,
    pixel_boxes_to_wgs84,
    pixel_to_crs_boxes,
    tile_to_scene_boxes,
    to_wgs84,
    touches_inner_edge,
)

UTM33 = "EPSG:32633"
T10 = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)  # 10 m, north-up


def test_tile_boxes_shift_to_scene_pixels():
    out = tile_to_scene_boxes(np.array([[1, 2, 3, 4]]), col_off=100, row_off=50)
    np.testing.assert_allclose(out, [[101, 52, 103, 54]])


def test_pixel_boxes_map_to_crs_with_north_up_transform():
    crs_boxes = pixel_to_crs_boxes(np.array([[0, 0, 1, 1], [10, 20, 30, 40]]), T10)
    np.testing.assert_allclose(crs_boxes[0], [500_000, 4_999_990, 500_010, 5_000_000])
    np.testing.assert_allclose(crs_boxes[1], [500_100, 4_999_600, 500_300, 4_999_800])


def test_accepts_stac_proj_transform_list():
    np.testing.assert_allclose(
        pixel_to_crs_boxes(np.array([[0, 0, 1, 1]]), [10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0, 0, 0, 1]),
        pixel_to_crs_boxes(np.array([[0, 0, 1, 1]]), T10),
    )


def test_rotated_grid_gives_exact_polygons():
    rotated = T10 * Affine.rotation(30.0)
    poly = pixel_boxes_to_crs_polygons(np.array([[0, 0, 10, 20]]), rotated)[0]
    corners = np.array([rotated @ (x, y) for x, y in [(0, 0), (10, 0), (10, 20), (0, 20)]])
    got = np.array(poly.exterior.coords)[:4]
    np.testing.assert_allclose(got, corners, atol=1e-6)
    assert poly.area == pytest.approx(10 * 20 * 100, rel=1e-9)


def test_wgs84_polygon_matches_pyproj_corner_by_corner():
    geom = pixel_boxes_to_wgs84(np.array([[100, 200, 164, 264]]), T10, UTM33, points_per_edge=1)[0]
    to_ll = Transformer.from_crs(UTM33, 4326, always_xy=True)
    expect = [to_ll.transform(*(T10 @ (x, y))) for x, y in [(100, 200), (100, 264), (164, 264), (164, 200)]]
    np.testing.assert_allclose(np.array(geom.exterior.coords)[:4], expect, atol=1e-9)
    assert geom.is_valid and geom.exterior.is_ccw  # RFC 7946 winding for a north-up grid


def test_antimeridian_crossing_box_is_split_and_valid():
    # UTM zone 60 (central meridian 177°E); at the equator 180° lies ~333 km east of the central meridian
    to_utm = Transformer.from_crs(4326, "EPSG:32660", always_xy=True)
    x180, _ = to_utm.transform(180.0, 0.5)
    transform = Affine(100.0, 0.0, x180 - 5_000.0, 0.0, -100.0, 60_000.0)  # 100 m pixels, 5 km west of 180°
    geom = pixel_boxes_to_wgs84(np.array([[0, 0, 100, 100]]), transform, "EPSG:32660")[0]
    assert geom.geom_type == "MultiPolygon" and geom.is_valid
    lons = shapely.get_coordinates(geom)[:, 0]
    assert lons.min() >= -180 and lons.max() <= 180
    beyond, before = sorted(geom.geoms, key=lambda g: g.centroid.x)  # east of 180° has negative longitudes
    assert beyond.bounds[0] == pytest.approx(-180.0) and before.bounds[2] == pytest.approx(180.0)
    # the two parts together are 10 km wide (~0.09°), not 360° minus that
    width = (beyond.bounds[2] - beyond.bounds[0]) + (before.bounds[2] - before.bounds[0])
    assert 0.08 < width < 0.1
    assert beyond.exterior.is_ccw and before.exterior.is_ccw


def test_box_not_crossing_antimeridian_stays_a_polygon_near_it():
    geoms = to_wgs84([shapely.box(700_000, 0, 710_000, 10_000)], "EPSG:32660")
    assert geoms[0].geom_type == "Polygon" and geoms[0].is_valid


def test_touches_inner_edge_ignores_scene_edges():
    boxes = np.array([[0, 10, 5, 20], [10, 10, 20, 20], [50, 0, 64, 8]])
    # tile at the scene's top-left corner: left/top edges are scene edges
    np.testing.assert_array_equal(
        touches_inner_edge(boxes, (64, 64), (0, 0), (384, 384)), [False, False, True]
    )
    # the same boxes in an interior tile
    np.testing.assert_array_equal(touches_inner_edge(boxes, (64, 64), (64, 64), (384, 384)), [True, False, True])


def test_nms_removes_duplicate_seen_by_two_overlapping_tiles():
    boxes = np.array([[100, 100, 110, 112], [100.4, 99.6, 110.3, 112.2], [200, 200, 210, 210]])
    keep = nms_per_scene(boxes, scores=[0.5, 0.9, 0.7], labels=["ship"] * 3)
    np.testing.assert_array_equal(keep, [1, 2])


def test_nms_is_label_aware():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
    np.testing.assert_array_equal(nms_per_scene(boxes, [0.9, 0.8], ["ship", "tank"]), [0, 1])


def test_nms_prefers_whole_box_over_truncated_copy():
    whole = [100, 100, 116, 110]
    truncated = [100, 100, 108, 110]  # cut by a tile edge at x=108: IoU 0.5 only, but fully inside
    boxes = np.array([truncated, whole])
    keep = nms_per_scene(boxes, [0.99, 0.5], ["ship", "ship"], cut_by_tile_edge=np.array([True, False]),
                         iou_threshold=0.6)
    np.testing.assert_array_equal(keep, [1])


def test_nms_keeps_small_uncut_box_inside_large_one():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 20, 20]])
    np.testing.assert_array_equal(nms_per_scene(boxes, [0.9, 0.8], ["a", "a"]), [0, 1])


def test_nms_in_pixels_equals_nms_in_crs():
    rng = np.random.default_rng(0)
    base_xy = rng.uniform(0, 300, (20, 2))
    base = np.concatenate([base_xy, base_xy + rng.uniform(5, 40, (20, 2))], axis=1)
    boxes = np.repeat(base, 3, axis=0) + rng.normal(0, 1.5, (60, 4))  # each object seen ~3 times
    scores = rng.uniform(size=60)
    labels = rng.choice(["a", "b"], 60)
    keep_px = nms_per_scene(boxes, scores, labels)
    keep_crs = nms_per_scene(pixel_to_crs_boxes(boxes, T10), scores, labels)
    np.testing.assert_array_equal(keep_px, keep_crs)
    assert 0 < len(keep_px) < 60


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 200), st.floats(0, 200), st.floats(1, 40), st.floats(1, 40),
                          st.floats(0, 1)), min_size=1, max_size=25))
def test_nms_kept_boxes_never_overlap_above_threshold(rows):
    arr = np.array(rows)
    boxes = np.column_stack([arr[:, 0], arr[:, 1], arr[:, 0] + arr[:, 2], arr[:, 1] + arr[:, 3]])
    keep = nms_per_scene(boxes, arr[:, 4], ["x"] * len(arr), iou_threshold=0.5)
    assert len(keep) >= 1
    for i in keep:
        others = [j for j in keep if j != i]
        if others:
            assert (box_iou(boxes[i], boxes[others]) < 0.5).all()
    # every dropped box overlaps some kept box
    for j in set(range(len(arr))) - set(keep.tolist()):
        assert (box_iou(boxes[j], boxes[keep]) >= 0.5).any()


# -- polar scenes: boxes round a pole and crossing ±180° (EPSG:3413 north, EPSG:3031 south) -----------------------

POLAR_GRID = (10.0, 0.0, -2320.0, 0.0, -10.0, 2080.0)  # 10 m pixels; the pole (x = y = 0) is pixel (232, 208)


def _covers_sampled_points(geom: shapely.Geometry, box: list[float], transform: tuple[float, ...], crs: str) -> None:
    """Points inside the pixel box, mapped to lon/lat, lie in the WGS84 geometry (a 2 % margin inside the box
    leaves room for the straight lon/lat edges between densified vertices)."""
    rng = np.random.default_rng(0)
    x1, y1, x2, y2 = box
    mx, my = 0.02 * (x2 - x1), 0.02 * (y2 - y1)
    cols, rows = rng.uniform(x1 + mx, x2 - mx, 200), rng.uniform(y1 + my, y2 - my, 200)
    a = Affine(*transform)
    xs, ys = a @ (cols, rows)
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(xs, ys)
    assert shapely.covers(geom.buffer(1e-9), shapely.points(lon, lat)).all()


@pytest.mark.parametrize(("crs", "pole"), [("EPSG:3413", 90.0), ("EPSG:3031", -90.0)])
def test_box_round_a_pole_becomes_a_polygon_reaching_the_pole(crs, pole):
    box = [224, 192, 243.2, 224]  # the box: it holds the pole pixel (232, 208)
    geom = pixel_boxes_to_wgs84(np.array([box]), POLAR_GRID, crs)[0]
    assert geom.geom_type == "Polygon" and geom.is_valid and geom.exterior.is_ccw
    minx, miny, maxx, maxy = geom.bounds
    assert (minx, maxx) == (-180.0, 180.0)
    assert (maxy if pole > 0 else miny) == pole
    assert abs(miny if pole > 0 else maxy) > 89.99  # a box ~200 m wide: within a few hundredths of a degree
    assert shapely.covers(geom, shapely.points([0.0, 100.0, -170.0], [pole] * 3)).all()
    _covers_sampled_points(geom, box, POLAR_GRID, crs)


@pytest.mark.parametrize(("crs", "pole"), [("EPSG:3413", 90.0), ("EPSG:3031", -90.0)])
def test_tiles_of_a_polar_scene_each_georeference(crs, pole):
    # a 4x4-tile scene around the pole: one tile holds it, its neighbours cross ±180° or not, all valid
    tiles = [[c, r, c + 120, r + 100] for r in range(0, 400, 100) for c in range(0, 480, 120)]
    geoms = pixel_boxes_to_wgs84(np.array(tiles, dtype=float), POLAR_GRID, crs, points_per_edge=8)
    assert all(g.is_valid and not g.is_empty for g in geoms)
    lons = shapely.get_coordinates(geoms)[:, 0]
    assert lons.min() >= -180 and lons.max() <= 180
    reaching = [k for k, g in enumerate(geoms) if pole in (g.bounds[1], g.bounds[3])]
    assert [tiles[k] for k in reaching] == [[120, 200, 240, 300]]  # the tile holding the pole pixel
    for tile, geom in zip(tiles, geoms, strict=True):
        _covers_sampled_points(geom, tile, POLAR_GRID, crs)


def test_polar_box_crossing_the_antimeridian_is_split_not_wrapped():
    # EPSG:3031: 180° runs along the negative y axis; a 100 km x 10 km box straddling it, far from the pole
    transform = (1000.0, 0.0, -50_000.0, 0.0, -1000.0, -1_000_000.0)
    geom = pixel_boxes_to_wgs84(np.array([[0, 0, 100, 10]]), transform, "EPSG:3031", points_per_edge=16)[0]
    assert geom.geom_type == "MultiPolygon" and geom.is_valid
    assert geom.bounds[1] > -82 and geom.bounds[3] < -80  # nowhere near the pole
    width = sum(g.bounds[2] - g.bounds[0] for g in geom.geoms)
    assert 5 < width < 7  # ~100 km at 81°S, not 360° minus that
    _covers_sampled_points(geom, [0, 0, 100, 10], transform, "EPSG:3031")
