"""From pixels to the map: tile boxes → scene pixels → scene CRS → WGS84 polygons, and cross-tile NMS per scene.

Conventions:

- Pixel boxes are ``[x1, y1, x2, y2]`` in pixel *edges* (column, row), so a box covering pixel (0, 0) alone is
  ``[0, 0, 1, 1]``; the scene's affine ``transform`` maps edge coordinates to the CRS, like rasterio's.
- WGS84 geometries follow RFC 7946: longitude first, and a footprint crossing the antimeridian is split into a
  MultiPolygon on either side of ±180° rather than wrapping the long way round the globe. A footprint containing a
  pole (polar stereographic scenes, EPSG:3413 / EPSG:3031) becomes one polygon from -180° to 180° reaching ±90°.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer

BoxArray = np.ndarray  # (N, 4) float64: x1, y1, x2, y2


def as_affine(transform: Affine | Sequence[float]) -> Affine:
    """Normalise a geotransform to an :class:`affine.Affine`.

    Args:
        transform: An ``Affine``, or its first six coefficients ``(a, b, c, d, e, f)`` as STAC ``proj:transform``
            and rasterio store them.

    Returns:
        The affine transform from pixel (col, row) to CRS (x, y).
    """
    if isinstance(transform, Affine):
        return transform
    coeffs = [float(v) for v in transform]
    if len(coeffs) not in (6, 9):
        raise ValueError(f"a geotransform has 6 (or 9) coefficients, got {len(coeffs)}")
    return Affine(*coeffs[:6])


def tile_to_scene_boxes(boxes: BoxArray, col_off: float, row_off: float) -> BoxArray:
    """Shift boxes from tile pixel coordinates to scene pixel coordinates.

    Args:
        boxes: ``(N, 4)`` boxes in the tile's pixel grid.
        col_off: The tile window's column offset in the scene.
        row_off: The tile window's row offset in the scene.

    Returns:
        ``(N, 4)`` boxes in the scene's pixel grid.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return boxes + np.array([col_off, row_off, col_off, row_off], dtype=np.float64)


def _box_rings(boxes: BoxArray, points_per_edge: int) -> np.ndarray:
    """Closed rings around each box, ``(N, 4 * points_per_edge + 1, 2)`` in the boxes' coordinates."""
    n = max(int(points_per_edge), 1)
    t = np.arange(n, dtype=np.float64) / n
    x1, y1, x2, y2 = (boxes[:, i : i + 1] for i in range(4))
    top = np.stack([x1 + (x2 - x1) * t, np.broadcast_to(y1, (len(boxes), n))], axis=-1)
    right = np.stack([np.broadcast_to(x2, (len(boxes), n)), y1 + (y2 - y1) * t], axis=-1)
    bottom = np.stack([x2 - (x2 - x1) * t, np.broadcast_to(y2, (len(boxes), n))], axis=-1)
    left = np.stack([np.broadcast_to(x1, (len(boxes), n)), y2 - (y2 - y1) * t], axis=-1)
    ring = np.concatenate([top, right, bottom, left], axis=1)
    return np.concatenate([ring, ring[:, :1]], axis=1)


def _apply_affine(transform: Affine, xy: np.ndarray) -> np.ndarray:
    a, b, c, d, e, f = transform[:6]
    x, y = xy[..., 0], xy[..., 1]
    return np.stack([a * x + b * y + c, d * x + e * y + f], axis=-1)


def pixel_to_crs_boxes(boxes: BoxArray, transform: Affine | Sequence[float]) -> BoxArray:
    """Map scene pixel boxes to axis-aligned boxes ``[minx, miny, maxx, maxy]`` in the scene CRS.

    For a north-up grid the result is exact; for a rotated grid it is the bounding box of the mapped corners.

    Args:
        boxes: ``(N, 4)`` scene pixel boxes.
        transform: The scene's pixel-to-CRS affine transform.

    Returns:
        ``(N, 4)`` boxes in CRS units.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = _apply_affine(as_affine(transform), _box_rings(boxes, 1)[:, :4])
    return np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)


def pixel_boxes_to_crs_polygons(
    boxes: BoxArray, transform: Affine | Sequence[float], points_per_edge: int = 1
) -> np.ndarray:
    """Scene pixel boxes as polygons in the scene CRS (exact under any affine transform, rotation included).

    Args:
        boxes: ``(N, 4)`` scene pixel boxes.
        transform: The scene's pixel-to-CRS affine transform.
        points_per_edge: Vertices per box edge; more follow the curvature once reprojected.

    Returns:
        An object array of ``N`` shapely polygons.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.empty(0, dtype=object)
    rings = _apply_affine(as_affine(transform), _box_rings(boxes, points_per_edge))
    return shapely.polygons(rings)


