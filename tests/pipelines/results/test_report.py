"""``earthgpt report``: the page opens in headless Debian chromium with no console error and no network request,
and shows the counts the tables hold."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipelines.results import open_outputs
from pipelines.results.report import build_report, cli, counts, load_run
from tests.pipelines.results.chromium import find_chromium, load_page

pytestmark = pytest.mark.integration
needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="chromium not installed (scripts/setup.sh)")


def _card(text: str, label: str) -> int:
    match = re.search(rf"(\d+)\s*\n\s*{label}", text)
    assert match, f"no count for {label!r} on the page"
    return int(match.group(1))


@needs_chromium
def test_the_report_renders_in_chromium_with_the_expected_counts(toy_outputs, tmp_path):
    out = open_outputs(str(toy_outputs.root))
    page = tmp_path / "report.html"
    page.write_text(build_report(out, toy_outputs.run_a))
    loaded = load_page(page.as_uri())
    assert loaded.console_errors == [] and loaded.exceptions == [] and loaded.log_errors == []
    assert [u for u in loaded.requests if not u.startswith(("file:", "data:"))] == []  # self-contained
    assert loaded.images_broken == 0
    want = counts(load_run(out, toy_outputs.run_a))
    dets = out.detections(run=toy_outputs.run_a)
    assert want["detections"] == len(dets) > 0 and want["scenes"] == 3 and want["scenes-failed"] == 1
    for key, label in (("scenes", "scenes processed"), ("scenes-failed", "scenes failed"),
                       ("tiles", "tiles answered"), ("detections", "detections"), ("errors", "errors")):
        assert _card(loaded.text, label) == want[key], label
    for label, n in dets["label"].value_counts().items():
        assert re.search(rf"{label}\s+{n}\s", loaded.text), label
    assert "AssetNotFound" in loaded.text or "RasterioIOError" in loaded.text  # the broken item's error type
    assert loaded.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(loaded.screenshot) > 20_000
    shot = Path(os.environ.get("EARTHGPT_REPORT_SCREENSHOT", tmp_path / "report.png"))
    shot.write_bytes(loaded.screenshot)


@needs_chromium
def test_the_browser_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><p>7 detections</p><img src='https://example.invalid/x.png'>"
                   "<script>console.error('boom'); undefinedFunction()</script></body></html>")
    loaded = load_page(bad.as_uri())
    assert loaded.console_errors == ["boom"] and loaded.exceptions
    assert "https://example.invalid/x.png" in loaded.requests and loaded.images_broken == 1
    assert "7 detections" in loaded.text


def test_an_interrupted_run_reports_nothing_committed(toy_outputs):
    out = open_outputs(str(toy_outputs.root))
    html = build_report(out, "latest", with_gallery=False)
    assert toy_outputs.run_b in html and "interrupted" in html
    assert counts(load_run(out, "latest")) == {"scenes": 0, "scenes-failed": 0, "tiles": 0, "tiles-skipped": 0,
                                               "detections": 0, "errors": 0}


def test_the_report_is_written_next_to_the_outputs_on_s3(s3_root, s3, toy_outputs, capsys):
    assert cli([toy_outputs.run_a, "--root", s3_root, "--no-gallery"]) == 0
    where = capsys.readouterr().out.strip()
    assert where == f"{s3_root}/reports/report-{toy_outputs.run_a}.html"
    fs = s3.filesystem()
    text = fs.cat_file(where.removeprefix("s3://")).decode()
    assert "<!DOCTYPE html>" in text and "data:image/png;base64," in text
    assert cli(["no-such-run", "--root", s3_root]) == 2
    assert "no run" in capsys.readouterr().err


def test_the_nightly_schedules_write_a_report_after_each_run():
    import shlex

    import yaml

    repo = Path(__file__).resolve().parents[3]
    cron = [ln for ln in (repo / "cluster/schedule/crontab").read_text().splitlines()
            if "earthgpt submit run" in ln and not ln.startswith("#")]
    assert cron and all("earthgpt report latest --config" in ln for ln in cron)
    for line in cron:
        config = shlex.split(line.split("earthgpt report latest --config", 1)[1])[0]
        assert (repo / config).is_file(), config
    (cronjob,) = [d for d in yaml.safe_load_all((repo / "cluster/schedule/raycronjob-infer.yaml").read_text()) if d]
    entry = cronjob["spec"]["jobTemplate"]["entrypoint"]
    assert "python -m pipelines.results.report latest --config /etc/earthgpt/infer.yaml" in entry
    assert entry.index("pipelines.infer") < entry.index("pipelines.results.report") and "exit $status" in entry
