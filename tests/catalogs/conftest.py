"""Fixtures for the catalogs tests: one small toy world per session, and the hand-written catalog items."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from catalogs.toyworld import ToyWorld, generate_toyworld
from tests.catalogs.blobserver import RangeServer, TokenServer
from tests.harness.servers import S3Server, env_vars, start_s3

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


@dataclass
class Servers:
    """The local stand-ins for the public archives' storage (see ``servers``)."""

    tokens: TokenServer
    blob: RangeServer  # Azure-blob-like: refuses requests without a live SAS token
    plain: RangeServer  # plain HTTP(S) COGs
    s3: S3Server  # the deployment's default S3 (moto)
    cdse: S3Server  # CDSE's own S3 endpoint (a second moto)


@pytest.fixture(scope="module")
def servers(s3: S3Server) -> Iterator[Servers]:
    """Loopback PC token endpoint + signed blob server, plain range server, default S3 and CDSE's own S3 (moto),
    with the environment a deployment would set (blob endpoint redirect, CDSE endpoint and keys)."""
    import planetary_computer.sas
    from planetary_computer.settings import Settings

    tokens = TokenServer(ttl_s=3600)
    blob, plain, cdse = RangeServer(tokens=tokens), RangeServer(), start_s3()
    settings = Settings.get()
    saved_url, saved_cache = settings.sas_url, dict(planetary_computer.sas.TOKEN_CACHE)
    settings.sas_url = tokens.url
    planetary_computer.sas.TOKEN_CACHE.clear()
    env = {"EARTHGPT_AZURE_BLOB_ENDPOINT": blob.url, "CDSE_S3_ENDPOINT": cdse.endpoint_url,
           "CDSE_S3_ACCESS_KEY_ID": "cdse-key", "CDSE_S3_SECRET_ACCESS_KEY": "cdse-secret"}
    try:
        with env_vars(env):
            yield Servers(tokens, blob, plain, s3, cdse)
    finally:
        settings.sas_url = saved_url
        planetary_computer.sas.TOKEN_CACHE.clear()
        planetary_computer.sas.TOKEN_CACHE.update(saved_cache)
        for server in (tokens, blob, plain, cdse):
            server.stop()
