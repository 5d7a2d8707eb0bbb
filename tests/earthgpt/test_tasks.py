"""Task templates and answer parsers: round trips (hypothesis), garbage, and the MMRS-1M answer syntax."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from earthgpt import tasks
from earthgpt.boxes import Box, PadInfo
from earthgpt.tasks import build_prompt, format_answer, parse_answer

LABELS = ["ship", "building", "airplane", "vehicle", "storage tank"]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def grid_boxes(draw: st.DrawFn) -> tuple[tuple[int, int], list[Box]]:
    """A non-square tile and boxes whose padded-normalised corners are multiples of 0.01 (exactly representable)."""
    h = draw(st.integers(8, 900))
    w = draw(st.integers(8, 900))
    pad = PadInfo.for_shape(h, w)
    boxes = []
    for _ in range(draw(st.integers(0, 6))):
        # choose hundredths inside the image part of the square, then map to pixels
        lo_x, hi_x = math.ceil(100 * pad.left / pad.side), math.floor(100 * (pad.left + w) / pad.side)
        lo_y, hi_y = math.ceil(100 * pad.top / pad.side), math.floor(100 * (pad.top + h) / pad.side)
        if hi_x - lo_x < 1 or hi_y - lo_y < 1:
            continue
        kx1 = draw(st.integers(lo_x, hi_x - 1))
        kx2 = draw(st.integers(kx1 + 1, hi_x))
        ky1 = draw(st.integers(lo_y, hi_y - 1))
        ky2 = draw(st.integers(ky1 + 1, hi_y))
        s = pad.side
        boxes.append(
            Box(draw(st.sampled_from(LABELS)), kx1 * s / 100 - pad.left, ky1 * s / 100 - pad.top,
                kx2 * s / 100 - pad.left, ky2 * s / 100 - pad.top)
        )  # fmt: skip
    return (h, w), boxes


def _key(b: Box) -> tuple:
    return (b.label, round(b.x1, 6), round(b.y1, 6), round(b.x2, 6), round(b.y2, 6))


@FAST
@given(grid_boxes())
def test_detection_round_trip_is_exact_on_the_two_decimal_grid(
    case: tuple[tuple[int, int], list[Box]],
) -> None:
    hw, boxes = case
    text = format_answer("detect", boxes, hw)
    parsed = parse_answer("detect", text, hw)
    assert parsed.n_malformed == 0
    assert sorted(map(_key, parsed.boxes)) == sorted(map(_key, boxes))
    expected_counts: dict[str, int] = {}
    for b in boxes:
        expected_counts[b.label] = expected_counts.get(b.label, 0) + 1
    assert parsed.counts == expected_counts


@FAST
@given(
    st.integers(4, 1200),
    st.integers(4, 1200),
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)), max_size=5),
)
def test_detection_round_trip_within_rounding_on_any_box(h: int, w: int, fractions: list) -> None:
    boxes = []
    for a, b, c, d in fractions:
        x1, x2 = sorted((a * w, c * w))
        y1, y2 = sorted((b * h, d * h))
        boxes.append(Box("ship", x1, y1, x2, y2))
    text = format_answer("detect", boxes, (h, w))
    parsed = parse_answer("detect", text, (h, w))
    side = max(h, w)
    # each written coordinate is rounded to 0.01 of the side; degenerate boxes (collapsed by rounding) are dropped
    assert len(parsed.boxes) + parsed.n_malformed == len(boxes)
    for p in parsed.boxes:
        assert 0 <= p.x1 < p.x2 <= w and 0 <= p.y1 < p.y2 <= h
        assert any(
            all(abs(u - v) <= 0.005 * side + 1e-6 for u, v in zip(p.as_tuple(), b.as_tuple(), strict=True))
            for b in boxes
        )
    # formatting what was parsed gives back the same text (a fixed point)
    if parsed.n_malformed == 0:
        assert format_answer("detect", parsed.boxes, (h, w)) == text


@FAST
@given(grid_boxes())
def test_grounding_round_trip(case: tuple[tuple[int, int], list[Box]]) -> None:
    hw, boxes = case
    for box in boxes:
        unlabeled = Box("", *box.as_tuple())
        parsed = parse_answer("ground", format_answer("ground", unlabeled, hw), hw)
        assert parsed.n_malformed == 0
        assert [_key(b) for b in parsed.boxes] == [_key(unlabeled)]


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300), st.sampled_from(tasks.TASKS), st.integers(1, 999), st.integers(1, 999))
def test_parsers_never_raise_on_garbage(text: str, task: str, h: int, w: int) -> None:
    parsed = parse_answer(task, text, (h, w))
    assert parsed.task == task
    assert parsed.n_malformed >= 0
    for b in parsed.boxes:
        assert 0 <= b.x1 < b.x2 <= w and 0 <= b.y1 < b.y2 <= h


ANSWER_ALPHABET = st.sampled_from(
    list("<p>/[],;.0123456789 shipsThereare1") + ["<p>", "</p>", "0.5", "1", "###"]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(ANSWER_ALPHABET, max_size=60).map("".join), st.integers(1, 999), st.integers(1, 999))
def test_parsers_never_raise_on_near_miss_syntax(text: str, h: int, w: int) -> None:
    for task in ("detect", "ground"):
        parsed = parse_answer(task, text, (h, w))
        for b in parsed.boxes:
            assert 0 <= b.x1 < b.x2 <= w and 0 <= b.y1 < b.y2 <= h


def test_detection_answer_syntax_matches_mmrs() -> None:
    boxes = [Box("ship", 40, 40, 50, 50), Box("ship", 10, 60, 20, 70), Box("ship", 5, 40, 9, 45)]
    text = format_answer("detect", boxes, (100, 100))
    # sorted by y1 then x1
    assert text == "There are <p>3 ships</p>[0.05,0.40,0.09,0.45;0.40,0.40,0.50,0.50;0.10,0.60,0.20,0.70]"
    one = format_answer("detect", [("storage tank", 0, 0, 50, 25)], (50, 100))
    # 50x100 tile: padded side 100, 25 rows of padding on top
    assert one == "There is <p>1 storage tank</p>[0.00,0.25,0.50,0.50]"
    several = format_answer("detect", [Box("ship", 0, 0, 10, 10), Box("airplane", 0, 0, 10, 10)], (10, 10))
    assert several == "There is <p>1 airplane</p>[0.00,0.00,1.00,1.00] and <p>1 ship</p>[0.00,0.00,1.00,1.00]"
    assert format_answer("detect", [], (10, 10)) == tasks.NO_OBJECTS
    assert parse_answer("detect", tasks.NO_OBJECTS, (10, 10)).boxes == []


def test_parser_inverts_padding_of_a_wide_tile() -> None:
    # 50 x 100 (h x w): side 100, top padding 25 -> y = v * 100 - 25
    parsed = parse_answer("detect", "There are <p>2 ships</p>[0,0.25,0.5,0.5;0.1,0.3,1,1]", (50, 100))
    assert [b.as_tuple() for b in parsed.boxes] == [(0.0, 0.0, 50.0, 25.0), (10.0, 5.0, 100.0, 50.0)]
    assert parsed.counts == {"ship": 2} and parsed.n_malformed == 0


def test_parser_clamps_drops_and_counts_malformed() -> None:
    text = (
        "There are <p>4 ships</p>[0.1,0.1,1.7,0.3;0.2,0.2;0.5,0.5,0.4,0.6;a,b,c,d] and <p>2 airplanes</p>"
        "[0.1,0.1,0.2,0.2;0.3,0.3,0.4"
    )
    parsed = parse_answer("detect", text, (100, 100))
    assert [(b.label, b.as_tuple()) for b in parsed.boxes] == [
        ("ship", (10.0, 10.0, 100.0, 30.0)),  # 1.7 clamped to 1
        ("airplane", (10.0, 10.0, 20.0, 20.0)),
    ]
    # 3 bad ship boxes (3 numbers, x2 < x1, letters) + the unfinished airplane box
    assert parsed.n_malformed == 4
    assert parsed.counts == {"ship": 4, "airplane": 2}


def test_parser_ignores_text_after_separator() -> None:
    parsed = parse_answer(
        "detect", "There is <p>1 ship</p>[0.1,0.1,0.2,0.2]### Human: <p>1 ship</p>[0,0,1,1]", (10, 10)
    )
    assert len(parsed.boxes) == 1


def test_boxes_lying_in_the_padding_are_malformed() -> None:
    # tall tile 100 x 50: columns 0..0.25 of the square are padding
    parsed = parse_answer("detect", "There is <p>1 ship</p>[0.0,0.1,0.2,0.2]", (100, 50))
    assert parsed.boxes == [] and parsed.n_malformed == 1


def test_classify_and_text_tasks() -> None:
    assert parse_answer("classify", " Dense_Residential.###").label == "dense residential"
    snapped = parse_answer("classify", "it is a harbor I think", choices=["Airport", "Harbor"])
    assert snapped.label == "harbor"
    assert format_answer("caption", "  Many  ships\nin a harbor. ") == "Many ships in a harbor."
    assert parse_answer("caption", "Many ships in a harbor.### Human:").text == "Many ships in a harbor."
    assert parse_answer("vqa", " yes").text == "yes"


@pytest.mark.parametrize("sensor", tasks.SENSORS)
def test_prompts_for_every_task_and_sensor(sensor: str) -> None:
    noun = tasks.SENSOR_NOUNS[sensor]
    prompts = {
        "classify": build_prompt("classify", sensor),
        "caption": build_prompt("caption", sensor),
        "region_caption": build_prompt("region_caption", sensor, box=(0, 25, 50, 50), image_hw=(50, 100)),
        "vqa": build_prompt("vqa", sensor, question="How many ships are there?"),
        "ground": build_prompt("ground", sensor, description="the ship at the top"),
        "detect": build_prompt("detect", sensor, labels=["ship", "storage tank"]),
    }
    assert set(prompts) == set(tasks.TASKS)
    for task, text in prompts.items():
        if task != "vqa":
            assert noun in text, (task, text)
    assert "[0.00,0.50,0.50,0.75]" in prompts["region_caption"]
    assert "ships and storage tanks" in prompts["detect"]
    assert "Harbor, Airport" in build_prompt("classify", sensor, choices=["Harbor", "Airport"])


def test_prompt_errors() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("segment")
    with pytest.raises(ValueError, match="unknown sensor"):
        build_prompt("caption", "lidar")
    with pytest.raises(ValueError, match="question"):
        build_prompt("vqa")
    with pytest.raises(ValueError, match="image_hw"):
        format_answer("detect", [], None)


@pytest.mark.parametrize(
    ("one", "many"),
    [("ship", "ships"), ("airplane", "airplanes"), ("building", "buildings"), ("vehicle", "vehicles"),
     ("storage tank", "storage tanks"), ("overpass", "overpasses"), ("bus", "buses"), ("body", "bodies"),
     ("aircraft", "aircraft"), ("person", "people"), ("harbor", "harbors"), ("bridge", "bridges")],
)  # fmt: skip
def test_plural_and_singular(one: str, many: str) -> None:
    assert tasks.plural(one) == many
    assert tasks.singular(many) == one
    assert tasks.singular(one) == one
    assert tasks.count_phrase(1, one) == f"1 {one}"
    assert tasks.count_phrase(3, one) == f"3 {many}"
