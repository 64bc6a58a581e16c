"""Config precedence (defaults < YAML < params < overrides) and clear errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from bonehpc.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    describe,
    field_docs,
    load_config,
    read_yaml,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.data.num_folds == 5 and cfg.teacher.model == "resnet50"


def test_precedence(tmp_path: Path) -> None:
    exp = tmp_path / "exp.yaml"
    exp.write_text("name: a\ntrain: {batch_size: 8, patience: 2}\nteacher: {epochs: 4}\n")
    params = tmp_path / "best.yaml"
    params.write_text("train.batch_size: 12\nstudent.lr: 0.001\n")
    cfg = load_config(exp)
    assert (cfg.name, cfg.train.batch_size, cfg.train.patience, cfg.teacher.epochs) == ("a", 8, 2, 4)
    assert cfg.train.log_every == ExperimentConfig().train.log_every  # untouched keys keep their defaults
    cfg = load_config(exp, params=params)
    assert cfg.train.batch_size == 12 and cfg.student.lr == pytest.approx(0.001)
    cfg = load_config(exp, ["train.batch_size=16", "distill.kind=hard"], params=params)
    assert cfg.train.batch_size == 16 and cfg.distill.kind == "hard" and cfg.train.patience == 2


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.bogus=1", "unknown config key 'train.bogus'"),
        ("bogus.x=1", "unknown config key 'bogus'"),
        ("train.batch_size=abc", "train.batch_size: expected an integer"),
        ("train.batch_size=1.5", "train.batch_size: expected an integer"),
        ("teacher.lr=fast", "teacher.lr: expected a number"),
        ("train.channels_last=maybe", "train.channels_last: expected true/false"),
        ("teacher.epochs=0", "teacher.epochs: must be > 0"),
        ("data.fit=crop", "data.fit: 'crop' is not one of"),
        ("distill.alpha=1.5", "distill.alpha: must be in [0, 1]"),
        ("augment.mean=[0.5,0.5]", "augment.mean: expected 3 values"),
        ("tune.folds=[]", "tune.folds: need at least one fold"),
        ("name=a/b", "name: 'a/b' is not a valid experiment name"),
        ("train.batch_size", "expected key=value"),
    ],
)
def test_errors_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(lst)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("data: 3\n")
    with pytest.raises(ConfigError, match="data: expected a mapping"):
        load_config(wrong)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.batch_size=7", "student.model_kwargs={depth: 2}"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert yaml.safe_load(path.read_text())["train"]["batch_size"] == 7
    assert load_config(path) == cfg
    assert not list(path.parent.glob("*.tmp"))


def test_apply_overrides_validates() -> None:
    cfg = apply_overrides(ExperimentConfig(), {"student.lr": 0.01, "distill.kind": "hard"})
    assert cfg.student.lr == 0.01 and cfg.distill.kind == "hard"
    with pytest.raises(ConfigError, match="distill.kind"):
        apply_overrides(cfg, {"distill.kind": "mystery"})


@pytest.mark.parametrize("name", ["demo.yaml", "mura.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert to_dict(cfg)["name"] == read_yaml(ROOT / "configs" / name)["name"]


def test_every_field_is_documented() -> None:
    def walk(cls: type) -> list[str]:
        docs = field_docs(cls)
        missing = [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name) if cls is not ExperimentConfig else getattr(ExperimentConfig(), f.name)
            if dataclasses.is_dataclass(default):
                missing += walk(type(default))
        return missing

    assert walk(ExperimentConfig) == []
    assert "train.batch_size = 64" in describe()


def test_yaml11_exponent_text_is_a_number() -> None:
    # YAML 1.1 reads 1e-3 (no dot) as a string; where a float is due it is accepted as the number it spells.
    cfg = load_config(None, ["teacher.lr=8e-3", "tune.space={student.lr: {type: float, low: 1e-5, high: 1e-3}}"])
    assert cfg.teacher.lr == pytest.approx(8e-3)
    assert cfg.tune.space["student.lr"]["low"] == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match=r"tune.space.student.lr.low: expected a number"):
        load_config(None, ["tune.space={student.lr: {type: float, low: tiny, high: 1}}"])


def test_yaml_words_where_strings_are_due(tmp_path: Path) -> None:
    """YAML 1.1 reads off/no/on/yes as booleans; the config reads them as the words it documents."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("train: {amp: off, channels_last: no}\ndata: {verify: off}\nteacher: {pretrained: yes}\n")
    cfg = load_config(exp)
    assert (cfg.train.amp, cfg.train.channels_last, cfg.data.verify, cfg.teacher.pretrained) == (
        "off", False, "none", True
    )  # fmt: skip
    assert load_config(None, ["train.amp=off", "data.verify=quick"]).train.amp == "off"
    assert load_config(save_config(cfg, tmp_path / "again.yaml")) == cfg  # safe_dump quotes 'off'
    assert ExperimentConfig().data.verify == "full"
    with pytest.raises(ConfigError, match="train.amp: expected a string, got False"):
        load_config(None, ["train.amp=false"])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", ".NaN"])
def test_non_finite_numbers_are_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match="teacher.lr: expected a finite number"):
        load_config(None, [f"teacher.lr={value}"])


def test_repeated_keys_and_non_utf8(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: a\ntrain:\n  batch_size: 8\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"dup.yaml line 4: key 'batch_size' repeats \(first on line 3\)"):
        load_config(dup)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: a\n# r\xe9sum\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml line 2: not UTF-8 text \(byte 0xe9\)"):
        load_config(latin)
