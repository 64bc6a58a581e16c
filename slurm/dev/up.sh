#!/usr/bin/env bash
# Start the dev Slurm 22.05 cluster on this machine: munged, MariaDB, slurmdbd, slurmctld, slurmd.
#
# Root, no systemd: every daemon is started by hand and recorded in a PID file under the root dir, so
# down.sh can stop exactly these processes. Installs the Debian packages when they are missing.
# Env: SLURM_CI_ROOT (default /tmp/bonehpc-slurm), SLURM_CI_JOBS_PER_CORE (jobs sharing a core, default 4),
#      SLURM_CI_MEM_MB (default 16000, at most the machine's), SLURM_CI_FAKE_GPUS (default 2), SLURM_CI_FRESH=1 (wipe the root first),
#      SLURM_CI_CGROUP=1 (proctrack/task cgroup plugins instead of linuxproc + task/affinity; see slurm/README.md).
# Ports: 3306 (MariaDB), 6817 (slurmctld), 6818 (slurmd), 6819 (slurmdbd), all on 127.0.0.1.
set -euo pipefail
R=${SLURM_CI_ROOT:-/tmp/bonehpc-slurm}
H=$(hostname -s)
SHARE=${SLURM_CI_JOBS_PER_CORE:-4}
MEM_MB=${SLURM_CI_MEM_MB:-16000}
if [ -n "${SLURM_CI_CPUS:-}" ]; then
  # declaring more CPUs than exist folded several allocated cores onto one real core under core binding:
  # a -c 2 step on a fragmented node failed to launch (exit 65). Sharing cores replaces it.
  echo "up.sh: SLURM_CI_CPUS is no longer supported: the node declares the machine's CPU layout; set SLURM_CI_JOBS_PER_CORE (default 4) for jobs side by side" >&2
  exit 2
fi
NGPU=${SLURM_CI_FAKE_GPUS:-2}
CGROUP=${SLURM_CI_CGROUP:-0}
T0=$(date +%s%N)
say() { local d=$((($(date +%s%N) - T0) / 1000000)); printf '[up %d.%03ds] %s\n' $((d / 1000)) $((d % 1000)) "$*"; }

if [ "$(id -u)" != 0 ]; then
  echo "up.sh: must run as root (it starts munged, MariaDB and the Slurm daemons)" >&2
  exit 1
fi

# --- packages: the lean set (no Recommends) is all the cluster needs ---------------------------------
missing=0
for b in munged slurmctld slurmd sinfo sacct slurmdbd mariadbd mariadb-install-db; do
  command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  say "installing slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client slurmdbd munge mariadb-server >/dev/null
  say "packages installed"
fi
export PATH=$PATH:/usr/sbin:/sbin

# A second cluster on the same ports would fail in confusing ways: refuse early, naming the holder.
if [ -f "$R/run/slurmctld.pid" ] && kill -0 "$(cat "$R/run/slurmctld.pid")" 2>/dev/null; then
  echo "up.sh: a dev cluster is already running from $R (slurmctld pid $(cat "$R/run/slurmctld.pid")); run down.sh first" >&2
  exit 1
