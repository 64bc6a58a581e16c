"""The console script: every command explains itself, and input errors are one clear line (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bonehpc.cli import build_parser, main

COMMANDS = [name for name in build_parser()._subparsers._group_actions[0].choices]  # type: ignore[union-attr]


def test_top_level_help_lists_every_command(capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ("synth", "manifest", "folds", "pack", "verify", "train", "submit", "status", "tune", "report"):
        assert name in COMMANDS and name in out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str, capsys) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 3


def test_bonehpc_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bonehpc", "train", "--fold", "0", "--role", "teacher",
         f"run_root={tmp_path}", f"data.shards={tmp_path / 'missing'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "ShardError" in proc.stderr and "run `bonehpc pack` first" in proc.stderr


def test_config_error_exit_code(capsys) -> None:  # noqa: ANN001
    assert main(["config", "train.batch_size=many"]) == 2
    assert "train.batch_size: expected an integer" in capsys.readouterr().err
