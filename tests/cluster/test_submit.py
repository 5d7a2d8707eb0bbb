"""``earthgpt submit``: job specs, config validation before submission."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import submit

ROOT = Path(__file__).resolve().parents[2]


def test_job_spec_forwards_endpoint_settings_but_not_keys(monkeypatch):
    monkeypatch.setenv("AWS_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    spec = submit.job_spec("run", "/cfg/my job.yaml", job_args=["--max-items", "3"])
    assert spec["entrypoint"] == "python -m pipelines.infer '/cfg/my job.yaml' --max-items 3"
    assert spec["runtime_env"]["env_vars"]["AWS_S3_ENDPOINT"] == "127.0.0.1:9000"
    assert "AWS_SECRET_ACCESS_KEY" not in spec["runtime_env"]["env_vars"]
    with_keys = submit.job_spec("train", "/cfg/t.yaml", forward_credentials=True)
    assert with_keys["runtime_env"]["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"
    assert with_keys["entrypoint"].startswith("python -m pipelines.train ")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        submit.job_spec("serve", "x.yaml")


def test_bad_config_is_refused_before_contacting_a_cluster(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/infer/s3-pgstac.yaml").read_text().replace("size: 448", "size: -1"))
    # No cluster listens on this port: a non-2 exit here would mean submission was attempted.
    code = submit.cli(["run", str(bad), "--address", "http://127.0.0.1:9"])
    assert code == 2
    assert "tiling.size" in capsys.readouterr().err


def test_options_after_the_config_are_ours_and_after_double_dash_the_jobs(tmp_path, monkeypatch):
    seen = {}

    def fake_submit(address, spec, *, wait, timeout):  # records what would reach the Jobs API
        seen.update(address=address, spec=spec, wait=wait)
        return "job-1", "SUCCEEDED"

    monkeypatch.setattr(submit, "submit", fake_submit)
    cfg = ROOT / "configs/infer/s3-pgstac.yaml"
    code = submit.cli(["run", str(cfg), "--address", "http://head:8265", "--no-wait", "--", "--max-items", "5"])
    assert code == 0
    assert seen["address"] == "http://head:8265" and seen["wait"] is False
    assert seen["spec"]["entrypoint"].endswith("s3-pgstac.yaml --max-items 5")


def test_exit_code_mirrors_the_jobs_final_state(monkeypatch):
    cfg = str(ROOT / "configs/infer/s3-pgstac.yaml")
    for state, code in [("SUCCEEDED", 0), ("FAILED", 1), ("STOPPED", 1), ("TIMEOUT", 124)]:
        monkeypatch.setattr(submit, "submit", lambda address, spec, *, wait, timeout, s=state: ("job-1", s))
        assert submit.cli(["run", cfg, "--address", "http://head:8265"]) == code, state
    # not waiting: success means "submitted"
    monkeypatch.setattr(submit, "submit", lambda address, spec, *, wait, timeout: ("job-1", "PENDING"))
    assert submit.cli(["run", cfg, "--address", "http://head:8265", "--no-wait"]) == 0


def test_ship_code_uploads_this_checkouts_packages(monkeypatch):
    seen = {}
    monkeypatch.setattr(submit, "submit", lambda address, spec, *, wait, timeout: seen.update(spec) or ("j", "PENDING"))
    cfg = str(ROOT / "configs/infer/s3-pgstac.yaml")
    assert submit.cli(["run", cfg, "--no-wait", "--ship-code", "--pip-deps", "--pip", "extra-pkg==1"]) == 0
    env = seen["runtime_env"]
    assert sorted(Path(p).name for p in env["py_modules"]) == ["catalogs", "earthgpt", "pipelines"]
    assert all(Path(p).resolve().parent == ROOT for p in env["py_modules"])
    names = [r.split(">")[0].split("=")[0].split("[")[0] for r in env["pip"]]
    assert "torch" in names and "rasterio" in names and "ray" not in names  # the image brings Ray
    assert "pytest" not in names  # no extras
    assert env["pip"][-1] == "extra-pkg==1"


def test_no_cluster_at_the_address_is_one_clear_line(capsys):
    from pipelines import jobs

    assert jobs.cli(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("earthgpt jobs status:") and "127.0.0.1:9" in err and "Traceback" not in err
    code = submit.cli(["run", str(ROOT / "configs/infer/s3-pgstac.yaml"), "--address", "http://127.0.0.1:9"])
    assert code == 2 and "127.0.0.1:9" in capsys.readouterr().err
