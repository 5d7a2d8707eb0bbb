"""Training config schema, LR schedule, DeepSpeed config and the record mixture (no Ray, no model)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipelines.train import _ReadPart, deepspeed_config, lr_factor, source_sizes
from pipelines.train_config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs" / "train").glob("*.yaml"))


def _minimal(**over: object) -> dict:
    cfg: dict = {
        "run": {"name": "t", "storage": "/tmp/x"},
        "data": {"train": [{"path": "a.json"}]},
        "schedule": {"max_steps": 10},
        "optim": {"warmup_steps": 2},
    }
    for dotted, value in over.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return cfg


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.schedule.max_steps > 0 and cfg.data.train
    # relative paths are resolved against the YAML's folder
    for src in cfg.data.train:
        assert "://" in src.path or Path(src.path).is_absolute()


def test_shipped_configs_exist() -> None:
    assert {p.name for p in SHIPPED} >= {
        "toyworld-small.yaml",
        "toyworld-tiny-zero3.yaml",
        "mmrs-paper-stage3.yaml",
    }


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"optim__lr": -1}, "optim.lr"),
        ({"deepspeed__zero_stage": 4}, "deepspeed.zero_stage"),
        ({"model__stage": 5}, "model.stage"),
        ({"model__preset": "huge"}, "model.preset"),
        ({"schedule__max_steps": 0}, "schedule.max_steps"),
        ({"data__train": []}, "data.train"),
        ({"data__train": [{"path": "a.json", "weight": -0.5}]}, "data.train.0.weight"),
        ({"data__train": [{"path": "a.json", "task": "segment"}]}, "data.train.0.task"),
        ({"run__name": "bad name/"}, "run.name"),
        ({"schedule__micro_batch_sizes": 4}, "schedule.micro_batch_sizes"),  # typo: unknown key
        ({"deepspeed__offload_params": True}, "deepspeed"),  # needs ZeRO-3
    ],
)
def test_bad_config_is_refused_naming_the_field(over: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(**over))
    assert field in str(info.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        parse_config(_minimal(optim__warmup_steps=10))
    with pytest.raises(ConfigError, match="generate_records"):
        parse_config(_minimal(deepspeed__zero_stage=3, data__generate_records=8))


def test_load_config_overrides_and_refuses_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal()))
    cfg = load_config(path, {"schedule.max_steps": 20, "scaling.num_workers": 1})
    assert cfg.schedule.max_steps == 20 and cfg.scaling.num_workers == 1
    assert cfg.data.train[0].path == str(tmp_path / "a.json")
    assert cfg.global_batch_size == cfg.schedule.micro_batch_size
    path.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)


def test_cli_refuses_bad_config_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.train import cli

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_minimal(optim__lr=0)))
    assert cli([str(path)]) == 2
    assert "optim.lr" in capsys.readouterr().err
    # a valid config whose data file is missing is refused before Ray starts, naming the source
    path.write_text(yaml.safe_dump(_minimal()))
    assert cli([str(path)]) == 2
    assert "data source 0" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine() -> None:
    f = [lr_factor(s, warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(20)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f[4] == pytest.approx(1.0)
    assert f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[14] == pytest.approx(0.1) and f[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))


def test_deepspeed_config_follows_the_training_config() -> None:
    cfg = parse_config(_minimal(deepspeed__zero_stage=3, deepspeed__offload_optimizer=True, scaling__num_workers=2,
                                schedule__micro_batch_size=4, schedule__grad_accum_steps=3))  # fmt: skip
    ds = deepspeed_config(cfg, bf16=False)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is False and "optimizer" not in ds  # torch AdamW handed in: no JIT-built op
    ds = deepspeed_config(parse_config(_minimal(optim__optimizer="deepspeed_adamw")), bf16=True)
    assert ds["optimizer"]["type"] == "AdamW" and ds["bf16"]["enabled"] is True


def _source(tmp_path: Path, name: str, n: int) -> str:
    path = tmp_path / name
    path.write_text(
        json.dumps([{"id": f"{name}-{i}", "image": "x.png", "conversations": []} for i in range(n)])
    )
    return str(path)


def test_mixture_follows_weights_and_reshuffles_each_pass(tmp_path: Path) -> None:
    paths = (_source(tmp_path, "a.json", 600), _source(tmp_path, "b.json", 600))
    reader = _ReadPart(paths, (1.0, 0.25), seed=3)
    rows_pass0 = [r for part in range(3) for r in reader({"source": 0, "pass": 0, "part": part, "parts": 3})]
    assert sorted(json.loads(r["raw"])["id"] for r in rows_pass0) == sorted(f"a.json-{i}" for i in range(600))
    rows_pass1 = [r for r in reader({"source": 0, "pass": 1, "part": 0, "parts": 3})]
    assert [r["index"] for r in rows_pass1] != [r["index"] for r in rows_pass0[:200]]
    b = [r for part in range(3) for r in reader({"source": 1, "pass": 0, "part": part, "parts": 3})]
    assert 110 <= len(b) <= 190  # 0.25 x 600 = 150 expected
    twice = _ReadPart(paths, (2.0, 1.0), seed=3)
    counts = Counter(r["index"] for r in twice({"source": 0, "pass": 0, "part": 0, "parts": 1}))
    assert set(counts.values()) == {2} and len(counts) == 600


def test_source_sizes_names_unreadable_source(tmp_path: Path) -> None:
    cfg = parse_config(
        _minimal(data__train=[{"path": _source(tmp_path, "a.json", 5)}, {"path": str(tmp_path / "no")}])
    )
    with pytest.raises(ConfigError, match="data source 1"):
        source_sizes(cfg.data.train)
