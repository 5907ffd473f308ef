"""A private single-host SLURM cluster for tests: its own munged, slurmctld and slurmd.

Everything lives in one folder (munge key and socket, slurm.conf, state, spool, logs) and on
ports picked free, so a SLURM installation already on the machine is never touched. The
daemons run in the foreground as children of the test and are stopped and reaped by `stop()`.
`unavailable()` says why such a cluster cannot run here (not root, packages missing and not
installable), or returns None.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from m3tgossip.harness.testbed import free_ports

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
#: longest wait for one daemon to come up, and for apt-get
START_S = 60.0
APT_S = 900.0


def _apt_install() -> str | None:
    """Install PACKAGES with apt-get (update first only if the lists lack them)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    cmd += ["-o", "DPkg::Lock::Timeout=300", *PACKAGES]  # another install may hold the lock
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_S)
    if done.returncode != 0 and "Unable to locate package" in done.stderr:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=APT_S)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_S)
    if done.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}"
    return None


def unavailable() -> str | None:
    """Why a private SLURM cluster cannot run here, or None (installing the packages if
    they are missing and this is root with apt-get)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return None if os.geteuid() == 0 else "slurmd must run as root to launch job steps"
    if os.geteuid() != 0:
        return f"SLURM binaries missing ({', '.join(missing)}) and not root to install them"
    if shutil.which("apt-get") is None:
        return f"SLURM binaries missing ({', '.join(missing)}) and no apt-get to install them"
    problem = _apt_install()
    if problem:
        return problem
    missing = [b for b in BINARIES if shutil.which(b) is None]
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def free_port() -> int:
    return free_ports(1)[0]


def consecutive_free_ports(n: int) -> int:
    """The first of `n` consecutive ports free on 127.0.0.1 right now."""
    return free_ports(n, consecutive=True)[0]


SLURM_CONF = """\
ClusterName=m3ttest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:16
"""


class LocalSlurm:
    """munged, slurmctld and slurmd for NodeName=localhost (CPUs=2), all under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment the SLURM client commands need to find this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _wait(self, name: str, ready, what: str) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if ready():
                return
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}: {self.log(name)}")
            time.sleep(0.2)
        raise RuntimeError(f"{name}: {what} within {START_S:g} s: {self.log(name)}")

    def log(self, name: str) -> str:
        text = ""
        for path in (self.root / f"{name}.out", self.root / f"{name}.log"):
            if path.exists():
                text += path.read_text(errors="replace")[-2000:]
        return text

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(mode=0o700, parents=True)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(mode=0o755)
        key = munge / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(1024))
        sock = munge / "munge.socket"
        self._spawn(
            "munged",
            [
                "munged",
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )
        self._wait("munged", sock.exists, "no socket")
        self.conf.write_text(
            SLURM_CONF.format(root=self.root, ctld_port=free_port(), slurmd_port=free_port())
        )
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", self._ping, "no answer to scontrol ping")
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("slurmd", self._idle, "node localhost not idle")

    def run(self, *cmd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def _ping(self) -> bool:
        done = self.run("scontrol", "ping")
        return done.returncode == 0 and "UP" in done.stdout

    def _idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%t")
        return done.returncode == 0 and done.stdout.split() == ["idle"]

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (SIGTERM, then SIGKILL)
        and reap them."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user=root", timeout=15)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h").stdout.strip():
                    time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
