"""Loader contract on every backend: shapes, dtypes, labels, len, DDP sharding, reshuffling, determinism."""

from __future__ import annotations

import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import time
from itertools import islice

import numpy as np
import pytest
import torch

from bonehpc.config import load_config
from bonehpc.data.loaders import LoaderError, build_eval_loader, build_loader, resolve_backend
from bonehpc.data.shards import ShardReader

BATCH = 8
CPU = torch.device("cpu")


def make_cfg(backend: str, *extra: str):
    return load_config(
        None,
        [
            f"data.backend={backend}",
            "data.image_size=64",
            "data.pack_size=64",
            "data.num_workers=1",
            f"train.batch_size={BATCH}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def reader(shards_dir) -> ShardReader:
    return ShardReader(shards_dir)


@pytest.fixture(scope="module")
def labels_of(reader: ShardReader) -> dict[int, int]:
    return dict(zip(reader.index["image_id"].tolist(), reader.index["label"].astype(int).tolist(), strict=True))


def collect(loader) -> tuple[list[torch.Tensor], np.ndarray, np.ndarray]:
    images, labels, ids = [], [], []
    for x, y, i in loader:
        images.append(x)
        labels.append(y.numpy())
        ids.append(i.numpy())
    return images, np.concatenate(labels), np.concatenate(ids)


@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
def test_contract_train_and_eval(backend: str, reader: ShardReader, labels_of: dict[int, int]) -> None:
    cfg = make_cfg(backend)
    ids = reader.image_ids
    n = len(ids)
    train = build_loader(cfg, reader, ids, train=True, device=CPU, seed=1)
    assert train.backend == backend and len(train) == n // BATCH
    images, labels, got = collect(train)
    assert len(images) == len(train)
    for x in images:
        assert x.shape == (BATCH, 3, 64, 64) and x.dtype == torch.float32 and x.device == CPU
        assert torch.isfinite(x).all()
    assert labels.dtype == np.int64 and got.dtype == np.int64
    assert len(set(got.tolist())) == len(got) and set(got.tolist()) <= set(ids.tolist())
    assert labels.tolist() == [labels_of[i] for i in got.tolist()]  # labels travel with their ids

    ev = build_eval_loader(cfg, reader, ids, device=CPU)
    assert len(ev) == math.ceil(n / BATCH)
    images, labels, got = collect(ev)
    assert got.tolist() == ids.tolist()  # fixed order, every image once, partial last batch kept
    assert images[-1].shape[0] == n - (len(ev) - 1) * BATCH
    assert labels.tolist() == [labels_of[i] for i in got.tolist()]
    train.close()
    ev.close()


def test_real_backends_agree_on_eval_images(reader: ShardReader) -> None:
    """Evaluation batches of the dali and torch backends hold the same images (within 1 gray level)."""
    ids = reader.image_ids[:20]
    out = {}
    for backend in ("dali", "torch"):
        ev = build_eval_loader(make_cfg(backend, "data.image_size=48"), reader, ids, device=CPU)
        images, _, got = collect(ev)
        assert got.tolist() == ids.tolist()
        out[backend] = torch.cat(images)
    assert (out["dali"] - out["torch"]).abs().max() <= 1 / (255 * 0.224) * 1.001


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_ddp_sharding_reshuffle_determinism(backend: str, reader: ShardReader) -> None:
    cfg = make_cfg(backend)
    ids = reader.image_ids
    n = len(ids)
    # Evaluation: the two ranks together visit every image exactly once.
    evals = [build_eval_loader(cfg, reader, ids, rank=r, world_size=2, device=CPU) for r in (0, 1)]
    seen = np.concatenate([collect(ev)[2] for ev in evals])
    assert sorted(seen.tolist()) == sorted(ids.tolist())
    # Training: equal full steps per rank, disjoint ids, a new order every epoch, same seed -> same batches.
    loaders = [build_loader(cfg, reader, ids, train=True, rank=r, world_size=2, device=CPU, seed=4) for r in (0, 1)]
    steps = (n // 2) // BATCH
    assert [len(x) for x in loaders] == [steps, steps]
    per_epoch = []
    for epoch in (0, 1):
        got = []
        for ld in loaders:
            ld.set_epoch(epoch)
            imgs, _, i = collect(ld)
            assert len(imgs) == steps and all(x.shape[0] == BATCH for x in imgs)
            got.append(i)
        assert not set(got[0].tolist()) & set(got[1].tolist())
        per_epoch.append(got[0])
    assert per_epoch[0].tolist() != per_epoch[1].tolist()
    again = build_loader(cfg, reader, ids, train=True, rank=0, world_size=2, device=CPU, seed=4)
    a_imgs, _, a_ids = collect(again)
    loaders[0].set_epoch(0)
    b_imgs, _, b_ids = collect(loaders[0])
    assert a_ids.tolist() == b_ids.tolist() == per_epoch[0].tolist()
    assert all(torch.equal(a, b) for a, b in zip(a_imgs, b_imgs, strict=True))  # augmentation is seeded too
    other = build_loader(cfg, reader, ids, train=True, rank=0, world_size=2, device=CPU, seed=5)
    assert collect(other)[2].tolist() != a_ids.tolist()
    for ld in (*loaders, again, other):
        ld.close()


def _views(loader, epoch: int) -> dict[int, torch.Tensor]:
    loader.set_epoch(epoch)
    images, _, ids = collect(loader)
    return dict(zip(ids.tolist(), torch.cat(images), strict=True))


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_views_are_keyed_on_seed_epoch_and_id_only(backend: str, reader: ShardReader) -> None:
    """An image's view in an epoch is the same for 1 or 2 ranks and for the outputs job's fixed-order reading."""
    cfg = make_cfg(backend, "augment.rotate_deg=30")
    ids = reader.image_ids
    one = build_loader(cfg, reader, ids, train=True, device=CPU, seed=3)
    two = [build_loader(cfg, reader, ids, train=True, rank=r, world_size=2, device=CPU, seed=3) for r in (0, 1)]
    every = build_loader(cfg, reader, ids, train=False, augment=True, device=CPU, seed=3)
    for epoch in (1, 0):  # out of order, as after a resume
        single = _views(one, epoch)
        split = {**_views(two[0], epoch), **_views(two[1], epoch)}
        fixed = _views(every, epoch)
        assert set(fixed) == set(ids.tolist())  # every id once, the dropped remainder too
        common = set(single) & set(split)
        assert len(common) >= len(ids) // 2
        assert all(torch.equal(single[i], split[i]) and torch.equal(single[i], fixed[i]) for i in common)
    assert not all(torch.equal(a, b) for a, b in zip(_views(every, 0).values(), _views(every, 1).values(), strict=True))
    for ld in (one, *two, every):
        ld.close()


def test_dali_epoch_left_unfinished_restarts_cleanly(reader: ShardReader) -> None:
    """A `break` mid-epoch (e.g. a step cap in the caller) must not leak batches into the next epoch."""
    cfg = make_cfg("dali")
    ld = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=2)
    for _ in ld:
        break
    ld.set_epoch(1)
    _, _, ids1 = collect(ld)
    fresh = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=2)
    fresh.set_epoch(1)
    assert ids1.tolist() == collect(fresh)[2].tolist()
    assert len(ids1) == len(ld) * BATCH
    ld.close()
    fresh.close()


def test_dali_pipeline_is_built_once_per_run(reader: ShardReader) -> None:
    """Epochs taken as the trainer takes them (islice of len(loader)) reuse one pipeline; a loader that
    starts at a later epoch (a resumed run) gives that epoch's batches exactly."""
    cfg = make_cfg("dali", "train.max_steps_per_epoch=3", "augment.rotate_deg=10", "augment.hflip_p=0.5")
    ld = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=3)
    epochs = []
    for epoch in range(3):
        ld.set_epoch(epoch)
        epochs.append(list(islice(ld, len(ld))))
        assert len(epochs[-1]) == len(ld) == 3
    assert ld.builds == 1
    assert epochs[1][0][2].tolist() != epochs[2][0][2].tolist()  # reshuffled: the epochs really advanced
    resumed = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=3)
    resumed.set_epoch(2)
    got = list(resumed)
    assert resumed.builds == 2  # the one at construction (epoch 0) and the jump to epoch 2
    for (x, y, i), (wx, wy, wi) in zip(got, epochs[2], strict=True):
        assert i.tolist() == wi.tolist() and y.tolist() == wy.tolist()
        assert torch.equal(x, wx)  # same augmentation draws too
    ld.close()
    resumed.close()


