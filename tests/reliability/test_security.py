"""Security: hrefs outside the allow-list refused (redirects included), no secret in any output, log or Ray's records,
pickle checkpoints refused, every server the project starts on loopback only and gone when its starter is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import psutil
import pytest

from catalogs.access import resolve_access
from catalogs.errors import HrefNotAllowed
from catalogs.hrefs import to_gdal_path
from catalogs.io import read_header
from tests.catalogs.blobserver import RangeServer, _Server
from tests.catalogs.cogs import write_cog
from tests.harness.sockets import is_loopback, listening

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------- helpers


class RedirectServer(_Server):
    """Answers every request with ``302 Location: {target}{path}`` (a loopback HTTP server)."""

    def __init__(self, target: str) -> None:
        self.target = target
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(302)
                self.send_header("Location", server.target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET  # noqa: N815

        super().__init__(Handler)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------------------------- redirects to other hosts


@pytest.fixture(scope="module")
def cog_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    tmp = tmp_path_factory.mktemp("redirect")
    data = write_cog(tmp / "x.tif", 7, dtype="uint16", nodata=0, crs="EPSG:32633",
                     transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0), size=256, block=128)
    server = RangeServer({"/cogs/x.tif": data})
    yield server
    server.stop()


def test_redirect_to_another_host_refused(cog_server: RangeServer) -> None:
    # the same server under another host name: GDAL alone would follow the redirect and read it
    other = cog_server.url.replace("127.0.0.1", "localhost")
    hop = RedirectServer(other)
    try:
        href = f"{hop.url}/cogs/x.tif"
        assert read_header(to_gdal_path(href)).shape == (256, 256)  # what happens without the check
        with pytest.raises(HrefNotAllowed, match="redirects to another host") as err:
            resolve_access(href, item_id="item-r", asset="red")
        record = err.value.record()
        assert record["error_type"] == "HrefNotAllowed" and record["item_id"] == "item-r"
    finally:
        hop.stop()


def test_redirect_within_the_host_or_to_a_listed_host_followed(cog_server: RangeServer) -> None:
    hop = RedirectServer(cog_server.url)  # same host name (another port): allowed
    try:
        access = resolve_access(f"{hop.url}/cogs/x.tif")
        assert access.path == f"/vsicurl/{cog_server.url}/cogs/x.tif"  # GDAL opens the final URL, no redirect left
        assert read_header(access.path).shape == (256, 256)
        hop.target = cog_server.url.replace("127.0.0.1", "localhost")
        os.environ["EARTHGPT_REDIRECT_HOSTS"] = "mirror.example, localhost"
        try:
            assert resolve_access(f"{hop.url}/cogs/x.tif").path.startswith("/vsicurl/http://localhost:")
        finally:
            del os.environ["EARTHGPT_REDIRECT_HOSTS"]
    finally:
        hop.stop()


# --------------------------------------------------------------------------------- servers: loopback, no orphans


_DRIVER = textwrap.dedent("""
    import json, sys, time
    from pipelines.embedded import serve_stac
    with serve_stac([sys.argv[1]], sys.argv[2]) as url:
        import psutil
        kids = [p.pid for p in psutil.Process().children() if p.name() == "rustac"]
        print(json.dumps({"url": url, "pids": kids}), flush=True)
        time.sleep(120)
""")


@pytest.fixture(scope="module")
def stac_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("stac")
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": "c", "description": "c", "license": "proprietary",
        "links": [], "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                                "temporal": {"interval": [["2020-01-01T00:00:00Z", None]]}},
    }
    (tmp / "collection.json").write_text(json.dumps(collection))
    (tmp / "items.ndjson").write_text("")
    return tmp / "collection.json", tmp / "items.ndjson"


@pytest.mark.integration
def test_embedded_stac_server_dies_with_a_killed_driver(stac_files: tuple[Path, Path]) -> None:
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, *map(str, stac_files)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = driver.stdout.readline() if driver.stdout else ""
        started = json.loads(line)
        (server,) = started["pids"]
        sockets = listening({server})
        assert sockets and all(is_loopback(ip) for ip, _, _ in sockets), sockets
        driver.send_signal(signal.SIGKILL)  # no finally, no atexit: only the kernel can stop the server now
        driver.wait(timeout=10)
        deadline = time.monotonic() + 5
        while not _gone(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(server), f"rustac serve (pid {server}) outlived its SIGKILLed driver"
    finally:
        if driver.poll() is None:
            driver.kill()
        if "server" in locals() and not _gone(server):
            psutil.Process(server).kill()


_RAY_DRIVER = textwrap.dedent("""
    import json, os, time
    import psutil, ray
    from pipelines.archive.config import parse_config
    from pipelines.archive.job import _start_ray
    config = parse_config({"catalog": {"url": "http://127.0.0.1:9/", "collections": ["c"]},
                           "output": {"root": "/tmp/unused"}, "ray": {"num_cpus": 1, "object_store_mb": 80}})
    assert _start_ray(config)

    @ray.remote
    class Probe:
        def ping(self):
            return os.getpid()

    actor = Probe.remote()
    ray.get(actor.ping.remote())
    ray.get(ray.remote(lambda: 1).remote())
    time.sleep(2)  # the agents open their ports after the node is up
    pids = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
    sockets = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("inet")
               if c.status == psutil.CONN_LISTEN and c.pid in pids]
    print(json.dumps(sockets), flush=True)
    ray.shutdown()
