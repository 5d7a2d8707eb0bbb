"""Training config schema (through the shared job-config loader), LR schedule, DeepSpeed config and the record
stream: mixture, sharding between ranks, resume positions (no Ray, no model)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipelines.train_config import ConfigError, load_config, parse_config
from pipelines.training.records import (
    RecordStream,
    StreamPosition,
    pass_order,
    resume_position,
    source_sizes,
)
from pipelines.training.schedule import deepspeed_config, lr_factor

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
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump(_minimal()))
    with pytest.raises(ConfigError, match=r"^run\.name\.first: cannot set a key below"):
        load_config(path, {"run.name.first": 1})


def test_one_loader_one_error_format_for_both_jobs(tmp_path: Path) -> None:
    """The archive job's and the training job's configs are read and refused the same way."""
    from pipelines.archive.config import load_config as load_archive
    from pipelines.jobconfig import parse_overrides

    assert parse_overrides(["schedule.max_steps=20", "model.also_train=[a., b.]"]) == {
        "schedule.max_steps": 20, "model.also_train": ["a.", "b."]}  # fmt: skip
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["schedule.max_steps"])
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump(_minimal(optim__lr=-1, schedule__max_steps=0)))
    archive = tmp_path / "archive.yaml"
    archive.write_text(yaml.safe_dump({"catalog": {"url": "http://x", "collections": ["c"]},
                                       "tiling": {"size": 8}, "output": {"root": "out"}}))  # fmt: skip
    for load, path, fields in ((load_config, train, {"optim.lr", "schedule.max_steps"}),
                               (load_archive, archive, {"tiling.size"})):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            load(path)
        lines = str(info.value).splitlines()
        assert {line.split(": ", 1)[0] for line in lines} == fields, lines
    # cross-field checks blame a field too
    with pytest.raises(ConfigError) as info:
        parse_config(_minimal(optim__warmup_steps=10))
    assert str(info.value).startswith("optim.warmup_steps: 10 must be below schedule.max_steps")
    # relative paths: the training job's are relative to its YAML file, the archive job's stay as written
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(_minimal()))
    loaded = load_config(tmp_path / "t.yaml")
    assert loaded.data.train[0].path == str(tmp_path / "a.json")
    assert loaded.run.storage == "/tmp/x"


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


def test_mixture_follows_weights_and_reshuffles_each_pass() -> None:
    src0, idx0 = pass_order([600, 600], [1.0, 0.25], seed=3, pass_=0)
    assert sorted(idx0[src0 == 0].tolist()) == list(range(600))  # weight 1: every record once
    assert 110 <= int((src0 == 1).sum()) <= 190  # weight 0.25 of 600: 150 expected
    assert len(set(idx0[src0 == 1].tolist())) == int((src0 == 1).sum())
    # the sources interleave: both appear in the first hundred positions
    assert set(src0[:100].tolist()) == {0, 1}
    src1, idx1 = pass_order([600, 600], [1.0, 0.25], seed=3, pass_=1)
    assert idx1[src1 == 0].tolist() != idx0[src0 == 0].tolist()  # each pass shuffled anew
    twice_src, twice_idx = pass_order([600, 10], [2.0, 1.0], seed=3, pass_=0)
    counts = Counter(twice_idx[twice_src == 0].tolist())
    assert set(counts.values()) == {2} and len(counts) == 600
    # reproducible: a pass follows from (seed, pass) alone
    again = pass_order([600, 600], [1.0, 0.25], seed=3, pass_=0)
    assert again[0].tolist() == src0.tolist() and again[1].tolist() == idx0.tolist()


def _take(stream: RecordStream, n: int) -> list:
    return [row for _, row in zip(range(n), stream, strict=False)]


def test_ranks_share_no_record_and_a_resumed_stream_continues_exactly(tmp_path: Path) -> None:
    cfg = parse_config(_minimal(data__train=[{"path": _source(tmp_path, "a.json", 50)},
                                             {"path": _source(tmp_path, "b.json", 20), "weight": 0.5}]))  # fmt: skip
    sources = cfg.data.train
    ranks = [_take(RecordStream(sources, 7, r, 2, resume_position(None, r, 2)), 40) for r in range(2)]
    pass0 = [(row.source, row.index) for rows in ranks for row in rows if row.pass_ == 0]
    assert len(pass0) == len(set(pass0))  # no record twice within a pass, over both ranks
    assert {row.position % 2 for row in ranks[1]} == {1}
    # "checkpoint" after 13 rows on rank 0 and 17 on rank 1, then resume: each rank continues where it stopped
    saved = {"world": 2, "positions": [list(ranks[0][12].after), list(ranks[1][16].after)]}
    resumed = [_take(RecordStream(sources, 7, r, 2, resume_position(saved, r, 2)), 10) for r in range(2)]
    assert [row.position for row in resumed[0]] == [row.position for row in ranks[0][13:23]]
    assert [row.position for row in resumed[1]] == [row.position for row in ranks[1][17:27]]
    # one pass is 50 + ~10 records: rank streams run on into pass 1 with a new order
    long = _take(RecordStream(sources, 7, 0, 2, StreamPosition(0, 0)), 40)
    assert {row.pass_ for row in long} == {0, 1}
    # another number of ranks: all start at the slowest position of the earliest pass; nothing before it is lost
    three = [resume_position(saved, r, 3) for r in range(3)]
    slowest = min(ranks[0][12].after.next, ranks[1][16].after.next)
    assert three == [StreamPosition(0, slowest + r) for r in range(3)]
    consumed = {row.position for rows, n in ((ranks[0], 13), (ranks[1], 17)) for row in rows[:n]}
    assert set(range(slowest)) <= consumed


def test_source_sizes_names_unreadable_source(tmp_path: Path) -> None:
    cfg = parse_config(
        _minimal(data__train=[{"path": _source(tmp_path, "a.json", 5)}, {"path": str(tmp_path / "no")}])
    )
    with pytest.raises(ConfigError, match=r"data\.train\.1\.path: data source 1"):
        source_sizes(cfg.data.train)


def test_ray_is_joined_with_an_address_only_or_started_locally_with_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `ray job submit` (RAY_ADDRESS set) sizing arguments would be refused by Ray; without an address the job
    starts its own local instance and never attaches to one started with `ray start` on the same machine."""
    import ray

    from pipelines.training import job

    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the session's test Ray may be up already
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    job._start_ray()
    monkeypatch.delenv("RAY_ADDRESS")
    job._start_ray()
    joined, local = calls
    assert joined["address"] == "http://127.0.0.1:8265"
    assert not {"num_cpus", "object_store_memory", "include_dashboard", "_system_config"} & set(joined)
    assert local["address"] == "local" and local["num_cpus"] >= 2 and local["include_dashboard"] is False