fi
[ "${SLURM_CI_FRESH:-0}" = 1 ] && rm -rf "$R"
# The node declares this machine's real layout (slurmd -C), so task/affinity binds allocated cores to
# distinct real cores; side-by-side jobs come from sharing cores (OverSubscribe), not from phantom CPUs.
LAYOUT=$(slurmd -C | head -1 | grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*')
[ -n "$LAYOUT" ] || { echo "up.sh: slurmd -C printed no CPU layout" >&2; exit 1; }
NCPU=$(echo "$LAYOUT" | sed 's/^CPUs=\([0-9]*\).*/\1/')
REAL_MB=$(slurmd -C | head -1 | grep -o 'RealMemory=[0-9]*' | cut -d= -f2)
[ "$MEM_MB" -le "$REAL_MB" ] || MEM_MB=$REAL_MB
mkdir -p "$R"/{etc,state,spool/"slurmd-$H",log,run,dev,mysql-data,mysql-run}
export SLURM_CONF=$R/etc/slurm.conf

# --- configs -----------------------------------------------------------------------------------------
gres=""
: >"$R/etc/gres.conf"
if [ "$NGPU" -gt 0 ]; then
  # Slurm only stat()s GRES files and insists on character devices; 195 is the NVIDIA major number.
  for i in $(seq 0 $((NGPU - 1))); do [ -e "$R/dev/nvidia$i" ] || mknod "$R/dev/nvidia$i" c 195 "$i"; done
  echo "NodeName=$H Name=gpu File=$R/dev/nvidia[0-$((NGPU - 1))]" >"$R/etc/gres.conf"
  gres="Gres=gpu:$NGPU"
fi
cat >"$R/etc/slurm.conf" <<CONF
ClusterName=bonehpc-dev
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# requeued jobs become eligible after cred_expire seconds (default 120)
AuthInfo=cred_expire=10
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$R/state
SlurmdSpoolDir=$R/spool/slurmd-%n
SlurmctldPidFile=$R/run/slurmctld.pid
SlurmdPidFile=$R/run/slurmd-%n.pid
SlurmctldLogFile=$R/log/slurmctld.log
SlurmdLogFile=$R/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# task/affinity binds every step to the CPUs it was given, like production sites (an srun step without
# SRUN_CPUS_PER_TASK gets one core; the start-of-task check of jobs/train.py catches that)
$(if [ "$CGROUP" = 1 ]; then
  echo "ProctrackType=proctrack/cgroup"; echo "TaskPlugin=task/cgroup,task/affinity"; echo "JobAcctGatherType=jobacct_gather/cgroup"; echo "TaskPluginParam=Cores"
else
  echo "ProctrackType=proctrack/linuxproc"; echo "TaskPlugin=task/affinity"; echo "JobAcctGatherType=jobacct_gather/linux"
  echo "TaskPluginParam=Cores"
fi)
JobAcctGatherFrequency=30
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
OverTimeLimit=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$H NodeAddr=127.0.0.1 $LAYOUT RealMemory=$MEM_MB $gres State=UNKNOWN
# debug shares each core among up to $SHARE jobs (arrays run side by side on a small machine); urgent does not
# share with debug, so an urgent job that needs the cores preempts (requeues) the debug jobs on them
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=500 PriorityTier=1 PreemptMode=REQUEUE GraceTime=20 OverSubscribe=FORCE:$SHARE
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP DefMemPerCPU=500 PriorityTier=10 PreemptMode=OFF
CONF
cat >"$R/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=$H
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$R/log/slurmdbd.log
PidFile=$R/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=slurmpw
CONF
chmod 600 "$R/etc/slurmdbd.conf"
if [ "$CGROUP" = 1 ]; then
  cat >"$R/etc/cgroup.conf" <<CONF
CgroupPlugin=cgroup/v1
CgroupMountpoint=/sys/fs/cgroup
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainDevices=no
CONF
else
  rm -f "$R/etc/cgroup.conf"
fi

# --- munge (its own PID file under $R, so down.sh stops only the munged we started) --------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge "$R/run"
if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "reusing the running munged"
else
  runuser -u munge -- /usr/sbin/munged --pid-file="$R/run/munged.pid"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  say "munged up"
fi
chown root:root "$R/run"

# --- MariaDB: private datadir, TCP on 127.0.0.1 (a socket-only setup breaks slurmdbd's StorageHost) ----
touch "$R/log/mariadb.err"
chown mysql:mysql "$R/mysql-data" "$R/mysql-run" "$R/log/mariadb.err"
if [ ! -d "$R/mysql-data/mysql" ]; then
  mariadb-install-db --user=mysql --datadir="$R/mysql-data" --auth-root-authentication-method=socket \
    --skip-test-db >"$R/log/mariadb-install.log" 2>&1
fi
/usr/sbin/mariadbd --user=mysql --datadir="$R/mysql-data" --socket="$R/mysql-run/mysqld.sock" \
  --pid-file="$R/mysql-run/mysqld.pid" --bind-address=127.0.0.1 --port=3306 --log-error="$R/log/mariadb.err" \
  --innodb-buffer-pool-size=256M --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1 &
ok=0
for _ in $(seq 300); do
  mariadb-admin --socket="$R/mysql-run/mysqld.sock" ping >/dev/null 2>&1 && { ok=1; break; }
  sleep 0.1
done
[ "$ok" = 1 ] || { echo "up.sh: MariaDB did not answer in 30 s (is port 3306 taken?)" >&2; tail -20 "$R/log/mariadb.err" >&2; exit 1; }
mariadb --socket="$R/mysql-run/mysqld.sock" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
FLUSH PRIVILEGES;
SQL
say "mariadb up"

# --- slurmdbd, then slurmctld + slurmd (all three daemonise themselves) --------------------------------
/usr/sbin/slurmdbd </dev/null
for _ in $(seq 150); do sacctmgr -n -P show cluster </dev/null >/dev/null 2>&1 && break; sleep 0.2; done
say "slurmdbd up"
/usr/sbin/slurmctld </dev/null
/usr/sbin/slurmd </dev/null
st=""
for _ in $(seq 300); do
  st=$(sinfo -h -n "$H" -o '%T' 2>/dev/null || true)
  [ "$st" = idle ] && break
  sleep 0.2
done
if [ "$st" != idle ]; then
  echo "up.sh: node $H is '$st', not idle" >&2
  scontrol show node "$H" >&2 || true
  tail -20 "$R/log/slurmctld.log" "$R/log/slurmd-$H.log" >&2 || true
  exit 1
fi
# an account like a real site's (the dev profile's `account:` names it)
sacctmgr -i add account bonehpc Description=bonehpc Organization=dev >/dev/null 2>&1 || true
sacctmgr -i add user root Account=bonehpc >/dev/null 2>&1 || true
say "cluster up: node $H idle, $NCPU CPUs ($SHARE jobs per core in debug), $NGPU fake GPUs, partitions debug (default) and urgent"
echo "export SLURM_CONF=$SLURM_CONF"
