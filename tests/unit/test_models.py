"""Registry, hybrid student, model info and offline pretrained weights (random init and files made here)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from bonehpc.models import (
    HybridNet,
    ModelKwargsError,
    ModelNotFoundError,
    WeightsNotFoundError,
    constructor_kwargs,
    create_model,
    fetch_weights,
    find_weights,
    list_models,
    model_info,
)
from bonehpc.models.info import count_gflops
from bonehpc.models.weights import hub_source

HYBRIDS = ("hybrid_tiny", "hybrid_small", "hybrid_base")


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------------------------------- registry


def test_list_models() -> None:
    assert set(HYBRIDS) <= set(list_models())
    assert list_models("hybrid_s*") == ["hybrid_small"]
    assert "resnet50" in list_models("resnet5*", include_timm=True)


@pytest.mark.parametrize("name", ["hybrid_tiny", "resnet18", "vit_tiny_r_s16_p8_224"])
def test_create_model_bonehpc_and_timm_names(name: str) -> None:
    m = create_model(name, num_classes=2).eval()
    assert m.input_size == (3, 224, 224)
    cfg = getattr(m, "pretrained_cfg", None)
    if cfg:  # timm models keep their own normalisation (vit_tiny_r_s16_p8_224 uses 0.5 / 0.5)
        assert m.mean == tuple(cfg["mean"]) and m.std == tuple(cfg["std"])
    else:
        assert m.mean == (0.485, 0.456, 0.406) and m.std == (0.229, 0.224, 0.225)
    assert m.bonehpc_spec == {"name": name, "kwargs": {"num_classes": 2, "drop_rate": 0.0}}
    with torch.no_grad():
        assert m(torch.randn(1, 3, 224, 224)).shape == (1, 2)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ModelNotFoundError, match="hybrid_small"):
        create_model("resnet_of_dreams")


@pytest.mark.parametrize(
    ("name", "kwargs"), [("hybrid_tiny", {"depth": 1, "img_size": 64, "pool": "cls"}), ("resnet18", {"in_chans": 1})]
)
def test_spec_round_trip(tmp_path: Path, name: str, kwargs: dict) -> None:
    m = create_model(name, num_classes=3, drop_rate=0.1, **kwargs)
    # The spec survives a weights_only checkpoint, and create_model(**spec) rebuilds the same architecture.
    torch.save({"model_spec": m.bonehpc_spec, "model": m.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    spec = ckpt["model_spec"]
    rebuilt = create_model(spec["name"], **spec["kwargs"])
    rebuilt.load_state_dict(ckpt["model"])  # strict: same names and shapes
    assert rebuilt.bonehpc_spec == m.bonehpc_spec
    assert rebuilt.input_size == m.input_size
    x = torch.randn(2, m.input_size[0], 64, 64)
    assert torch.allclose(rebuilt.eval()(x), m.eval()(x))


@pytest.mark.parametrize("name", ["hybrid_tiny", "resnet18"])
@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "kwargs", "banana"])
def test_only_documented_constructor_kwargs(tmp_path: Path, name: str, key: str) -> None:
    """timm's loader switches (checkpoint_path, pretrained_cfg...) never pass through: only the model
    class's constructor parameters are keyword arguments of create_model."""
    assert {"num_classes", "drop_rate", "in_chans"} <= constructor_kwargs(name)
    assert key not in constructor_kwargs(name)
    victim = tmp_path / "not-a-model.pth"
    victim.write_bytes(b"foreign bytes")
    with pytest.raises(ModelKwargsError, match=f"takes no keyword argument.*{key}"):
        create_model(name, **{key: str(victim)})


# ---------------------------------------------------------------------------------------------- hybrid student


