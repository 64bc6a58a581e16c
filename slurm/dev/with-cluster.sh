#!/usr/bin/env bash
# Run CMD... with a fresh dev Slurm cluster up; always bring it down afterwards; exit with CMD's status.
#
# An exclusive flock on /tmp/bonehpc-slurm.lock serialises users of the machine's fixed ports
# (3306, 6817-6819): a second caller waits instead of clashing.
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: with-cluster.sh CMD [ARGS...]" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CI_ROOT=${SLURM_CI_ROOT:-/tmp/bonehpc-slurm}
exec 9>/tmp/bonehpc-slurm.lock
if ! flock -n 9; then
  echo "with-cluster.sh: waiting for another user of the dev cluster (/tmp/bonehpc-slurm.lock)" >&2
  flock 9
fi
child=""
down() { bash "$HERE/down.sh" >/dev/null 2>&1 || true; }
stop() {  # INT/TERM: stop CMD first (the trap runs at once because we sit in `wait`, not in CMD)
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
  exit "$1"
}
trap down EXIT
trap 'stop 130' INT
trap 'stop 143' TERM
down  # a cluster left behind by a killed run (same root) would hold the ports
SLURM_CI_FRESH=1 bash "$HERE/up.sh" || { echo "with-cluster.sh: the dev cluster did not come up" >&2; exit 1; }
export SLURM_CONF=$SLURM_CI_ROOT/etc/slurm.conf
# in the background (stdin kept) so that a signal to this script is handled while CMD runs
"$@" <&0 &
child=$!
wait "$child"
exit $?
