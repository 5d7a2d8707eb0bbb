"""``earthgpt similar``: streamed top-k equals brute force over every embedding; tiles with ships find tiles with
ships; filters; the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely

from pipelines.results import open_outputs
from pipelines.results.similar import cli, find_similar
from tests.pipelines.results.conftest import INTERRUPTED_SCENE

pytestmark = pytest.mark.integration

QUERY = "toy-sar-000-s0/r0002_c0005"  # a tile with ships (docs/querying.md uses it too)


def _brute_force(out, tile: str, k: int, collections=None):
    """Every committed embedding at once: the reference the streamed search must reproduce."""
    scene_id, tile_id = tile.split("/")
    tiles = out.tiles()
    q = tiles[(tiles["scene_id"] == scene_id) & (tiles["tile_id"] == tile_id)].iloc[0]
    vectors, keys = [], []
    for row in out.scenes().itertuples():
        if collections and row.collection not in collections:
            continue
        ds = out.open_group(row.embeddings_group)
        emb = ds.embedding.values
        for i, r in enumerate(ds.row_off.values):
            for j, c in enumerate(ds.col_off.values):
                vectors.append(emb[i, j])
                keys.append((row.scene_id, int(r), int(c)))
    vectors = np.array(vectors)
    qkey = (scene_id, int(q["row_off"]), int(q["col_off"]))
    qds = out.embeddings(scene_id)
    i = int(np.flatnonzero(qds.row_off.values == qkey[1])[0])
    j = int(np.flatnonzero(qds.col_off.values == qkey[2])[0])
    query = qds.embedding.values[i, j]
    norms = np.linalg.norm(vectors, axis=1)
    scores = vectors @ query / (norms * np.linalg.norm(query))
    ranked = [(s, key) for s, key in zip(scores, keys, strict=True) if np.isfinite(s) and key != qkey]
    ranked.sort(key=lambda t: -t[0])
    return ranked[:k]


@pytest.mark.parametrize("batch", [1, 16])
def test_streamed_search_equals_brute_force(any_root, batch):
    out = open_outputs(any_root)
    hits = find_similar(out, QUERY, k=12, batch=batch)
    want = _brute_force(out, QUERY, 12)
    assert list(hits["rank"]) == list(range(1, 13))
    np.testing.assert_allclose(hits["score"].to_numpy(), [s for s, _ in want], rtol=1e-5)
    # ties may come in either order: compare each score's set of tiles
    got = {(round(s, 5), (sid, r, c)) for s, sid, r, c in
           zip(hits["score"], hits["scene_id"], hits["row_off"], hits["col_off"], strict=True)}
    assert got == {(round(float(s), 5), key) for s, key in want}
    assert not hits["tile_id"].isna().any() and hits.geometry.notna().all() and hits.crs.to_epsg() == 4326
    assert INTERRUPTED_SCENE not in set(hits["scene_id"])
    assert "toy-sar-000-s0" not in set(hits["scene_id"]) or "r0002_c0005" not in set(
        hits.loc[hits["scene_id"] == "toy-sar-000-s0", "tile_id"])


def test_a_ship_tile_finds_ship_tiles_first(any_root):
    out = open_outputs(any_root)
    tiles = out.tiles()
    ships = tiles["caption"].fillna("").str.contains("ships")
    assert ships.sum() > 10
    hits = find_similar(out, QUERY, k=10)
    with_ships = set(zip(tiles.loc[ships, "scene_id"], tiles.loc[ships, "tile_id"], strict=True))
    precision = np.mean([(s, t) in with_ships for s, t in zip(hits["scene_id"], hits["tile_id"], strict=True)])
    assert precision == 1.0


def test_filters_restrict_the_candidates(any_root):
    out = open_outputs(any_root)
    hits = find_similar(out, QUERY, k=5, collection="toyworld-optical")
    assert set(hits["collection"]) == {"toyworld-optical"}
    want = _brute_force(out, QUERY, 5, collections={"toyworld-optical"})
    np.testing.assert_allclose(hits["score"].to_numpy(), [s for s, _ in want], rtol=1e-5)
    sar = out.scenes(collection="toyworld-sar").geometry.iloc[0]
    x0, y0, x1, y1 = sar.bounds
    west = shapely.box(x0, y0, (x0 + x1) / 2, y1)
    boxed = find_similar(out, QUERY, k=50, bbox=west.bounds)
    assert len(boxed) > 0 and set(boxed["collection"]) == {"toyworld-sar"}
    assert boxed.geometry.centroid.within(west.buffer(1e-4)).all()  # tile centres inside the box


def test_cli_table_and_geojson(toy_outputs, tmp_path, capsys):
    root = str(toy_outputs.root)
    assert cli([QUERY, "-k", "3", "--root", root]) == 0
    captured = capsys.readouterr()
    assert "score" in captured.out and "scored" in captured.err
    out = tmp_path / "similar.geojson"
    assert cli(["r0002_c0005", "--scene", "toy-sar-000-s0", "-k", "4", "--root", root, "--format", "geojson",
                "--out", str(out)]) == 0
    features = json.loads(out.read_text())["features"]
    assert [f["properties"]["rank"] for f in features] == [1, 2, 3, 4]
    assert cli(["toy-sar-000-s0/r9999_c9999", "--root", root]) == 2
    assert "no tile" in capsys.readouterr().err
    assert cli([f"{INTERRUPTED_SCENE}/r0000_c0000", "--root", root]) == 2
    assert "no committed scene" in capsys.readouterr().err
    assert cli(["no-slash", "--root", root]) == 2
