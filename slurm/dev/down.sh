#!/usr/bin/env bash
# Stop the dev Slurm cluster that up.sh started: by PID file only, never by process name.
#
# Two waves, each signalled at once (a daemon needs ~2 s to exit): slurmd + slurmctld first, so the
# controller can flush to slurmdbd; then slurmdbd, MariaDB and munged (munged only when up.sh started it).
# Env: SLURM_CI_ROOT (default /tmp/bonehpc-slurm); SLURM_CI_WIPE=1 also removes the root dir.
set -uo pipefail
R=${SLURM_CI_ROOT:-/tmp/bonehpc-slurm}
H=$(hostname -s)

wave() {  # args: pidfile ...
  local pids=() f p
  for f in "$@"; do
    [ -f "$f" ] || continue
    p=$(cat "$f")
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null || continue
    kill -TERM "$p" && pids+=("$p:$(basename "$f" .pid)")
  done
  for item in "${pids[@]+"${pids[@]}"}"; do
    p=${item%%:*}
    for _ in $(seq 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$p" 2>/dev/null; then
      echo "down.sh: ${item#*:} ($p) ignored SIGTERM for 15 s; SIGKILL" >&2
      kill -KILL "$p"
    fi
    echo "stopped ${item#*:} ($p)"
  done
}
# Jobs first: a batch step whose slurmd is gone outlives the cluster (an orphaned slurmstepd and its
# trainers keep cores busy for the next run). Cancel every job, give the steps a moment, then kill what
# is left of this root's job scripts (matched by their spool path, which only this cluster uses).
if [ -f "$R/etc/slurm.conf" ] && [ -f "$R/run/slurmctld.pid" ] && kill -0 "$(cat "$R/run/slurmctld.pid")" 2>/dev/null; then
  SLURM_CONF=$R/etc/slurm.conf scancel --full --quiet --user="$(id -un)" 2>/dev/null
  for _ in $(seq 100); do
    [ -z "$(SLURM_CONF=$R/etc/slurm.conf squeue -h -o %i 2>/dev/null)" ] && break
    sleep 0.1
  done
fi
for pid in $(pgrep -f "$R/spool/" 2>/dev/null); do
  pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
  [ -n "$pgid" ] && kill -KILL -- "-$pgid" 2>/dev/null
done
wave "$R/run/slurmd-$H.pid" "$R/run/slurmctld.pid"
# A slurmstepd that outlived its slurmd (a step still ending when the daemons stopped) talks to the next
# cluster on the same ports: its "Kill task failed" drains that cluster's node, and its jobs' ids are
# unknown there. Ours carry this root's SLURM_CONF in their environment (up.sh exports it to slurmd); they
# and their remaining tasks (children and process groups) get SIGKILL.
for pid in $(pgrep -x slurmstepd 2>/dev/null); do
  tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$R/etc/slurm.conf" || continue
  for child in $(pgrep -P "$pid" 2>/dev/null); do kill -KILL -- "-$child" "$child" 2>/dev/null; done
  kill -KILL "$pid" 2>/dev/null && echo "killed slurmstepd $pid left by an earlier run"
done
wave "$R/run/slurmdbd.pid" "$R/mysql-run/mysqld.pid" "$R/run/munged.pid"
[ "${SLURM_CI_WIPE:-0}" = 1 ] && rm -rf "$R"
exit 0
