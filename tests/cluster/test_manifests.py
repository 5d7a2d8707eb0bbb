"""Every shipped manifest and schedule parses, names an entrypoint that exists, and embeds a valid job config."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipelines.archive.config import ConfigError
from pipelines.archive.config import load_config as load_infer_config

ROOT = Path(__file__).resolve().parents[2]
# Kubernetes manifests (cluster/launcher holds Ray cluster-launcher configs, cluster/schemas vendored schemas)
MANIFESTS = sorted(p for folder in ("kuberay", "schedule") for p in (ROOT / "cluster" / folder).glob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _entrypoints(doc: dict) -> list[str]:
    spec = doc.get("spec", {})
    found = [spec["entrypoint"]] if "entrypoint" in spec else []
    if "jobTemplate" in spec and "entrypoint" in spec["jobTemplate"]:
        found.append(spec["jobTemplate"]["entrypoint"])
    return found


def test_there_are_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-infer.yaml", "rayjob-train.yaml", "raycronjob-infer.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_is_well_formed(path: Path):
    docs = _docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        if doc["apiVersion"].startswith("ray.io/"):
            assert doc["kind"] in {"RayCluster", "RayJob", "RayCronJob"}
        for entry in _entrypoints(doc):
            argv = shlex.split(entry)
            assert argv[:2] == ["python", "-m"], entry
            assert importlib.util.find_spec(argv[2]) is not None, f"{entry}: no module {argv[2]}"


def test_embedded_job_configs_are_valid(tmp_path: Path):
    checked = 0
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] != "ConfigMap" or "infer.yaml" not in doc.get("data", {}):
                continue
            cfg = tmp_path / "infer.yaml"
            cfg.write_text(doc["data"]["infer.yaml"])
            load_infer_config(cfg)
            checked += 1
    assert checked >= 1


def test_an_invalid_embedded_config_would_be_caught(tmp_path: Path):
    # The check above is not vacuous: the same loader refuses a broken config, naming the field.
    doc = next(d for d in _docs(ROOT / "cluster/kuberay/rayjob-infer.yaml") if d["kind"] == "ConfigMap")
    broken = yaml.safe_load(doc["data"]["infer.yaml"])
    broken["tiling"]["overlap"] = broken["tiling"]["size"]
    cfg = tmp_path / "infer.yaml"
    cfg.write_text(yaml.safe_dump(broken))
    with pytest.raises(ConfigError, match="tiling"):
        load_infer_config(cfg)


def test_crontab_submits_a_shipped_config():
    lines = [ln for ln in (ROOT / "cluster/schedule/crontab").read_text().splitlines()
             if ln and not ln.startswith("#") and "earthgpt submit" in ln]
    assert lines
    for line in lines:
        config = shlex.split(line.split("earthgpt submit run", 1)[1])[0]
        load_infer_config(ROOT / config)


def _shipped_infer_configs() -> list[tuple[str, dict]]:
    found = [(str(p.relative_to(ROOT)), yaml.safe_load(p.read_text())) for p in sorted((ROOT / "configs/infer").glob("*.yaml"))]
    for path in MANIFESTS:
        for doc in _docs(path):
            if doc["kind"] == "ConfigMap" and "infer.yaml" in doc.get("data", {}):
                found.append((f"{path.name}:{doc['metadata']['name']}", yaml.safe_load(doc["data"]["infer.yaml"])))
    return found


def test_no_shipped_config_turns_kernel_injection_on():
    # DeepSpeed 0.19.8 kernel injection fails with transformers 5 (benchmarks/results/gpu_generate_h200.txt)
    configs = _shipped_infer_configs()
    assert any(c.get("model", {}).get("engine") == "deepspeed" for _, c in configs)
    assert [name for name, c in configs if c.get("model", {}).get("kernel_inject")] == []
    from pipelines.archive.config import ModelConfig

    assert ModelConfig.model_fields["kernel_inject"].default is False


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_every_manifest_names_the_images_through_the_one_makefile_parameter():
    shipped = re.search(r"^SHIPPED_IMAGE := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    images = {i for p in MANIFESTS for d in _docs(p) for i in _images(d)}
    assert images == {shipped, f"{shipped}-cuda"}
    launcher = {i for p in (ROOT / "cluster/launcher").glob("*.yaml") for i in _images(yaml.safe_load(p.read_text()))}
    assert launcher <= {shipped, f"{shipped}-cuda"}
