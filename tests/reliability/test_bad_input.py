"""The bad-input zoo: one run of the archive job over a toy world salted with every kind of broken input a catalog
nobody here controls can hold. Real servers: items in a STAC API (rustac), COGs in S3 (moto), an HTTP server that
answers 403, a host name that does not resolve. The one stand-in is the model stage (a model cannot be made to write
text that parses to nothing, or bytes that are not UTF-8): it answers every other tile plainly.

Each bad item must end as ``errors`` rows with the right ``error_type`` and a message that says what is wrong (the
polar scene as correct rows), the run must go on, every good scene's rows must be there, and the committed tables
must hold every planned tile exactly once (:func:`tests.reliability.outcomes.check_exactly_once`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.windows import Window

from catalogs.errors import error_category
from catalogs.tiling import plan_tiles
from catalogs.toyworld import load_items
from pipelines.archive.config import parse_config
from pipelines.archive.georef import pixel_boxes_to_wgs84
from pipelines.archive.job import run
from pipelines.archive.store import OutputStore, read_table
from tests.catalogs.blobserver import RangeServer, TokenServer
from tests.pipelines.conftest import upload_world
from tests.reliability.outcomes import check_exactly_once, record

pytestmark = pytest.mark.integration

TILE = 128  # few tiles: the zoo is about kinds of input, not volume
BUCKET, PREFIX, SEED = "zoo", "w31", 31
DNS_HOST = "no-such-host.invalid"  # RFC 6761: never resolves
POLAR_TRANSFORM = (10.0, 0.0, -2320.0, 0.0, -10.0, 2080.0)  # EPSG:3413; the pole is pixel (232, 208)


def stand_in_model() -> type:
    """A model stage that answers plainly, except for two scenes whose text is unusable (the permitted stand-in).

    ``zoo-model-empty``: every answer is empty (parses to nothing). ``zoo-model-bytes``: the caption carries bytes
    that are not UTF-8, as a tokenizer's byte-level decode leaves them (U+FFFD).
    """

    class StandInModel:
        needs = ("scene_key", "status")

        def __init__(self, **_: Any) -> None:
            import os

            self.actor_id = f"stand-in-{os.getpid()}"

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            n = len(batch["scene_key"])
            ok = [str(s) == "ok" for s in batch["status"]]
            captions, detects = [], []
            for i in range(n):
                key = str(batch["scene_key"][i])
                if not ok[i] or key.endswith("/zoo-model-empty"):
                    captions.append(""), detects.append("")
                elif key.endswith("/zoo-model-bytes"):
                    captions.append(b"a harbour \xff\xfe\xc3".decode("utf-8", "replace"))
                    detects.append("There are no objects.")
                else:
                    captions.append("a plain scene"), detects.append("There are no objects.")
            out = {k: v for k, v in batch.items() if k != "image"}
            out["answer_caption"] = np.array(captions, dtype=object)
            out["logprob_caption"] = np.zeros(n, np.float32)
            out["answer_detect"] = np.array(detects, dtype=object)
            out["logprob_detect"] = np.zeros(n, np.float32)
            out["vqa_json"] = np.array(["[]"] * n, dtype=object)
            emb = np.empty(n, dtype=object)
            emb[:] = [np.ones(4, np.float32).tobytes() if o else b"" for o in ok]
            out["embedding"] = emb
            out["tokens_detect"] = np.array([""] * n, dtype=object)
            out["actor_id"] = np.array([self.actor_id] * n, dtype=object)
            out["model_loads"] = np.ones(n, np.int32)
            out["actor_ready_at"] = np.zeros(n, np.float64)
            return out

    return StandInModel


def _geotiff(path: Path, data: np.ndarray, *, crs: str | None, transform: tuple[float, ...] | None,
             nodata: float | None = 0, **extra: Any) -> bytes:
    profile: dict[str, Any] = {"driver": "GTiff", "height": data.shape[0], "width": data.shape[1], "count": 1,
                               "dtype": data.dtype.name, "nodata": nodata, **extra}
    if crs:
        profile.update(crs=crs, transform=Affine(*transform[:6]))
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data, 1)
    return path.read_bytes()


def _variant(base: dict[str, Any], item_id: str, href: str | None = None, **props: Any) -> dict[str, Any]:
    item = copy.deepcopy(base)
    item["id"] = item_id
    if href is not None:
        item["assets"]["lwir11"]["href"] = href
    for key, value in props.items():
        key = key.replace("__", ":")
        if value is ...:
            item["properties"].pop(key, None)
        else:
            item["properties"][key] = value
    return item


@pytest.fixture(scope="module")
def zoo(s3, rustac_server, ray_local, tmp_path_factory):  # noqa: ANN001
    """Run the job once over the salted toy world; return what the tests below inspect."""
    tmp = tmp_path_factory.mktemp("zoo")
    world = upload_world(tmp / "world", BUCKET, PREFIX, scenes=3, seed=SEED, s3=s3)
    good = load_items(world.items_path)
    thermal = next(i for i in good if i["collection"] == "toyworld-thermal")
    optical = next(i for i in good if i["collection"] == "toyworld-optical")
    fs = s3.filesystem()
    cogs = f"{BUCKET}/{PREFIX}/cogs"
    original = fs.cat_file(thermal["assets"]["lwir11"]["href"].removeprefix("s3://"))

    def put(name: str, data: bytes) -> str:
        fs.pipe_file(f"{cogs}/{name}", data)
        return f"s3://{cogs}/{name}"

    grid = {"crs": thermal["properties"]["proj:code"], "transform": thermal["properties"]["proj:transform"]}
    rng = np.random.default_rng(SEED)
    nan_inf = np.where(rng.random((128, 128)) < 0.5, np.nan, np.inf).astype(np.float32)
    polar = _geotiff(tmp / "polar.tif", rng.integers(20_000, 40_000, (416, 448), dtype=np.uint16), crs="EPSG:3413",
                     transform=POLAR_TRANSFORM, tiled=True, blockxsize=128, blockysize=128)
    # a header claiming 200,000 x 200,000 pixels: a sparse tiled GeoTIFF of ~300 KB, no block ever written
    huge_path = tmp / "huge.tif"
    with rasterio.open(huge_path, "w", driver="GTiff", height=200_000, width=200_000, count=1, dtype="uint16",
                       nodata=0, crs=grid["crs"], transform=Affine(30.0, 0, 398000.0, 0, -30.0, 3710000.0),
                       tiled=True, blockxsize=1024, blockysize=1024, sparse_ok=True) as ds:
        ds.write(np.zeros((1, 1), np.uint16), 1, window=Window(0, 0, 1, 1))
    forbidden = RangeServer(tokens=TokenServer())  # every unsigned request: 403
    forbidden.files["/acct/zoo-forbidden.tif"] = original

    polar_footprint = pixel_boxes_to_wgs84(np.array([[0, 0, 448, 416]], float), POLAR_TRANSFORM, "EPSG:3413")[0]
    polar_item = _variant(thermal, "zoo-polar", put("polar.tif", polar), proj__code="EPSG:3413",
                          proj__transform=list(POLAR_TRANSFORM), proj__shape=[416, 448])
    polar_item["geometry"] = shapely.geometry.mapping(polar_footprint)
    polar_item["bbox"] = list(polar_footprint.bounds)
    # (the STAC server itself refuses an asset without `href` and gives an item without `properties` a datetime:
    # those never reach a client as such; the unit tests of pipelines.archive.source cover them)
    no_assets = _variant(thermal, "zoo-no-assets")
    del no_assets["assets"]
    unproj = {"proj__code": ..., "proj__shape": ..., "proj__transform": ...}  # the grid comes from the header
    bad = [
        _variant(thermal, "zoo-truncated", put("truncated.tif", original[: len(original) * 3 // 5])),
        _variant(thermal, "zoo-not-a-tiff", put("not-a-tiff.tif", b"<html><body>503 Service Unavailable</body>"
                                                                  b"</html>" * 40)),
        _variant(thermal, "zoo-no-crs", put("no-crs.tif", _geotiff(tmp / "no-crs.tif", np.full((128, 128), 900,
                                                                     np.uint16), crs=None, transform=None)), **unproj),
        _variant(thermal, "zoo-all-nodata", put("all-nodata.tif", _geotiff(
            tmp / "nodata.tif", np.zeros((128, 128), np.uint16), **grid)), proj__shape=[128, 128]),
        _variant(thermal, "zoo-nan-inf", put("nan-inf.tif", _geotiff(tmp / "naninf.tif", nan_inf, nodata=None,
                                                                     **grid)), proj__shape=[128, 128]),
        _variant(thermal, "zoo-1x1", put("one-pixel.tif", _geotiff(tmp / "one.tif", np.full((1, 1), 900, np.uint16),
                                                                   **grid)), proj__shape=[1, 1]),
        _variant(thermal, "zoo-claims-1x1", proj__shape=[1, 1]),  # the asset is the 512 x 512 original
        _variant(thermal, "zoo-huge-header", put("huge.tif", huge_path.read_bytes()), **unproj),
        no_assets,
        _variant(thermal, "zoo-updated-not-a-date", updated="not-a-date"),
        _variant(thermal, "zoo-null-datetime", datetime=None),
        _variant(thermal, "zoo-forbidden", f"{forbidden.url}/acct/zoo-forbidden.tif"),
        _variant(thermal, "zoo-not-found", f"s3://{cogs}/gone.tif"),
        _variant(thermal, "zoo-dns", f"http://{DNS_HOST}/cogs/scene.tif"),
        _variant(optical, "zoo-model-empty"),
        _variant(optical, "zoo-model-bytes"),
        polar_item,
    ]
    collections = [json.loads(p.read_text()) for p in world.collection_paths.values()]
    url = rustac_server(collections, [*good, *bad])
    s3.make_bucket("zoo-out")
    root = "s3://zoo-out/run"
    config = parse_config({
        "catalog": {"url": url, "collections": sorted(c["id"] for c in collections),
                    "asset_prefixes": [f"s3://{cogs}/", f"{forbidden.url}/", f"http://{DNS_HOST}/"]},
        "tasks": ["caption", "detect"],
        "tiling": {"size": TILE, "overlap": 0, "min_valid_fraction": 0.25},
        "actors": {"min_actors": 1, "max_actors": 1, "batch_size": 16, "read_num_cpus": 0.5},
        "output": {"root": root, "commit_tiles": 200, "commit_seconds": None},
    })
    try:
        summary = run(config, model_stage=stand_in_model())
    finally:
        forbidden.stop()
    store = OutputStore(root)
    return {"summary": summary, "root": root, "good": good, "bad": bad, "store": store,
            "errors": read_table(store, "errors"), "tiles": read_table(store, "tiles"),
            "scenes": read_table(store, "scenes"), "config": config}


# expected (error_type, words the message must hold) per bad item; a scene-level error unless noted
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "zoo-truncated": ("CorruptRaster", ("TIFFReadEncodedTile",)),
    "zoo-not-a-tiff": ("CorruptRaster", ("not recognized as being in a supported file format",)),
    "zoo-no-crs": ("NoGeoreference", ("CRS",)),
    "zoo-all-nodata": ("AllNodata", ("no valid",)),
    "zoo-nan-inf": ("AllNodata", ("no valid",)),
    "zoo-1x1": ("UnsupportedScene", ("1 x 1 pixels", "tiling.min_valid_fraction")),
    "zoo-claims-1x1": ("UnsupportedScene", ("proj:shape [1, 1] contradicts the raster header",)),
    "zoo-huge-header": ("AllNodata", ("no valid",)),
    "zoo-no-assets": ("MissingAsset", ("lwir11", "has []")),  # the server lists it with `assets: {}`
    "zoo-updated-not-a-date": ("InvalidItem", ("unreadable updated 'not-a-date'",)),
    "zoo-null-datetime": ("InvalidItem", ("datetime",)),
    "zoo-forbidden": ("AssetAccessDenied", ("403",)),
    "zoo-not-found": ("AssetNotFound", ("gone.tif", "does not exist")),
    "zoo-dns": ("NetworkError", ("Could not resolve host", DNS_HOST, "attempts")),
    "zoo-model-empty": ("ParseError", ("parse to nothing",)),
    "zoo-model-bytes": ("ParseError", ("not UTF-8",)),
}


def test_the_run_goes_on_and_good_scenes_are_whole(zoo):
    summary = zoo["summary"]
    print("\n".join(summary.lines()))
    assert summary.status == "ok_with_errors" and summary.reconciles, summary.lines()
    committed = set(zoo["scenes"]["scene_id"])
    assert {i["id"] for i in zoo["good"]} | {"zoo-polar"} <= committed
    for item in zoo["good"]:
        h, w = item["properties"]["proj:shape"]
        mine = zoo["tiles"][zoo["tiles"]["scene_id"] == item["id"]]
        assert sorted(mine["tile_id"]) == sorted(t.tile_id for t in plan_tiles(h, w, TILE, 0))


@pytest.mark.parametrize("item_id", sorted(EXPECTED))
def test_each_bad_item_is_an_errors_row_with_its_type_and_cause(zoo, item_id):
    error_type, words = EXPECTED[item_id]
    rows = zoo["errors"][zoo["errors"]["scene_id"] == item_id]
    assert len(rows) >= 1, f"{item_id}: no errors row"
    assert set(rows["error_type"]) == {error_type}, rows[["error_type", "stage", "message"]].to_dict("records")
    assert error_category(error_type) != "other"
    for message in rows["message"]:
        for word in words:
            assert word in message, f"{item_id}: {word!r} not in {message!r}"
    # no tile of a bad item reached the tables as an answered tile (the truncated COG's readable part aside)
    answered = zoo["tiles"][(zoo["tiles"]["scene_id"] == item_id) & (zoo["tiles"]["status"] == "ok")]
    assert answered.empty or item_id == "zoo-truncated"


def test_polar_scene_has_correct_rows(zoo):
    tiles = zoo["tiles"][zoo["tiles"]["scene_id"] == "zoo-polar"]
    assert len(tiles) == len(plan_tiles(416, 448, TILE, 0)) and set(tiles["status"]) == {"ok"}
    assert tiles.geometry.is_valid.all()
    reaching = [g for g in tiles.geometry if g.bounds[3] == 90.0]
    assert len(reaching) == 1 and reaching[0].bounds[0] == -180.0 and reaching[0].bounds[2] == 180.0


def test_the_huge_header_was_planned_lazily(zoo):
    summary = zoo["summary"]
    huge = len(plan_tiles(200_000, TILE, TILE, 0)) ** 2  # 1,563 rows x 1,563 columns of tiles
    assert summary.tiles_planned > huge  # counted, never listed: the run went on in a few minutes at most


def test_every_planned_tile_exactly_once(zoo):
    planned: dict[tuple[str, str], list[str]] = {}
    for item in [*zoo["good"], *zoo["bad"]]:
        whole_scene = item["id"] in EXPECTED and item["id"] not in ("zoo-truncated", "zoo-model-empty",
                                                                     "zoo-model-bytes")
        shape = (item.get("properties") or {}).get("proj:shape")
        tiles = [] if whole_scene or not shape else [t.tile_id for t in plan_tiles(*shape, TILE, 0)]
        planned[(item["collection"], item["id"])] = tiles
    errors = zoo["errors"]
    outcome = check_exactly_once(
        zoo["root"], planned, scenario="bad-input-zoo",
        guarantee="every broken input is an errors row with its type and cause; the run goes on; good scenes whole",
        details={"bad_items": len(zoo["bad"]), "good_items": len(zoo["good"]),
                 "error_rows": len(errors), "run_status": zoo["summary"].status},
    )
    record(outcome)
    print(outcome)
    assert outcome.exactly_once, outcome
    assert outcome.unexpected == 0 and outcome.written > 0 and outcome.errored > 0


def test_a_scene_failing_max_attempts_runs_in_a_row_is_quarantined(ray_local, tmp_path):
    """Quarantine on the embedded catalog (``rustac serve``) with local outputs: a scene whose asset is missing fails
    two runs in a row (``output.max_attempts: 2``), is quarantined with its attempt count, skipped by a full scan,
    tried again by ``--retry-quarantined``, and committed once its asset appears; ``errors`` keeps only its latest
    attempt, so the tables stay exactly once through all five runs."""
    from catalogs.toyworld import generate_toyworld
    from pipelines.archive.job import _state_name
    from pipelines.archive.ledger import Ledger
    from pipelines.archive.source import SearchSpec

    world = generate_toyworld(tmp_path / "world", scenes=1, seed=41, chips_per_scene=1,
                              href_base=(tmp_path / "world").as_uri())
    (item,) = load_items(world.items_path)
    good_href = item["assets"]["red"]["href"]
    bad = _variant(item, "q-bad")
    bad["assets"]["red"]["href"] = good_href.replace(".tif", "-late.tif")  # not there yet
    items_path = tmp_path / "items.ndjson"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in (item, bad)))
    root = tmp_path / "out"
    config = parse_config({
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(items_path)},
                    "collections": ["toyworld-optical"], "asset_prefixes": [(world.root / "cogs").as_uri()]},
        "tiling": {"size": TILE, "overlap": 0, "min_valid_fraction": 0.25},
        "actors": {"read_num_cpus": 0.5, "batch_size": 16},
        "output": {"root": str(root), "max_attempts": 2},
    })
    store = OutputStore(str(root))
    spec = SearchSpec(url="", collections=("toyworld-optical",), page_size=config.catalog.page_size,
                      source_id=f"embedded:{items_path.resolve()}")
    state_name = _state_name(config.output_key(), spec)
    model = stand_in_model()

    def state() -> dict[str, Any]:
        return Ledger(store).read_state(state_name) or {}

    def bad_errors() -> list[str]:
        errors = read_table(store, "errors")
        return [] if errors is None or errors.empty else list(errors[errors["scene_id"] == "q-bad"]["error_type"])

    first = run(config, model_stage=model)
    assert first.scenes_processed == 1 and first.scenes_failed == 1
    assert state()["attempts"] == {"toyworld-optical/q-bad": 1} and state()["retry"] == ["toyworld-optical/q-bad"]
    second = run(config, model_stage=model)  # the retry list brings it back: a second failure in a row
    assert second.scenes_failed == 1
    held = state()["quarantined"]["toyworld-optical/q-bad"]
    assert held["attempts"] == 2 and held["error_type"] == "AssetNotFound" and state()["retry"] == []
    assert bad_errors() == ["AssetNotFound"]  # the latest attempt only: the first run's row was replaced
    third = run(config, model_stage=model, full_scan=True)  # listed again, and skipped
    assert third.scenes_failed == 0 and third.skip_reasons["quarantined"] == 1
    fourth = run(config, model_stage=model, retry_quarantined=True)  # tried on request; fails: quarantined again
    assert fourth.scenes_failed == 1 and state()["quarantined"]["toyworld-optical/q-bad"]["attempts"] == 3
    Path(bad["assets"]["red"]["href"].removeprefix("file://")).write_bytes(
        Path(good_href.removeprefix("file://")).read_bytes())
    fifth = run(config, model_stage=model, retry_quarantined=True)
    assert fifth.scenes_processed == 1 and fifth.scenes_failed == 0
    assert state()["quarantined"] == {} and state()["attempts"] == {} and bad_errors() == []
    h, w = item["properties"]["proj:shape"]
    tile_ids = [t.tile_id for t in plan_tiles(h, w, TILE, 0)]
    outcome = check_exactly_once(
        str(root), {("toyworld-optical", item["id"]): tile_ids, ("toyworld-optical", "q-bad"): tile_ids},
        scenario="zoo-quarantine",
        guarantee="a scene failing max_attempts runs in a row is quarantined, retried on request, then committed "
                  "once; errors keep its latest attempt",
        details={"runs": 5, "max_attempts": 2},
    )
    record(outcome)
    assert outcome.exactly_once, outcome
