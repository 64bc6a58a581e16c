"""The one check of every value that reaches a generated job script or a shell command.

Values enter bonehpc in three places: the experiment config (YAML, --params, CLI overrides), the cluster
profile, and the command line; each is checked there, by the functions below, before anything is written
or submitted. The rules follow what reads the values:

- the sbatch script is parsed line by line by Slurm: a newline (or any control character) in a value ends
  the `#SBATCH` line and the rest runs as a shell line, and the directives after it are lost;
- Slurm treats `\\` as an escape inside `#SBATCH` arguments (also inside quotes) and expands `%j`, `%A`, ...
  in file names; submitit expands `%j`, `%t`, `%A`, `%a` in its job folder (the experiment folder's
  submitit/), so a path or name with `%` or `\\` does not name the folder it says;
- submitit pastes option keys unquoted and the interpreter (`python`) unquoted into the script.

So: every string is printable on one line; experiment and study names use a safe character set; paths
that reach a script have no `%` or `\\`; Slurm names (partition, account, qos, constraint) use Slurm's
character set; `additional` keys are known sbatch options that neither repeat a profile field nor replace
what bonehpc relies on (signal, requeue, array, dependency, output paths) unless listed in
`additional_override`; `python` is one absolute path, quoted when rendered.
"""

from __future__ import annotations

import functools
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from bonehpc.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAME_RULE = "letters, digits, '.', '_', '-'; starting with a letter or digit; at most 100 characters"

SLURM_WORD_RE = re.compile(r"[A-Za-z0-9_.,-]+")
"""partition, account, qos: Slurm names (a comma-separated list for partition and qos)."""
CONSTRAINT_RE = re.compile(r"[A-Za-z0-9_.,&|()\[\]*:!-]+")
"""--constraint: features joined by & | , with brackets, counts (*2) and !."""

SCRIPT_PATH_FORBIDDEN = "%\\"
"""Characters a path rendered into a job script may not hold (Slurm and submitit expand or escape them)."""

SBATCH_OPTIONS = frozenset(
    [
        "account",
        "acctg-freq",
        "array",
        "batch",
        "bb",
        "bbf",
        "begin",
        "chdir",
        "cluster-constraint",
        "clusters",
        "comment",
        "constraint",
        "container",
        "contiguous",
        "core-spec",
        "cores-per-socket",
        "cpu-freq",
        "cpus-per-gpu",
        "cpus-per-task",
        "deadline",
        "delay-boot",
        "dependency",
        "distribution",
        "error",
        "exclude",
        "exclusive",
        "export",
        "extra-node-info",
        "get-user-env",
        "gpu-bind",
        "gpu-freq",
        "gpus",
        "gpus-per-node",
        "gpus-per-socket",
        "gpus-per-task",
        "gres",
        "gres-flags",
        "hint",
        "hold",
        "input",
        "job-name",
        "kill-on-invalid-dep",
        "licenses",
        "mail-type",
        "mail-user",
        "mcs-label",
        "mem",
        "mem-bind",
        "mem-per-cpu",
        "mem-per-gpu",
        "mincpus",
        "network",
        "nice",
        "no-kill",
        "no-requeue",
        "nodefile",
        "nodelist",
        "nodes",
        "ntasks",
        "ntasks-per-core",
        "ntasks-per-gpu",
        "ntasks-per-node",
        "ntasks-per-socket",
        "open-mode",
        "output",
        "overcommit",
        "oversubscribe",
        "partition",
        "power",
        "prefer",
        "priority",
        "profile",
        "propagate",
        "qos",
        "reboot",
        "requeue",
        "reservation",
        "signal",
        "sockets-per-node",
        "spread-job",
        "switches",
        "thread-spec",
        "threads-per-core",
        "time",
        "time-min",
        "tmp",
        "use-min-nodes",
        "wait-all-nodes",
        "wckey",
    ]
)
"""Long options of sbatch (Slurm 22.05) that make sense in a job script (not --wrap, --parsable, ...)."""

PROTECTED_OPTIONS = frozenset(
    [
        "array",
        "dependency",
        "error",
        "output",
        "open-mode",
        "job-name",
        "kill-on-invalid-dep",
        "no-requeue",
        "requeue",
        "signal",
    ]
)
"""Options bonehpc or submitit set and rely on (requeue on time limit, USR2 before it, array and
dependency graph, log paths); `additional` may replace them only when listed in additional_override."""

