"""ONNX export of trained checkpoints: dynamic batch, same logits as PyTorch (onnxruntime)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_report import build_tiny_experiment

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is needed for the ONNX parity check")

from bonehpc.checkpoint import build_model_from_checkpoint, load_checkpoint  # noqa: E402
from bonehpc.export import ExportError, export_onnx  # noqa: E402


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory, synth_root: Path, shards_dir: Path) -> Path:
    # Same folder as test_report's fixture: whichever runs first trains, the other finds the stamp.
    return build_tiny_experiment(tmp_path_factory.getbasetemp() / "tiny_experiment", synth_root, shards_dir)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_export_matches_pytorch_at_any_batch(tiny_experiment: Path, tmp_path: Path, role: str) -> None:
    ckpt = tiny_experiment / "final" / role / "best.pt"
    out = tmp_path / f"{role}.onnx"
    info = export_onnx(ckpt, out)
    assert out.is_file() and info["image_size"] == 64 and info["max_abs_diff"] < 1e-4
    assert json.loads(Path(f"{out}.json").read_text())["model"] == info["model"]
    model = build_model_from_checkpoint(load_checkpoint(ckpt))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 7):  # neither is the batch of the export example (2)
        x = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        got = sess.run(["logits"], {"images": x.numpy()})[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_export_errors_and_cli(tiny_experiment: Path, tmp_path: Path) -> None:
    from bonehpc.checkpoint import CheckpointError
    from bonehpc.cli import main

    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "nope.pt", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="differ by"):
        export_onnx(
            tiny_experiment / "final" / "student" / "best.pt", tmp_path / "strict.onnx", atol=-1.0
        )  # an impossible bound
    out = tmp_path / "cli.onnx"
    assert main(["export", "--model", str(tiny_experiment / "final" / "student" / "best.pt"), "--out", str(out)]) == 0
    assert out.is_file()
    assert main(["export", "--model", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert not (tmp_path / "strict.onnx").exists()  # a failed parity check leaves nothing at --out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_run_folder_and_hostile_outputs(
    tiny_experiment: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from bonehpc.cli import main

    run = tiny_experiment / "final" / "teacher"
    info = export_onnx(run, tmp_path / "run.onnx", check=False)
    assert info["checkpoint"] == str(run / "best.pt")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "best.pt", unfinished / "last.pt")
    with pytest.raises(ExportError, match="pass --model .*last.pt"):
        export_onnx(unfinished, tmp_path / "u.onnx")
    with pytest.raises(ExportError, match=r"e\.g\. --model .*best\.pt"):
        export_onnx(tiny_experiment, tmp_path / "e.onnx")
    (tmp_path / "adir").mkdir()
    (tmp_path / "theirs.onnx").write_bytes(b"someone else's model")
    for args, match in (
        (["--model", str(run), "--out", str(tmp_path / "adir")], "is a folder"),
        (["--model", str(run), "--out", str(tmp_path / "theirs.onnx")], "not written by bonehpc export"),
        (["--model", str(unfinished), "--out", str(tmp_path / "u.onnx")], "last.pt"),
    ):
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert (tmp_path / "theirs.onnx").read_bytes() == b"someone else's model"
    # re-exporting over our own output is allowed
    assert export_onnx(run, tmp_path / "run.onnx", check=False)["path"] == str(tmp_path / "run.onnx")