@lru_cache(maxsize=64)
def _to_wgs84_transformer(crs_key: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(crs_key), CRS.from_epsg(4326), always_xy=True)


@lru_cache(maxsize=64)
def _poles_in_crs(crs_key: str) -> tuple[tuple[float, float, float], ...]:
    """The poles a CRS can represent: ``(x, y, latitude)`` of each pole with finite coordinates in it."""
    to_crs = Transformer.from_crs(CRS.from_epsg(4326), CRS.from_user_input(crs_key), always_xy=True)
    poles = []
    for lat in (90.0, -90.0):
        try:
            x, y = to_crs.transform(0.0, lat, errcheck=True)
        except Exception:  # a pole outside the projection's domain (e.g. the south pole in EPSG:3413)
            continue
        if np.isfinite(x) and np.isfinite(y):
            poles.append((float(x), float(y), lat))
    return tuple(poles)


def _unwrap(lon: np.ndarray) -> np.ndarray:
    """Longitudes along a ring made continuous: each step is taken the short way round (|step| <= 180°)."""
    step = (np.diff(lon) + 180.0) % 360.0 - 180.0
    return np.concatenate([lon[:1], lon[0] + np.cumsum(step)])


def _cut_at_antimeridian(poly: shapely.Polygon) -> list[shapely.Polygon]:
    """A polygon with continuous (possibly out-of-range) longitudes cut into parts inside [-180°, 180°]."""
    minx, _, maxx, _ = poly.bounds
    parts: list[shapely.Polygon] = []
    for k in range(int(np.floor((minx + 180.0) / 360.0)), int(np.ceil((maxx - 180.0) / 360.0)) + 1):
        piece = shapely.intersection(poly, shapely.box(360.0 * k - 180.0, -90.0, 360.0 * k + 180.0, 90.0))
        if k:
            piece = shapely.transform(piece, lambda xy, k=k: xy - [360.0 * k, 0.0])
        parts += [p for p in shapely.get_parts(piece) if isinstance(p, shapely.Polygon) and p.area > 0]
    return parts


def _polar_cap(lon: np.ndarray, lat: np.ndarray, pole_lat: float) -> shapely.Polygon:
    """The polygon of a ring that winds once round a pole: cut where it crosses ±180°, closed along the pole.

    ``lon`` is unwrapped, so its last value is its first ± 360°; the result runs from -180° to 180° and reaches
    ``pole_lat`` (the polygon contains the pole, as the ring in the projected CRS does).
    """
    turn = lon[-1] - lon[0]
    lo, hi = min(lon[0], lon[-1]), max(lon[0], lon[-1])
    cut = 180.0 + 360.0 * np.ceil((lo - 180.0) / 360.0)  # a longitude ≡ 180° that the ring passes
    if cut > hi:
        cut -= 360.0
    i = next(k for k in range(len(lon) - 1)
             if min(lon[k], lon[k + 1]) <= cut <= max(lon[k], lon[k + 1]) and lon[k] != lon[k + 1])
    f = (cut - lon[i]) / (lon[i + 1] - lon[i])
    cross_lat = lat[i] + f * (lat[i + 1] - lat[i])
    seq_lon = np.concatenate([[cut], lon[i + 1 :], lon[1 : i + 1] + turn, [cut + turn]])
    seq_lat = np.concatenate([[cross_lat], lat[i + 1 :], lat[1 : i + 1], [cross_lat]])
    shift = (-180.0 - cut) if turn > 0 else (180.0 - cut)
    seq_lon = np.clip(seq_lon + shift, -180.0, 180.0)
    ring = np.column_stack([seq_lon, seq_lat])
    end, start = seq_lon[-1], seq_lon[0]
    ring = np.vstack([ring, [[end, pole_lat], [start, pole_lat]], ring[:1]])
    return shapely.Polygon(ring)


