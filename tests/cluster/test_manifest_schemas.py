"""Every manifest under cluster/ validated against the schemas the cluster itself applies: KubeRay's CRD schemas for
RayCluster / RayJob / RayCronJob (vendored, cluster/schemas/kuberay-ray.io-v1.yaml names their source and version) and
Kubernetes' own schemas for everything else (CronJob, ConfigMap, Secret; from the ``kubernetes-validate`` package).

Unknown fields fail, as with ``kubectl apply --validate=strict``: a misspelt field would otherwise be silently pruned
by the API server and the setting lost.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
# Kubernetes manifests (cluster/launcher holds Ray cluster-launcher configs, cluster/schemas vendored schemas)
MANIFESTS = sorted(p for folder in ("kuberay", "schedule") for p in (ROOT / "cluster" / folder).glob("*.yaml"))
KUBERAY_SCHEMA = ROOT / "cluster/schemas/kuberay-ray.io-v1.yaml"
# Kubernetes version whose schemas check core types (also those KubeRay embeds: pod templates, services, env vars).
KUBERNETES_VERSION = "1.34"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _closed(node: Any) -> Any:
    """Every object schema that lists its properties admits no others (strict field validation)."""
    if isinstance(node, dict):
        node = {k: _closed(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


@cache
def _kuberay_validators() -> dict[str, jsonschema.protocols.Validator]:
    vendored = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    defs = _closed(vendored["$defs"])
    k8s_dir = Path(kubernetes_validate.__file__).parent / f"kubernetes-json-schema/v{KUBERNETES_VERSION}.0-local-strict"
    definitions = json.loads((k8s_dir / "_definitions.json").read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    validators = {}
    for kind, parts in vendored["kinds"].items():
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "apiVersion": {"const": "ray.io/v1"},
                "kind": {"const": kind},
                "metadata": {"$ref": f"{definitions['$id']}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                "spec": {"$ref": f"#/$defs/{parts['spec']}"},
            },
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "additionalProperties": False,
            "$defs": defs,
        }
        validators[kind] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """Every schema violation of one manifest document, as ``path: message`` lines (empty when valid)."""
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        validator = _kuberay_validators().get(doc.get("kind", ""))
        if validator is None:
            return [f"kind: no KubeRay schema for {doc.get('kind')!r}"]
        return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"$.{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_there_are_manifests_of_every_kind_we_ship():
    kinds = {d["kind"] for p in MANIFESTS for d in _documents(p)}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ConfigMap"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_manifest_matches_the_cluster_schemas(path: Path):
    for doc in _documents(path):
        errors = schema_errors(doc)
        assert not errors, f"{path.name} {doc['kind']} {doc['metadata'].get('name')}:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("path", "kind", "where", "misspelt"),
    [
        ("kuberay/raycluster.yaml", "RayCluster", ("spec", "workerGroupSpecs", 0), "maxReplica"),
        ("kuberay/rayjob-infer.yaml", "RayJob", ("spec",), "shutdownAfterJobFinish"),
        ("kuberay/rayjob-train.yaml", "RayJob", ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec",
                                                "containers", 0), "volumeMount"),
        ("schedule/raycronjob-infer.yaml", "RayCronJob", ("spec", "jobTemplate"), "entryPoint"),
        ("schedule/cronjob-submit.yaml", "CronJob", ("spec", "jobTemplate", "spec"), "backoffLimits"),
        ("kuberay/raycluster.yaml", "ConfigMap", (), "datas"),
    ],
)
def test_a_misspelt_field_in_a_copy_of_a_manifest_fails(path: str, kind: str, where: tuple, misspelt: str):
    doc = copy.deepcopy(next(d for d in _documents(ROOT / "cluster" / path) if d["kind"] == kind))
    node = doc
    for key in where:
        node = node[key]
    # the misspelling of an existing field, or a field that does not exist, with a plausible value
    correct = next((k for k in node if k.startswith(misspelt[:6]) and k != misspelt), None)
    node[misspelt] = node.pop(correct) if correct else {"a": "b"}
    errors = schema_errors(doc)
    assert errors and any(misspelt in e for e in errors), errors


def test_a_wrong_type_fails():
    doc = copy.deepcopy(_documents(ROOT / "cluster/kuberay/raycluster.yaml")[0])
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("replicas" in e for e in schema_errors(doc))