PROFILE_OPTIONS = {
    "account": "account",
    "partition": "partition",
    "qos": "qos",
    "constraint": "constraint",
    "nodes": "nodes",
    "time": "time_min",
    "cpus-per-task": "cpus_per_task",
    "ntasks-per-node": "nodes (one task per node)",
    "ntasks": "nodes (one task per node)",
    "mem": "mem_gb",
    "mem-per-cpu": "mem_gb",
    "mem-per-gpu": "mem_gb",
    "gpus-per-node": "gpus_per_node",
    "gpus": "gpus_per_node",
}
"""sbatch options that a profile field sets (an `additional` entry would repeat or contradict it)."""


def check_text(key: str, value: str) -> str:
    """A string that is printable on one line: no newline, NUL, tab or other control character."""
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ConfigError(f"{key}: {value!r} holds the control character {bad!r} (values must be printable, one line)")
    return value


HEREDOC_RE = re.compile(r"<<(?!<)")


def check_shell_line(key: str, value: str) -> str:
    """A `setup` line: printable, one line, and a complete shell command on its own, so that it cannot
    swallow the lines after it (an open quote or $(, a trailing backslash, a here-document)."""
    check_text(key, value)
    problem = ""
    if value.rstrip().endswith("\\"):
        problem = "ends with a backslash (it would continue on the next line)"
    elif HEREDOC_RE.search(value):
        problem = "opens a here-document (it would read the lines after it)"
    else:
        problem = _incomplete(value)
    if problem:
        raise ConfigError(f"{key}: {value!r} {problem}")
    return value


@functools.lru_cache(maxsize=256)
def _incomplete(line: str) -> str:
    """Why `line` is not a complete shell command ('' when it is): bash's own parser (`bash -n`, which runs
    nothing), or shlex's quote rules where there is no bash. Cached: profiles are checked per job kind."""
    bash = shutil.which("bash")
    if bash is None:
        try:
            shlex.split(line, comments=True)
        except ValueError as err:
            return f"is not a complete shell line ({err})"
        return ""
    res = subprocess.run([bash, "-n"], input=line + "\n", capture_output=True, text=True, check=False)
    if res.returncode == 0:
        return ""
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return f"is not a complete shell line (bash -n: {re.sub(r'^.*? line [0-9]+: ', '', last)})"


def check_name(key: str, value: str, what: str = "experiment name") -> str:
    """An experiment or study name: the safe character set (it names a folder, a job and a log path)."""
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a valid {what} ({NAME_RULE})")
    return value


def check_script_path(key: str, value: str, absolute: bool = False) -> str:
    """A path that reaches a job script: printable, one line, no `%` or `\\` (and absolute when asked)."""
    check_text(key, value)
    bad = [c for c in SCRIPT_PATH_FORBIDDEN if c in value]
    if bad:
        raise ConfigError(
            f"{key}: {value!r} holds {bad[0]!r}, which Slurm and submitit expand in job paths (rename the folder)"
        )
    if not value:
        raise ConfigError(f"{key}: empty path")
    if value.startswith("~"):  # submitit expands it in the job's paths, bonehpc would not: two folders
        raise ConfigError(f"{key}: {value!r} starts with '~'; write the path without it (absolute or relative)")
    if absolute and not PurePosixPath(value).is_absolute():
        raise ConfigError(f"{key}: {value!r} is not an absolute path")
    return value


def check_slurm_word(key: str, value: str) -> str:
    """partition / account / qos / constraint: empty, or Slurm's character set for that field."""
    if not value:
        return value
    pattern, rule = (
        (CONSTRAINT_RE, "letters, digits, _ . , - and the operators & | ( ) [ ] * : !")
        if key.endswith("constraint")
        else (SLURM_WORD_RE, "letters, digits, _ . - and , between names")
    )
    if not pattern.fullmatch(value):
        raise ConfigError(f"{key}: {value!r} is not a Slurm name ({rule})")
    return value


def check_python(key: str, value: str) -> str:
    """The jobs' interpreter: empty (the submitting one) or one absolute path (a wrapper script for containers)."""
    if value:
        check_script_path(key, value, absolute=True)
    return value


def quote_python(value: str) -> str:
    """`python` as submitit pastes it into the script: one shell word."""
    return shlex.quote(value)


