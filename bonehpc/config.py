"""Experiment configuration: nested dataclasses, YAML files and CLI dotlist overrides.

Precedence is defaults < experiment YAML (< PARAMS YAML, e.g. tuned best params) < CLI overrides
(`train.batch_size=64`). Unknown keys and values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bonehpc.errors import ConfigError as ConfigError  # re-exported: bonehpc.config.ConfigError everywhere
from bonehpc.fsio import atomic_write_text
from bonehpc.shellsafe import check_name, check_script_path, check_text

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


MAX_YAML_DEPTH = 64
"""Deepest nesting of a config or profile file (a real one nests 4 levels; 50,000 would overflow the stack)."""
MAX_YAML_BYTES = 4 << 20
"""Largest config, --params or profile file read (4 MiB; real ones are a few KB)."""
MAX_YAML_NODES = 100_000
"""Most values a file may hold with every alias (*name) expanded: an alias bomb (each level repeating the
one before) is refused while it is still small, before anything walks the expanded tree."""


class _Loader(yaml.SafeLoader):
    """YAML as written by people: only true/false are booleans (YAML 1.2), and a repeated key is an error.

    YAML 1.1 turns `off`, `no`, `on`, `yes` into booleans, so `amp: off` would not be the word `off`
    that the config documents. Bool fields accept those words (see _coerce). Nesting and the size with
    aliases expanded are bounded (MAX_YAML_DEPTH, MAX_YAML_NODES): hostile files fail in one line, fast.
    """

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(f"{self.name} line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, self.name)
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{self.name} line {line}: key {key!r} repeats (first on line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _check_expanded_size(root: yaml.Node, name: str) -> None:
    """Refuse a document whose values, aliases expanded, exceed MAX_YAML_NODES, or that contains itself."""
    size: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order without recursion; a shared (aliased) node is counted once per use
        node, done = stack.pop()
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            size[id(node)] = min(MAX_YAML_NODES + 1, 1 + sum(size[id(c)] for c in children))
            continue
        if id(node) in size:
            continue
        if id(node) in visiting:
            line = node.start_mark.line + 1
            raise ConfigError(f"{name} line {line}: an alias refers to the value that contains it (a cycle)")
        visiting.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    if size[id(root)] > MAX_YAML_NODES:
        raise ConfigError(
            f"{name}: more than {MAX_YAML_NODES:,} values with its aliases (*name) expanded (an alias bomb?)"
        )


def yaml_load(text: str, name: str = "<string>") -> Any:
    """Parse YAML with the config's rules (YAML 1.2 booleans, no repeated keys); errors name `name`."""
    loader = _Loader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Where the data lives and how it is split and packed."""

    mura_root: str = "data/synth"
    """Folder that contains `MURA-v1.1/` (official or synthetic)."""
    shards: str = "data/shards"
    """Folder of packed HDF5 shards (written by `bonehpc pack`)."""
    num_folds: int = 5
    """K of the patient-grouped cross-validation on the official train split."""
    fold_seed: int = 0
    """Seed of the fold assignment."""
    pack_size: int = 256
    """Side of the square uint8 images stored in the shards."""
    fit: str = "letterbox"
    """How images are made square when packing: letterbox (keep aspect, pad) or stretch."""
    compression: str = "none"
    """HDF5 filter of the image dataset: none or lzf."""
    images_per_shard: int = 2048
    """Images per shard file."""
    max_reject_frac: float = 0.01
    """Packing fails when more than this fraction of images is unreadable."""
    min_side: int = 32
    """Packing rejects images whose shorter side is below this many pixels (0: no limit)."""
    backend: str = "auto"
    """Loader backend: auto (dali if importable, else torch), dali, torch or synthetic."""
    num_workers: int = 2
    """CPU worker processes of the loader (DataLoader workers or DALI Python workers)."""
    image_size: int = 224
    """Side of the square network input."""
    cross_split_patients: bool = False
    """Accept a patient number in both the train and the valid split (refused by default: a holdout leak)."""
    verify: str = "full"
    """Shard check before training: full (SHA-256 of every file, cached in .verified until a file changes),
    quick (structure and sizes) or none (also written off)."""

    def __post_init__(self) -> None:
        _choice("data.fit", self.fit, ("letterbox", "stretch"))
        _choice("data.compression", self.compression, ("none", "lzf"))
        _choice("data.backend", self.backend, ("auto", "dali", "torch", "synthetic"))
        if self.verify == "off":
            self.verify = "none"
        _choice("data.verify", self.verify, ("quick", "full", "none"))
        if self.num_folds < 2:
            raise ConfigError(f"data.num_folds: need at least 2 folds, got {self.num_folds}")
        for key in ("pack_size", "images_per_shard", "image_size"):
            _positive(f"data.{key}", getattr(self, key))
        if self.pack_size > 4096:
            raise ConfigError(f"data.pack_size: must be <= 4096, got {self.pack_size}")
        _positive("data.num_workers", self.num_workers, allow_zero=True)
        _positive("data.min_side", self.min_side, allow_zero=True)
        if not 0 <= self.max_reject_frac <= 1:
            raise ConfigError(f"data.max_reject_frac: must be in [0, 1], got {self.max_reject_frac}")


@dataclass(kw_only=True)
class AugmentConfig:
    """Training augmentation (evaluation only resizes and normalises)."""

    hflip_p: float = 0.5
    """Probability of a horizontal flip."""
    rotate_deg: float = 10.0
    """Rotation angle drawn uniformly from [-rotate_deg, rotate_deg]."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean (0..1 scale) after the gray image is replicated to 3 channels."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std (0..1 scale)."""

    def __post_init__(self) -> None:
        if not 0 <= self.hflip_p <= 1:
            raise ConfigError(f"augment.hflip_p: must be in [0, 1], got {self.hflip_p}")
        if not 0 <= self.rotate_deg <= 180:
            raise ConfigError(f"augment.rotate_deg: must be in [0, 180], got {self.rotate_deg}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("augment.mean / augment.std: need 3 values each")
        if min(self.std) <= 0:
            raise ConfigError("augment.std: values must be > 0")


@dataclass(kw_only=True)
class RoleConfig:
    """Model and optimisation of one role (teacher or student)."""

    model: str = "resnet50"
    """Registered model name (bonehpc hybrids or any timm model name)."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model constructor."""
    pretrained: bool = False
    """Start from ImageNet weights (local file or offline HF cache; never downloaded at run time)."""
    weights: str = ""
    """Local weight file (.pth / .safetensors) used when pretrained is true; empty: the HF cache."""
    epochs: int = 10
    """Training epochs."""
    optimizer: str = "adamw"
    """adamw or sgd."""
    lr: float = 3e-4
    """Peak learning rate for a batch of 256 images; scaled linearly with the global batch."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to norms and biases)."""
    momentum: float = 0.9
    """SGD momentum."""
    warmup_epochs: float = 1.0
    """Linear warm-up length in epochs, then cosine decay to zero."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""

    def __post_init__(self) -> None:
        _choice("optimizer", self.optimizer, ("adamw", "sgd"))
        _positive("epochs", self.epochs)
        _positive("lr", self.lr)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate: must be in [0, 1), got {self.drop_rate}")


def _default_student() -> RoleConfig:
    return RoleConfig(model="hybrid_small", lr=5e-4, epochs=15)


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from the fold's teacher into the student."""

    kind: str = "soft"
    """none (plain training), soft (KL on softened probabilities) or hard (teacher's decision)."""
    alpha: float = 0.5
    """Weight of the distillation term; the task loss gets 1 - alpha."""
    tau: float = 2.0
    """Temperature of soft distillation."""
    baseline: bool = False
    """Also train the student without KD per fold (role baseline, distill.kind=none): what distillation buys."""
    teacher_outputs: str = "auto"
    """Where the student's teacher logits come from. cached: the fold's teacher-outputs file (the outputs job
    of the fold graph; computed once over exactly the student's views), an error when it does not match the
    run; online: the frozen teacher runs on every batch; auto: the cache when it matches, else online (the log
    says which and why)."""
    outputs_batch_size: int = 0
    """Images per batch of the teacher-outputs job (0: 4 x train.batch_size; inference keeps no activations)."""

    def __post_init__(self) -> None:
        _choice("distill.kind", self.kind, ("none", "soft", "hard"))
        _choice("distill.teacher_outputs", self.teacher_outputs, ("auto", "online", "cached"))
        if self.outputs_batch_size < 0:
            raise ConfigError(f"distill.outputs_batch_size: must be >= 0, got {self.outputs_batch_size}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"distill.alpha: must be in [0, 1], got {self.alpha}")
        _positive("distill.tau", self.tau)


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop, shared by both roles."""

    batch_size: int = 64
    """Images per process (global batch = batch_size x world size)."""
    amp: str = "auto"
    """Mixed precision: auto (bf16 on GPU, off on CPU), bf16, fp16 or off."""
    channels_last: bool = True
    """Use the channels_last memory format on GPU."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    class_weight: str = "auto"
    """auto: weight classes by inverse frequency of the training images; none: unweighted."""
    early_stop_metric: str = "val/study_kappa"
    """Validation metric that selects best.pt and drives early stopping (higher is better)."""
    patience: int = 5
    """Stop after this many epochs without improvement of early_stop_metric (0 disables)."""
    log_every: int = 20
    """Progress line every N steps (rank 0)."""
    max_steps_per_epoch: int = 0
    """Cap on training steps per epoch (0: the whole epoch); for smoke tests and benchmarks."""
    num_threads: int = 0
    """torch CPU threads per process (0: leave torch's default)."""
    seed: int = 0
    """Seed of model init, shuffling and augmentation."""
    final_val_frac: float = 0.1
    """Final models hold out this share of train patients (grouped, stratified; never the valid split): their
    learning curve, and their epoch selection when final_epoch is best."""
    final_epoch: str = "last"
    """Which epoch a final model keeps as best.pt: last (the last epoch; the held-out slice only monitors, so a
    small slice cannot pick a bad epoch) or best (the best early_stop_metric on the slice). README: the
    measurement behind the default."""
    checkpoint_every_epochs: int = 1
    """Write last.pt every N epochs (0: only by time, at the end and on preemption, which always writes it)."""
    checkpoint_every_min: float = 0.0
    """Also write last.pt when this many minutes passed since the last write (0: no time rule)."""

    def __post_init__(self) -> None:
        if not 0 < self.final_val_frac <= 0.5:
            raise ConfigError(f"train.final_val_frac: must be in (0, 0.5], got {self.final_val_frac}")
        _positive("train.checkpoint_every_epochs", self.checkpoint_every_epochs, allow_zero=True)
        _positive("train.checkpoint_every_min", self.checkpoint_every_min, allow_zero=True)
        _positive("train.batch_size", self.batch_size)
        _choice("train.amp", self.amp, ("auto", "bf16", "fp16", "off"))
        _choice("train.class_weight", self.class_weight, ("auto", "none"))
        _choice("train.final_epoch", self.final_epoch, ("last", "best"))
        _positive("train.grad_clip", self.grad_clip, allow_zero=True)
        _positive("train.patience", self.patience, allow_zero=True)
        _positive("train.log_every", self.log_every)
        _positive("train.max_steps_per_epoch", self.max_steps_per_epoch, allow_zero=True)
        if not self.early_stop_metric.startswith("val/"):
            raise ConfigError(f"train.early_stop_metric: must be a val/ metric, got {self.early_stop_metric!r}")


@dataclass(kw_only=True)
class ClusterConfig:
    """Where jobs run."""

    mode: str = "auto"
    """auto (Slurm when sinfo answers, else local), slurm, local (subprocesses) or debug (in-process)."""
    profile: str = "dev"
    """Cluster profile name: slurm/clusters/<profile>.yaml (or a path to a YAML file)."""
    nproc_per_node: int = 0
    """Training processes per node (0: one per GPU, or 1 on CPU-only nodes)."""
    local_parallel: int | str = "auto"
    """mode local: tasks of the job graph run at once; auto: one per visible GPU, else one per core (within
    memory); threads are shared out (bonehpc.localgraph.plan_share)."""

    def __post_init__(self) -> None:
        _choice("cluster.mode", self.mode, ("auto", "slurm", "local", "debug"))
        _positive("cluster.nproc_per_node", self.nproc_per_node, allow_zero=True)
        if self.local_parallel != "auto" and not (isinstance(self.local_parallel, int) and self.local_parallel >= 1):
            raise ConfigError(f"cluster.local_parallel: expected auto or an integer >= 1, got {self.local_parallel!r}")


@dataclass(kw_only=True)
class TuneConfig:
    """Optuna search over the student / distillation hyperparameters."""

    trials: int = 20
    """Number of trials (one Slurm array task each)."""
    parallel: int = 4
    """Array tasks running at once."""
    storage: str = ""
    """Empty: Optuna journal file in the experiment dir; else an RDB URL (mysql+pymysql://..., postgresql://...)."""
    study_name: str = ""
    """Empty: the experiment name."""
    folds: list[int] = field(default_factory=lambda: [0])
    """Folds each trial trains on (their teachers must exist)."""
    epochs: int = 0
    """Student epochs per trial (0: student.epochs)."""
    metric: str = "val/study_kappa"
    """Objective, maximised; reported every epoch for pruning."""
    pruner: str = "median"
    """median, halving (successive halving) or none."""
    sampler_seed: int = 0
    """Seed of the TPE sampler."""
    max_retry: int = 2
    """Retries of a trial whose worker died (its Slurm task ended per sacct/squeue, or its process is gone)."""
    space: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "student.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
            "student.weight_decay": {"type": "float", "low": 1e-3, "high": 0.1, "log": True},
            "distill.alpha": {"type": "float", "low": 0.1, "high": 0.9},
            "distill.tau": {"type": "float", "low": 1.0, "high": 6.0},
            "distill.kind": {"type": "categorical", "choices": ["soft", "hard"]},
        }
    )
    """Search space: dotted config key -> {type: float|int|categorical, low, high, log, step, choices};
    distill.kind may include none (the student without KD as one of the choices)."""

    def __post_init__(self) -> None:
        _positive("tune.trials", self.trials)
        _positive("tune.parallel", self.parallel)
        _choice("tune.pruner", self.pruner, ("median", "halving", "none"))
        if not self.folds:
            raise ConfigError("tune.folds: need at least one fold")
        if self.study_name:
            check_name("tune.study_name", self.study_name, "study name")  # it names a folder under tune/
        check_tune_space(self.space)