""")


@pytest.mark.integration
@pytest.mark.ray
def test_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", _RAY_DRIVER], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    sockets = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the check saw Ray's servers
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert not exposed, f"Ray listens beyond loopback: {exposed}"


# -------------------------------------------------------------------------------------------- safetensors only


class _Payload:
    """Unpickling this runs code (here: it writes a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "pwned"))


def test_model_folder_with_only_pickle_weights_refused(tmp_path: Path) -> None:
    import torch

    from earthgpt.engine import InferenceEngine
    from earthgpt.modeling import EarthGPTForConditionalGeneration
    from earthgpt.presets import build_model, preset_config
    from earthgpt.processor import EarthGPTProcessor
    from earthgpt.weights import UnsafeWeightsError

    config = preset_config("tiny")
    folder = tmp_path / "model"
    model = build_model(config, seed=0)
    model.save_pretrained(str(folder))
    EarthGPTProcessor.from_config(config).save_pretrained(str(folder))
    for weights in folder.glob("*.safetensors"):  # the same weights as a pickle, as older tools write them
        weights.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="only safetensors are loaded"):
        InferenceEngine.from_pretrained(folder)
    # converted to safetensors (where the files are trusted), the folder loads
    model.save_pretrained(str(folder))
    engine = InferenceEngine.from_pretrained(folder)
    assert isinstance(engine.model, EarthGPTForConditionalGeneration)


def test_checkpoint_loads_are_weights_only(tmp_path: Path) -> None:
    import pickle

    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from earthgpt.weights import weights_only_loads

    good, bad, marker = tmp_path / "optim_states.pt", tmp_path / "planted.pt", tmp_path / "marker"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": {"w": torch.ones(2)}, "step": 3}, good)
    torch.save({"module": {"w": torch.ones(2)}, "x": _Payload(marker)}, bad)
    with weights_only_loads():  # DeepSpeed's own call, verbatim: weights_only=False
        state = torch.load(good, map_location="cpu", weights_only=False)
        assert state["zero_stage"] == ZeroStageEnum.gradients and state["step"] == 3
        with pytest.raises(pickle.UnpicklingError):
            torch.load(bad, map_location="cpu", weights_only=False)
    assert not marker.exists()
    assert torch.load.__name__ == "load" and torch.load(good, weights_only=False)["step"] == 3  # restored after


# ------------------------------------------------------------------- the archive job: hostile hrefs, planted secrets

SECRET = "wJalrXUtnFEMI-K7MDENG-planted-4a1b"  # one value planted everywhere a secret can enter


def _scan(paths: list[Path], secret: str) -> list[str]:
    """Files under ``paths`` whose bytes contain ``secret`` (parquet, zarr chunks, JSON, logs: raw bytes)."""
    hits = []
    needle = secret.encode()
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            try:
                if needle in f.read_bytes():
                    hits.append(str(f))
            except OSError:
                continue
    return hits


