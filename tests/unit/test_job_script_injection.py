"""Hostile values in every field that reaches a job script: refused where they enter, or rendered as one
argument; the script has exactly the expected directives and no extra shell line (issue 20, family 1)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bonehpc import slurm
from bonehpc.config import ConfigError, load_config
from bonehpc.paths import ExperimentPaths

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "sbatch_hostile.txt"

HOSTILE = {
    "newline": "a\nb",
    "cr": "a\rb",
    "tab": "a\tb",
    "nul": "a\x00b",
    "percent": "a%jb",
    "backslash": "a\\b",
    "quote": "a'b",
    "dquote": 'a"b',
    "semicolon": "a;b",
    "space": "a b",
}
CONTROL = {"newline", "cr", "tab", "nul"}

# Values the golden script is rendered with: all accepted, all odd (quotes, ;, spaces, %, #, &, |).
RUN_ROOT = "/srv/bone hpc;'q\"/runs"
PYTHON = "/opt/my env;x/'q\"/bin/python"
SETUP = "echo 'set; up' \"%j\""
ADDITIONAL = {"comment": "a b;c'd\"e %j #x", "mail_user": "me@example.org", "exclusive": True, "hint": "nomultithread"}


def _profile(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"time_min": 60, **values}))  # safe_dump writes each value exactly
    return path


def _one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text and "\r" not in text and "\x00" not in text, repr(text)
    return text


# ----------------------------------------------------------------------------------------------
# Refused where they enter


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_name_from_params_or_cli_refuses_every_hostile_value(tmp_path: Path, kind: str) -> None:
    params = tmp_path / "best_params.yaml"  # a --params file received from someone else
    params.write_text(yaml.safe_dump({"name": HOSTILE[kind]}))
    with pytest.raises(ConfigError) as err:
        load_config(None, [], params=params)
    assert _one_line(err).startswith("name: ")
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"name=x{HOSTILE[kind]}y"])
    assert "name" in _one_line(err)
    params.write_text(yaml.safe_dump({"tune.study_name": HOSTILE[kind]}))
    with pytest.raises(ConfigError) as err:
        load_config(None, [], params=params)
    assert _one_line(err).startswith("tune.study_name: ")


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_run_root_refuses_what_slurm_or_submitit_would_change(tmp_path: Path, kind: str) -> None:
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"run_root": f"/srv/{HOSTILE[kind]}/runs"}))
    if kind in CONTROL or kind in ("percent", "backslash"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [], params=params)
        assert _one_line(err).startswith("run_root: ")
    else:  # quotes, ;, spaces: a real folder name, rendered quoted (see the golden script)
        assert load_config(None, [], params=params).run_root == f"/srv/{HOSTILE[kind]}/runs"


PROFILE_FIELDS = ("partition", "account", "qos", "constraint", "python", "setup", "additional-key", "additional-value")


def _field_values(field: str, value: str) -> tuple[dict[str, Any], str]:
    """(profile YAML values, the key the error must name) for a hostile `value` in `field`."""
    if field == "python":
        return {"python": f"/opt/{value}/python"}, "python"
    if field == "setup":
        return {"setup": [f"echo {value}"]}, "setup[0]"
    if field == "additional-key":
        return {"additional": {value: "1"}}, "additional"
    if field == "additional-value":
        return {"additional": {"comment": value}}, "additional.comment"
    return {field: value}, field


def _accepted(field: str, kind: str) -> bool:
    if kind in CONTROL or field in ("partition", "account", "qos", "constraint", "additional-key"):
        return False
    if field == "setup":  # shell lines by design: one complete, printable line each, written as they are
        return kind not in ("quote", "dquote")  # an open quote would swallow the lines after it
    return not (kind == "backslash" or (kind == "percent" and field == "python"))


@pytest.mark.parametrize("field", PROFILE_FIELDS)
def test_every_profile_field_refuses_or_quotes_every_hostile_value(tmp_path: Path, field: str) -> None:
    for kind, value in HOSTILE.items():
        values, key = _field_values(field, value)
        for where, doc in (("", values), ("per_kind.train.", {"per_kind": {"train": values}})):
            path = _profile(tmp_path, doc)
            if not _accepted(field, kind):
                with pytest.raises(ConfigError) as err:
                    slurm.load_profile(str(path))
                assert f"{where}{key}" in _one_line(err), (field, kind)
                continue
            spec = slurm.load_profile(str(path)).for_kind("train")
            _check_structure(slurm.render_sbatch(spec, "/R/x/submitit/%j", "x-train", command=None), spec)


@pytest.mark.parametrize(
    ("additional", "needle"),
    [
        ({"signal": "B:USR1@10"}, r"additional.signal: bonehpc sets --signal .* additional_override"),
        ({"requeue": True}, r"additional.requeue: bonehpc sets"),
        ({"no_requeue": True}, r"additional.no_requeue: bonehpc sets --no-requeue"),
        ({"array": "0-99"}, r"additional.array: bonehpc sets"),
        ({"dependency": "afterok:1"}, r"additional.dependency: bonehpc sets"),
        ({"output": "/tmp/x"}, r"additional.output: bonehpc sets"),
        ({"open-mode": "truncate"}, r"additional.open-mode: bonehpc sets"),
        ({"time": "1:00:00"}, r"additional.time: set by the profile field time_min"),
        ({"mem_per_cpu": "1G"}, r"additional.mem_per_cpu: set by the profile field mem_gb"),
        ({"partition": "other"}, r"additional.partition: set by the profile field partition"),
        ({"frobnicate": "1"}, r"additional.frobnicate: not an sbatch option"),
        ({"wrap": "rm -rf ~"}, r"additional.wrap: not an sbatch option"),
        ({"exclusive": False}, r"additional.exclusive: False is not an sbatch option value"),
        ({"comment": ""}, r"additional.comment: '' is not"),
        ({"nice": float("nan")}, r"additional.nice: nan is not an sbatch option value"),
    ],
)
def test_additional_is_known_options_that_do_not_replace_bonehpcs(
    tmp_path: Path, additional: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle) as err:
        slurm.load_profile(str(_profile(tmp_path, {"additional": additional})))
    _one_line(err)


def test_additional_override_is_an_explicit_opt_in_and_replaces_once(tmp_path: Path) -> None:
    path = _profile(
        tmp_path,
        {
            "additional": {"signal": "B:USR2@100", "no-requeue": True, "kill_on_invalid_dep": "no", "mail-type": "END"},
            "additional_override": ["signal", "no_requeue", "kill-on-invalid-dep"],
        },
    )
    spec = slurm.load_profile(str(path))
    text = slurm.render_sbatch(spec, "/R/x/submitit/%j", "x-train", dependency="afterok:1", command=None)
    directives = _directives(text)
    assert directives["signal"] == ["B:USR2@100"] and directives["kill-on-invalid-dep"] == ["no"]
    assert "requeue" not in directives and directives["no-requeue"] == [""] and directives["mail-type"] == ["END"]
    with pytest.raises(ConfigError, match=r"additional_override\[0\]: 'mem' is not an option bonehpc sets"):
        slurm.load_profile(str(_profile(tmp_path, {"additional_override": ["mem"]})))


def test_experiment_folder_in_a_percent_folder_is_refused_before_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "proj%j"  # a relative run_root is fine, until it resolves under a folder Slurm expands
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = load_config(None, ["name=e"])
    with pytest.raises(ConfigError, match=r"experiment folder: '.*proj%j/runs/e' holds '%'"):
        slurm.SubmitContext(cfg, ExperimentPaths.of(cfg), slurm.load_profile("dev"), "slurm", str(cwd))


# ----------------------------------------------------------------------------------------------
# Accepted odd values: the golden script, parsed the way Slurm and bash read it


def _hostile_scripts(tmp_path: Path) -> list[str]:
    """The dry run of a two-task train array and an evaluate job, from a --params config and a profile
    holding accepted odd values in every string field."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"name": "exp-1.a_b", "run_root": RUN_ROOT, "cluster.mode": "slurm"}))
    cfg = load_config(None, [], params=params)
    profile = slurm.load_profile(
        str(
            _profile(
                tmp_path,
                {
                    "partition": "gpu,debug",
                    "account": "proj_1.a-b",
                    "qos": "normal",
                    "constraint": "a100&(ib|eth)*2",
                    "python": PYTHON,
                    "setup": [SETUP],
                    "additional": ADDITIONAL,
                    "per_kind": {"evaluate": {"partition": "cpu", "additional": {"comment": "ev'al;"}}},
                },
            )
        )
    )
    ctx = slurm.SubmitContext(cfg, ExperimentPaths.of(cfg), profile, "slurm", "/work")
    with slurm.dry_run() as scripts:
        train = slurm.submit(ctx, "train", print, [0, "final"], role="teacher", label=str)
        slurm.submit(ctx, "evaluate", print, dependency=f"afterany:{train['job_id']}")
    return scripts


