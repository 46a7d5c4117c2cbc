"""A real one-node SLURM cluster on this machine, for the tests (Debian's slurmctld, slurmd, munge).

    python -m tests.slurm_cluster up DIR     # start; prints the SLURM_CONF to export
    python -m tests.slurm_cluster down DIR   # stop

The node is this host, with two partitions (``cpu``, default, and ``gpu``) and one GPU declared
as a generic resource backed by /dev/null: SLURM allocates it and sets CUDA_VISIBLE_DEVICES, and
the job runs on the CPU. The node declares more CPUs and memory than the machine has
(``config_overrides``) so that the lab's real profile, which asks for 4 CPUs and 32 GB per
conversion job, can be used unchanged.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

DAEMONS = ("slurmctld", "slurmd", "munged")

SLURM_CONF = """\
ClusterName=ckptmigrate
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=16817
SlurmdPort=16818
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
# Memory limits enforced as a cgroup-less cluster does: RSS polled every second, a step over
# its --mem killed (the lab's cluster may use cgroups; the job's log says the same either way).
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=1
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
MpiDefault=none
MinJobAge=600
ReturnToService=2
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
NodeName={host} CPUs=8 RealMemory=64000 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
# A partition whose only node has no GPU and never registers: what `ckpt-migrate doctor` must flag.
NodeName=nogpu1 NodeAddr=127.0.0.2 CPUs=2 RealMemory=1000 State=DOWN Reason=test_node_without_gpu
PartitionName=nogpu Nodes=nogpu1 MaxTime=60 State=UP
"""

GRES_CONF = "NodeName={host} Name=gpu Count=1 File=/dev/null\n"

# srun inside a job (snakemake-executor-plugin-slurm-jobstep) runs with every SLURM_* variable
# but a few removed, SLURM_CONF included, so the configuration must be where SLURM looks by
# default. An existing one is moved aside and put back by stop().
SYSTEM_CONF_DIR = "/etc/slurm"
BACKUP_SUFFIX = ".ckpt-migrate-backup"


class ClusterUnavailable(RuntimeError):
    """This machine cannot run the test cluster (not root, or the packages are missing)."""


def _run(*cmd: str, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, check=check, timeout=60)


def _ensure_munge() -> None:
    if _run("munge", "-n", check=False).returncode == 0:
        return
    os.makedirs("/run/munge", exist_ok=True)
    os.makedirs("/var/log/munge", exist_ok=True)
    if not os.path.exists("/etc/munge/munge.key"):
        _run("mungekey", "--create", "--force")
    for path in ("/run/munge", "/var/log/munge", "/etc/munge", "/etc/munge/munge.key"):
        shutil.chown(path, "munge", "munge")
    log = "/var/log/munge/munged.log"
    open(log, "a").close()
    shutil.chown(log, "munge", "munge")
    _run("runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force")
    for _ in range(50):
        if _run("munge", "-n", check=False).returncode == 0:
            return
        time.sleep(0.1)
    raise ClusterUnavailable("munged did not start")


def start(workdir: str, timeout: float = 60) -> dict[str, str]:
    """Start munge, slurmctld and slurmd; returns the environment to reach the cluster."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("needs root to start slurmctld/slurmd/munged")
    missing = [d for d in DAEMONS if not shutil.which(d) and not os.path.exists(f"/usr/sbin/{d}")]
    if missing or not shutil.which("sbatch"):
        raise ClusterUnavailable(f"SLURM packages missing ({', '.join(missing) or 'sbatch'}): "
                                 "apt-get install slurmctld slurmd slurm-client munge")
    _ensure_munge()
    host = socket.gethostname().split(".")[0]
    os.makedirs(os.path.join(workdir, "state"), exist_ok=True)
    os.makedirs(os.path.join(workdir, "spool"), exist_ok=True)
    os.makedirs(SYSTEM_CONF_DIR, exist_ok=True)
    for name, template in (("slurm.conf", SLURM_CONF), ("gres.conf", GRES_CONF)):
        system_path = os.path.join(SYSTEM_CONF_DIR, name)
        if os.path.exists(system_path) and not os.path.exists(system_path + BACKUP_SUFFIX):
            os.replace(system_path, system_path + BACKUP_SUFFIX)
        text = f"# written by ckpt-migrate's tests for {workdir}\n" + template.format(host=host, dir=workdir)
        for path in (os.path.join(workdir, name), system_path):
            with open(path, "w") as f:
                f.write(text)
    conf = os.path.join(workdir, "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    _run("/usr/sbin/slurmctld", "-f", conf, "-i", env=env)
    _run("/usr/sbin/slurmd", "-f", conf, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = _run("sinfo", "-h", "-o", "%P %t", env=env, check=False).stdout.split()
        if out.count("idle") == 2:
            return {"SLURM_CONF": conf}
        time.sleep(0.5)
    logs = "".join(open(os.path.join(workdir, n)).read()[-1500:] for n in ("slurmctld.log", "slurmd.log")
                   if os.path.exists(os.path.join(workdir, n)))
    stop(workdir)
    raise RuntimeError(f"SLURM did not come up within {timeout}s; sinfo: {out}\n{logs}")


def stop(workdir: str) -> None:
    """Cancel every job and stop both daemons (munged is left running: other users may need it)."""
    env = {**os.environ, "SLURM_CONF": os.path.join(workdir, "slurm.conf")}
    _run("scancel", "--full", "-u", "root", env=env, check=False)
    for name in ("slurmd", "slurmctld"):
        pidfile = os.path.join(workdir, f"{name}.pid")
        try:
            pid = int(open(pidfile).read().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 15)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
    for name in ("slurm.conf", "gres.conf"):
        system_path = os.path.join(SYSTEM_CONF_DIR, name)
        if os.path.exists(system_path + BACKUP_SUFFIX):
            os.replace(system_path + BACKUP_SUFFIX, system_path)
        elif os.path.exists(system_path) and workdir in open(system_path).read():
            os.unlink(system_path)


if __name__ == "__main__":
    action, directory = sys.argv[1], os.path.abspath(sys.argv[2])
    if action == "up":
        print(f"export SLURM_CONF={start(directory)['SLURM_CONF']}")
    else:
        stop(directory)
