"""Model folders wherever they live: a content digest of the weights, and a per-node cache for remote folders.

A model folder is what ``save_pretrained`` writes (``config.json``, ``*.safetensors``, processor files). It may be a
local path or any fsspec URL (``s3://bucket/models/earthgpt-13b``). Two things the archive job needs of it:

- **What it is**, independent of where it is: :func:`weights_digest` hashes the config, every file's size, each
  safetensors header (tensor names, dtypes, shapes, offsets) and evenly spaced samples of the tensor bytes. Reading
  a few MB instead of tens of GB makes it cheap enough to run at every job start, and the same weights copied to
  another node or bucket give the same digest. For local folders it is cached beside the weights
  (``.earthgpt-digest.json``, keyed by file sizes and modification times) when the folder is writable.
- **A local copy on each node**: :func:`fetch_model` downloads a remote folder once into a cache shared by that
  node's processes (a file lock serialises concurrent actors; the copy is written to a temporary folder, verified
  against the remote digest and sizes, then renamed into place, so a half-written copy is never used).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
# the classes DeepSpeed's own checkpoint files hold besides tensors and containers (seen in ZeRO 0-3 checkpoints);
# anything else in a checkpoint is refused
DEEPSPEED_CHECKPOINT_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)

DIGEST_FILE = ".earthgpt-digest.json"
DIGEST_VERSION = 1
SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 64 * 1024
_MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header well below this


def is_remote(name_or_path: str) -> bool:
    """Whether a model reference is an fsspec URL (``s3://``, ``gs://``, ``https://`` ...) rather than a path."""
    return "://" in str(name_or_path) and not str(name_or_path).startswith("file://")


def _fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, str(path).rstrip("/")


def _listing(fs: Any, root: str) -> dict[str, int]:
    """``relative name -> size`` of every file under a model folder (digest and cache files excluded)."""
    out: dict[str, int] = {}
    for path, info in fs.find(root, detail=True).items():
        rel = str(path)[len(root):].lstrip("/")
        if rel and info.get("type", "file") == "file" and not rel.startswith(".earthgpt-"):
            out[rel] = int(info["size"])
    if not out:
        raise FileNotFoundError(f"no files under model folder {root}")
    return out


def _safetensors_digest(fh: Any, size: int, h: Any) -> None:
    head = fh.read(8)
    if len(head) < 8:
        raise ValueError("not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"not a safetensors file (header length {n} of a {size}-byte file)")
    h.update(head)
    h.update(fh.read(n))
    body = size - 8 - n
    for k in range(SAMPLES_PER_FILE if body > 0 else 0):
        offset = 8 + n + (body - SAMPLE_BYTES) * k // max(1, SAMPLES_PER_FILE - 1) if body > SAMPLE_BYTES else 8 + n
        fh.seek(max(8 + n, offset))
        h.update(fh.read(min(SAMPLE_BYTES, body)))


def weights_digest(name_or_path: str, storage_options: dict[str, Any] | None = None, *, cache: bool = True) -> str:
    """A content digest of a model folder (local or remote): same files anywhere ⇒ same digest.

    Small files (config, tokenizer) are hashed whole; each ``*.safetensors`` file contributes its size, its header
    and ``SAMPLES_PER_FILE`` evenly spaced samples of ``SAMPLE_BYTES`` (a few MB read per file, whatever its size).

    Args:
        name_or_path: Local folder or fsspec URL.
        storage_options: fsspec options for a URL.
        cache: Reuse / write ``.earthgpt-digest.json`` beside local weights (keyed by sizes and mtimes).

    Returns:
        A hex digest (sha256).

    Raises:
        FileNotFoundError: The folder has no files.
        ValueError: A ``.safetensors`` file is not one.
    """
    fs, root = _fs(str(name_or_path), storage_options)
    files = _listing(fs, root)
    local = not is_remote(str(name_or_path))
    stamp = None
    if local and cache:
        stamp = {rel: [size, os.stat(os.path.join(root, rel)).st_mtime_ns] for rel, size in files.items()}
        with contextlib.suppress(OSError, ValueError, KeyError):
            cached = json.loads(Path(root, DIGEST_FILE).read_text())
            if cached["version"] == DIGEST_VERSION and cached["files"] == stamp:
                return str(cached["digest"])
    h = hashlib.sha256(f"earthgpt-weights-v{DIGEST_VERSION}".encode())
    for rel in sorted(files):
        size = files[rel]
        h.update(f"\0{rel}\0{size}\0".encode())
        with fs.open(f"{root}/{rel}", "rb") as fh:
            if rel.endswith(".safetensors"):
                _safetensors_digest(fh, size, h)
            elif size <= 64 * 2**20:
                h.update(fh.read())
    digest = h.hexdigest()
    if stamp is not None:
        with contextlib.suppress(OSError):  # a read-only folder simply is not cached
            tmp = Path(root, f"{DIGEST_FILE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"version": DIGEST_VERSION, "digest": digest, "files": stamp}))
            os.replace(tmp, Path(root, DIGEST_FILE))
    return digest


def default_cache_dir() -> Path:
    """``$EARTHGPT_CACHE`` or ``~/.cache/earthgpt``: where remote models are copied on each node."""
    return Path(os.environ.get("EARTHGPT_CACHE") or Path.home() / ".cache" / "earthgpt")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def fetch_model(
    url: str,
    cache_dir: str | Path | None = None,
    storage_options: dict[str, Any] | None = None,
    *,
    digest: str | None = None,
) -> Path:
    """A local copy of a remote model folder, downloaded at most once per node and verified.

    Every process of a node that asks for the same weights gets the same folder; the first downloads it while the
    others wait on a file lock. The copy lands in a temporary folder, is checked (file sizes, and the digest
    recomputed from the copy must equal the remote one), and is renamed into place: a crash mid-download leaves only
    a temporary folder, removed by the next call.

    Args:
        url: fsspec URL of a ``save_pretrained`` folder (a local path is returned unchanged).
        cache_dir: Cache root (default :func:`default_cache_dir`).
        storage_options: fsspec options (endpoint, profile); credentials come from the environment.
        digest: The remote digest if already known (computed otherwise).

    Returns:
        The local folder, ``<cache_dir>/models/<digest>``.

    Raises:
        OSError: The copy does not match the remote folder.
    """
    if not is_remote(url):
        return Path(url.removeprefix("file://"))
    fs, root = _fs(url, storage_options)
    digest = digest or weights_digest(url, storage_options)
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = base / "models" / digest[:32]
    if (target / DIGEST_FILE).is_file():
        return target
    with _file_lock(base / "models" / f".{digest[:32]}.lock"):
        if (target / DIGEST_FILE).is_file():  # another process of this node finished it while we waited
            return target
        for stale in (base / "models").glob(f".{digest[:32]}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        files = _listing(fs, root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:32]}.tmp-", dir=base / "models"))
        try:
            for rel in sorted(files):
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(dst))
                if dst.stat().st_size != files[rel]:
                    raise OSError(f"model download {url}/{rel}: {dst.stat().st_size} bytes, expected {files[rel]}")
            local = weights_digest(str(tmp), cache=False)
            if local != digest:
                raise OSError(f"model download {url}: digest {local[:12]} of the copy differs from {digest[:12]}")
            (tmp / DIGEST_FILE).write_text(json.dumps({"version": DIGEST_VERSION, "digest": digest, "source": url}))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


class UnsafeWeightsError(ValueError):
    """A model folder holds its weights only in a pickle format (``.bin``, ``.pt`` ...), which is never loaded."""


def require_safetensors(folder: str | Path) -> None:
    """Refuse a local model folder whose weights exist only as pickle files.

    Args:
        folder: A ``save_pretrained`` folder (anything that is not a local folder is left to its loader).

    Raises:
        UnsafeWeightsError: The folder has ``.bin``/``.pt``/... files and no ``.safetensors`` file.
    """
    path = Path(str(folder).removeprefix("file://"))
    if not path.is_dir() or any(path.rglob("*.safetensors")):
        return
    pickles = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"model folder {path} holds its weights only as pickle files ({', '.join(pickles[:5])}); loading a "
            "pickle runs any code it contains, so only safetensors are loaded. Convert the folder once, on a "
            "machine where you trust the files: `from_pretrained(folder)` then `save_pretrained(folder, "
            "safe_serialization=True)`"
        )


def _resolve_global(name: str) -> Any:
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


@contextlib.contextmanager
def weights_only_loads(extra_globals: tuple[str, ...] = DEEPSPEED_CHECKPOINT_GLOBALS) -> Iterator[None]:
    """Within the block, every ``torch.load`` (DeepSpeed's included) is a ``weights_only=True`` load.

    DeepSpeed reads its checkpoint files with ``torch.load(..., weights_only=False)``, i.e. full unpickling: a file
    planted in a run's checkpoint folder would run code in every training worker that resumes from it. Here such a
    file fails with ``pickle.UnpicklingError`` naming the refused global; DeepSpeed's own state (tensors, containers,
    and the classes in ``extra_globals``) loads as before.

    Args:
        extra_globals: Dotted names of the classes allowed besides torch's own safe set.
    """
    import torch

    allowed = [g for g in map(_resolve_global, extra_globals) if g is not None]
    original = torch.load

    @functools.wraps(original)
    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    torch.load = load  # type: ignore[assignment]
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = original
