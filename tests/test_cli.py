"""The console script answers --help from day one and refuses unknown commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "unknown command 'no-such-command'" in capsys.readouterr().err


def test_help_imports_neither_torch_nor_ray():
    # --help must not import torch or ray (seconds each): run it in a fresh interpreter and inspect sys.modules.
    probe = "import sys; from pipelines.cli import main; main([]); print('HEAVY', [m for m in ('torch', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
