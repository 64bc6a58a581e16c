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


def _cli_raising(monkeypatch: pytest.MonkeyPatch, err: BaseException) -> None:
    """Make `bonehpc boom` a command whose work raises `err` (main's error mapping is what is tested)."""
    import argparse

    import bonehpc.cli as cli

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(prog="bonehpc")
        p.add_argument("-v", "--verbose", action="store_true")
        sub = p.add_subparsers(dest="command")

        def boom(_: argparse.Namespace) -> int:
            raise err

        sub.add_parser("boom").set_defaults(func=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)


@pytest.mark.parametrize(
    ("err", "expected"),
    [
        (PermissionError(13, "Permission denied", "/data/out"), "PermissionError: Permission denied: /data/out"),
        (IsADirectoryError(21, "Is a directory", "runs/x"), "IsADirectoryError: Is a directory: runs/x"),
        (NotADirectoryError(20, "Not a directory", "a/b"), "NotADirectoryError: Not a directory: a/b"),
        (OSError(28, "No space left on device"), "OSError: No space left on device"),
        (OSError(28, "No space left on device", "/scratch/s.h5"), "No space left on device: /scratch/s.h5"),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "UnicodeDecodeError: not UTF-8 text"),
    ],
)  # fmt: skip
def test_input_errors_are_one_line_exit_2(monkeypatch, capsys, err: BaseException, expected: str) -> None:  # noqa: ANN001
    from bonehpc.constants import INPUT_ERROR_EXIT_CODE

    _cli_raising(monkeypatch, err)
    assert main(["boom"]) == INPUT_ERROR_EXIT_CODE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bonehpc boom: ") and expected in lines[0]
    with pytest.raises(type(err)):  # -v: the traceback
        main(["-v", "boom"])


def test_bugs_keep_their_traceback(monkeypatch) -> None:  # noqa: ANN001
    _cli_raising(monkeypatch, OSError("no filename: not about an input path"))
    with pytest.raises(OSError):
        main(["boom"])
    _cli_raising(monkeypatch, KeyError("x"))
    with pytest.raises(KeyError):
        main(["boom"])


def test_demo_with_too_few_patients_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bonehpc", "demo", "--patients", "1", f"run_root={tmp_path}",
         f"data.mura_root={tmp_path / 'data'}"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("bonehpc demo: --patients 1: need at least") and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written
