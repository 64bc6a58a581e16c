"""Every bad input ends in one line naming it, exit code 2, and nothing written or changed (issue 13, section 3).

Each case builds its inputs in a fresh folder, snapshots that folder and the shared data (sizes, modes,
mtimes of every entry), runs the `bonehpc` command in-process with the working directory inside the
snapshot, and checks: exit code 2, exactly one non-log line on stderr that names the input, no
traceback, and a snapshot equal to the one before (nothing half-written, nothing deleted).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tinyexp import tiny_overrides

from bonehpc.cli import main as cli_main

LOG_LINE = re.compile(r"^[DIWEC]\d{4} \d\d:\d\d:\d\d ")  # the CLI's logging format (warnings may precede)


# ----------------------------------------------------------------------------------------------
# Shared inputs (built once) and helpers


@dataclass
class World:
    """A small synthetic data set, its shards and a trained-looking checkpoint, shared read-only by the cases."""

    base: Path
    root: Path
    shards: Path
    ckpt: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from bonehpc.data.pack import pack_dataset
    from bonehpc.data.shards import verify_shards
    from bonehpc.data.synthetic import generate

    base = tmp_path_factory.mktemp("hostile_world")
    generate(base / "mura", patients=10, seed=4, max_side=96)
    pack_dataset(base / "mura", base / "shards", pack_size=64, images_per_shard=64, min_side=0, progress=False)
    verify_shards(base / "shards", full=True)  # the .verified stamp exists, so a cached check writes nothing
    return World(base, base / "mura", base / "shards", _checkpoint(base / "model" / "best.pt"))


def _checkpoint(path: Path) -> Path:
    """A weights checkpoint of the tiny student, as training writes best.pt (no training needed)."""
    from bonehpc.checkpoint import TrainState, make_checkpoint, save_checkpoint
    from bonehpc.config import load_config, to_dict
    from bonehpc.models import create_model

    cfg = load_config(None, ["student.model=hybrid_tiny", "data.pack_size=64", "data.image_size=64"])
    model = create_model("hybrid_tiny", num_classes=2)
    save_checkpoint(path, make_checkpoint(TrainState(fold=0, role="student"), model, to_dict(cfg)))
    return path


def _snapshot(*roots: Path) -> dict[str, tuple[int, int, int, int]]:
    """(type and mode, size, mtime_ns, inode) of every entry under roots, symlinks not followed."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                size = st.st_size if stat.S_ISREG(st.st_mode) else 0
                out[str(p)] = (st.st_mode, size, st.st_mtime_ns, st.st_ino)
    return out


def _read_only(path: Path) -> Callable[[], None]:
    """Make folder `path` read-only for this process (chmod; as root, the immutable flag); returns the undo."""
    path.chmod(0o555)
    if _writable(path):  # root ignores modes
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], check=False).returncode:
            path.chmod(0o755)
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        if _writable(path):
            subprocess.run(["chattr", "-i", str(path)], check=False)
            path.chmod(0o755)
            pytest.skip("cannot make a read-only folder here")

    def undo() -> None:
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)
        path.chmod(0o755)

    return undo


def _writable(path: Path) -> bool:
    probe = path / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@dataclass
class Ctx:
    """What a case builder gets: its own folder, the shared world, and a way to register cleanups."""

    tmp: Path
    world: World
    cleanups: list[Callable[[], None]]
    stack: contextlib.ExitStack

    def copy_tree(self) -> Path:
        dst = self.tmp / "mura"
        shutil.copytree(self.world.root, dst)
        return dst

    def read_only_dir(self, name: str = "ro") -> Path:
        d = self.tmp / name
        d.mkdir()
        self.cleanups.append(_read_only(d))
        return d

    def tiny(self, *extra: str) -> list[str]:
        return tiny_overrides(self.tmp / "runs", self.world.root, self.world.shards, *extra)


@dataclass
class Case:
    """One bad input: `build(ctx)` returns (argv, regex that the error line must match); owner implements it."""

    id: str
    owner: str
    build: Callable[[Ctx], tuple[list[str], str]]
    outputs: tuple[str, ...] = ()
    """Folders (relative to the case folder) that may gain new files, e.g. a log; nothing there may change."""


# ----------------------------------------------------------------------------------------------
# Case builders


def _mura_csv_latin1(c: Ctx) -> tuple[list[str], str]:
    root = c.copy_tree()
    csv = root / "MURA-v1.1" / "train_labeled_studies.csv"
    lines = csv.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"study", b"st\xfcdy", 1)
    csv.write_bytes(b"\n".join(lines))
    return ["manifest", "--mura-root", str(root)], r"train_labeled_studies.csv line 2: not UTF-8"


def _yaml_latin1(c: Ctx) -> tuple[list[str], str]:
    cfg = c.tmp / "exp.yaml"
    cfg.write_bytes(b"name: exp\n# caf\xe9\n")
    return ["pack", "--config", str(cfg)], r"exp.yaml line 2: not UTF-8"


def _empty_csvs(c: Ctx) -> tuple[list[str], str]:
    root = c.copy_tree()
    for csv in (root / "MURA-v1.1").glob("*.csv"):
        csv.write_text("")
    return ["manifest", "--mura-root", str(root), "--out", str(c.tmp / "out" / "m.csv")], r"no image rows"


def _empty_manifest_csv(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "m.csv").write_text("")
    return ["folds", "--manifest", str(c.tmp / "m.csv"), "--out", str(c.tmp / "f.csv")], r"m.csv: empty file"


def _pack_empty_manifest(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "m.csv").write_text("")
    argv = ["pack", "--mura-root", str(c.world.root), "--out", str(c.tmp / "s"), "--manifest", str(c.tmp / "m.csv")]
    return argv, r"m.csv: empty file"


def _pack_args(c: Ctx, *extra: str) -> list[str]:
    return ["pack", "--mura-root", str(c.world.root), "--out", str(c.tmp / "shards"), "--quiet", *extra]


