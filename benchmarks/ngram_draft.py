"""How far n-gram drafts would carry speculative decoding on the engine's own greedy answers (offline, no new decoder).

Prompt-lookup speculative decoding proposes the next ``k`` tokens by finding the answer's last n-gram (n = 3, 2, 1)
earlier in the prompt or the answer, and checks them in one decoder pass; for greedy decoding the output is exact,
and a pass yields the accepted draft tokens plus one. This script answers the benchmark workload (``engine.py``:
caption + detect per tile, 64 new tokens) with the static engine, then replays every answer against the drafts and
counts the decoder passes such an engine would run: ``tokens_per_pass`` is the upper bound of its decode-step gain
(each pass costs at least one plain step).

    python benchmarks/ngram_draft.py --models tiny,small,models/earthgpt-toy --tiles 8

Prints a table and one JSON line (``tokens_per_pass`` per model and draft length).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from engine import load, workload  # noqa: E402

from earthgpt.engine import InferenceEngine  # noqa: E402


def draft(context: list[int], k: int, max_n: int = 3) -> list[int]:
    """Up to ``k`` tokens following the earliest earlier occurrence of the context's last n-gram (longest n first)."""
    for n in range(min(max_n, len(context) - 1), 0, -1):
        tail = context[-n:]
        for s in range(len(context) - n):
            if context[s : s + n] == tail:
                return context[s + n : s + n + k]
    return []


def passes(prompt: list[int], answer: list[int], k: int) -> int:
    """Decoder passes to produce ``answer`` when each pass checks a ``k``-token draft."""
    i = count = 0
    while i < len(answer):
        proposal = draft(prompt + answer[:i], k)
        accepted = 0
        while (
            accepted < len(proposal)
            and i + accepted < len(answer)
            and proposal[accepted] == answer[i + accepted]
        ):
            accepted += 1
        i += accepted + 1
        count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small,models/earthgpt-toy")
    ap.add_argument("--tiles", type=int, default=8)
    ap.add_argument("--drafts", default="2,4,8", help="draft lengths k")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cpu")
    drafts = [int(k) for k in args.drafts.split(",")]
    results: dict[str, Any] = {}
    print(f"{'model':<22} {'k':>3} {'answers':>8} {'tokens':>7} {'passes':>7} {'tokens/pass':>12}")
    print("-" * 64)
    for name in args.models.split(","):
        model, processor = load(name, device, torch.float32, args.seed, None)
        engine = InferenceEngine(model, processor, dtype=torch.float32, device=device, decoding="static")
        images, prompts, index = workload(processor, args.tiles, args.seed)
        answers = engine.generate(images, prompts, max_new_tokens=args.new_tokens, image_index=index)
        encoded = [processor.encode_prompt(q) for q in prompts]
        tokens = sum(a.n_tokens for a in answers)
        label = Path(name).name
        results[label] = {"tokens": tokens, "distinct_answers": len({tuple(a.token_ids) for a in answers})}
        for k in drafts:
            n_pass = sum(passes(p, a.token_ids, k) for p, a in zip(encoded, answers, strict=True))
            results[label][f"tokens_per_pass_k{k}"] = round(tokens / max(n_pass, 1), 3)
            print(
                f"{label:<22} {k:>3} {len(answers):>8} {tokens:>7} {n_pass:>7} {tokens / max(n_pass, 1):>12.2f}"
            )
    print(json.dumps({"tiles": args.tiles, "new_tokens": args.new_tokens, "tokens_per_pass": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
