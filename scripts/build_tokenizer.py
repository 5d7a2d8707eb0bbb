"""Builds the small byte-level BPE tokenizer of the tiny/small EarthGPT presets into ``earthgpt/tokenizer/``.

The paper preset uses the LLaMA-2 tokenizer from the LLM folder; small presets need something small that still covers
every prompt and answer the tasks produce, so this trains a 1024-token byte-level BPE with the ``tokenizers`` library
on a generated corpus: the conversation template, every task template for every sensor, answers for the toy-world and
scene-class vocabulary, every box coordinate ``0.00 .. 1.00`` (each becomes one token), counts, and common English
caption words. Bytes are the base alphabet, so any text (any caption, any language) encodes without unknown tokens.

Special tokens have fixed ids (``earthgpt.presets`` relies on them; a test checks): ``<unk>`` 0, ``<s>`` 1,
``</s>`` 2, ``<pad>`` 3, ``<image>`` 4, ``<img>`` 5, ``</img>`` 6. ``<p>``, ``</p>`` and ``###`` are single
(non-special) tokens.

Deterministic: the same corpus and settings give the same files. Run from the repository root::

    .venv/bin/python scripts/build_tokenizer.py            # writes earthgpt/tokenizer/
    .venv/bin/python scripts/build_tokenizer.py --out DIR  # elsewhere (tests)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from earthgpt import conversation, tasks  # noqa: E402
from earthgpt.boxes import Box  # noqa: E402

VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<img>", "</img>"]
PLAIN_ADDED_TOKENS = ["<p>", "</p>", conversation.SEP]

OBJECT_LABELS = [
    "ship", "building", "airplane", "vehicle", "storage tank",
    "harbor", "bridge", "large vehicle", "small vehicle", "helicopter", "roundabout", "swimming pool",
    "tennis court", "baseball field", "basketball court", "ground track field", "soccer ball field",
    "chimney", "dam", "windmill", "overpass", "stadium", "train station", "airport", "golf field",
    "expressway service area", "expressway toll station", "container crane", "plane", "car", "boat", "person",
]  # fmt: skip
SCENE_CLASSES = [
    "harbor", "airport", "residential", "open sea", "farmland", "industrial", "forest", "river", "lake", "beach",
    "desert", "meadow", "mountain", "parking lot", "bridge", "dense residential", "medium residential",
    "sparse residential", "commercial area", "industrial area", "circular farmland", "rectangular farmland",
    "church", "cloud", "freeway", "golf course", "intersection", "island", "mobile home park", "palace",
    "railway", "railway station", "runway", "sea ice", "snowberg", "terrace", "thermal power station", "wetland",
    "chaparral", "baseball diamond", "storage tanks", "coastline", "port", "urban", "rural", "ocean", "water",
]  # fmt: skip
CAPTION_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "with",
    "and",
    "or",
    "to",
    "from",
    "by",
    "near",
    "next",
    "beside",
    "around",
    "along",
    "between",
    "across",
    "above",
    "below",
    "there",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "has",
    "have",
    "many",
    "some",
    "several",
    "few",
    "two",
    "three",
    "four",
    "five",
    "lots",
    "large",
    "small",
    "big",
    "long",
    "short",
    "wide",
    "narrow",
    "tall",
    "low",
    "high",
    "dark",
    "bright",
    "white",
    "black",
    "green",
    "gray",
    "grey",
    "blue",
    "red",
    "brown",
    "yellow",
    "dense",
    "sparse",
    "densely",
    "sparsely",
    "neatly",
    "arranged",
    "parked",
    "lined",
    "located",
    "surrounded",
    "built",
    "covered",
    "distributed",
    "scattered",
    "crossing",
    "running",
    "passing",
    "lying",
    "standing",
    "moored",
    "docked",
    "berthed",
    "sailing",
    "flying",
    "building",
    "buildings",
    "house",
    "houses",
    "road",
    "roads",
    "street",
    "streets",
    "tree",
    "trees",
    "grass",
    "lawn",
    "field",
    "fields",
    "car",
    "cars",
    "vehicle",
    "vehicles",
    "ship",
    "ships",
    "boat",
    "boats",
    "plane",
    "planes",
    "airplane",
    "airplanes",
    "tank",
    "tanks",
    "runway",
    "apron",
    "terminal",
    "water",
    "sea",
    "ocean",
    "river",
    "lake",
    "pond",
    "shore",
    "coast",
    "bank",
    "sand",
    "soil",
    "crop",
    "crops",
    "land",
    "area",
    "areas",
    "region",
    "part",
    "side",
    "center",
    "middle",
    "corner",
    "top",
    "bottom",
    "left",
    "right",
    "image",
    "picture",
    "scene",
    "view",
    "this",
    "that",
    "these",
    "those",
    "it",
    "its",
    "other",
    "another",
    "each",
    "every",
    "all",
    "no",
    "not",
    "only",
    "also",
    "very",
    "quite",
    "rather",
    "some",
    "one",
    "object",
    "objects",
    "target",
    "targets",
    "square",
    "round",
    "rectangular",
    "circular",
    "straight",
    "curved",
    "parallel",
    "regular",
    "irregular",
    "playground",
    "court",
    "courts",
    "track",
    "stadium",
    "bridge",
    "bridges",
    "port",
    "harbor",
    "dock",
    "pier",
    "wharf",
    "factory",
    "factories",
    "residential",
    "industrial",
    "commercial",
    "urban",
    "rural",
    "farmland",
    "forest",
    "desert",
    "mountain",
    "hill",
    "hills",
    "what",
    "how",
    "where",
    "which",
    "who",
    "why",
    "when",
    "can",
    "does",
    "do",
    "yes",
    "no",
    "answer",
    "question",
    "number",
    "count",
    "category",
    "class",
    "describe",
    "detect",
    "output",
    "give",
    "show",
    "find",
    "locate",
    "bounding",
    "box",
    "boxes",
    "region",
    "object",
    "following",
    "sar",
    "infrared",
    "optical",
    "thermal",
    "remote",
    "sensing",
    "radar",
    "backscatter",
    "speckle",
]
ENGLISH_SENTENCES = [
    "Many buildings and green trees are around a playground.",
    "Several ships are docked at the harbor next to the pier.",
    "Some cars are parked in the parking lot near the road.",
    "A river runs through the farmland with some houses on its bank.",
    "Two airplanes are parked on the apron of the airport beside the terminal.",
    "The dense residential area is surrounded by roads and trees.",
    "A bright ship is sailing on the dark sea.",
    "There are no objects in this image.",
    "Large storage tanks are arranged neatly in the industrial area.",
    "The quick brown fox jumps over the lazy dog.",
]


def _numbers() -> Iterator[str]:
    for k in range(101):
        yield f"{k / 100:.2f}"


def corpus(seed: int = 0) -> Iterator[str]:
    """The generated training text, deterministic for a seed."""
    rng = random.Random(seed)
    sensors = list(tasks.SENSORS)
    labels = sorted({tasks.singular(x) for x in OBJECT_LABELS})
    yield conversation.SYSTEM
    for _ in range(40):
        yield conversation.render_prompt("What is the category of this image?") + conversation.render_answer(
            "harbor"
        )
    for sensor in sensors:
        for task in tasks.TASKS:
            for _ in range(20):
                kw: dict = {}
                if task == "vqa":
                    kw["question"] = rng.choice(
                        ["How many ships are there?", "Is there a harbor?", "What is it?"]
                    )
                elif task == "ground":
                    kw["description"] = (
                        f"the {rng.choice(labels)} on the {rng.choice(['left', 'right', 'top'])}"
                    )
                elif task == "region_caption":
                    kw["box"] = (
                        rng.randint(0, 20),
                        rng.randint(0, 20),
                        rng.randint(30, 60),
                        rng.randint(30, 60),
                    )
                    kw["image_hw"] = (64, 64)
                elif task == "classify" and rng.random() < 0.5:
                    kw["choices"] = rng.sample(SCENE_CLASSES, 5)
                elif task == "detect" and rng.random() < 0.5:
                    kw["labels"] = rng.sample(labels, rng.randint(1, 3))
                yield conversation.render_prompt(tasks.build_prompt(task, sensor, **kw))
    for label in OBJECT_LABELS:
        for n in range(12):
            yield tasks.count_phrase(n, label)
            yield f"There are {tasks.count_phrase(n, label)}."
    for scene in SCENE_CLASSES:
        for _ in range(6):
            yield conversation.render_answer(scene)
    # detection answers: every coordinate value many times, in the exact answer syntax
    for _ in range(1500):
        h, w = rng.choice([(64, 64), (64, 96), (96, 64), (512, 512), (800, 600)])
        boxes = []
        for _ in range(rng.randint(0, 4)):
            x1, y1 = rng.uniform(0, w - 2), rng.uniform(0, h - 2)
            boxes.append(Box(rng.choice(labels[:5]), x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)))
        yield conversation.render_answer(tasks.format_answer("detect", boxes, (h, w)))
    for _ in range(30):
        yield "[" + ",".join(_numbers()) + "]"
    for n in range(200):
        yield f"{n} {n}, {n}."
    for sentence in ENGLISH_SENTENCES:
        for _ in range(8):
            yield conversation.render_answer(sentence)
    for _ in range(600):
        sentence = " ".join(rng.choice(CAPTION_WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
        yield conversation.render_answer(sentence)


def build(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Trains the tokenizer on :func:`corpus`."""
    tok = Tokenizer(models.BPE(unk_token=None))
    # numbers like "0.12" stay one pre-token (one token once merged); a single leading space sticks to the next word
    split = pre_tokenizers.Split(
        Regex(r" ?\d\.\d+| ?\d+| ?[A-Za-z]+| ?[^\sA-Za-z\d]|\s+(?!\S)|\s+"), behavior="isolated"
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(PLAIN_ADDED_TOKENS),
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_ADDED_TOKENS])
    return tok


def check(tok: Tokenizer) -> None:
    """Fails loudly if the tokenizer breaks an assumption the presets and tasks rely on."""
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    for value in _numbers():
        assert len(tok.encode(value).ids) == 1, value
    for t in PLAIN_ADDED_TOKENS:
        assert len(tok.encode(t).ids) == 1, t
    for text in [
        "Ünïcode façade — 東京 ☃",
        conversation.SYSTEM,
        "There are <p>3 ships</p>[0.12,0.40,0.18,0.47]",
    ]:
        assert tok.decode(tok.encode(text).ids) == text, text


def save(tok: Tokenizer, out: Path) -> None:
    """Writes ``tokenizer.json`` + the transformers side files, loadable with ``AutoTokenizer.from_pretrained``."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "<img>", "</img>"],
        padding_side="left",
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    # name the portable class: transformers 4.x has no "TokenizersBackend", 5.x maps this name to it
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "earthgpt" / "tokenizer")
    args = parser.parse_args(argv)
    tok = build()
    check(tok)
    save(tok, args.out)
    print(f"wrote {args.out} ({tok.get_vocab_size()} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