def test_dali_spawns_workers_once_the_cuda_driver_is_up(reader: ShardReader, monkeypatch: pytest.MonkeyPatch) -> None:
    """After torch.cuda.is_available() on a GPU machine DALI refuses fork: spawned workers give the same batches."""
    import bonehpc.data.loaders as loaders

    cfg = make_cfg("dali")
    forked = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=4)
    assert forked._pipe.py_start_method == "fork"
    want = collect(forked)
    forked.close()
    monkeypatch.setattr(loaders, "_cuda_driver_initialized", lambda: True)
    spawned = build_loader(cfg, reader, reader.image_ids, train=True, device=CPU, seed=4)
    assert spawned._pipe.py_start_method == "spawn"
    got = collect(spawned)
    spawned.close()
    assert got[2].tolist() == want[2].tolist() and got[1].tolist() == want[1].tolist()
    torch.testing.assert_close(torch.cat(got[0]), torch.cat(want[0]))


def test_max_steps_per_epoch_caps_training_only(reader: ShardReader) -> None:
    cfg = make_cfg("torch", "train.max_steps_per_epoch=2")
    assert len(build_loader(cfg, reader, reader.image_ids, train=True, device=CPU)) == 2
    assert len(build_eval_loader(cfg, reader, reader.image_ids, device=CPU)) == math.ceil(len(reader) / BATCH)