@pytest.mark.integration
def test_archive_job_refuses_hostile_hrefs_and_leaks_no_secret(
    tmp_path: Path, ray_local, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import logging
    import shutil

    import geopandas as gpd

    from catalogs.tiling import plan_tiles
    from catalogs.toyworld import generate_toyworld, load_items
    from pipelines.archive.config import parse_config
    from pipelines.archive.job import run
    from pipelines.results.outputs import Outputs
    from tests.pipelines.oracle import oracle_stage
    from tests.reliability.outcomes import check_exactly_once, record

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("PC_SDK_SUBSCRIPTION_KEY", SECRET)
    world = generate_toyworld(tmp_path / "world", scenes=2, seed=41, chips_per_scene=1,
                              href_base=(tmp_path / "world").as_uri())
    cogs = world.root / "cogs"
    items = load_items(world.items_path)
    base = items[0]
    files = {Path(a["href"]).name for a in base["assets"].values() if a["href"].endswith(".tif")}
    private = tmp_path / "private"
    private.mkdir()
    for name in files:
        shutil.copy(cogs / name, private / name)
        (cogs / f"link-{name}").symlink_to(private / name)
    blobs = RangeServer({f"/cogs/{n}": (cogs / n).read_bytes() for n in files})
    hop = RedirectServer(blobs.url.replace("127.0.0.1", "localhost"))

    def variant(suffix: str, href_of) -> dict:
        item = json.loads(json.dumps(base))
        item["id"] = f"{base['id']}-{suffix}"
        for asset in item["assets"].values():
            if asset["href"].endswith(".tif"):
                asset["href"] = href_of(Path(asset["href"]).name)
        return item

    hostile = {
        "dotdot": lambda n: f"{cogs.as_uri()}/../../private/{n}",
        "symlink": lambda n: f"{cogs.as_uri()}/link-{n}",
        "vsicurl": lambda n: f"/vsicurl/{blobs.url}/cogs/{n}",
        "redirect": lambda n: f"{hop.url}/cogs/{n}?sig={SECRET}",
        "userinfo": lambda n: f"http://reader:{SECRET}@{blobs.url.removeprefix('http://')}/cogs/{n}",
        "outside": lambda n: f"https://elsewhere.example/cogs/{n}?X-Amz-Signature={SECRET}",
    }
    signed = variant("signed", lambda n: f"{blobs.url}/cogs/{n}?token={SECRET}")  # allowed: it is read
    missing = variant("missing", lambda n: f"{blobs.url}/nothing/{n}?sig={SECRET}")  # allowed, answers 404
    all_items = [*items, signed, missing, *(variant(k, f) for k, f in hostile.items())]
    items_path = tmp_path / "items.ndjson"
    items_path.write_text("".join(json.dumps(i) + "\n" for i in all_items))

    root = tmp_path / "out"
    config = parse_config({
        "catalog": {"embedded": {"collections": [str(p) for p in world.collection_paths.values()],
                                 "items": str(items_path)},
                    "collections": sorted({i["collection"] for i in items}),
                    "asset_prefixes": [cogs.as_uri(), f"{blobs.url}/", f"{hop.url}/"]},
        "tiling": {"size": 64, "overlap": 0, "min_valid_fraction": 0.5},
        "actors": {"read_num_cpus": 0.5},
        "output": {"root": str(root), "commit_tiles": 1000, "commit_seconds": None},
    })
    truth = gpd.read_parquet(world.ground_truth_path).drop(columns="geometry").to_dict("records")
    caplog.set_level(logging.INFO)
    try:
        summary = run(config, model_stage=oracle_stage(truth))
    finally:
        hop.stop()
        blobs.stop()
    out, err = capsys.readouterr()

    errors = Outputs(str(root)).read("errors")
    by_scene = {str(r["scene_id"]): r for r in errors.to_dict("records")}
    for key in hostile:
        row = by_scene[f"{base['id']}-{key}"]
        assert row["error_type"] == "HrefNotAllowed", (key, row)
        assert row["message"], key
    assert "redirects to another host" in by_scene[f"{base['id']}-redirect"]["message"]
    assert "symlink" in by_scene[f"{base['id']}-symlink"]["message"]
    assert f"{base['id']}-signed" not in by_scene and f"{base['id']}-missing" in by_scene

    # planned: every tile of each readable scene; a refused or missing scene is one unit (its scene-level error)
    planned: dict[tuple[str, str], list[str]] = {}
    for item in all_items:
        readable = item["id"] in {i["id"] for i in items} or item["id"] == signed["id"]
        h, w = item["properties"]["proj:shape"]
        planned[(item["collection"], item["id"])] = [t.tile_id for t in plan_tiles(h, w, 64, 0)] if readable else []
    outcome = check_exactly_once(
        str(root), planned, scenario="security-hostile-hrefs",
        guarantee="hrefs outside the allow-list (.., symlink, /vsicurl/, user-info, redirect to another host) are "
        "errors rows HrefNotAllowed; the other scenes are processed; no planted secret in any output or log",
        details={"hostile_items": len(hostile), "tiles_written": summary.tiles_written},
    )

    # the planted secret: nowhere in the tables, the ledger, the state documents, the logs, Ray's job records
    leaks = _scan([root], SECRET)
    assert not leaks, f"secret written to {leaks}"
    logged = out + err + "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged
    import ray

    jobs = ray._private.state.state.job_table()  # what Ray keeps of each driver (entrypoint, runtime env, config)
    assert jobs and SECRET not in json.dumps(jobs, default=str)
    session = Path(ray._private.worker.global_worker.node.get_session_dir_path())
    ray_leaks = _scan([session / "logs"], SECRET)
    assert not ray_leaks, f"secret in Ray's logs: {ray_leaks}"

    assert outcome.exactly_once, outcome
    record(outcome)