def test_hostile_values_render_exactly_the_golden_script(tmp_path: Path) -> None:
    # regenerate after a deliberate change: write "\n".join(_hostile_scripts(tmp)) + "\n" to GOLDEN
    text = "\n".join(_hostile_scripts(tmp_path)) + "\n"
    assert text == GOLDEN.read_text()


def test_golden_script_has_exactly_the_directives_and_runs_one_command(tmp_path: Path) -> None:
    train = _hostile_scripts(tmp_path)[0].split("\n", 1)[1]
    folder = f"{RUN_ROOT}/exp-1.a_b/submitit"
    assert _directives(train) == {
        "account": ["proj_1.a-b"],
        "array": ["0-1%2"],
        "comment": [ADDITIONAL["comment"]],
        "constraint": ["a100&(ib|eth)*2"],
        "cpus-per-task": ["2"],
        "error": [f"{folder}/%A_%a/%A_%a_0_log.err"],
        "exclusive": [""],
        "hint": ["nomultithread"],
        "job-name": ["exp-1.a_b-teacher"],
        "mail-user": ["me@example.org"],
        "mem": ["4GB"],
        "nodes": ["1"],
        "ntasks-per-node": ["1"],
        "open-mode": ["append"],
        "output": [f"{folder}/%A_%a/%A_%a_0_log.out"],
        "partition": ["gpu,debug"],
        "qos": ["normal"],
        "requeue": [""],
        "signal": ["USR2@120"],
        "time": ["60"],
        "wckey": ["submitit"],
    }
    spec = slurm.load_profile(str(tmp_path / "site.yaml")).for_kind("train")
    _check_structure(train, spec)
    argv = _run_with_fake_srun(tmp_path, train)
    assert argv == [
        "--unbuffered",
        "--output",
        f"{folder}/%A_%a/%A_%a_%t_log.out",
        "--error",
        f"{folder}/%A_%a/%A_%a_%t_log.err",
        PYTHON,
        "-u",
        "-m",
        "submitit.core._submit",
        f"{folder}/%j",
    ]