def test_bad_input_is_named(reader: ShardReader) -> None:
    cfg = make_cfg("torch")
    with pytest.raises(LoaderError, match="not in the shards"):
        build_loader(cfg, reader, [0, 1, 10**9], train=False, device=CPU)
    with pytest.raises(LoaderError, match="repeat"):
        build_loader(cfg, reader, [0, 0, 1], train=False, device=CPU)
    with pytest.raises(LoaderError, match="smaller than one global batch"):
        build_loader(cfg, reader, reader.image_ids[:10], train=True, world_size=2, device=CPU)
    with pytest.raises(LoaderError, match="rank"):
        build_loader(cfg, reader, reader.image_ids, train=True, rank=2, world_size=2, device=CPU)
    with pytest.raises(LoaderError, match="needs a ShardReader"):
        build_loader(cfg, None, reader.image_ids, train=True, device=CPU)
    with pytest.raises(LoaderError, match="not one of"):
        resolve_backend("opencv")


def test_auto_picks_dali_when_it_imports(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="bonehpc.data.loaders"):
        assert resolve_backend("auto") == "dali"
    assert "using dali" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bonehpc.data.loaders"):
        resolve_backend("auto", rank=1)
    assert caplog.text == ""  # only rank 0 logs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["dali", "torch", "synthetic"])
def test_gpu_batches_are_half_channels_last(backend: str, reader: ShardReader) -> None:
    cfg = make_cfg(backend, "train.amp=bf16")
    dev = torch.device("cuda", 0)
    ld = build_loader(cfg, reader, reader.image_ids, train=True, device=dev)
    x, y, i = next(iter(ld))
    assert x.is_cuda and x.dtype == torch.bfloat16 and x.shape == (BATCH, 3, 64, 64)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.is_cuda and y.dtype == torch.int64 and i.is_cuda and i.dtype == torch.int64
    ld.close()


# Preemption: Slurm signals every process of the step ---------------------------------------------