def _wrap_lonlat(geom: shapely.Geometry, source: shapely.Geometry,
                 poles: Sequence[tuple[float, float, float]]) -> shapely.Geometry:
    """Fix a reprojected polygon whose ring jumps across ±180° or winds round a pole.

    A ring whose unwrapped longitudes return to their start is cut at the antimeridian into a MultiPolygon; one
    that winds once round the globe holds a pole (found in the source CRS, where the ring really contains it) and
    becomes a polygon reaching that pole's latitude.
    """
    if not isinstance(geom, shapely.Polygon) or geom.is_empty:
        return geom
    ring = shapely.get_coordinates(geom.exterior)
    lon = _unwrap(ring[:, 0])
    if np.allclose(lon, ring[:, 0]):
        return geom  # no jump across ±180°
    turn = lon[-1] - lon[0]
    if abs(turn) > 180.0:
        inside = [lat for x, y, lat in poles if shapely.contains_xy(source, x, y)]
        pole_lat = inside[0] if inside else (90.0 if float(np.mean(ring[:, 1])) >= 0 else -90.0)
        return _polar_cap(lon, ring[:, 1], pole_lat)
    parts = _cut_at_antimeridian(shapely.Polygon(np.column_stack([lon, ring[:, 1]])))
    if not parts:
        return geom
    return shapely.MultiPolygon(parts) if len(parts) > 1 else parts[0]


def to_wgs84(geoms: np.ndarray | Sequence[shapely.Geometry], crs: str | CRS) -> np.ndarray:
    """Reproject geometries from ``crs`` to WGS84 lon/lat, splitting any that cross the antimeridian.

    Args:
        geoms: Shapely geometries in ``crs``.
        crs: The source CRS (``"EPSG:32633"``, WKT, PROJJSON...).

    Returns:
        An object array of valid WGS84 geometries (Polygon, or MultiPolygon for antimeridian-crossing ones).
    """
    geoms = np.asarray(geoms, dtype=object)
    if len(geoms) == 0:
        return geoms
    key = crs.to_wkt() if isinstance(crs, CRS) else str(crs)
    transformer = _to_wgs84_transformer(key)

    def reproject(xy: np.ndarray) -> np.ndarray:
        lon, lat = transformer.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([lon, lat])

    out = shapely.transform(geoms, reproject)
    bounds = shapely.bounds(out)
    crossing = (bounds[:, 2] - bounds[:, 0]) > 180.0  # a jump across ±180°, or a ring round a pole
    if crossing.any():
        poles = _poles_in_crs(key)
        for i in np.flatnonzero(crossing):
            out[i] = _wrap_lonlat(out[i], geoms[i], poles)
    invalid = ~shapely.is_valid(out)
    if invalid.any():
        out[invalid] = shapely.make_valid(out[invalid])
    # RFC 7946 winding (exterior counter-clockwise) whatever the sign of the pixel grid's y axis
    return np.asarray(shapely.orient_polygons(out, exterior_cw=False), dtype=object)


def pixel_boxes_to_wgs84(
    boxes: BoxArray, transform: Affine | Sequence[float], crs: str | CRS, points_per_edge: int = 4
) -> np.ndarray:
    """Scene pixel boxes → WGS84 polygons (densified so long edges follow the projection's curvature).

    Args:
        boxes: ``(N, 4)`` scene pixel boxes.
        transform: The scene's pixel-to-CRS affine transform.
        crs: The scene CRS.
        points_per_edge: Vertices per box edge before reprojection.

    Returns:
        An object array of ``N`` WGS84 geometries.
    """
    return to_wgs84(pixel_boxes_to_crs_polygons(boxes, transform, points_per_edge), crs)