def _slurm_arguments(rest: str) -> list[str]:
    """The arguments Slurm's sbatch reads from the rest of one `#SBATCH` line (its _get_argument rules:
    quotes pair up and are dropped, a backslash escapes the next character, an unquoted # ends the line)."""
    args: list[str] = []
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i].isspace():
            i += 1
        if i >= n or rest[i] == "#":
            break
        arg, quote, escape = "", "", False
        while i < n and (quote or not rest[i].isspace()):
            c = rest[i]
            i += 1
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                continue
            elif quote:
                if c == quote:
                    quote = ""
                    continue
            elif c in "'\"":
                quote = c
                continue
            elif c == "#":
                i = n
                break
            arg += c
        args.append(arg)
    return args


def _directives(text: str) -> dict[str, list[str]]:
    """option -> values of every #SBATCH line; each line must hold exactly one argument."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            args = _slurm_arguments(line[len("#SBATCH") :])
            assert len(args) == 1 and args[0].startswith("--"), f"not one option: {line!r} -> {args}"
            key, _, value = args[0][2:].partition("=")
            out.setdefault(key, []).append(value)
    return out


def _check_structure(text: str, spec: slurm.ResourceSpec) -> None:
    """Every #SBATCH line is one option, none repeats, and the shell lines are exactly the expected ones."""
    directives = _directives(text)
    assert all(len(v) == 1 for v in directives.values()), directives
    assert directives["signal"] == [f"USR2@{spec.signal_delay_s}"] and "requeue" in directives
    shell = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    setup = slurm.executor_parameters(spec, "x", "slurm")["slurm_setup"]  # bonehpc's lines, then the profile's
    assert setup[len(setup) - len(spec.setup) :] == spec.setup
    assert shell[:-2] == setup and shell[-2] == "export SUBMITIT_EXECUTOR=slurm"
    assert shell[-1].startswith("srun --unbuffered --output ") and len(shell) == len(setup) + 2
    assert subprocess.run(["bash", "-n"], input=text, text=True, check=False).returncode == 0


def _run_with_fake_srun(tmp_path: Path, text: str) -> list[str]:
    """Run the script with bash, `srun` replaced by a stub that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "srun"
    stub.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$SRUN_ARGS"\n')
    stub.chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(text)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SRUN_ARGS": str(tmp_path / "args")}
    res = subprocess.run([shutil.which("bash") or "bash", str(script)], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "set; up %j\n"  # the setup line ran as written, nothing else printed
    return (tmp_path / "args").read_text().split("\0")[:-1]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("echo 'open", "unexpected EOF while looking for matching"),
        ("echo $'ansi\\'s' 'ok'", None),  # valid bash (ANSI-C quoting) that shlex would refuse
        ("echo $(hostname", "bash -n: unexpected EOF"),
        ("export A=1 \\", "ends with a backslash"),
        ("cat <<EOF", "here-document"),
        ("if true; then", "bash -n"),
    ],
)
def test_a_setup_line_cannot_swallow_the_lines_after_it(tmp_path: Path, line: str, needle: str | None) -> None:
    if needle is None:
        assert slurm.load_profile(str(_profile(tmp_path, {"setup": ["module load x", line]}))).setup[1] == line
        return
    with pytest.raises(ConfigError, match=rf"setup\[1\]: .*{re.escape(needle)}") as err:
        slurm.load_profile(str(_profile(tmp_path, {"setup": ["module load x", line]})))
    _one_line(err)
