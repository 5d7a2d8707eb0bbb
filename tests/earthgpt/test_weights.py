"""Model folders by content: the weights digest (same files anywhere -> same digest, any changed byte sampled ->
another), and remote folders copied once per node into a verified cache (against a real S3 server)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import struct
from pathlib import Path

import pytest

from earthgpt.weights import DIGEST_FILE, fetch_model, is_remote, weights_digest


def model_folder(path: Path, payload: bytes) -> Path:
    """A ``save_pretrained``-shaped folder: a config and one safetensors file (header length, JSON, data)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "earthgpt"}')
    header = json.dumps({"w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


def test_digest_follows_content_not_place_or_time(tmp_path):
    a = model_folder(tmp_path / "a", bytes(range(256)) * 4000)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", (1, 1))
    assert weights_digest(str(a)) == weights_digest(str(b))
    # a byte changed where the digest samples (the start of the tensor data) gives another digest
    data = bytearray((b / "model.safetensors").read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start] ^= 0xFF
    (b / "model.safetensors").write_bytes(bytes(data))
    assert weights_digest(str(a)) != weights_digest(str(b))
    # a changed config too
    (a / "config.json").write_text('{"model_type": "earthgpt", "x": 1}')
    assert weights_digest(str(a), cache=False) != weights_digest(str(b), cache=False)


def test_digest_is_cached_beside_the_weights_and_refreshed_when_they_change(tmp_path):
    a = model_folder(tmp_path / "a", b"x" * 10_000)
    first = weights_digest(str(a))
    cached = json.loads((a / DIGEST_FILE).read_text())
    assert cached["digest"] == first
    (a / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes()[:-1] + b"y")
    assert weights_digest(str(a)) != first


def test_not_a_safetensors_file_is_refused(tmp_path):
    a = tmp_path / "bad"
    a.mkdir()
    (a / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        weights_digest(str(a))


def test_local_paths_are_not_fetched(tmp_path):
    a = model_folder(tmp_path / "a", b"x" * 100)
    assert not is_remote(str(a)) and fetch_model(str(a)) == a
    assert is_remote("s3://bucket/model") and not is_remote("file:///x")


def _fetch(url: str, cache: str, queue: multiprocessing.Queue) -> None:
    queue.put(str(fetch_model(url, cache)))


@pytest.mark.integration
def test_remote_model_is_copied_once_per_node_and_verified(s3, tmp_path):
    local = model_folder(tmp_path / "model", os.urandom(300_000))
    s3.make_bucket("models")
    fs = s3.filesystem()
    for f in local.iterdir():
        fs.put_file(str(f), f"models/earthgpt-x/{f.name}")
    url = "s3://models/earthgpt-x"
    assert weights_digest(url) == weights_digest(str(local), cache=False)  # same weights anywhere: same digest

    cache = tmp_path / "cache"
    s3.clear_requests()
    # two processes of one node ask at once: one downloads, the other waits and reuses the copy
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch, args=(url, str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    paths = {queue.get(timeout=5) for _ in procs}
    assert len(paths) == 1
    copy = Path(paths.pop())
    assert (copy / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()

    def downloads() -> int:  # whole-object GETs of the weights (the digest reads a few ranges only)
        return sum(1 for method, path, rng in s3.requests
                   if method == "GET" and path.endswith("model.safetensors") and rng is None)

    assert downloads() == 1
    assert not list((cache / "models").glob(".*tmp-*"))  # no half copy left behind
    # a later call (another actor, another run) finds the node's copy: no download
    s3.clear_requests()
    assert fetch_model(url, cache) == copy and downloads() == 0
