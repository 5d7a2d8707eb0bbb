"""Fixtures of the pipeline tests: a small toy world on local disk and its scenes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from catalogs.hrefs import HrefPolicy
from catalogs.scene import Scene
from catalogs.toyworld import ToyWorld, generate_toyworld, load_items


def upload_world(tmp: Path, bucket: str, prefix: str, scenes: int, seed: int, s3: Any) -> ToyWorld:
    """A toy world whose COGs are uploaded to ``s3://bucket/prefix/cogs/`` (item hrefs point there)."""
    world = generate_toyworld(tmp, scenes=scenes, seed=seed, chips_per_scene=1, href_base=f"s3://{bucket}/{prefix}")
    s3.make_bucket(bucket)
    fs = s3.filesystem()
    for path in sorted((tmp / "cogs").iterdir()):
        fs.put_file(str(path), f"{bucket}/{prefix}/cogs/{path.name}")
    return world


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> ToyWorld:
    """Three toy scenes (optical, SAR, thermal; 384-512 px), asset hrefs as ``file://`` URLs."""
    root = tmp_path_factory.mktemp("toyworld")
    return generate_toyworld(root, scenes=3, seed=0, chips_per_scene=2, href_base=Path(root).as_uri())


@pytest.fixture(scope="session")
def world_items(world: ToyWorld) -> list[dict[str, Any]]:
    """The world's STAC items."""
    return load_items(world.items_path)


@pytest.fixture(scope="session")
def world_scenes(world: ToyWorld, world_items: list[dict[str, Any]]) -> list[Scene]:
    """The world's scenes, built as the job builds them."""
    policy = HrefPolicy.for_roots((world.root / "cogs").as_uri())
    return [Scene.from_item(item, href_policy=policy) for item in world_items]
