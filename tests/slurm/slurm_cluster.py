"""A throwaway SLURM cluster on this host: a private munged, slurmctld and two slurmd "nodes".

Everything (key, sockets, state, spool, logs, fake GPU device files) lives under one directory; the
daemons run in the foreground as children of the test and are stopped by their process ids. The
node names are appended to /etc/hosts (and removed again) so a rendezvous on ``n1`` resolves.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_ports

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / ".ci" / "install_slurm.sh"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel")
HOSTS = Path("/etc/hosts")
HOSTS_MARK = "# ditmoe slurm test"
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def unavailable_reason() -> str | None:
    """None when a cluster can be started here (installing SLURM with apt if needed), else why not."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM test needs Linux"
    if os.geteuid() != 0:
        return "SLURM test needs root (slurmd and a private munged run as root)"
    if not os.access(HOSTS, os.W_OK):
        return f"SLURM test needs a writable {HOSTS} to resolve the virtual node names"
    if all(_which(name) for name in DAEMONS):
        return None
    if not _which("apt-get"):
        return "SLURM is not installed and apt-get is unavailable (install slurmctld slurmd slurm-client munge)"
    proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return f"installing SLURM with {INSTALL} failed:\n{(proc.stdout + proc.stderr)[-2000:]}"
    return None


class SlurmCluster:
    """``with SlurmCluster(root) as c: c.sbatch(...)``; ``c.env`` is the environment for SLURM commands."""

    def __init__(self, root: Path, nodes=("n1", "n2"), cpus: int = 8, gpus: int = 8):
        self.root, self.nodes, self.cpus, self.gpus = Path(root), nodes, cpus, gpus
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{os.environ['PATH']}:{SBIN_PATH}"}
        self.procs: list[subprocess.Popen] = []
        self.added_hosts = False

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- bring-up -------------------------------------------------------------------------------
    def start(self, timeout: float = 60):
        for sub in ("state", "dev", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants its socket's directory searchable by all
        self._add_hosts()
        self._start_munge()
        self._write_config()
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.nodes:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split()
            if out[1::2] == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not become idle: {out}\n{self.logs()}")

    def _add_hosts(self):
        try:
            if all(socket.gethostbyname(n) for n in self.nodes):
                return
        except OSError:
            pass
        with HOSTS.open("a") as f:
            f.write(f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK}\n")
        self.added_hosts = True

    def _start_munge(self):
        key = self.root / "munge.key"
        subprocess.run([_which("mungekey"), "--create", "--force", "--keyfile", str(key)], check=True,
                       capture_output=True)
        key.chmod(0o600)
        self._daemon("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munged.pid'}", f"--log-file={self.root / 'munged.log'}",
            f"--seed-file={self.root / 'munged.seed'}",
        ])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.1)

    def _write_config(self):
        r = self.root
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} RealMemory=16000 Gres=gpu:{self.gpus}"
            for n, p in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=ditmoetest
SlurmctldHost={socket.gethostname()}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=5
MinJobAge=600
{nodes}
PartitionName=test Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")
        gres = []
        for n in self.nodes:
            for i in range(self.gpus):
                dev = r / "dev" / f"{n}-gpu{i}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device like /dev/null
            gres.append(f"NodeName={n} Name=gpu File={r}/dev/{n}-gpu[0-{self.gpus - 1}]")
        (r / "gres.conf").write_text("\n".join(gres) + "\n")

    def _daemon(self, name: str, cmd: list[str]):
        log = open(self.root / f"{name}.out", "w")
        self.procs.append(subprocess.Popen([_which(cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, cwd=self.root))
        log.close()

    def _check_alive(self):
        dead = [p.args[0] for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited\n{self.logs()}")

    def logs(self) -> str:
        parts = [f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(self.root.glob("*.log"))]
        parts += [f"--- {f.name}\n{f.read_text(errors='replace')[-1000:]}" for f in sorted(self.root.glob("*.out"))]
        return "\n".join(parts)

    # -- tear-down ------------------------------------------------------------------------------
    def stop(self):
        if any(p.poll() is None for p in self.procs if "slurmctld" in p.args[0]):
            self.run(["scancel", "--quiet", "--partition=test"], check=False)
            self._wait_jobs_gone(20)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.added_hosts:
            lines = HOSTS.read_text().splitlines(keepends=True)
            HOSTS.write_text("".join(line for line in lines if HOSTS_MARK not in line))
            self.added_hosts = False

    def _wait_jobs_gone(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                return
            time.sleep(0.5)

    # -- jobs -----------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kw):
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60,
                              **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> str:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def output(self, fields: dict[str, str]) -> str:
        """The job's fields, batch output and the end of the log it names ("logging to PATH")."""
        parts = [" ".join(f"{k}={v}" for k, v in fields.items())]
        stdout = Path(fields.get("StdOut", ""))
        if stdout.is_file():
            text = stdout.read_text(errors="replace")
            parts.append(text[-3000:])
            logs = re.findall(r"^logging to (.+)$", text, re.M)
            if logs and Path(logs[-1]).is_file():
                parts.append(Path(logs[-1]).read_text(errors="replace")[-5000:])
        return "\n".join(parts)

    def wait_job(self, job_id: str, done, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll until ``done(fields)``; a job that ends any other way fails the wait."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if done(fields):
                return fields
            if fields["JobState"] in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                raise RuntimeError(f"job {job_id} ended {fields['JobState']}\n{self.output(fields)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields['JobState']} after {timeout} s\n{self.output(fields)}")
            time.sleep(poll)
