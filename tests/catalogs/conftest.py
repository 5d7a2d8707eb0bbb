"""Fixtures for the catalogs tests: one small toy world per session, and the hand-written catalog items."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from catalogs.toyworld import ToyWorld, generate_toyworld

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_item(name: str) -> dict[str, Any]:
    """Load one of the hand-written STAC item fixtures by file stem."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def toyworld(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    """Six scenes (two per sensor), few chips: the archive the IO, search and ingest tests read."""
    return generate_toyworld(tmp_path_factory.mktemp("toyworld"), scenes=6, seed=7, chips_per_scene=24)


@pytest.fixture(scope="session")
def toy_items(toyworld: ToyWorld) -> list[dict[str, Any]]:
    from catalogs.ingest import read_ndjson

    return list(read_ndjson(toyworld.items_path))


@pytest.fixture(scope="session")
def toy_collections(toyworld: ToyWorld) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in toyworld.collection_paths.values()]
