"""Roofline of the inference engine: the static decoder beside today's (baseline) decoder and this hardware's bounds.

For each model (preset with random weights, or a saved folder) and each batch of tiles, in one process:

1. the hardware bounds, measured here and now: a bare matmul (square GEMM in the model's dtype: the prefill bound,
   FLOP/s) and a weights-read probe (a matrix-vector product over a large weight matrix: the memory-bandwidth bound
   of decoding, bytes/s);
2. the same tiles and prompts (caption + detect per tile, the demo's tasks) through ``decoding="baseline"`` and
   ``decoding="static"``, ``--repeats`` times each (median wall time; alternating on a CPU, one decoder after the
   other on a GPU, each alone in memory; the baseline in calls of as many tiles as fit); greedy answers compared token
   for token;
3. per engine: tiles/s, prefill tokens/s and ``prefill_efficiency`` (decoder matmul FLOP/s over the GEMM probe),
   decode steps/s and ``decode_efficiency`` (the time a step must take at the probed bandwidth, reading the decoder's
   weights once plus the live rows' keys and values, or at the probed FLOP/s if that is longer, over the time it took).
   The static engine reports its own prefill/decode split; the baseline's prefill is timed by a 1-token call.

Prints a table, then one JSON line: ``prefill_efficiency``, ``decode_efficiency``, ``tiles_per_s``,
``speedup_vs_baseline`` (each for the largest batch of the last model; ``min_speedup_vs_baseline`` over all rows;
``cpu_speedup_vs_baseline``: the same ratio in process CPU time, steadier when other work shares the machine),
``identical_greedy`` (all rows), ``same_up_to_ties`` (every difference a rounding near-tie: at the first differing
token, the baseline model's log-prob gap between the two choices is within twice its own rounding noise; see
:func:`compare`) and every row.

    python benchmarks/engine.py --models tiny,small --batches 8,32                    # CPU (float32)
    python benchmarks/engine.py --models paper --device cuda --dtype bfloat16 \\
        --batches 8,16,32,64,128 --repeats 1 --init-std 0.5 --cuda-graphs --budget-s 540   # one GPU, < 10 min

Needs only torch, transformers, tokenizers, safetensors and numpy plus this repository's ``earthgpt/`` (run from the
repository root). ``--budget-s`` skips the batches that would not fit in the time left (said in the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from earthgpt.engine import Generation, InferenceEngine, is_out_of_memory  # noqa: E402
from earthgpt.modeling import EarthGPTForConditionalGeneration  # noqa: E402
from earthgpt.processor import EarthGPTProcessor  # noqa: E402
from earthgpt.tasks import build_prompt  # noqa: E402

START = time.perf_counter()
SENSORS = ("optical", "sar", "infrared")


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_probe(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an ``n x n x n`` GEMM in ``dtype`` (best of a few)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b, device, 1) for _ in range(5))
    return 2 * n**3 / best


def weights_read_probe(device: torch.device, dtype: torch.dtype, nbytes: int) -> float:
    """Bytes/s of a matrix-vector product over a ``nbytes`` weight matrix (every weight read once)."""
    cols = 4096
    rows = max(nbytes // (cols * torch.empty((), dtype=dtype).element_size()), 1)
    w = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(cols, device=device).to(dtype)
    torch.mv(w, x)
    best = min(_timed(lambda: torch.mv(w, x), device, 1) for _ in range(5))
    return w.numel() * w.element_size() / best


def load(
    name: str, device: torch.device, dtype: torch.dtype, seed: int, init_std: float | None
) -> tuple[Any, EarthGPTProcessor]:
    from earthgpt.presets import PRESETS, build_model, preset_config

    if name in PRESETS:
        overrides: dict[str, Any] = {}
        if init_std is not None:
            overrides["text_config"] = {"initializer_range": init_std}
        if name == "paper":
            # the bundled tokenizer stands in for LLaMA's (no hub): its ids are valid in the paper vocabulary
            overrides.update(image_token_id=4, image_start_token_id=5, image_end_token_id=6)
        config = preset_config(name, **overrides)
        model = build_model(config, device=device, dtype=dtype, seed=seed)
        return model, EarthGPTProcessor.from_config(config)
    return EarthGPTForConditionalGeneration.from_pretrained(name), EarthGPTProcessor.from_pretrained(name)


class Workload(NamedTuple):
    """Tiles and their prompts: ``index[i]`` is the tile of ``prompts[i]``, in tile order."""

    images: list[torch.Tensor]
    prompts: list[str]
    index: list[int]


def workload(processor: EarthGPTProcessor, tiles: int, seed: int) -> Workload:
    """``tiles`` random tiles, each asked the demo's caption and detect prompts."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, processor.image_size, processor.image_size, generator=g) for _ in range(tiles)]
    prompts, index = [], []
    for j in range(tiles):
        for task in ("caption", "detect"):
            prompts.append(build_prompt(task, SENSORS[j % len(SENSORS)]))
            index.append(j)
    return Workload(images, prompts, index)