SPACE_FIELDS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
}


def check_tune_space(space: dict[str, Any]) -> None:
    """THE validation of tune.space (TuneConfig and bonehpc.tune.space_distributions call it); numbers
    written as text ("1e-4", YAML 1.1) become floats. Raises ConfigError naming the key."""
    for key, spec in space.items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in SPACE_FIELDS:
            raise ConfigError(f"tune.space.{key}: type must be float, int or categorical, got {kind!r}")
        unknown = set(spec) - SPACE_FIELDS[kind]
        if unknown:
            raise ConfigError(
                f"tune.space.{key}: unknown field(s) {', '.join(sorted(unknown))} for type {kind} "
                f"(allowed: {', '.join(sorted(SPACE_FIELDS[kind]))})"
            )
        if kind == "categorical":
            if not isinstance(spec.get("choices"), (list, tuple)) or not spec["choices"]:
                raise ConfigError(f"tune.space.{key}: categorical needs choices (a non-empty list)")
            continue
        for name in ("low", "high"):
            v = spec.get(name)
            if isinstance(v, str) and _FLOAT_TEXT.fullmatch(v.strip()):
                spec[name] = v = float(v)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(
                    f"tune.space.{key}.{name}: expected a number, got {v!r} (bounds of a float or int range)"
                )
            if kind == "int" and not isinstance(v, int):
                raise ConfigError(f"tune.space.{key}: {name} must be an integer, got {v!r}")
        if not spec["low"] < spec["high"]:
            raise ConfigError(f"tune.space.{key}: needs low < high")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise ConfigError(f"tune.space.{key}: log must be true or false, got {log!r}")
        if log and spec["low"] <= 0:
            raise ConfigError(f"tune.space.{key}: a log range needs low > 0, got {spec['low']!r}")
        if step is not None:
            integral = isinstance(step, int) or kind == "float"
            if log or isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or not integral:
                raise ConfigError(
                    f"tune.space.{key}: step must be a positive number (an integer for int), without log; "
                    f"got step={step!r}, log={log}"
                )