def _override(key_value: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    return lambda c: (_pack_args(c, key_value), fragment)


def _flag(flag: str, value: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    return lambda c: (_pack_args(c, flag, value), fragment)


def _yaml_dup(c: Ctx) -> tuple[list[str], str]:
    cfg = c.tmp / "exp.yaml"
    cfg.write_text("name: exp\ntrain:\n  batch_size: 8\n  batch_size: 16\n")
    return ["pack", "--config", str(cfg)], r"exp.yaml line 4: key 'batch_size' repeats"


def _yaml_words_then_bad(c: Ctx) -> tuple[list[str], str]:
    # amp: off and verify: off are accepted (the error is about the one bad key after them).
    cfg = c.tmp / "exp.yaml"
    cfg.write_text("train: {amp: off, channels_last: no}\ndata: {verify: off, pack_size: 0}\n")
    return ["pack", "--config", str(cfg)], r"data.pack_size: must be > 0"


def _ro_pack(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return ["pack", "--mura-root", str(c.world.root), "--out", str(ro / "shards")], r"ro/shards"


def _ro_pack_existing(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return ["pack", "--mura-root", str(c.world.root), "--out", str(ro)], r"cannot write in --out .*ro"


def _ro_manifest(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return ["manifest", "--mura-root", str(c.world.root), "--out", str(ro / "m.csv")], r"ro/m.csv"


def _ro_synth(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return ["synth", "--out", str(ro / "synth"), "--patients", "4", "--max-side", "32"], r"ro/synth"


def _synth_out_is_file(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "synth").write_text("not a folder")
    return ["synth", "--out", str(c.tmp / "synth"), "--patients", "4"], r"synth is a file"


def _synth_bad_frac(c: Ctx) -> tuple[list[str], str]:
    return ["synth", "--out", str(c.tmp / "synth"), "--patients", "4", "--bad-frac", "2"], r"bad_frac: must be in"


def _out_is_file(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "shards").write_text("not a folder")
    return _pack_args(c), r"--out .*shards is a file"


def _out_foreign(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "shards").mkdir()
    (c.tmp / "shards" / "thesis.tex").write_text("precious")
    return _pack_args(c), r"shards is a non-empty folder that is not a bonehpc shard folder .*thesis.tex"


def _lock_held(c: Ctx) -> tuple[list[str], str]:
    from bonehpc.data.pack import _open_out, pack_lock

    c.stack.enter_context(pack_lock(_open_out(c.tmp / "shards")))
    return _pack_args(c), rf"shards is being packed by host \S+ pid {os.getpid()}"


def _bad_manifest_row(change: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        from bonehpc.data.mura import build_manifest, write_manifest

        m = build_manifest(c.world.root)
        col, value = change.split("=", 1)
        m[col] = m[col].astype(object)
        m.loc[0, col] = value
        write_manifest(m, c.tmp / "m.csv")
        return _pack_args(c, "--manifest", str(c.tmp / "m.csv")), fragment

    return build


def _no_space(c: Ctx) -> tuple[list[str], str]:
    from bonehpc.data import pack

    c.stack.enter_context(pytest.MonkeyPatch.context()).setattr(pack, "_free_bytes", lambda path: 4096)
    return _pack_args(c), r"not enough free space for --out .*shards"


def _part_renamed(new_part: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        root = c.copy_tree()
        folder = root / "MURA-v1.1"
        old = next((folder / "train").glob("XR_*")).name
        for csv in folder.glob("train_*.csv"):
            csv.write_text(csv.read_text().replace(f"/{old}/", f"/{new_part}/"))
        if new_part[3:].isalnum():
            (folder / "train" / old).rename(folder / "train" / new_part)
        return ["manifest", "--mura-root", str(root)], fragment

    return build


# Other owners' commands (EVAL: predict/export; TRAIN: train; ARCH: demo).


def _predict(c: Ctx, *extra: str, inp: Path | None = None) -> list[str]:
    if inp is None:
        inp = c.tmp / "images"
        inp.mkdir(exist_ok=True)
        shutil.copy(next(c.world.root.glob("MURA-v1.1/valid/*/*/*/image1.png")), inp / "a.png")
    return ["predict", "--model", str(c.world.ckpt), "--input", str(inp), *extra]


def _predict_empty_csv(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "list.csv").write_text("")
    return _predict(c, "--out", str(c.tmp / "p.csv"), inp=c.tmp / "list.csv"), r"list.csv"


def _predict_cuda(c: Ctx) -> tuple[list[str], str]:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    return _predict(c, "--out", str(c.tmp / "p.csv"), "--device", "cuda:0"), r"cuda:0"


def _predict_banana(c: Ctx) -> tuple[list[str], str]:
    return _predict(c, "--out", str(c.tmp / "p.csv"), "--device", "banana"), r"banana"


def _predict_out_dir(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "outdir").mkdir()
    return _predict(c, "--out", str(c.tmp / "outdir")), r"outdir"


def _predict_gradcam_file(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "cam").write_text("a file")
    return _predict(c, "--out", str(c.tmp / "p.csv"), "--gradcam", str(c.tmp / "cam")), r"cam"


def _predict_ro(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return _predict(c, "--out", str(ro / "p.csv")), r"ro/p.csv"


def _predict_truncated_ckpt(c: Ctx) -> tuple[list[str], str]:
    data = c.world.ckpt.read_bytes()
    (c.tmp / "cut.pt").write_bytes(data[: len(data) // 3])
    argv = _predict(c, "--out", str(c.tmp / "p.csv"))
    argv[argv.index("--model") + 1] = str(c.tmp / "cut.pt")
    return argv, r"cut.pt"


def _train_fold5(c: Ctx) -> tuple[list[str], str]:
    return ["train", "--fold", "5", "--role", "teacher", *c.tiny()], r"fold"


def _train_ro(c: Ctx) -> tuple[list[str], str]:
    ro = c.read_only_dir()
    return ["train", "--fold", "0", "--role", "teacher", "--run-dir", str(ro / "run"), *c.tiny()], r"ro/run"


def _train_truncated_last(c: Ctx) -> tuple[list[str], str]:
    run = c.tmp / "run"
    run.mkdir()
    data = c.world.ckpt.read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 3])
    return ["train", "--fold", "0", "--role", "teacher", "--run-dir", str(run), *c.tiny()], r"last.pt"


def _train_changed_shard_byte(c: Ctx) -> tuple[list[str], str]:
    shards = c.tmp / "shards"
    shutil.copytree(c.world.shards, shards)
    shard = next(shards.glob("shard-*.h5"))
    with open(shard, "r+b") as fh:  # one pixel byte: invisible to the quick check, caught by the default full one
        fh.seek(shard.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))
    argv = ["train", "--fold", "0", "--role", "teacher", *c.tiny(), f"data.shards={shards}"]
    return argv, rf"{shard.name}: SHA-256 differs"


def _demo_one_patient(c: Ctx) -> tuple[list[str], str]:
    return ["demo", "--patients", "1", f"run_root={c.tmp / 'runs'}", f"data.mura_root={c.tmp / 'd'}"], r"patients"


def _export_run_dir(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "run").mkdir()
    return ["export", "--model", str(c.tmp / "run"), "--out", str(c.tmp / "m.onnx")], r"run"


# Issue 20: values that reach a job script or a shell, and inputs that would exhaust time or memory.


def _submit_dry(c: Ctx, *extra: str) -> list[str]:
    return ["submit", "folds", "--dry-run", *c.tiny("cluster.mode=slurm", *extra)]


def _params_file(c: Ctx, text: str) -> str:
    (c.tmp / "best_params.yaml").write_text(text)
    return str(c.tmp / "best_params.yaml")


def _name_in_params(text: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    # without the tiny experiment's name=..., which as a command-line override would win over --params
    return lambda c: ([a for a in _submit_dry(c) if a != "name=tiny"] + ["--params", _params_file(c, text)], fragment)


def _profile_case(text: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        (c.tmp / "site.yaml").write_text("time_min: 60\n" + text)
        return _submit_dry(c, f"cluster.profile={c.tmp / 'site.yaml'}"), fragment

    return build


def _yaml_bomb(c: Ctx) -> tuple[list[str], str]:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    return [*_submit_dry(c), "--params", _params_file(c, "\n".join(levels) + "\n")], r"best_params.yaml: more than"


def _yaml_deep(c: Ctx) -> tuple[list[str], str]:
    text = "name: " + "[" * 50_000 + "]" * 50_000 + "\n"
    return [*_submit_dry(c), "--params", _params_file(c, text)], r"best_params.yaml line 1: nested deeper than"


def _yaml_huge(c: Ctx) -> tuple[list[str], str]:
    text = "name: x\n" + "# padding\n" * 500_000  # 5 MB: refused before it is read
    return [*_submit_dry(c), "--params", _params_file(c, text)], r"best_params.yaml: 5,000,008 bytes, more than"


def _cli_nul(c: Ctx) -> tuple[list[str], str]:
    return ["status", "--exp", "a\x00b", "--run-root", str(c.tmp)], r"--exp: 'a\\x00b' holds the control character"


def _replace_in_csvs(root: Path, split: str, old: str, new: str) -> None:
    for csv in (root / "MURA-v1.1").glob(f"{split}_*.csv"):
        csv.write_text(csv.read_text().replace(old, new))


def _leak_tree(c: Ctx) -> Path:
    """A copy of the data set whose valid patient 11185 (XR_FOREARM) is renumbered to train patient 2."""
    root = c.copy_tree()
    forearm = root / "MURA-v1.1" / "valid" / "XR_FOREARM"
    (forearm / "patient11185").rename(forearm / "patient00002")
    _replace_in_csvs(root, "valid", "valid/XR_FOREARM/patient11185/", "valid/XR_FOREARM/patient00002/")
    return root


def _leak(command: str) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        root = _leak_tree(c)
        argv = ["manifest", "--mura-root", str(root)] if command == "manifest" else _pack_args(c)
        if command == "pack":
            argv[argv.index("--mura-root") + 1] = str(root)
        return argv, r"1 patient\(s\) in both the train and the valid split \(a holdout leak\): patient00002 \(train "

    return build


def _spelled_twice(c: Ctx) -> tuple[list[str], str]:
    root = c.copy_tree()
    elbow = root / "MURA-v1.1" / "train" / "XR_ELBOW"  # patient 4 also has FINGER and SHOULDER studies
    (elbow / "patient00004").rename(elbow / "patient4")
    _replace_in_csvs(root, "train", "train/XR_ELBOW/patient00004/", "train/XR_ELBOW/patient4/")
    return ["manifest", "--mura-root", str(root)], r"1 patient number\(s\) spelled two ways .*patient00004 and patient4"


def _same_file_twice(c: Ctx) -> tuple[list[str], str]:
    root = c.copy_tree()
    hand = root / "MURA-v1.1" / "train" / "XR_HAND"
    (hand / "patient00009").symlink_to("patient00001")  # one folder listed under two patients
    for csv in (root / "MURA-v1.1").glob("train_*.csv"):
        rows = [r for r in csv.read_text().splitlines() if "XR_HAND/patient00001/" in r]
        csv.write_text(csv.read_text() + "".join(r.replace("patient00001", "patient00009") + "\n" for r in rows))
    return ["manifest", "--mura-root", str(root)], r"listed twice under two paths .*patient00001/.* and .*patient00009/"


def _pack_size_change(c: Ctx) -> tuple[list[str], str]:
    argv = ["pack", "--mura-root", str(c.world.root), "--out", str(c.world.shards), "--pack-size", "32", "--quiet"]
    return argv, r"holds images packed at pack_size 64, not 32: .*--overwrite"


def _ckpt_with_spec(c: Ctx, **kwargs: object) -> Path:
    """The world's checkpoint with model_spec kwargs changed (as a file received from someone else)."""
    import torch

    state = torch.load(c.world.ckpt, weights_only=True)
    state["model_spec"] = {**state["model_spec"], "kwargs": {**state["model_spec"]["kwargs"], **kwargs}}
    path = c.tmp / "model" / "best.pt"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def _gigantic(c: Ctx) -> tuple[list[str], str]:
    argv = _predict(c, "--out", str(c.tmp / "p.csv"))
    argv[argv.index("--model") + 1] = str(_ckpt_with_spec(c, depth=100_000, embed_dim=1 << 20))
    return argv, r"model_spec hybrid_tiny .* builds a model larger than the \d+ tensors"


def _spec_wrong_type(c: Ctx) -> tuple[list[str], str]:
    argv = _predict(c, "--out", str(c.tmp / "p.csv"))
    argv[argv.index("--model") + 1] = str(_ckpt_with_spec(c, embed_dim="wide"))
    return argv, r"checkpoint model_spec: TypeError"


def _calibration(temperature: object, bias: object = None) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        import json

        run = c.tmp / "exp" / "fold0" / "student"
        run.mkdir(parents=True)
        shutil.copy(c.world.ckpt, run / "best.pt")
        doc = {"roles": {"student": {"temperature": temperature, **({} if bias is None else {"bias": bias})}}}
        (c.tmp / "exp" / "calibration.json").write_text(json.dumps(doc))
        argv = _predict(c, "--out", str(c.tmp / "p.csv"), "--calibrate")
        argv[argv.index("--model") + 1] = str(run / "best.pt")
        if bias is not None:
            return argv, r"calibration.json: bias of role 'student' is .*not a number in \[-50.0, 50.0\]"
        return argv, r"calibration.json: temperature of role 'student' is .*not a number in \[0.05, 20.0\]"

    return build


def _gradcam_in_input(c: Ctx) -> tuple[list[str], str]:
    argv = _predict(c, "--out", str(c.tmp / "p.csv"), "--gradcam", str(c.tmp / "images" / "cams"))
    return argv, r"--gradcam .*images/cams is inside the input folder"


def _gradcam_holds_input(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "cams").mkdir()
    shutil.copy(next(c.world.root.glob("MURA-v1.1/valid/*/*/*/image1.png")), c.tmp / "cams" / "x.png")
    (c.tmp / "list.csv").write_text(f"path\n{c.tmp / 'cams' / 'x.png'}\n")
    argv = _predict(c, "--out", str(c.tmp / "p.csv"), "--gradcam", str(c.tmp / "cams"), inp=c.tmp / "list.csv")
    return argv, r"--gradcam .*cams holds input .*x.png"


# Issue 20, second round: ids read back from jobs.json reach scancel's argv and `#SBATCH --dependency=`.


def _registry(jobs: str, command: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    """An experiment folder whose jobs.json holds `jobs` (JSON text), then `bonehpc <command> --exp` on it."""

    def build(c: Ctx) -> tuple[list[str], str]:
        from bonehpc.config import load_config, save_config
        from bonehpc.paths import ExperimentPaths

        paths = ExperimentPaths.of(load_config(None, c.tiny()))
        paths.root.mkdir(parents=True)
        save_config(load_config(None, c.tiny()), paths.config)
        paths.jobs.write_text(jobs)
        return [*command.split(), "--exp", str(paths.root)], fragment

    return build


def _slurm_jobs(job_id: str = "7", task_id: str = "7_0", dependency: str = "") -> str:
    import json

    task = {"task_id": task_id, "fold": "fold0"}
    job = {"kind": "train", "role": "teacher", "job_id": job_id, "dependency": dependency, "tasks": [task]}
    return json.dumps({"submissions": [{"kind": "folds", "mode": "slurm", "workdir": "/", "jobs": [job]}]})


# Issue 20, second round: a CSV or JSON file of 8 GiB (sparse: made at once, never read) is refused from its size.
HUGE = 8 << 30
HUGE_LINE = r"8,589,934,592 bytes, more than bonehpc reads"


def _sparse(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(HUGE)
    return path


def _huge_mura_csv(c: Ctx) -> tuple[list[str], str]:
    root = c.tmp / "mura"
    shutil.copytree(c.world.root, root, ignore=shutil.ignore_patterns("*.png"))  # the CSVs are read first
    _sparse(root / "MURA-v1.1" / "train_image_paths.csv")
    return ["manifest", "--mura-root", str(root)], rf"train_image_paths.csv: {HUGE_LINE}"


def _huge_manifest(command: str) -> Callable[[Ctx], tuple[list[str], str]]:
    def build(c: Ctx) -> tuple[list[str], str]:
        m = str(_sparse(c.tmp / "m.csv"))
        if command == "folds":
            return ["folds", "--manifest", m, "--out", str(c.tmp / "f.csv")], rf"m.csv: {HUGE_LINE}"
        return [
            "pack",
            "--mura-root",
            str(c.world.root),
            "--out",
            str(c.tmp / "s"),
            "--manifest",
            m,
        ], rf"m.csv: {HUGE_LINE}"

    return build


def _huge_predict_csv(c: Ctx) -> tuple[list[str], str]:
    return _predict(c, "--out", str(c.tmp / "p.csv"), inp=_sparse(c.tmp / "list.csv")), rf"list.csv: {HUGE_LINE}"


def _report_foreign(c: Ctx) -> tuple[list[str], str]:
    (c.tmp / "notes" / "report").mkdir(parents=True)  # the user's own report/ folder: never written into
    (c.tmp / "notes" / "report" / "index.html").write_text("mine")
    return ["report", "--exp", "notes", "--run-root", str(c.tmp)], r"notes is not an experiment folder"


def _tune_dry(space: str, fragment: str) -> Callable[[Ctx], tuple[list[str], str]]:
    return lambda c: (["submit", "tune", "--dry-run", *c.tiny("cluster.mode=slurm", "tune.folds=[0]", space)], fragment)


def _pack_setting_change(flag: str, value: str, was: str) -> Callable[[Ctx], tuple[list[str], str]]:
    """Another setting than pack_size changes every shard's bytes too: the same refusal (issue 20 family 5)."""

    def build(c: Ctx) -> tuple[list[str], str]:
        argv = ["pack", "--mura-root", str(c.world.root), "--out", str(c.world.shards), "--pack-size", "64"]
        return [*argv, "--min-side", "0", flag, value, "--quiet"], rf"holds images packed with {was}, not .*--overwrite"

    return build


CASES = [
    # DATA: bonehpc synth / manifest / folds / pack and the config loader
    Case("csv-not-utf8", "DATA", _mura_csv_latin1),
    Case("yaml-not-utf8", "DATA", _yaml_latin1),
    Case("csvs-all-empty", "DATA", _empty_csvs),
    Case("manifest-csv-0-bytes", "DATA", _empty_manifest_csv),
    Case("pack-manifest-0-bytes", "DATA", _pack_empty_manifest),
    Case("yaml-off-words-accepted", "DATA", _yaml_words_then_bad),
    Case("lr-nan", "DATA", _override("teacher.lr=.nan", r"teacher.lr: expected a finite number, got nan")),
    Case("lr-inf", "DATA", _override("student.lr=.inf", r"student.lr: expected a finite number, got inf")),
    Case("yaml-duplicate-key", "DATA", _yaml_dup),
    Case("pack-out-read-only-parent", "DATA", _ro_pack),
    Case("pack-out-read-only", "DATA", _ro_pack_existing),
    Case("manifest-out-read-only", "DATA", _ro_manifest),
    Case("synth-out-read-only", "DATA", _ro_synth),
    Case("pack-out-is-file", "DATA", _out_is_file),
    Case("synth-out-is-file", "DATA", _synth_out_is_file),
    Case("synth-bad-frac-2", "DATA", _synth_bad_frac),
    Case("pack-size-0", "DATA", _flag("--pack-size", "0", r"pack_size must be in 1\.\.4096, got 0")),
    Case("pack-size-neg", "DATA", _flag("--pack-size", "-5", r"pack_size must be in 1\.\.4096, got -5")),
    Case("pack-size-huge", "DATA", _flag("--pack-size", "20000", r"pack_size must be in 1\.\.4096, got 20000")),
    Case("images-per-shard-0", "DATA", _flag("--images-per-shard", "0", r"images_per_shard must be > 0, got 0")),
    Case("max-reject-frac-2", "DATA", _flag("--max-reject-frac", "2", r"max_reject_frac must be in \[0, 1\], got 2")),
    Case("xr-dotdot", "DATA", _part_renamed("XR_..", r"path '.*XR_\.\./.*' does not match")),
    Case("xr-non-ascii", "DATA", _part_renamed("XR_HÄND", r"XR_HÄND.* non-ASCII")),
    # DATA, section 2 (integrity), as the CLI shows them
    Case("pack-out-foreign-folder", "DATA", _out_foreign),
    Case("pack-lock-held", "DATA", _lock_held),
    Case("pack-manifest-label-2", "DATA", _bad_manifest_row("label=2", r"m.csv: .*data row 1: label=2")),
    Case("pack-manifest-outside-root", "DATA", _bad_manifest_row("path=../../etc/passwd", r"'../../etc/passwd'")),
    Case("pack-no-free-space", "DATA", _no_space),
    # EVAL
    Case("predict-csv-0-bytes", "EVAL", _predict_empty_csv),
    Case("predict-device-cuda-no-gpu", "EVAL", _predict_cuda),
    Case("predict-device-banana", "EVAL", _predict_banana),
    Case("predict-out-is-dir", "EVAL", _predict_out_dir),
    Case("predict-gradcam-is-file", "EVAL", _predict_gradcam_file),
    Case("predict-out-read-only", "EVAL", _predict_ro),
    Case("predict-truncated-checkpoint", "EVAL", _predict_truncated_ckpt),
    Case("export-model-run-dir", "EVAL", _export_run_dir),
    # TRAIN
    Case("train-fold-5-of-2", "TRAIN", _train_fold5),
    Case("train-out-read-only", "TRAIN", _train_ro),
    Case("train-shard-byte-changed", "TRAIN", _train_changed_shard_byte, outputs=("runs",)),
    Case("train-truncated-last-pt", "TRAIN", _train_truncated_last, outputs=("run", "runs")),
    # ARCH
    Case("demo-1-patient", "ARCH", _demo_one_patient),
    # HOSTILE (issue 20), family 1: job-script injection, refused where the value enters
    Case("name-newline-in-params", "HOSTILE", _name_in_params('name: "x\\n#SBATCH --time=1"\n', r"name: 'x\\n#SBATCH")),
    Case("name-percent-override", "HOSTILE", lambda c: (_submit_dry(c, "name=a%jb"), r"name: 'a%jb' is not a valid")),
    Case("name-semicolon-params", "HOSTILE", _name_in_params("name: a;reboot\n", r"name: 'a;reboot'")),
    Case("run-root-percent", "HOSTILE", lambda c: (_submit_dry(c, "run_root=/srv/%u/runs"), r"run_root: .*'%'")),
    Case("run-root-tilde", "HOSTILE", lambda c: (_submit_dry(c, "run_root=~/runs"), r"run_root: '~/runs' starts with")),
    Case("profile-partition-newline", "HOSTILE", _profile_case('partition: "gpu\\nrm -rf ~"\n', r"partition: 'gpu\\n")),
    Case("profile-qos-space", "HOSTILE", _profile_case("qos: high prio\n", r"qos: 'high prio' is not a Slurm name")),
    Case(
        "profile-python-relative", "HOSTILE", _profile_case("python: .venv/bin/python\n", r"python: .* not an absolute")
    ),
    Case("profile-setup-open-quote", "HOSTILE", _profile_case('setup: ["echo \'x"]\n', r"setup\[0\]: .*complete")),
    Case("profile-additional-key", "HOSTILE", _profile_case('additional: {"x\\ny": 1}\n', r"additional key: 'x\\ny'")),
    Case("profile-additional-signal", "HOSTILE", _profile_case("additional: {signal: USR1@5}\n", r"additional.signal")),
    Case(
        "profile-per-kind-account-quote",
        "HOSTILE",
        _profile_case('per_kind: {pack: {account: "a\'b"}}\n', r"per_kind.pack.account: \"a'b\""),
    ),
    # family 4: inputs that would exhaust time or memory, refused before the expensive work
    Case("yaml-alias-bomb", "HOSTILE", _yaml_bomb),
    Case("yaml-50000-deep", "HOSTILE", _yaml_deep),
    Case("yaml-5-mb", "HOSTILE", _yaml_huge),
    Case("name-nul-in-params", "HOSTILE", _name_in_params('name: "a\\0b"\n', r"name: 'a\\x00b'")),
    Case("cli-nul", "HOSTILE", _cli_nul),
    Case("predict-checkpoint-gigantic-model", "HOSTILE", _gigantic),
    Case("predict-checkpoint-kwargs-wrong-type", "HOSTILE", _spec_wrong_type),
    Case("predict-calibration-zero", "HOSTILE", _calibration(0)),
    Case("predict-calibration-tiny", "HOSTILE", _calibration(1e-300)),
    Case("predict-calibration-text", "HOSTILE", _calibration("1.5")),
    Case("predict-calibration-nan", "HOSTILE", _calibration(float("nan"))),
    Case("predict-calibration-bias-huge", "HOSTILE", _calibration(1.5, 1e9)),
    Case("predict-calibration-bias-text", "HOSTILE", _calibration(1.5, "0.3")),
    # family 2: split integrity
    Case("manifest-patient-in-both-splits", "HOSTILE", _leak("manifest")),
    Case("pack-patient-in-both-splits", "HOSTILE", _leak("pack")),
    Case("manifest-patient-spelled-twice", "HOSTILE", _spelled_twice),
    Case("manifest-same-file-twice", "HOSTILE", _same_file_twice),
    # family 5: silent data changes
    Case("pack-size-change-into-existing-shards", "HOSTILE", _pack_size_change),
    Case("predict-gradcam-inside-input-folder", "HOSTILE", _gradcam_in_input),
    Case("predict-gradcam-holds-an-input", "HOSTILE", _gradcam_holds_input),
    # issue 20, second round: jobs.json ids are Slurm ids (never an scancel option, never a second line)
    Case(
        "jobs-json-task-id-option",
        "HOSTILE",
        _registry(_slurm_jobs(task_id="--user=root"), "status", r"task_id: '--user=root' is not a Slurm job id"),
    ),
    Case(
        "jobs-json-job-id-newline",
        "HOSTILE",
        _registry(_slurm_jobs(job_id="7\n#SBATCH --x"), "submit resubmit", r"job_id: '7\\n#SBATCH --x' is not"),
    ),
    Case(
        "jobs-json-dependency-injection",
        "HOSTILE",
        _registry(_slurm_jobs(dependency="afterok:1 --wrap=x"), "submit resubmit", r"dependency: 'afterok:1 --wrap"),
    ),
    Case("jobs-json-deep", "HOSTILE", _registry("[" * 100_000, "status", r"jobs.json: nested too deep")),
    Case(
        "jobs-json-job-without-kind",
        "HOSTILE",
        _registry('{"submissions": [{"jobs": [{"tasks": []}]}]}', "submit resubmit", r"jobs\[0\]: expected .*'kind'"),
    ),
    Case("report-into-a-folder-that-is-no-experiment", "HOSTILE", _report_foreign),
    Case(
        "tune-space-moves-the-run-root",
        "HOSTILE",
        _tune_dry(
            "tune.space={run_root: {type: categorical, choices: [/tmp/a, /tmp/b]}}", r"run_root cannot be searched"
        ),
    ),
    Case(
        "tune-space-middle-choice-newline",
        "HOSTILE",
        _tune_dry(
            'tune.space={student.model: {type: categorical, choices: [hybrid_tiny, "x\\n#SBATCH -t 1", hybrid_tiny]}}',
            r"student.model: 'x\\n#SBATCH -t 1' holds the control character",
        ),
    ),
    Case(
        "pack-fit-change-into-existing-shards", "HOSTILE", _pack_setting_change("--fit", "stretch", "fit 'letterbox'")
    ),
    Case(
        "pack-compression-change-into-existing-shards",
        "HOSTILE",
        _pack_setting_change("--compression", "lzf", "compression 'none'"),
    ),
    Case(
        "pack-min-side-change-into-existing-shards", "HOSTILE", _pack_setting_change("--min-side", "200", "min_side 0")
    ),
    Case("mura-csv-8-gib", "HOSTILE", _huge_mura_csv),
    Case("folds-manifest-8-gib", "HOSTILE", _huge_manifest("folds")),
    Case("pack-manifest-8-gib", "HOSTILE", _huge_manifest("pack")),
    Case("predict-csv-8-gib", "HOSTILE", _huge_predict_csv),
    Case("jobs-json-entry-not-object", "HOSTILE", _registry('{"submissions": [1]}', "status", r"submissions\[0\]: ")),
]


@contextlib.contextmanager
def _case_env(tmp_path: Path, world: World) -> Iterator[Ctx]:
    cleanups: list[Callable[[], None]] = []
    with contextlib.ExitStack() as stack:
        ctx = Ctx(tmp_path, world, cleanups, stack)
        try:
            yield ctx
        finally:
            for undo in reversed(cleanups):
                undo()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_is_written(
    case: Case,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with _case_env(tmp_path / "case", world) as ctx:
        ctx.tmp.mkdir()
        argv, fragment = case.build(ctx)
        cwd = ctx.tmp / "cwd"
        cwd.mkdir()
        monkeypatch.chdir(cwd)  # relative default outputs land inside the snapshot
        capsys.readouterr()
        before = _snapshot(ctx.tmp, world.base)
        with caplog.at_level("INFO"):
            rc = cli_main(argv)
        err = capsys.readouterr().err
        after = _snapshot(ctx.tmp, world.base)
    # The error is a plain stderr line or a logged ERROR (the CLI's log format writes it as one stderr line).
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    lines = [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)] + logged
    err = err + "".join(f"(logged) {m}\n" for m in logged)
    assert rc == 2, f"[{case.owner}] exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err and len(lines) == 1 and "\n" not in lines[0], f"[{case.owner}] not one line:\n{err}"
    assert re.search(fragment, lines[0]), f"[{case.owner}] {lines[0]!r} does not name the input ({fragment})"
    outs = [str(ctx.tmp / o) for o in case.outputs]
    changed = sorted(
        k
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k) and not _allowed(k, before, after, outs)
    )
    assert not changed, f"[{case.owner}] files written, changed or removed: {changed[:10]}"


def _allowed(path: str, before: dict, after: dict, outputs: list[str]) -> bool:
    """A new entry inside an output folder, or an output folder (or a folder in one) that gained entries."""
    inside = any(path == o or path.startswith(o + os.sep) for o in outputs)
    is_dir = stat.S_ISDIR((after.get(path) or before.get(path) or (0,))[0])
    return inside and (path not in before or (is_dir and path in after))


def test_body_part_outside_the_seven_is_kept_with_a_warning(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with _case_env(tmp_path, world) as ctx:
        argv, _ = _part_renamed("XR_LEG", "")(ctx)
    with caplog.at_level("WARNING"):
        assert cli_main(argv) == 0
    assert "LEG" in capsys.readouterr().out
    assert "XR_LEG" in caplog.text and "outside MURA's seven" in caplog.text


# ----------------------------------------------------------------------------------------------
# Issue 20, family 3: a moved experiment folder is the only truth


def _submitted_experiment(world: World, run_root: Path, name: str) -> Path:
    """An experiment folder whose every run completed, as `submit folds` leaves it (config.yaml, jobs.json)."""
    import json

    from bonehpc.config import load_config, save_config
    from bonehpc.paths import ExperimentPaths

    cfg = load_config(None, tiny_overrides(run_root, world.root, world.shards, f"name={name}"))
    paths = ExperimentPaths.of(cfg)
    paths.root.mkdir(parents=True)
    save_config(cfg, paths.config)
    tasks = []
    for fold in ("fold0", "fold1", "final"):
        for role in ("teacher", "student"):
            (paths.root / fold / role).mkdir(parents=True)
            (paths.root / fold / role / "metrics.json").write_text('{"status": "completed"}')
            tasks.append({"kind": "train", "role": role, "job_id": "1", "tasks": [{"task_id": "1", "fold": fold}]})
    tasks.append({"kind": "evaluate", "role": "", "job_id": "2", "tasks": [{"task_id": "2", "state": "COMPLETED"}]})
    tasks[0]["tasks"][0]["state"] = "FAILED"  # one failed teacher (completed since) makes it a resubmit
    sub = {"kind": "folds", "mode": "debug", "workdir": str(run_root.parent), "jobs": tasks}
    paths.jobs.write_text(json.dumps({"submissions": [sub]}))
    return paths.root


def test_resubmit_of_a_moved_experiment_writes_only_in_the_folder_given(world: World, tmp_path: Path) -> None:
    from bonehpc.config import load_config
    from jobs.submit import resubmit

    old = _submitted_experiment(world, tmp_path / "old" / "runs", "moved")
    new = tmp_path / "new" / "runs" / "moved"
    new.parent.mkdir(parents=True)
    old.rename(new)
    entry = resubmit(new)
    assert entry["run_dir"] == str(new) and not entry["jobs"]  # everything completed: nothing to run
    assert list((tmp_path / "old" / "runs").iterdir()) == []  # nothing written where the config pointed
    assert (new / "folds.csv").is_file() and load_config(new / "config.yaml").run_root == str(new.parent)


def test_tune_status_of_a_moved_experiment_writes_only_in_the_folder_given(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import optuna

    from bonehpc.config import load_config, save_config
    from bonehpc.paths import ExperimentPaths
    from bonehpc.tune import open_study, study_dir

    cfg = load_config(None, tiny_overrides(tmp_path / "old" / "runs", world.root, world.shards, "name=moved"))
    study = open_study(cfg, create=True)  # the journal under old/runs/moved/tune/, one completed trial
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    save_config(cfg, study_dir(cfg) / "config.yaml")
    new = tmp_path / "new" / "runs" / "moved"
    new.parent.mkdir(parents=True)
    ExperimentPaths.of(cfg).root.rename(new)
    assert cli_main(["tune", "status", "--exp", str(new)]) == 0
    assert list((tmp_path / "old" / "runs").iterdir()) == []  # no journal, no best_params.yaml at the old place
    assert (new / "tune" / "best_params.yaml").is_file() and "COMPLETE=1" in capsys.readouterr().out


def test_resubmit_of_a_renamed_experiment_is_refused_in_one_line(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = _submitted_experiment(world, tmp_path / "runs", "first")
    new = old.rename(old.parent / "second")
    before = _snapshot(tmp_path)
    assert cli_main(["submit", "resubmit", "--exp", str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert "second: the experiment folder was renamed (its config.yaml says name 'first')" in err
    assert "\n" not in err and _snapshot(tmp_path) == before


def test_cross_split_patients_are_packed_when_the_data_set_means_it(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with _case_env(tmp_path, world) as ctx:
        root = _leak_tree(ctx)
    with caplog.at_level("WARNING"):
        assert cli_main(["manifest", "--mura-root", str(root), "--cross-split-patients"]) == 0
    assert "1 patient(s) in both the train and the valid split (allowed" in caplog.text


# ----------------------------------------------------------------------------------------------
# Issue 20, families 4 and 5 below the CLI: images decoded only when their header is sane, upright, at
# their real bit depth; overlays with unique names


def test_a_jpeg_named_png_claiming_20000_squared_is_refused_from_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2
    import numpy as np

    from bonehpc.data import images

    ok, jpg = cv2.imencode(".jpg", np.zeros((16, 16), np.uint8))
    data = bytearray(jpg.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") + (20000).to_bytes(2, "big")  # height, width
    (tmp_path / "image1.png").write_bytes(bytes(data))
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: pytest.fail("decoded before the pixel cap"))
    with pytest.raises(images.RejectedImageError, match=r"too_large: header claims 400000000 px"):
        images.read_gray8(tmp_path / "image1.png")
    with pytest.raises(images.RejectedImageError, match=r"JPEG header claims 300x300 px, above the cap of 1000"):
        data[sof + 5 : sof + 9] = (300).to_bytes(2, "big") + (300).to_bytes(2, "big")
        images.decode_gray8(bytes(data), max_pixels=1000)
    # a format whose header cannot be read first is not decoded (OpenCV reads Radiance HDR up to 1 Gpx)
    hdr = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 20000 +X 20000\n" + bytes(64)
    with pytest.raises(images.RejectedImageError, match=r"not_an_image"):
        images.decode_gray8(hdr)


def _png(arr: object, exif_orientation: int = 1, sbit: int = 0) -> bytes:
    import io
    import struct
    import zlib

    from PIL import Image

    im = Image.fromarray(arr)  # type: ignore[arg-type]
    exif = Image.Exif()
    exif[0x0112] = exif_orientation
    buf = io.BytesIO()
    im.save(buf, format="PNG", **({"exif": exif.tobytes()} if exif_orientation != 1 else {}))
    data = buf.getvalue()
    if sbit:  # an sBIT chunk right after IHDR (8 + 25 bytes), as detector software writes it
        chunk = struct.pack(">I", 1) + b"sBIT" + bytes([sbit])
        chunk += struct.pack(">I", zlib.crc32(b"sBIT" + bytes([sbit])))
        data = data[:33] + chunk + data[33:]
    return data


def test_16_bit_png_of_12_bit_data_is_scaled_by_its_bit_depth() -> None:
    import numpy as np

    from bonehpc.data.images import decode_gray8

    g12 = np.array([[0, 1024, 2048, 4095]], np.uint16)
    assert decode_gray8(_png(g12)).tolist() == [[0, 64, 128, 255]]  # not x / 257: almost black
    dark = np.array([[0, 256, 512, 1023]], np.uint16)  # a dark 12-bit image, its bit depth declared in sBIT
    assert decode_gray8(_png(dark, sbit=12)).tolist() == [[0, 16, 32, 64]]
    assert decode_gray8(_png(dark)).tolist() == [[0, 64, 128, 255]]  # undeclared: the data's 10 bits
    full = np.array([[0, 257, 65535]], np.uint16)
    assert decode_gray8(_png(full)).tolist() == [[0, 1, 255]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_honoured_as_pillow_does(orientation: int) -> None:
    import io

    import numpy as np
    from PIL import Image, ImageOps

    from bonehpc.data.images import decode_gray8

    arr = (np.arange(35).reshape(5, 7) * 7).astype(np.uint8)
    data = _png(arr, orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert decode_gray8(data).tolist() == want.tolist()


def test_overlays_of_images_with_the_same_last_folders_get_two_files() -> None:
    from bonehpc.predict import overlay_name

    a = "/site-a/MURA-v1.1/valid/XR_HAND/patient1/study1_positive/image1.png"
    b = "/site-b/MURA-v1.1/valid/XR_HAND/patient1/study1_positive/image1.png"
    study = "valid/XR_HAND/patient1/study1_positive/"
    assert overlay_name(a, study) != overlay_name(b, study)
    assert overlay_name(a, study).startswith("XR_HAND_patient1_study1_positive__image1__")
    assert overlay_name("/x/a b.png", "s/") != overlay_name("/x/a_b.png", "s/")  # same once made safe


def test_ids_that_are_no_slurm_ids_never_reach_scancel_or_a_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    from bonehpc import slurm
    from bonehpc.config import ConfigError

    calls: list[list[str]] = []
    monkeypatch.setattr(
        slurm.subprocess, "run", lambda argv, **_: calls.append(argv) or subprocess.CompletedProcess(argv, 0)
    )
    slurm.cancel(["12_3", "--user=root", "-u", "4\n5", "9"], "test")
    assert calls == [["scancel", "12_3", "9"]]
    spec = slurm.ResourceSpec()
    for dep in ("afterok:1\n#SBATCH --time=1", "afterok:-1", "afterany:1 2", "after:%j", "afterok:"):
        with pytest.raises(ConfigError, match="dependency: .* is not a Slurm dependency"):
            slurm.render_sbatch(spec, "/x/%j", "n", dependency=dep)
    assert "#SBATCH --dependency=aftercorr:12,afterok:3_1:3_2" in slurm.render_sbatch(
        spec, "/x/%j", "n", dependency="aftercorr:12,afterok:3_1:3_2"
    )


HOSTILE_MAKE = "a b'c\"d;touch PWNED `touch PWNED` $$(touch PWNED) * -x"
"""As typed in `make status EXP=...` ($$ is make's $): a space, both quotes, ;, backticks, $(...), a glob."""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("status", ["status", "--exp", "{v}", "--run-root", "{v}"]),
        ("report", ["report", "--exp", "{v}", "--run-root", "{v}"]),
        ("resubmit", ["submit", "resubmit", "--exp", "{v}", "--run-root", "{v}"]),
        ("tune-status", ["tune", "status", "--exp", "{v}", "--run-root", "{v}", "--study", "{v}"]),
        ("predict", ["predict", "--model", "{v}/{v}", "--input", "{v}", "--out", "{v}"]),
        ("submit-folds", ["submit", "folds", "--config", "{v}", "--params", "{v}", "cluster.profile={v}"]),
        ("verify", ["verify", "--full", "--", "{v}"]),  # data.shards of CONFIG (here: CONFIG itself)
    ],
)
def test_make_variables_reach_bonehpc_as_one_word_each(tmp_path: Path, target: str, expected: list[str]) -> None:
    """EXP, RUN_ROOT, CONFIG, PARAMS, PROFILE, STUDY, INPUT, OUT: each one argument, nothing run by a shell."""
    import json
    import sys

    root = Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / ".stamp").touch()  # `setup` is done
    fake = venv / "bin" / "bonehpc"
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        "if sys.argv[1] == 'config':\n    print(json.dumps({'data': {'shards': sys.argv[3]}}))\n"  # JSON is YAML
        "else:\n    print('ARGV=' + json.dumps(sys.argv[1:]))\n"
    )
    (venv / "bin" / "python").symlink_to(sys.executable)
    fake.chmod(0o755)
    os.utime(venv / "bin" / ".stamp", (2**31, 2**31))  # newer than pyproject.toml
    names = ("EXP", "RUN_ROOT", "CONFIG", "PARAMS", "PROFILE", "STUDY", "INPUT", "OUT")
    res = subprocess.run(
        ["make", "-s", "-C", str(root), target, f"VENV={venv}", *(f"{n}={HOSTILE_MAKE}" for n in names)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    value = HOSTILE_MAKE.replace("$$", "$")
    argv = [json.loads(line[5:]) for line in res.stdout.splitlines() if line.startswith("ARGV=")]
    assert argv == [[a.replace("{v}", value) for a in expected]], res.stdout + res.stderr
    assert not list(tmp_path.glob("PWNED")) and not (root / "PWNED").exists()


def test_huge_json_files_from_elsewhere_are_refused_or_unreadable_from_their_size(tmp_path: Path) -> None:
    """manifest.json of a shard folder, metrics.json / calibration.json (read_json): 8 GiB sparse files."""
    from bonehpc.data.shards import ShardError, load_manifest_json
    from bonehpc.paths import read_json

    _sparse(tmp_path / "shards" / "manifest.json")
    with pytest.raises(ShardError, match=HUGE_LINE):
        load_manifest_json(tmp_path / "shards")
    assert read_json(_sparse(tmp_path / "metrics.json")) is None  # "unreadable", as a torn file


def test_a_config_path_starting_with_a_dash_reaches_the_trainer_as_its_value() -> None:
    """run_root=-x (a valid folder name) must not turn the torchrun child's --config value into an option."""
    from bonehpc.cli import build_parser
    from jobs.train import torchrun_command

    cmd = torchrun_command("-x/e/config.yaml", 0, "teacher", 1, "/usr/bin/python3", env={})
    args = build_parser().parse_args(["train", *cmd[cmd.index("bonehpc.cli.train") + 1 :]])
    assert (args.config, args.fold, args.role, args.overrides) == ("-x/e/config.yaml", "0", "teacher", [])


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_an_image_whose_alpha_varies_is_rejected_not_packed_as_its_colour_planes(tmp_path: Path, mode: str) -> None:
    """The X-ray drawn in the alpha plane over black: dropping alpha would pack a black image without a word."""
    import numpy as np
    from PIL import Image

    from bonehpc.data.images import RejectedImageError, read_gray8

    xray = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    black = np.zeros_like(xray)
    planes = [black, xray] if mode == "LA" else [black, black, black, xray]
    Image.fromarray(np.stack(planes, -1), mode).save(tmp_path / "a.png")
    with pytest.raises(RejectedImageError, match="transparent pixels"):
        read_gray8(tmp_path / "a.png")


def test_small_json_files_from_elsewhere_nested_50000_deep_are_unreadable_not_a_traceback(tmp_path: Path) -> None:
    """The synthetic marker of a data set (pack read it last: every shard written, then a RecursionError), the
    .onnx.json beside an export's --out, run metrics: each a ValueError to its reader, never a RecursionError."""
    from bonehpc.data.synthetic import SYNTHETIC_MARKER, read_marker
    from bonehpc.export import ExportError, _check_out
    from bonehpc.paths import read_json

    deep = "[" * 50_000
    (tmp_path / "MURA-v1.1").mkdir()
    (tmp_path / "MURA-v1.1" / SYNTHETIC_MARKER).write_text(deep)
    assert read_marker(tmp_path) is None  # not a marker bonehpc wrote: real data
    (tmp_path / "m.onnx").write_text("someone's model")
    (tmp_path / "m.onnx.json").write_text(deep)
    with pytest.raises(ExportError, match="was not written by bonehpc export"):
        _check_out(tmp_path / "m.onnx")
    (tmp_path / "metrics.json").write_text(deep)
    assert read_json(tmp_path / "metrics.json") is None


def test_a_png_header_asking_for_more_than_512_mib_decoded_is_refused_before_decoding(tmp_path: Path) -> None:
    """12000 x 12000 px is within the pixel cap, but as 16-bit RGBA OpenCV would allocate 1.15 GB per image."""
    import struct
    import zlib

    from bonehpc.data.images import RejectedImageError, read_gray8

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 16, 6, 0, 0, 0)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(RejectedImageError, match="12000x12000 px at 8 bytes each, above the cap of 512 MiB") as err:
        read_gray8(tmp_path / "a.png")
    assert err.value.reason == "too_large"
