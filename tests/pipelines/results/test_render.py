"""``earthgpt render``: tiles and scenes through the sensor recipe, boxes drawn, overviews for large scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from rasterio.windows import Window

from pipelines.results import open_outputs
from pipelines.results.render import cli, open_reader, render

pytestmark = pytest.mark.integration

SHIP_RED = np.array([0xFF, 0x3B, 0x30])


def _red_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(rgb - SHIP_RED).sum(axis=2) < 30).sum())


def test_scene_and_tile_pictures_show_their_boxes(any_root, tmp_path):
    out = open_outputs(any_root)
    scene = render(out, "toy-sar-000-s0", tmp_path / "scene.png")
    tile = render(out, "toy-sar-000-s0", tmp_path / "tile.png", tile="r0002_c0005")
    empty = render(out, "toy-thermal-000-s0", tmp_path / "thermal.png")
    assert Image.open(scene).size[0] > 600
    assert _red_pixels(scene) > 200 and _red_pixels(tile) > 50  # ship boxes, in the ship colour
    assert _red_pixels(empty) < _red_pixels(scene)


def test_a_large_scene_is_read_from_overviews(toy_outputs, tmp_path):
    out = open_outputs(str(toy_outputs.root))
    row = out.scene_row("toy-optical-000-s0")
    with open_reader(out, row) as reader:
        h, w = reader.shape
        small = reader.read_overview(max_side=100)
        full = reader.read(Window(0, 0, w, h), allow_empty=True)
    assert max(small.image.shape[1:]) == 100 and small.image.shape[0] == 3
    assert small.transform.a == pytest.approx(full.transform.a * w / small.image.shape[2])
    # the same picture, decimated: mean colour within a few percent
    assert np.abs(small.image.mean(axis=(1, 2)) - full.image.mean(axis=(1, 2))).max() < 0.05
    path = render(out, "toy-optical-000-s0", tmp_path / "small.png", max_side=100)
    assert path.is_file()


def test_cli_writes_a_png_and_names_missing_things(toy_outputs, tmp_path, capsys):
    root = str(toy_outputs.root)
    png = tmp_path / "q.png"
    assert cli(["toy-sar-000-s0", "--tile", "r0002_c0005", "--root", root, "--out", str(png)]) == 0
    assert Image.open(png).format == "PNG"
    assert cli(["toy-sar-000-s0", "--tile", "r9_c9", "--root", root, "--out", str(png)]) == 2
    assert "no tile" in capsys.readouterr().err
    assert cli(["nope", "--root", root, "--out", str(png)]) == 2
    assert "no committed scene" in capsys.readouterr().err
