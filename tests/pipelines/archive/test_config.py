"""The job config: every shipped YAML parses; invalid configs are refused before any work, naming the field."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.archive.config import ConfigError, InferConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[3]
SHIPPED = sorted((REPO / "configs" / "infer").glob("*.yaml"))

MINIMAL = {"catalog": {"url": "http://127.0.0.1:9/", "collections": ["toyworld-optical"]},
           "output": {"root": "/tmp/out"}}


def _with(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_parses(path):
    config = load_config(path)
    assert isinstance(config, InferConfig)
    assert config.output_key() == load_config(path).output_key()


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "s3-pgstac.yaml"}


def test_minimal_config_defaults():
    config = parse_config(MINIMAL)
    assert config.catalog.url == "http://127.0.0.1:9"
    assert config.tasks == ["caption", "detect"] and config.tiling.size == 448 and config.model.engine == "plain"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"catalog__bbox": [10, 50, 11]}, "catalog.bbox"),
        ({"catalog__bbox": [10, 50, 11, 40]}, "catalog.bbox"),
        ({"catalog__datetime": "last tuesday"}, "catalog.datetime"),
        ({"catalog__url": "ftp://x"}, "catalog.url"),
        ({"catalog__collections": []}, "catalog.collections"),
        ({"catalog__intersects": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 1], [1, 0], [0, 0]]]}},
         "catalog.intersects"),
        ({"catalog__bogus": 1}, "catalog.bogus"),
        ({"tasks": ["caption", "segment"]}, "tasks.1"),
        ({"tasks": ["caption", "caption"]}, "tasks"),
        ({"tiling__size": 8}, "tiling.size"),
        ({"tiling__overlap": 448}, "tiling.overlap"),
        ({"tiling__min_valid_fraction": 1.5}, "tiling.min_valid_fraction"),
        ({"model__engine": "onnx"}, "model.engine"),
        ({"model__dtype": "float16", "actors__num_gpus": 0}, "model"),
        ({"model__tp_size": 2}, "model.engine"),
        ({"model__cuda_graphs": True, "actors__num_gpus": 0}, "model"),
        ({"model__cuda_graphs": True, "model__engine": "deepspeed", "model__tp_size": 2, "actors__num_gpus": 2},
         "model.cuda_graphs"),
        ({"actors__min_actors": 3, "actors__max_actors": 2}, "actors.min_actors"),
        ({"actors__batch_size": 0}, "actors.batch_size"),
        ({"output__root": "gs://bucket/x"}, "output.root"),
        ({"output__wave_size": 8}, "output.wave_size"),
        ({"output__commit_tiles": 0}, "output.commit_tiles"),
        ({"output__max_attempts": 0}, "output.max_attempts"),
        ({"catalog__items_per_task": 0}, "catalog.items_per_task"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    with pytest.raises(ConfigError) as info:
        parse_config(_with(**changes))
    assert any(line.startswith(field) for line in str(info.value).splitlines()), str(info.value)


def test_url_and_embedded_are_exclusive(tmp_path):
    data = _with(catalog__embedded={"collections": ["c.json"], "items": "i.ndjson"})
    with pytest.raises(ConfigError, match=r"catalog\.url: give exactly one"):
        parse_config(data)


def test_output_key_changes_with_what_changes_results():
    base = parse_config(MINIMAL).output_key()
    assert parse_config(_with(tasks=["caption"])).output_key() != base
    assert parse_config(_with(tiling__overlap=0)).output_key() != base
    assert parse_config(_with(model__name_or_path="small")).output_key() != base
    # the actor pool, commit units and output root do not change a tile's results
    assert parse_config(_with(actors__batch_size=64, output__commit_tiles=3, output__max_attempts=5)).output_key() == base
    # nor do CUDA graphs (the same answers, replayed)
    assert parse_config(_with(model__cuda_graphs=True, actors__num_gpus=1)).output_key() == base


def test_output_key_depends_on_weights_content_not_path_or_mtime(tmp_path):
    import os
    import shutil

    from tests.earthgpt.test_weights import model_folder

    a = model_folder(tmp_path / "a" / "model", b"x" * 300_000)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, copy)
    os.utime(copy / "model.safetensors", (1, 1))  # a copy has another mtime
    other = model_folder(tmp_path / "b" / "model", b"x" * 299_999 + b"y")
    key = parse_config(_with(model__name_or_path=str(a))).output_key()
    assert parse_config(_with(model__name_or_path=str(copy))).output_key() == key
    assert parse_config(_with(model__name_or_path=str(other))).output_key() != key
    assert (a / ".earthgpt-digest.json").is_file()  # cached beside the weights for the next run


def test_load_config_applies_overrides_and_reports_bad_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(path, {"output.root": "s3://b/p"}).output.root == "s3://b/p"
    path.write_text("catalog: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_cli_refuses_invalid_config_before_any_work(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_with(tiling__overlap=-1, output__root=str(tmp_path / "out"))))
    code = (
        "import sys; from pipelines.archive.job import cli; rc = cli(sys.argv[1:]); "
        "assert 'ray' not in sys.modules or not __import__('ray').is_initialized(); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "tiling.overlap" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing written
    assert time.perf_counter() - t0 < 60


def test_cli_refuses_missing_embedded_files(tmp_path, capsys):
    from pipelines.archive.job import cli

    path = tmp_path / "job.yaml"
    data = _with(output__root=str(tmp_path / "out"))
    data["catalog"] = {"embedded": {"collections": [str(tmp_path / "c.json")], "items": str(tmp_path / "i.ndjson")},
                       "collections": ["x"]}
    path.write_text(yaml.safe_dump(data))
    assert cli([str(path)]) == 2
    assert "catalog.embedded.collections.0: no such file" in capsys.readouterr().err


def test_cli_refuses_unknown_model_before_starting_ray(tmp_path, capsys):
    from pipelines.archive.job import cli

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_with(model__name_or_path=str(tmp_path / "no-such-model"),
                                         output__root=str(tmp_path / "out"))))
    assert cli([str(path)]) == 2
    assert "model.name_or_path: no folder" in capsys.readouterr().err
    (tmp_path / "empty-model").mkdir()
    path.write_text(yaml.safe_dump(_with(model__name_or_path=str(tmp_path / "empty-model"))))
    assert cli([str(path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