def decoder_costs(model: Any) -> dict[str, int]:
    """Matmul parameters per token of the decoder layers and of the LM head, and their bytes."""
    layers = sum(
        p.numel()
        for n, p in model.language_model.model.layers.named_parameters()
        if n.endswith("proj.weight")
    )
    head = model.language_model.lm_head.weight.numel()
    item = model.language_model.lm_head.weight.element_size()
    return {"layer_params": layers, "head_params": head, "weights_bytes": (layers + head) * item}


def efficiencies(
    costs: dict[str, int],
    kv_bytes_per_token: int,
    flops: float,
    bandwidth: float,
    prefill_tokens: float,
    prefill_rows: float,
    prefill_s: float,
    decode_steps: float,
    decode_tokens: float,
    context_tokens: float,
    decode_s: float,
) -> dict[str, float]:
    prefill_flop = 2 * costs["layer_params"] * prefill_tokens + 2 * costs["head_params"] * prefill_rows
    decode_flop = 2 * (costs["layer_params"] + costs["head_params"]) * decode_tokens
    decode_bytes = costs["weights_bytes"] * decode_steps + kv_bytes_per_token * context_tokens
    bound_s = max(decode_bytes / bandwidth, decode_flop / flops)
    return {
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else float("nan"),
        "prefill_efficiency": prefill_flop / prefill_s / flops if prefill_s else float("nan"),
        "decode_steps_per_s": decode_steps / decode_s if decode_s else float("nan"),
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s else float("nan"),
        "decode_efficiency": bound_s / decode_s if decode_s else float("nan"),
    }


def first_difference(a: Generation, b: Generation) -> int | None:
    """The first answer position where two greedy answers differ (the stop token counts), or None."""
    return next((k for k, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=False)) if x != y), None)


def logprob_drift(base: list[Generation], new: list[Generation], first: list[int | None]) -> float:
    """How far the two decoders' log-probabilities of the same token drift apart where their answers still agree:
    the largest ``|log p_baseline - log p_new|`` before each answer's first difference (``first``)."""
    drift = 0.0
    for a, b, k in zip(base, new, first, strict=True):
        upto = min(a.n_tokens, b.n_tokens) if k is None else k
        for x, y in zip(a.token_logprobs[:upto], b.token_logprobs[:upto], strict=True):
            drift = max(drift, abs(x - y))
    return drift


