"""DeepSpeed automatic tensor parallelism (AutoTP, no kernel injection) with 2 ranks on CPU (gloo): both ranks give
the single-process answers, token for token, with either decoder.

Slow: two fresh processes import DeepSpeed, and the first run on a machine JIT-builds its shared-memory all-reduce op
(``deepspeed_shm_comm``, about a minute; cached in ``TORCH_EXTENSIONS_DIR`` afterwards).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from earthgpt.engine import InferenceEngine
from earthgpt.modeling import EarthGPTForConditionalGeneration
from earthgpt.presets import build_model, earthgpt_tiny
from earthgpt.processor import EarthGPTProcessor
from earthgpt.tasks import build_prompt

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [("caption", "optical"), ("detect", "optical"), ("caption", "sar"), ("classify", "sar")]
IMAGE_INDEX = [0, 0, 1, 1]


def _inputs() -> tuple[list[torch.Tensor], list[str]]:
    g = torch.Generator().manual_seed(0)
    tiles = [torch.rand(3, 32, 32, generator=g) for _ in range(2)]
    return tiles, [build_prompt(t, s) for t, s in PROMPTS]


def _model() -> EarthGPTForConditionalGeneration:
    return build_model(earthgpt_tiny(text_config={"initializer_range": 0.5}), seed=0)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One rank: AutoTP over 2 processes, both decoders, answers written to ``rank{N}.json``."""
    os.environ.update(
        DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = _model()
    processor = EarthGPTProcessor.from_config(model.config)
    tiles, prompts = _inputs()
    result: dict[str, object] = {}
    for decoding in ("static", "baseline"):
        engine = InferenceEngine(
            copy.deepcopy(model), processor, kind="deepspeed", tp_size=2, device="cpu", decoding=decoding
        )
        q_proj = engine.model.language_model.model.layers[0].self_attn.q_proj
        result["q_proj"] = [type(q_proj).__name__, list(q_proj.weight.shape)]
        out = engine.generate(tiles, prompts, max_new_tokens=10, image_index=IMAGE_INDEX)
        result[decoding] = [g.token_ids for g in out]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_autotp_two_ranks_match_one_process(tmp_path: Path) -> None:
    model = _model()
    processor = EarthGPTProcessor.from_config(model.config)
    tiles, prompts = _inputs()
    reference = InferenceEngine(model, processor, device="cpu", decoding="baseline")
    expected = [
        g.token_ids for g in reference.generate(tiles, prompts, max_new_tokens=10, image_index=IMAGE_INDEX)
    ]
    port = _free_port()
    code = f"from tests.earthgpt.test_engine_tp import _rank_main; _rank_main(int(__import__('sys').argv[1]), {port}, {str(tmp_path)!r})"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(r)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    logs = []
    try:
        for proc in ranks:
            logs.append(proc.communicate(timeout=540)[0])
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 0, f"rank {rank} failed:\n{logs[rank][-3000:]}"
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        # the attention projections really are split: each rank holds half of the query heads
        assert got["q_proj"] == ["LinearLayer", [model.config.text_config.hidden_size // 2, 64]]
        assert got["static"] == expected
        assert got["baseline"] == expected
