"""DALI implementation of the presets: one pipeline per loader, on the GPU or in DALI's CPU-only mode.

The pipeline takes per-sample tuples ``(image uint8 [S, S, 1], label int64 [1], image_id int64 [1])``
from a Python source (in parallel worker processes for the loaders), and runs the preset's steps as
DALI operators. The random draws (rotation angle, flip) come from DALI's random operators, or, with
``sample_draws``, from the source itself (more outputs, see `sample_draws_of`), which makes the result
independent of the pipeline's history (the loaders use this: a rebuilt or resumed pipeline repeats an
epoch exactly). On a GPU the image moves to the device right after the source and every operator runs
there; the output is fp16 in HWC layout, which torch sees as a channels_last NCHW tensor after a
``permute`` (no copy) - the one loader shape that kept ResNet-50 at ~99 % of its model-only speed on
an H100 (see shared docs/gpu-anchors.md). Without a GPU, ``device_id=None`` selects DALI's CPU-only
mode and the output is float32 CHW.

DALI is imported inside the functions, so importing this module is cheap and never fails.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bonehpc.augment.presets import Preset

OUTPUT_DTYPES = ("float32", "float16")
OUTPUT_LAYOUTS = ("CHW", "HWC")


def dali_available() -> bool:
    """Whether ``nvidia.dali`` imports in this environment."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def sample_draws_of(preset: Preset) -> tuple[str, ...]:
    """The per-sample draws a ``sample_draws`` source returns after (image, label, id), in order:
    ``angle`` (float32 scalar, degrees) when the preset rotates, ``flip`` (int32 0/1) when it flips."""
    return (("angle",) if preset.rotate_deg > 0 else ()) + (("flip",) if preset.hflip_p > 0 else ())


def _dali_modules() -> tuple[Any, Any, Any]:
    """nvidia.dali, .fn and .types, typed loosely (DALI's stubs lack the enum members and Optional ids)."""
    return (
        importlib.import_module("nvidia.dali"),
        importlib.import_module("nvidia.dali.fn"),
        importlib.import_module("nvidia.dali.types"),
    )


def preset_ops(
    preset: Preset,
    image: Any,
    *,
    gpu: bool,
    output_dtype: str,
    output_layout: str,
    angle: Any = None,
    mirror: Any = None,
) -> Any:
    """Apply a preset to a DALI data node of uint8 HWC (1 channel) images; call inside a pipeline.

    Args:
        preset: what to do.
        image: DataNode with layout HWC, 1 channel, uint8 (on the GPU already when ``gpu``).
        gpu: run the operators on the GPU.
        output_dtype: float32 or float16.
        output_layout: CHW or HWC.
        angle: per-sample rotation angles (float32 scalars, CPU); None: drawn by DALI.
        mirror: per-sample flips (int32 0/1 scalars, CPU); None: drawn by DALI.

    Returns:
        The normalised 3-channel DataNode.
    """
    _, fn, types = _dali_modules()
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {OUTPUT_DTYPES}, got {output_dtype!r}")
    if output_layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"output_layout must be one of {OUTPUT_LAYOUTS}, got {output_layout!r}")
    device = "gpu" if gpu else "cpu"
    size = preset.image_size
    # Resize first: rotating the small image is cheaper (measured 2.4x on the CPU).
    x = fn.resize(
        image,
        device=device,
        resize_x=size,
        resize_y=size,
        interp_type=types.INTERP_LINEAR,
        antialias=False,  # matches cv2.INTER_LINEAR (see presets module docstring)
    )
    if preset.rotate_deg > 0:
        if angle is None:
            angle = fn.random.uniform(range=(-preset.rotate_deg, preset.rotate_deg))
        x = fn.rotate(x, device=device, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
    x = fn.color_space_conversion(x, device=device, image_type=types.GRAY, output_type=types.RGB)
    # The flip is folded into crop_mirror_normalize (no extra pass); flipping after the rotation has the
    # same distribution as before it because the angle range is symmetric.
    if preset.hflip_p <= 0:
        mirror = 0
    elif mirror is None:
        mirror = fn.random.coin_flip(probability=preset.hflip_p)
    return fn.crop_mirror_normalize(
        x,
        device=device,
        dtype=types.FLOAT16 if output_dtype == "float16" else types.FLOAT,
        output_layout=output_layout,
        mean=preset.mean_255,
        std=preset.std_255,
        mirror=mirror,
    )


def build_dali_pipeline(
    preset: Preset,
    source: Callable[[Any], tuple[Any, ...]],
    *,
    batch_size: int,
    device_id: int | None,
    seed: int,
    num_threads: int = 2,
    parallel: bool = True,
    py_num_workers: int = 1,
    py_start_method: str = "fork",
    output_dtype: str = "float32",
    output_layout: str = "CHW",
    prefetch_queue_depth: int = 2,
    sample_draws: bool = False,
) -> Any:
    """A DALI pipeline: per-sample source -> preset -> (images, labels, ids).

    Args:
        preset: the transform.
        source: per-sample callable taking ``nvidia.dali.types.SampleInfo`` and returning
            ``(uint8 [S, S, 1], int64 [1], int64 [1])``; it raises StopIteration at the end of an epoch.
            With ``parallel`` it must be picklable (it runs in DALI's Python worker processes).
        batch_size: samples per batch.
        device_id: CUDA device index, or None for DALI's CPU-only mode.
        seed: seed of DALI's random operators (flip coins, angles).
        num_threads: DALI's own CPU threads.
        parallel: run the source in ``py_num_workers`` worker processes.
        py_num_workers: Python worker processes (parallel only).
        py_start_method: fork or spawn. With fork the workers must start before any CUDA context exists
            in this process (call ``pipe.start_py_workers()`` early); otherwise use spawn.
        output_dtype: float32 or float16.
        output_layout: CHW or HWC.
        prefetch_queue_depth: batches prepared ahead.
        sample_draws: the source returns more outputs per sample, the draws named by
            `sample_draws_of` (rotation angle, flip), used instead of DALI's random operators.

    Returns:
        The (not yet built) pipeline.
    """
    dali, fn, types = _dali_modules()
    gpu = device_id is not None
    kwargs: dict[str, Any] = {}
    if parallel:
        kwargs = {"py_num_workers": max(1, py_num_workers), "py_start_method": py_start_method}

    @dali.pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        seed=seed,
        prefetch_queue_depth=prefetch_queue_depth,
        **kwargs,
    )
    def pipe() -> tuple[Any, Any, Any]:
        draws = sample_draws_of(preset) if sample_draws else ()
        dtypes = {"angle": types.FLOAT, "flip": types.INT32}
        outputs = fn.external_source(
            source=source,
            num_outputs=3 + len(draws),
            batch=False,
            parallel=parallel,
            layout=["HWC", "", ""] + [""] * len(draws),
            dtype=[types.UINT8, types.INT64, types.INT64] + [dtypes[d] for d in draws],
        )
        image, label, image_id = outputs[:3]
        drawn = dict(zip(draws, outputs[3:], strict=True))
        angle, mirror = drawn.get("angle"), drawn.get("flip")
        if gpu:
            image = image.gpu()
        out = preset_ops(
            preset,
            image,
            gpu=gpu,
            output_dtype=output_dtype,
            output_layout=output_layout,
            angle=angle,
            mirror=mirror,
        )
        return out, label, image_id

    return pipe()