@pytest.mark.parametrize("size", [64, 224])
@pytest.mark.parametrize("name", ["hybrid_tiny", "hybrid_small"])
def test_hybrid_shapes(name: str, size: int) -> None:
    m = create_model(name).eval()
    with torch.no_grad():
        tokens = m.forward_features(torch.randn(2, 3, size, size))
        logits = m(torch.randn(2, 3, size, size))
    assert tokens.shape == (2, 1 + (size // 16) ** 2, m.embed_dim)
    assert logits.shape == (2, 2)


def test_hybrid_native_64px_and_grayscale() -> None:
    m = create_model("hybrid_tiny", img_size=64, in_chans=1, num_classes=5)
    assert m.pos_embed.shape[1] == 16 and m.input_size == (1, 64, 64)
    assert m(torch.randn(3, 1, 64, 64)).shape == (3, 5)


def test_hybrid_sizes_ordered() -> None:
    counts = [n_params(create_model(n)) for n in HYBRIDS]
    assert counts[0] < 1_000_000
    assert counts[0] < counts[1] < counts[2]


def test_hybrid_init() -> None:
    m = create_model("hybrid_small")
    assert 0.01 < m.pos_embed.std().item() < 0.03  # trunc_normal(0.02)
    assert m.head.bias.abs().sum() == 0
    linear_stds = [mod.weight.std().item() for mod in m.modules() if isinstance(mod, nn.Linear)]
    assert all(0.015 < s < 0.025 for s in linear_stds)
    assert m.no_weight_decay() == {"pos_embed", "cls_token"}


def test_hybrid_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        HybridNet(img_size=100)
    with pytest.raises(ValueError, match="divisible"):
        create_model("hybrid_tiny", embed_dim=65)


def test_hybrid_learns() -> None:
    """A few optimisation steps fit a small fixed batch (the architecture trains end to end)."""
    torch.manual_seed(0)
    m = create_model("hybrid_tiny", img_size=32)
    x = torch.randn(8, 3, 32, 32)
    y = torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---------------------------------------------------------------------------------------------- model info


def test_gflops_counts_two_per_mac() -> None:
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    assert count_gflops(lin, input_size=8) * 1e9 == pytest.approx(2 * 3 * 8 * 8 * 10)


def test_student_cheaper_than_teacher() -> None:
    teacher = model_info(create_model("resnet50"), 224)
    student = model_info(create_model("hybrid_small"), 224)
    assert 7.5 < teacher["gflops"] < 8.5  # resnet50: 4.1 GMACs
    assert student["gflops"] * 3 < teacher["gflops"]
    assert student["params"] * 4 < teacher["params"]


def test_model_info_measures() -> None:
    m = create_model("hybrid_tiny")
    info = model_info(m, input_size=64, measure=True, batch_size=4, steps=2, warmup=1)
    assert set(info) == {"params", "gflops", "input_size", "infer_img_per_s"}
    assert info["params"] == n_params(m) and info["infer_img_per_s"] > 0
    assert m.training  # the caller's model is left as it was


# ---------------------------------------------------------------------------------------------- offline weights


def test_missing_weight_file_fails_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="bonehpc weights resnet50") as err:
        create_model("resnet50", pretrained=True, weights=str(tmp_path / "resnet50.safetensors"))
    assert time.perf_counter() - start < 2.0
    assert "resnet50.safetensors" in str(err.value)


def test_empty_cache_fails_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match="in the cache") as err:
        create_model("resnet18", pretrained=True, weights=str(tmp_path))
    assert time.perf_counter() - start < 2.0
    assert str(tmp_path) in str(err.value)


def test_fetch_refuses_in_offline_mode(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        fetch_weights("resnet18", tmp_path)


@pytest.fixture(scope="module")
def imagenet_like_resnet18() -> dict[str, torch.Tensor]:
    """A random 1000-class resnet18 state_dict standing in for downloaded ImageNet weights."""
    import timm

    torch.manual_seed(3)
    return timm.create_model("resnet18", pretrained=False).state_dict()


def _assert_transferred(model: nn.Module, source: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    body = [k for k in source if not k.startswith("fc.")]
    assert all(torch.equal(own[k], source[k]) for k in body)
    assert own["fc.weight"].shape == (2, 512)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_weight_file(tmp_path: Path, imagenet_like_resnet18, fmt: str) -> None:
    path = tmp_path / f"resnet18.{fmt}"
    if fmt == "pth":
        torch.save(imagenet_like_resnet18, path)
    else:
        save_file(imagenet_like_resnet18, str(path))
    m = create_model("resnet18", pretrained=True, weights=str(path))
    _assert_transferred(m, imagenet_like_resnet18)
    assert "weights" not in m.bonehpc_spec["kwargs"]  # the checkpoint's state_dict replaces them


def test_prefilled_hf_cache(tmp_path: Path, imagenet_like_resnet18) -> None:
    """A cache folder in the Hugging Face layout (as fetch_weights leaves it) is found offline."""
    repo_id, _ = hub_source("resnet18")
    assert repo_id
    repo = tmp_path / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    save_file(imagenet_like_resnet18, str(snap / "model.safetensors"))
    assert find_weights("resnet18", tmp_path) == snap / "model.safetensors"
    assert fetch_weights("resnet18", tmp_path) == snap / "model.safetensors"  # already there: no network
    _assert_transferred(create_model("resnet18", pretrained=True, weights=str(tmp_path)), imagenet_like_resnet18)


def test_hybrid_pretrained_from_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(4)
    src = create_model("hybrid_tiny", num_classes=7)
    torch.save({"model_spec": src.bonehpc_spec, "model": src.state_dict()}, tmp_path / "best.pt")
    m = create_model("hybrid_tiny", pretrained=True, weights=str(tmp_path / "best.pt"))
    own, ref = m.state_dict(), src.state_dict()
    assert all(torch.equal(own[k], ref[k]) for k in ref if not k.startswith("head."))
    assert own["head.weight"].shape == (2, 128)
    with pytest.raises(WeightsNotFoundError, match="no published weights"):
        create_model("hybrid_tiny", pretrained=True)
    with pytest.raises(RuntimeError, match="does not fit"):
        create_model("hybrid_small", pretrained=True, weights=str(tmp_path / "best.pt"))