def option_name(key: str) -> str:
    """An `additional` key in sbatch's spelling (mail_type -> mail-type)."""
    return key.replace("_", "-")


def submitit_key(option: str) -> str:
    """The key submitit uses for an sbatch option (it sets open-mode with a dash, all others with '_')."""
    return option if option == "open-mode" else option.replace("-", "_")


def check_additional(prefix: str, additional: Mapping[str, Any], override: list[str]) -> dict[str, Any]:
    """The profile's `additional` sbatch options, checked and keyed as submitit keys them.

    Raises:
        ConfigError: a key that is not an sbatch option, one a profile field sets, one bonehpc relies on
            (not listed in `override`), or a value that is not a one-line string, a number or true.
    """
    allowed = set()
    for i, name in enumerate(override):
        opt = option_name(check_text(f"{prefix}additional_override[{i}]", name))
        if opt not in PROTECTED_OPTIONS:
            raise ConfigError(
                f"{prefix}additional_override[{i}]: {name!r} is not an option bonehpc sets "
                f"(valid: {', '.join(sorted(PROTECTED_OPTIONS))})"
            )
        allowed.add(opt)
    out: dict[str, Any] = {}
    for key, value in additional.items():
        where = f"{prefix}additional.{key!r}" if not str(key).isprintable() else f"{prefix}additional.{key}"
        opt = option_name(str(key))
        if opt not in SBATCH_OPTIONS:
            raise ConfigError(f"{where}: not an sbatch option (see `man sbatch`; write it without the dashes)")
        if opt in PROFILE_OPTIONS:
            raise ConfigError(f"{where}: set by the profile field {PROFILE_OPTIONS[opt]}; set that field instead")
        if opt in PROTECTED_OPTIONS and opt not in allowed:
            raise ConfigError(
                f"{where}: bonehpc sets --{opt} and relies on it (requeue, USR2 before the limit, job graph, "
                f"logs); list {opt} in additional_override to replace it"
            )
        if value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
            out[submitit_key(opt)] = value
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is not an sbatch option value (use a string, a number or true)")
        check_text(where, value)
        if "\\" in value:
            raise ConfigError(f"{where}: {value!r} holds '\\', which Slurm reads as an escape in a job script")
        out[submitit_key(opt)] = value
    return out


SLURM_JOB_ID_RE = re.compile(r"[0-9]{1,20}(_[0-9]{1,10})?")
"""A Slurm job or array task id as bonehpc records it: `123` or `123_4`."""
LOCAL_JOB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}")
"""A local or debug id (L<pid>.<n>_<i>, a pid, skipped-...): never a leading '-' or a space."""
DEPENDENCY_TYPES = ("after", "afterok", "afterany", "afternotok", "aftercorr", "afterburstbuffer")
_DEP_ID = r"(?:DRY)?[0-9]{1,20}(?:_[0-9]{1,10})?"  # DRY<n>: the ids of a dry run (bonehpc.slurm.dry_run)
_DEP_PART_RE = re.compile(rf"(?:{'|'.join(DEPENDENCY_TYPES)}):{_DEP_ID}(?::{_DEP_ID})*|singleton")


def check_job_id(key: str, value: str, slurm: bool = True) -> str:
    """A job or task id that reaches an sbatch/scancel/sacct argument or a dependency: digits (`123`,
    `123_4`) for Slurm, a plain word for local/debug ids; never an option (`--user=...`) or a second line."""
    pattern = SLURM_JOB_ID_RE if slurm else LOCAL_JOB_ID_RE
    if not isinstance(value, str) or not pattern.fullmatch(value):
        what = "a Slurm job id (123 or 123_4)" if slurm else "a job id (letters, digits, . _ : -)"
        raise ConfigError(f"{key}: {value!r} is not {what}")
    return value


def check_dependency(key: str, value: str) -> str:
    """A Slurm dependency string as it goes into `#SBATCH --dependency=`: <type>:<id>[:<id>...] joined by ','
    (types: after, afterok, afterany, afternotok, aftercorr, afterburstbuffer; or singleton)."""
    parts = value.split(",") if value else []
    if not isinstance(value, str) or any(not _DEP_PART_RE.fullmatch(p) for p in parts):
        raise ConfigError(f"{key}: {value!r} is not a Slurm dependency (<type>:<job id>[:<job id>...], ',' between)")
    return value