@torch.no_grad()
def tie_gaps(
    engine: InferenceEngine,
    work: Workload,
    base: list[Generation],
    new: list[Generation],
    first: list[int | None],
    limit: int = 64,
) -> tuple[list[float], float]:
    """Measures, for each differing answer (at most ``limit``, spread over them), how close its first difference was
    to a tie.

    One full forward pass of the baseline model (no cache) over the prompt and the baseline's whole answer gives, at
    the first differing position, the gap between the log-probabilities of the baseline's token and the new
    decoder's; and at every position, how far this pass's log-probability of the baseline's token lies from the one
    the baseline's own decoding gave: the rounding noise of the model computed two ways, which does not depend on the
    new decoder.

    Args:
        first: Each answer's first differing position (:func:`first_difference`), None where the answers agree.

    Returns:
        The gaps, and the largest such noise over the answers examined.
    """
    gaps: list[float] = []
    noise = 0.0
    zero = torch.zeros(1, dtype=torch.long, device=engine.device)
    differing = [i for i, k in enumerate(first) if k is not None]
    # spread over all differing answers (prompts admitted late as well as early), at most ``limit``
    chosen = [differing[round(j * len(differing) / limit)] for j in range(limit)] if len(differing) > limit else differing
    for i in chosen:
        a, b, k = base[i], new[i], first[i]
        assert k is not None
        prompt = engine.processor.encode_prompt(work.prompts[i])
        model = engine.model
        # the answer is embedded as tokens, never parsed: a random model may answer with the <image> id
        embeds = torch.cat(
            [
                model.embed_inputs(
                    torch.tensor([prompt], device=engine.device),
                    image_index=zero,
                    image_features=engine.encode_images([work.images[work.index[i]]]),
                )[0],
                model.get_input_embeddings()(torch.tensor([a.token_ids], device=engine.device)),
            ],
            dim=1,
        )
        hidden = model.language_model.model(
            inputs_embeds=embeds,
            position_ids=torch.arange(embeds.shape[1], device=engine.device)[None],
            use_cache=False,
            return_dict=True,
        ).last_hidden_state
        logits = model.language_model.lm_head(hidden[0, len(prompt) - 1 : len(prompt) - 1 + a.n_tokens])
        logp = torch.log_softmax(logits.float(), dim=-1)
        again = logp.gather(1, torch.tensor(a.token_ids, device=logp.device)[:, None])[:, 0].cpu()
        noise = max(noise, float((again - torch.tensor(a.token_logprobs)).abs().max()))
        gaps.append(abs(float(logp[k, a.token_ids[k]] - logp[k, b.token_ids[k]])))
    return gaps, noise


def compare(
    engine: InferenceEngine,
    work: Workload,
    base: list[Generation],
    new: list[Generation],
) -> dict[str, Any]:
    """Greedy answers of a new decoder against the baseline's: identical, per-position agreement, first differences,
    and whether every difference is a rounding near-tie (``same_up_to_ties``): at each first difference the baseline
    model's gap between the two tokens is at most twice its own rounding noise (:func:`tie_gaps`; at least 1e-6
    nats). A wrong decoder picks tokens whole nats behind the baseline's."""
    pairs = list(zip(base, new, strict=True))
    same = sum(sum(x == y for x, y in zip(a.token_ids, b.token_ids, strict=False)) for a, b in pairs)
    first = [first_difference(a, b) for a, b in pairs]
    identical = [g.token_ids for g in base] == [g.token_ids for g in new]
    gaps, noise = tie_gaps(engine, work, base, new, first) if not identical else ([], 0.0)
    return {
        "identical_greedy": identical,
        # greedy decoding continues from its own tokens, so one flipped near-tie changes everything after it
        "token_agreement": same / max(sum(max(a.n_tokens, b.n_tokens) for a, b in pairs), 1),
        "first_difference": [k for k in first if k is not None],
        "logprob_drift": logprob_drift(base, new, first),
        "tie_gaps": gaps,
        "rounding_noise": noise,
        "same_up_to_ties": identical or all(g <= max(2 * noise, 1e-6) for g in gaps),
    }


class GraphsFailed(RuntimeError):
    """The CUDA-graphs decoder failed (capture or replay): its row is dropped, the other decoders are timed again."""


