"""Pretrained weights, offline: find them in a local file or a pre-filled Hugging Face cache, fetch them once.

Jobs never download: `HF_HUB_OFFLINE=1` is set by the entry points (`bonehpc.offline_env`), and asking for
weights that are not on the machine raises `WeightsNotFoundError` at once (a hub lookup would otherwise retry
for ~47 s and then fail).
`fetch_weights` is for a machine with internet (a login node): it fills a shared cache folder whose file path
then goes into the config (``teacher.weights=...``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# Files timm looks for in a hub repo, best first (timm's own order).
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for but are not on this machine; the message says how to get them."""


def _fetch_hint(model_name: str, cache_dir: Path | None) -> str:
    where = f" --cache-dir {cache_dir}" if cache_dir else " --cache-dir /shared/weights"
    return (
        f"On a machine with internet run `bonehpc weights {model_name}{where}` (or "
        f"`bonehpc.models.weights.fetch_weights({model_name!r}, cache_dir)`), then set the printed file as "
        "<role>.weights in the config, or set <role>.pretrained=false to start from random weights."
    )


def hub_source(model_name: str) -> tuple[str | None, str | None]:
    """(Hugging Face repo id, URL) of timm's default pretrained weights of `model_name` (either may be None)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(model_name):
        raise WeightsNotFoundError(f"{model_name!r} is not a timm model, so it has no published weights")
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        return None, None
    url = cfg.url if isinstance(cfg.url, str) and cfg.url else None
    return cfg.hf_hub_id or None, url


def _default_cache() -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


def find_weights(model_name: str, weights: str | os.PathLike[str] | None = None) -> Path:
    """The local file holding pretrained weights for `model_name`, without touching the network.

    Args:
        model_name: timm model name (e.g. ``resnet50``; its default pretrained tag is used).
        weights: A weight file (.safetensors / .pth / .pt / .bin), a folder used as Hugging Face cache (as filled
            by `fetch_weights`), or None / empty for the default Hugging Face cache (``HF_HUB_CACHE``).

    Raises:
        WeightsNotFoundError: The file does not exist, or the cache holds no weights for the model.
    """
    if weights:
        path = Path(weights).expanduser()
        if path.is_file():
            return path
        if not path.exists():
            kind = "weight file" if path.suffix in WEIGHT_SUFFIXES else "weights path"
            raise WeightsNotFoundError(
                f"{kind} {path} does not exist (pretrained weights for {model_name}). "
                + _fetch_hint(model_name, path.parent if path.suffix in WEIGHT_SUFFIXES else path)
            )
        cache_dir = path
    else:
        cache_dir = _default_cache()

    repo_id, url = hub_source(model_name)
    from huggingface_hub import try_to_load_from_cache

    if repo_id:
        for filename in HUB_FILENAMES:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if url:
        flat = cache_dir / Path(url).name
        if flat.is_file():
            return flat
    what = f"hub repo {repo_id}" if repo_id else (f"url {url}" if url else "no published weights")
    raise WeightsNotFoundError(
        f"no pretrained weights for {model_name} ({what}) in the cache {cache_dir}. "
        + _fetch_hint(model_name, cache_dir)
    )


def fetch_weights(model_name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download `model_name`'s default pretrained weights into `cache_dir` (needs internet) and return the file.

    The folder gets the Hugging Face cache layout, so `find_weights(model_name, cache_dir)` finds the file later
    on machines without internet that share the folder. Returns at once when the file is already there.

    Raises:
        RuntimeError: Hugging Face offline mode is on in this process (set ``HF_HUB_OFFLINE=0`` before bonehpc
            is imported).
        WeightsNotFoundError: The model has no published weights.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else _default_cache()
    try:
        return find_weights(model_name, cache)
    except WeightsNotFoundError:
        pass
    repo_id, url = hub_source(model_name)
    if not repo_id and not url:
        raise WeightsNotFoundError(f"timm publishes no pretrained weights for {model_name}")
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    if huggingface_hub.is_offline_mode():
        raise RuntimeError(
            "cannot download weights: Hugging Face offline mode is on (HF_HUB_OFFLINE). Run the fetch with "
            "HF_HUB_OFFLINE=0 in the environment, on a machine with internet."
        )
    cache.mkdir(parents=True, exist_ok=True)
    if repo_id:
        last_err: Exception | None = None
        for filename in HUB_FILENAMES:
            try:
                path = huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache)
            except EntryNotFoundError as err:
                last_err = err
                continue
            log.info("fetched %s weights: %s", model_name, path)
            return Path(str(path))
        raise WeightsNotFoundError(f"{repo_id} has none of {HUB_FILENAMES}: {last_err}")
    assert url is not None
    dest = cache / Path(url).name
    torch.hub.download_url_to_file(url, str(dest), progress=False)
    log.info("fetched %s weights: %s", model_name, dest)
    return dest


def load_local_weights(model: nn.Module, model_name: str, weights: str | os.PathLike[str] | None) -> None:
    """Load a weight file into a bonehpc model (no published weights exist for those: a file is required).

    Accepts a plain state_dict or a checkpoint dict with a ``model`` / ``state_dict`` entry (a bonehpc
    checkpoint works). Classifier tensors whose shape differs (another number of classes) keep their fresh
    initialisation; every other tensor must match.

    Raises:
        WeightsNotFoundError: No file given, or it does not exist.
        RuntimeError: The file does not fit the model (names the mismatching keys).
    """
    if not weights or not Path(weights).is_file():
        shown = f"{weights} does not exist" if weights else "no weight file was given"
        raise WeightsNotFoundError(
            f"pretrained {model_name}: {shown}. bonehpc models have no published weights; set <role>.weights to a "
            "weight file or a bonehpc checkpoint of the same architecture, or pretrained=false."
        )
    from timm.models import load_state_dict

    state = load_state_dict(str(weights), weights_only=True)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    head_skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith("head.")]
    for k in head_skipped:
        del state[k]
    bad_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and k not in head_skipped]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or bad_shape:
        raise RuntimeError(
            f"{weights} does not fit {model_name}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {bad_shape[:5]}"
        )
    model.load_state_dict(state, strict=False)
    log.info("loaded %s weights from %s (head re-initialised: %s)", model_name, weights, bool(head_skipped))