def box_iou(box: np.ndarray, others: BoxArray) -> np.ndarray:
    """IoU of one box with each of ``others`` (all ``[x1, y1, x2, y2]``)."""
    inter = _intersection_area(box, others)
    union = _area(box[None])[0] + _area(others) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def _area(boxes: BoxArray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _intersection_area(box: np.ndarray, others: BoxArray) -> np.ndarray:
    w = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    h = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def touches_inner_edge(
    tile_boxes: BoxArray, tile_hw: tuple[int, int], window_off: tuple[int, int], scene_hw: tuple[int, int],
    tolerance: float = 1.0,
) -> np.ndarray:
    """Whether each box is cut by a tile edge that lies inside the scene (so a neighbour tile may see it whole).

    Args:
        tile_boxes: ``(N, 4)`` boxes in tile pixels.
        tile_hw: The tile's (height, width) in pixels.
        window_off: The tile's (row_off, col_off) in the scene.
        scene_hw: The scene's (height, width).
        tolerance: Pixels from an edge that still count as touching it.

    Returns:
        ``(N,)`` booleans.
    """
    boxes = np.asarray(tile_boxes, dtype=np.float64).reshape(-1, 4)
    (th, tw), (r0, c0), (sh, sw) = tile_hw, window_off, scene_hw
    left = (boxes[:, 0] <= tolerance) & (c0 > 0)
    top = (boxes[:, 1] <= tolerance) & (r0 > 0)
    right = (boxes[:, 2] >= tw - tolerance) & (c0 + tw < sw)
    bottom = (boxes[:, 3] >= th - tolerance) & (r0 + th < sh)
    return left | top | right | bottom


def nms_per_scene(
    boxes: BoxArray,
    scores: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    cut_by_tile_edge: np.ndarray | None = None,
    iou_threshold: float = 0.5,
    containment_threshold: float = 0.7,
    containment_margin: float = 0.0,
) -> np.ndarray:
    """Greedy, label-aware non-maximum suppression over all boxes of one scene (from overlapping tiles).

    Boxes are compared in the scene's pixel grid: IoU and area ratios are invariant under the affine map to the
    scene CRS, so this equals NMS in the scene CRS without reprojecting. Boxes a tile edge cut are considered after
    whole boxes (then by score, then by area), and a box is suppressed when its IoU with a kept box reaches
    ``iou_threshold``, or when it was cut by a tile edge and ``containment_threshold`` of its area lies inside a kept
    box — the truncated copy a neighbouring tile saw of an object another tile saw whole.

    Args:
        boxes: ``(N, 4)`` boxes in scene pixels (or any affine image of them, e.g. CRS boxes of a north-up grid).
        scores: ``(N,)`` confidences.
        labels: ``(N,)`` class labels; boxes of different labels never suppress each other.
        cut_by_tile_edge: ``(N,)`` booleans from :func:`touches_inner_edge` (default: none cut).
        iou_threshold: IoU at which the lower-ranked box is dropped.
        containment_threshold: Share of a cut box's area inside a kept box at which it is dropped.
        containment_margin: The kept box is grown by this much (in the boxes' units) when measuring containment,
            to absorb the quantisation of boxes written as text (two decimals of the tile side).

    Returns:
        Sorted indices of the kept boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(boxes)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    labels_arr = np.asarray(labels, dtype=object)
    cut = np.zeros(n, bool) if cut_by_tile_edge is None else np.asarray(cut_by_tile_edge, bool)
    areas = _area(boxes)
    # lexsort: last key is primary -> whole boxes first, then higher score, then larger area
    order = np.lexsort((-areas, -scores, cut))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    margin = np.array([-containment_margin, -containment_margin, containment_margin, containment_margin])
    # a spatial index: each kept box is compared only with the boxes it can touch, not with every box of its label
    tree = shapely.STRtree(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
    suppressed = np.zeros(n, bool)
    kept: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(int(i))
        grown = boxes[i] + margin
        near = tree.query(shapely.box(*grown))
        rest = near[(rank[near] > rank[i]) & ~suppressed[near] & (labels_arr[near] == labels_arr[i])]
        if len(rest) == 0:
            continue
        inter = _intersection_area(boxes[i], boxes[rest])
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        inside = _intersection_area(grown, boxes[rest])
        contained = np.where(areas[rest] > 0, inside / np.maximum(areas[rest], 1e-12), 1.0)
        drop = (iou >= iou_threshold) | (cut[rest] & (contained >= containment_threshold))
        suppressed[rest[drop]] = True
    return np.sort(np.array(kept, dtype=np.int64))