class _Baseline:
    """Today's engine on a batch, in calls of as many whole tiles as fit: one call for the batch unless it runs out
    of memory (its dynamic cache is not planned: 128 tiles of the paper preset need ~78 GB of keys and values), then
    halved until it fits, and kept so for every later call on this batch (``tiles_per_call`` in the row)."""

    def __init__(self, engine: InferenceEngine, tiles: int) -> None:
        self.engine = engine
        self.tiles_per_call = tiles

    def generate(
        self, images: list[torch.Tensor], prompts: list[str], index: list[int], max_new_tokens: int
    ) -> list[Generation]:
        while True:
            try:
                return self._calls(images, prompts, index, max_new_tokens)
            except Exception as exc:  # noqa: BLE001 - out of memory is retried below, outside this block
                if not is_out_of_memory(exc) or self.tiles_per_call == 1:
                    raise
            # retried here, once the traceback and the tensors it holds are gone (PyTorch FAQ)
            self.tiles_per_call = max(1, self.tiles_per_call // 2)
            log(f"  baseline out of memory: {self.tiles_per_call} tiles per call")
            self.engine.release_memory()

    def _calls(
        self, images: list[torch.Tensor], prompts: list[str], index: list[int], max_new_tokens: int
    ) -> list[Generation]:
        assert index == sorted(index), "prompts must come tile by tile"
        out: list[Generation] = []
        for lo in range(0, len(images), self.tiles_per_call):
            hi = min(lo + self.tiles_per_call, len(images))
            chosen = [i for i, j in enumerate(index) if lo <= j < hi]
            out += self.engine.generate(
                images[lo:hi],
                [prompts[i] for i in chosen],
                max_new_tokens=max_new_tokens,
                image_index=[index[i] - lo for i in chosen],
            )
        return out


def run_batch(
    name: str,
    engines: dict[str, InferenceEngine],
    tiles: int,
    args: argparse.Namespace,
    probes: dict[str, float],
    costs: dict[str, int],
    kv_bytes_per_token: int,
) -> dict[str, Any]:
    kinds = list(engines)  # "baseline", "static", and "shapes" (--static-shapes) or "graphs" (--cuda-graphs)
    news = [k for k in kinds if k != "baseline"]
    device = engines["static"].device
    work = workload(engines["static"].processor, tiles, args.seed)
    images, prompts, index = work
    baseline = _Baseline(engines["baseline"], tiles)
    outputs: dict[str, list[Generation]] = {}
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}  # process CPU time: steadier on a shared machine
    stats: dict[str, list[dict[str, float]]] = {k: [] for k in news}
    warmup_s: dict[str, float] = {}

    def call(kind: str, max_new_tokens: int, n: int | None = None) -> list[Generation]:
        n = len(images) if n is None else n
        todo = [i for i, j in enumerate(index) if j < n]
        if kind == "baseline":
            return baseline.generate(images[:n], [prompts[i] for i in todo], [index[i] for i in todo], max_new_tokens)
        try:
            return engines[kind].generate(
                images[:n], [prompts[i] for i in todo], max_new_tokens=max_new_tokens, image_index=[index[i] for i in todo]
            )
        except Exception as exc:
            if kind == "graphs":
                # its context still holds the failure's tensors: main() retries once this exception is gone
                raise GraphsFailed(f"{type(exc).__name__}: {exc}") from None
            raise

    def make_room(kind: str) -> None:
        # on a GPU each decoder runs alone: the kept caches of the fixed-shape ones go before another one runs
        if device.type == "cuda":
            for other in news:
                if other != kind and engines[other]._steps is not None:
                    engines[other].release_memory()

    def timed(kind: str) -> None:
        make_room(kind)
        while True:
            per_call = baseline.tiles_per_call
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = call(kind, args.new_tokens)
            sync(device)
            if kind != "baseline" or baseline.tiles_per_call == per_call:
                break  # else it ran out of memory and shrank on the way: that time is not a measurement
        walls[kind].append(time.perf_counter() - t0)
        cpus[kind].append(time.process_time() - c0)
        outputs.setdefault(kind, out)
        if kind != "baseline":
            stats[kind].append(dict(engines[kind].last_stats))

    def warm_up(kind: str) -> None:
        # fixed shapes: the kept cache is allocated, and each shape bucket captured (once per actor), before timing
        make_room(kind)
        sync(device)
        t0 = time.perf_counter()
        call(kind, args.new_tokens)
        sync(device)
        warmup_s[kind] = time.perf_counter() - t0

    for kind in kinds:  # warm-up: allocations, kernel selection
        call(kind, 2, n=1)
    if device.type == "cuda":  # one decoder after the other, each alone on the GPU
        for kind in kinds:
            if kind in news[1:]:
                warm_up(kind)
            for _ in range(args.repeats):
                timed(kind)
    else:  # alternating: a shared CPU's load falls on every decoder alike
        for kind in news[1:]:
            warm_up(kind)
        for _ in range(args.repeats):
            for kind in kinds:
                timed(kind)
    # the baseline's split, in the calls its timed runs made: a 1-token call less the image encoding is its prefill
    # (left-padded: padding is computed too)
    make_room("baseline")
    encode_s = _timed(lambda: engines["baseline"].encode_images(images), device, args.repeats)
    base_prefill_s = _timed(lambda: call("baseline", 1), device, args.repeats) - encode_s
    base = outputs["baseline"]
    row: dict[str, Any] = {"model": name, "tiles": tiles, "prompts": len(prompts), "engines": kinds}
    for kind in news:
        prefix = "" if kind == "static" else f"{kind}_"
        found = compare(engines["baseline"], work, base, outputs[kind])
        row.update({prefix + key: value for key, value in found.items()})
    width = max(len(engines["baseline"].processor.encode_prompt(q)) for q in prompts)
    steps = max(g.n_tokens for g in base) - 1
    base_wall = statistics.median(walls["baseline"])
    row["baseline"] = {
        "wall_s": base_wall,
        "tiles_per_s": tiles / base_wall,
        "tiles_per_call": baseline.tiles_per_call,
        **efficiencies(
            costs,
            kv_bytes_per_token,
            probes["flops"],
            probes["bandwidth"],
            len(prompts) * width,
            len(prompts),
            base_prefill_s,
            steps,
            steps * len(prompts),
            len(prompts) * sum(width + s for s in range(1, steps + 1)),
            max(base_wall - base_prefill_s - encode_s, 1e-9),
        ),  # fmt: skip
    }
    for kind in news:
        new_wall = statistics.median(walls[kind])
        s = stats[kind][len(stats[kind]) // 2]
        plan = engines[kind].batch_plan
        row[kind] = {
            "wall_s": new_wall,
            "tiles_per_s": tiles / new_wall,
            **efficiencies(
                costs,
                kv_bytes_per_token,
                probes["flops"],
                probes["bandwidth"],
                s["prefill_tokens"],
                len(prompts),
                s["prefill_s"],
                s["decode_steps"],
                s["decode_tokens"],
                s["decode_context_tokens"],
                s["decode_s"],
            ),  # fmt: skip
            "prefill_tokens": s["prefill_tokens"],
            "baseline_prefill_tokens": len(prompts) * width,
            "mean_answer_tokens": sum(g.n_tokens for g in outputs[kind]) / len(outputs[kind]),
            "batch_plan": {k: plan[k] for k in ("decode_batch", "prefill_batch", "static_shapes", "cuda_graphs")},
        }
        prefix = "" if kind == "static" else f"{kind}_"
        row[f"{prefix}speedup_vs_baseline"] = row[kind]["tiles_per_s"] / row["baseline"]["tiles_per_s"]
        row[f"{prefix}cpu_speedup_vs_baseline"] = statistics.median(cpus["baseline"]) / statistics.median(cpus[kind])
    for kind, seconds in warmup_s.items():  # a whole first call, captures included
        steps_runner = engines[kind]._steps
        row[kind]["warmup_s"] = seconds
        row[kind]["captured_graphs"] = steps_runner.captures if steps_runner is not None else 0
    make_room("baseline")  # the next batch starts with the baseline
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="tiny,small", help="presets (tiny, small, paper) or saved folders"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    parser.add_argument("--batches", default="8,32", help="tiles per generate call")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip batches that would not fit")
    parser.add_argument(
        "--static-shapes", action="store_true",
        help="also time the static decoder at fixed shapes (padded rows and keys, kept cache; no graphs)",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true",
        help="also time the static decoder with its decode steps replayed as CUDA graphs (GPU only)",
    )
    parser.add_argument(
        "--init-std", type=float, default=None,
        help="LLM weight std of presets (default the preset's 0.02; larger gives decisive logits, see README)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs --device cuda")

    device = torch.device(args.device)
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {device}, {dtype}, "
        f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    if device.type == "cuda":
        log(f"GPU {torch.cuda.get_device_name(device)}")
    probes = {"flops": matmul_probe(device, dtype, 8192 if device.type == "cuda" else 1024)}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    errors: list[str] = []
    stop = False
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if stop:
            break
        log(f"building {name}")
        model, processor = load(name, device, dtype, args.seed, args.init_std)
        engines = {
            kind: InferenceEngine(model, processor, dtype=dtype, device=device, decoding=kind)
            for kind in ("baseline", "static")
        }
        if args.static_shapes:
            engines["shapes"] = InferenceEngine(model, processor, dtype=dtype, device=device, static_shapes=True)
        if args.cuda_graphs:
            engines["graphs"] = InferenceEngine(model, processor, dtype=dtype, device=device, cuda_graphs=True)
        costs = decoder_costs(model)
        kv_bytes_per_token = int(engines["static"].batch_plan["kv_bytes_per_token"])
        # at least 64 MiB (past the CPU caches) and at most 2 GiB: enough to see the memory's bandwidth
        probes["bandwidth"] = weights_read_probe(
            device, dtype, min(max(costs["weights_bytes"], 64 * 2**20), 2 * 2**30)
        )
        last_s, last_tiles = 0.0, 1
        for tiles in [int(b) for b in args.batches.split(",") if b.strip()]:
            elapsed = time.perf_counter() - START
            # a batch costs about its tiles' share of the last one's time (plus a margin)
            if rows and elapsed + 1.2 * last_s * tiles / last_tiles > args.budget_s:
                skipped.append(f"{name} x{tiles}")
                log(f"skipping {name} batch {tiles}: {elapsed:.0f}s spent of {args.budget_s:.0f}s")
                continue
            log(f"{name}: {tiles} tiles")
            t0 = time.perf_counter()
            row = None
            for _attempt in range(2):  # a failing graphs decoder is dropped and the batch timed again without it
                retry = False
                try:
                    row = run_batch(name, engines, tiles, args, probes, costs, kv_bytes_per_token)
                except GraphsFailed as exc:  # only the graphs decoder's own failure: the others' figures still count
                    errors.append(f"{name} x{tiles}: cuda graphs: {exc}")
                    log(f"CUDA graphs failed, timing without them: {errors[-1]}")
                    retry = True
                except Exception as exc:  # report what was measured before the failure, then the failure
                    errors.append(f"{name} x{tiles}: {type(exc).__name__}: {exc}")
                    log(f"stopping: {errors[-1]}")
                    stop = True
                if not retry:
                    break
                # outside the except block: the failure's traceback no longer holds its tensors (PyTorch FAQ)
                engines.pop("graphs", None)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if stop or row is None:
                break
            last_s, last_tiles = time.perf_counter() - t0, tiles
            rows.append(row)
            log(f"  speedup {row['speedup_vs_baseline']:.2f}, identical {row['identical_greedy']}" + "".join(
                f"; {k} {row[k + '_speedup_vs_baseline']:.2f}, identical {row[k + '_identical_greedy']}"
                for k in row["engines"][2:]
            ))  # fmt: skip
        del engines, model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\nengine roofline: {device}{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{dtype}, {torch.get_num_threads()} threads; {args.new_tokens} new tokens, caption + detect per tile; "
          f"matmul probe {probes['flops'] / 1e9:.1f} GFLOP/s, weights-read probe {probes['bandwidth'] / 1e9:.1f} GB/s")  # fmt: skip
    header = (f"{'model':<22} {'tiles':>5} {'engine':<8} {'tiles/s':>8} {'prefill tok/s':>13} {'prefill eff':>11} "
              f"{'decode step/s':>13} {'decode eff':>10} {'speedup':>7} {'cpu x':>5} {'same':>5}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for row in rows:
        for kind in row["engines"]:
            r = row[kind]
            prefix = "" if kind == "static" else f"{kind}_"
            extra = (
                f"{row[prefix + 'speedup_vs_baseline']:7.2f} {row[prefix + 'cpu_speedup_vs_baseline']:5.2f} "
                f"{str(row[prefix + 'identical_greedy']):>5}"
                if kind != "baseline"
                else ""
            )
            print(f"{Path(row['model']).name:<22} {row['tiles']:>5} {kind:<8} {r['tiles_per_s']:8.2f} "
                  f"{r['prefill_tokens_per_s']:13.0f} {r['prefill_efficiency']:11.4f} {r['decode_steps_per_s']:13.1f} "
                  f"{r['decode_efficiency']:10.4f} {extra}")  # fmt: skip
    for row in rows:  # where answers differ: near-ties of rounding, or a decoder computing something else
        for kind in row["engines"][1:]:
            prefix = "" if kind == "static" else f"{kind}_"
            if row[prefix + "identical_greedy"]:
                continue
            gaps = row[prefix + "tie_gaps"]
            print(f"{Path(row['model']).name} x{row['tiles']} {kind}: {len(row[prefix + 'first_difference'])} of "
                  f"{row['prompts']} answers differ (agreement {row[prefix + 'token_agreement']:.3f}); baseline's "
                  f"gap between the two tokens at the first difference: max {max(gaps):.4f} nats over {len(gaps)}, "
                  f"its rounding noise {row[prefix + 'rounding_noise']:.4f} (the decoders drift "
                  f"{row[prefix + 'logprob_drift']:.4f} apart): "
                  + ("near-ties of rounding" if row[prefix + "same_up_to_ties"] else "NOT near-ties"))  # fmt: skip
    for item in skipped:
        print(f"{item}: skipped (time budget)")
    for item in errors:
        print(item)
    last = rows[-1] if rows else None
    # the headline: the last row's fastest new decoder that kept the baseline's answers, token for token or up to
    # rounding near-ties (bfloat16 rarely keeps every token); static if none did
    best = "static"
    for kind in last["engines"][2:] if last else []:
        if last[f"{kind}_same_up_to_ties"] and last[kind]["tiles_per_s"] > last[best]["tiles_per_s"]:
            best = kind
    prefix = "" if best == "static" else f"{best}_"
    summary = {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "matmul_flops": probes["flops"],
        "weights_read_bytes_per_s": probes.get("bandwidth"),
        "engine": best,
        "prefill_efficiency": last[best]["prefill_efficiency"] if last else None,
        "decode_efficiency": last[best]["decode_efficiency"] if last else None,
        "tiles_per_s": last[best]["tiles_per_s"] if last else None,
        "speedup_vs_baseline": last[prefix + "speedup_vs_baseline"] if last else None,
        "min_speedup_vs_baseline": min((r["speedup_vs_baseline"] for r in rows), default=None),
        "min_cpu_speedup_vs_baseline": min((r["cpu_speedup_vs_baseline"] for r in rows), default=None),
        "identical_greedy": bool(rows) and all(r["identical_greedy"] for r in rows),
        "same_up_to_ties": bool(rows) and all(r["same_up_to_ties"] for r in rows),
        **{
            f"{kind}_{key}": all(r.get(f"{kind}_{key}", False) for r in rows)  # False where the decoder was dropped
            for kind in dict.fromkeys(k for r in rows for k in r["engines"][2:])
            for key in ("identical_greedy", "same_up_to_ties")
        },
        "skipped": skipped,
        "errors": errors,
        "rows": rows,
        "total_s": time.perf_counter() - START,
    }
    print(json.dumps(summary))
    return 1 if stop else 0  # a batch that failed (listed in "errors") fails the command, after the figures


if __name__ == "__main__":
    raise SystemExit(main())