@dataclass(kw_only=True)
class ExperimentConfig:
    """One experiment: data, models, distillation, training, cluster and tuning."""

    name: str = "demo"
    """Experiment name; its outputs go to <run_root>/<name>/."""
    run_root: str = "runs"
    """Parent folder of experiment folders (on shared storage on a cluster)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data set, folds, shards and loader."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Training augmentation."""
    teacher: RoleConfig = field(default_factory=RoleConfig)
    """The ResNet-50 teacher."""
    student: RoleConfig = field(default_factory=_default_student)
    """The CNN+Transformer hybrid student."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where jobs run."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter search."""

    def __post_init__(self) -> None:
        # both reach every job script: the job name, and the experiment folder in the log paths
        check_name("name", self.name)
        check_script_path("run_root", self.run_root)

    def role(self, role: str) -> RoleConfig:
        """The RoleConfig of 'teacher' or 'student' ('baseline' is the student trained without KD)."""
        if role not in ("teacher", "student", "baseline"):
            raise ConfigError(f"role: {role!r} is not teacher, student or baseline")
        return self.teacher if role == "teacher" else self.student


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(key, arg, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text; accept it where a number is due
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return check_text(key, value)  # every string may reach a job script or a log line
        hint = " (write the word, e.g. off, or quote it)" if isinstance(value, bool) else ""
        raise ConfigError(f"{key}: expected a string, got {value!r}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(f"{key}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value, strict=True)))
        elem = args[0] if args else Any
        items = [_coerce(f"{key}[{i}]", elem, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {check_text(f"{key} key", str(k)): _coerce(f"{key}.{k}", vt, v) for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key {key!r} (valid keys here: {close})")
        kwargs[k] = _coerce(key, hints[k], v)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        msg = str(err)
        if prefix and not msg.startswith(prefix) and ":" in msg and "." not in msg.split(":", 1)[0]:
            msg = f"{prefix}.{msg}"
        raise ConfigError(msg) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def _deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("model_kwargs", "space"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (["a","b","c"], YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.batch_size=64)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml_load(raw, f"override {key}") if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse {raw!r}: {_one_line(err)}") from None
    return key.split("."), value


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def _one_line(err: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where (line, column), without the quoted snippet."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else str(problem)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        size = p.stat().st_size
        if size > MAX_YAML_BYTES:  # before reading it: configs, params and profiles are a few KB
            raise ConfigError(f"{p}: {size:,} bytes, more than a config file may hold ({MAX_YAML_BYTES:,})")
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read ({err.strerror or err})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(f"{p} line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    try:
        data = yaml_load(text, str(p)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    params: str | Path | None = None,
) -> ExperimentConfig:
    """Defaults < YAML file < params YAML (flat dotted keys or nested) < CLI overrides."""
    tree: dict[str, Any] = {}
    if path:
        tree = _deep_merge(tree, read_yaml(path))
    if params:
        for k, v in read_yaml(params).items():
            if isinstance(v, dict) and "." not in k:
                tree = _deep_merge(tree, {k: v})
            else:
                _set_path(tree, str(k).split("."), v)
    for item in overrides:
        parts, value = parse_override(item)
        _set_path(tree, parts, value)
    return from_dict(tree)


def from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """Build an ExperimentConfig from a nested dict (defaults for missing keys)."""
    cfg: ExperimentConfig = _build(ExperimentConfig, tree)
    return cfg


def config_in_place(cfg: ExperimentConfig, exp: str | Path, workdir: str | Path) -> ExperimentConfig:
    """`cfg`, read from experiment folder `exp`, pointing at `exp` (the folder given is the only truth).

    A config whose run_root/name (relative to the submission's `workdir`) is elsewhere belongs to a folder
    that was moved: its run_root is rewritten to the folder's parent, so that nothing is read from or
    written to the old place (resubmit, tune status). A renamed folder is refused (the name also names the
    jobs and the tuning study): rename it back.
    """
    here = Path(exp).resolve()
    if (Path(workdir) / cfg.run_root / cfg.name).resolve() == here:
        return cfg
    if here.name != cfg.name:
        raise ConfigError(
            f"{exp}: the experiment folder was renamed (its config.yaml says name {cfg.name!r}); "
            f"rename the folder back to {cfg.name!r}"
        )
    log.warning(
        "%s was moved (config.yaml said %s): run_root is now %s", exp, Path(cfg.run_root) / cfg.name, here.parent
    )
    return apply_overrides(cfg, {"run_root": str(here.parent)})


def apply_overrides(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A new config with dotted-key overrides applied ({"student.lr": 1e-3})."""
    tree = to_dict(cfg)
    for k, v in overrides.items():
        _set_path(tree, k.split("."), v)
    return from_dict(tree)


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe() -> str:
    """Every config key with its default and docstring, for `bonehpc config --describe`."""
    lines: list[str] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                lines.append(f"{key}:  {docs.get(f.name, '')}")
                walk(type(value), value, key + ".")
            else:
                lines.append(f"  {key} = {value!r}\n      {docs.get(f.name, '')}")

    walk(ExperimentConfig, ExperimentConfig(), "")
    return "\n".join(lines)


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal right after each field) from the class source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(prev.target, ast.Name)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = node.value.value.strip()
    return docs