_CHILD = """
import json, os, signal, sys
import torch
import bonehpc.data.loaders as loaders
from bonehpc import dist
from bonehpc.config import load_config
from bonehpc.data.shards import ShardReader

got = []

class Flag(dist.StopFlag):
    def _handle(self, signum, frame):
        got.append(signum)
        super()._handle(signum, frame)

if __name__ == "__main__":
    shards, backend, start = sys.argv[1:4]
    if start == "spawn":
        loaders._cuda_driver_initialized = lambda: True  # as on a GPU node: DALI spawns its workers
    cfg = load_config(None, [f"data.backend={backend}", "data.image_size=32", "data.pack_size=64",
                             "data.num_workers=2", "train.batch_size=4"])
    reader = ShardReader(shards)
    ld = loaders.build_loader(cfg, reader, reader.image_ids, train=True, device=torch.device("cpu"), seed=0)
    stop = Flag().install()  # after the workers started: they must not depend on inheriting it
    it = iter(ld)
    n = len([next(it)])
    print("READY", flush=True)
    sys.stdin.readline()  # the test signals the process group, checks the workers, then says go
    n += sum(1 for _ in it)
    ld.set_epoch(1)
    m = sum(1 for _ in ld)
    print(json.dumps({"signals": got, "flag": stop.is_set, "epoch0": n, "epoch1": m, "steps": len(ld)}), flush=True)
    ld.close()
"""


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(d))
    return sorted(pids)


def _readline(p: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout_s)
    if not ready:
        p.kill()
        raise AssertionError(f"no output from the loader process in {timeout_s:.0f} s")
    return p.stdout.readline()


@pytest.mark.parametrize(("backend", "start"), [("torch", "forkserver"), ("dali", "fork"), ("dali", "spawn")])
def test_workers_survive_preemption_signals_to_the_process_group(shards_dir, backend: str, start: str) -> None:
    """USR2 then TERM to every process of the group, as Slurm does: the rank process records them (its
    StopFlag), its loader workers (and the fork server, resource tracker) live on and the epoch goes on."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(shards_dir), backend, start],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, like a Slurm step
    )
    try:
        assert _readline(p, 180).strip() == "READY"
        before = _group(p.pid)
        assert len(before) >= 3, before  # the rank process and its 2 workers at least
        os.killpg(p.pid, signal.SIGUSR2)
        time.sleep(0.3)
        os.killpg(p.pid, signal.SIGTERM)
        time.sleep(1.0)
        assert _group(p.pid) == before  # nobody died
        p.stdin.write("go\n")
        p.stdin.flush()
        res = json.loads(_readline(p, 180))
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert res["signals"] == [signal.SIGUSR2, signal.SIGTERM] and res["flag"]
    assert res["epoch0"] == res["epoch1"] == res["steps"] > 1


_LEFT_OPEN = """
import sys
import torch
from bonehpc.config import load_config
from bonehpc.data.loaders import build_loader
from bonehpc.data.shards import ShardReader

if __name__ == "__main__":
    cfg = load_config(None, ["data.backend=torch", "data.image_size=32", "data.pack_size=64",
                             "data.num_workers=2", "train.batch_size=4"])
    reader = ShardReader(sys.argv[1])
    ld = build_loader(cfg, reader, reader.image_ids, train=True, device=torch.device("cpu"))
    next(iter(ld))
    if sys.argv[2] == "unknown":  # workers of a loader the close-at-exit registry does not hold (e.g.
        from bonehpc.data import loaders  # an iterator whose loader was collected while a worker was slow)

        loaders._OPEN_TORCH_LOADERS.discard(ld)
    print("exiting without close()", flush=True)
"""


@pytest.mark.parametrize("registered", ["registered", "unknown"])
def test_a_torch_loader_left_open_does_not_hang_the_exit(shards_dir, registered) -> None:
    """Workers ignore TERM; multiprocessing's exit handler (TERM, then join) would wait for them forever."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.Popen(
        [sys.executable, "-c", _LEFT_OPEN, str(shards_dir), registered],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0 and "exiting" in out
    deadline = time.monotonic() + 20
    while _group(p.pid) and time.monotonic() < deadline:  # the fork server and the tracker follow
        time.sleep(0.2)
    left = _group(p.pid)
    if left:
        os.killpg(p.pid, signal.SIGKILL)
    assert left == []
