"""A real, throw-away Slurm cluster on one machine, for the project's tests.

``SlurmCluster`` starts the stock Debian 12 Slurm 22.05 daemons without systemd:

* ``munged`` (authentication),
* ``mariadbd`` + ``slurmdbd`` (accounting: ``sacct`` and
  snakemake-executor-plugin-slurm need it; without it the plugin loses its jobs
  and snakemake hangs),
* ``slurmctld``,
* one ``slurmd -N nX`` per node.  Every node has its own port, spool directory,
  PID file, log file and a ``127.0.2.X`` address (``/etc/hosts`` gets
  ``127.0.2.X nX`` so that workloads can resolve ``SLURM_NODELIST`` host names;
  ``hostname`` itself is the same on every node, use ``SLURMD_NODENAME``).

GPUs are fake: a ``gpu`` GRES whose ``File=`` entries are symlinks to
``/dev/null`` (Slurm 22.05 drops GPU GRES without ``File=``).  Jobs get
``CUDA_VISIBLE_DEVICES``/``SLURM_JOB_GPUS`` like on a real cluster, nothing more.

State lives in the Debian default places: configs in ``/etc/slurm`` (keep it there: the
snakemake jobstep plugin strips ``SLURM_CONF`` from ``mpi`` rules, whose ``srun`` then reads
``/etc/slurm/slurm.conf``), PID files in
``/run/slurm``, spool/state in ``/var/spool/slurm``, logs in ``/var/log/slurm``
(``SlurmCluster.log_paths()`` lists them).  ``start()`` first stops a cluster
left behind by an earlier (crashed) session, by PID file, and wipes job state
and the accounting database, so job ids restart at 1 and runs don't see each
other's jobs.

slurm.conf highlights (see ``slurm_conf_text()``): select/cons_tres with
CR_Core_Memory, DefMemPerCPU=500, partition MaxTime=INFINITE DefaultTime=60,
ReturnToService=2, JobRequeue=1 (``scontrol requeue`` works; a requeued job is
eligible again after cred_expire+1 = 11 s), MinJobAge=600 (``scontrol show job``
sees finished jobs for 10 minutes), KillWait=30 (Slurm's default: the time a job's
processes have from SIGTERM to SIGKILL), OverTimeLimit=0,
bf_interval=1/sched_interval=2 (fast rescheduling), proctrack/linuxproc +
task/none (no cgroups; ``scancel --signal=USR1`` reaches every job step process),
jobacct_gather/linux + slurmdbd (``sacct`` reports steps, TRES, exit codes).

Needs root and the packages in ``PACKAGES`` (``ensure_installed()`` installs
them with apt-get when ``slurmctld`` is missing).  Never install
``slurm-wlm-emulator``: it replaces slurmctld/slurmd with front-end-mode
binaries that cannot run several nodes.

Use from pytest through ``tests.cluster.fixtures.slurm_cluster``; by hand::

    python -m tests.cluster.slurm up      # start (or restart) and print sinfo
    python -m tests.cluster.slurm status
    python -m tests.cluster.slurm down
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "PACKAGES",
    "SlurmCluster",
    "SlurmStartError",
    "SlurmUnavailable",
    "ensure_installed",
    "why_unavailable",
]

PACKAGES = ("slurm-wlm", "munge", "mariadb-server", "slurmdbd")

# Executables the cluster needs (daemons and client tools).
_REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmstepd",
    "slurmdbd",
    "munged",
    "munge",
    "unmunge",
    "mariadbd",
    "mariadb",
    "mariadb-admin",
    "sbatch",
    "srun",
    "scontrol",
    "sinfo",
    "squeue",
    "scancel",
    "sacct",
    "sacctmgr",
)
_EXTRA_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

_TERMINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run on this machine at all (not root, packages cannot be installed...).

    Tests should be *skipped* with this reason.
    """


class SlurmInUse(RuntimeError):
    """Another live process runs the test cluster on this machine; leave it alone."""


class SlurmStartError(RuntimeError):
    """Slurm should work here but a daemon did not come up.  Tests must *error*."""


# --------------------------------------------------------------------------- helpers


def _search_path() -> str:
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    for extra in _EXTRA_PATH:
        if extra not in parts:
            parts.append(extra)
    return os.pathsep.join(parts)


def _which(name: str) -> str | None:
    return shutil.which(name, path=_search_path())


def _missing_binaries() -> list[str]:
    return [b for b in _REQUIRED_BINARIES if _which(b) is None]


def _tail(path: Path | str, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            try:
                f.seek(-65536, os.SEEK_END)
            except OSError:
                f.seek(0)
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    """True if pid runs; a zombie (not yet reaped, e.g. PID 1 in a container) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    # "pid (comm) S ...": comm may contain spaces/parens, the state follows the last ')'
    state = stat.rsplit(")", 1)[-1].split()[0:1]
    return bool(state) and state[0] not in ("Z", "X")


def _read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError):
        return None


def _stop_pidfiles(pidfiles: Iterable[Path], term_timeout: float = 15.0) -> list[str]:
    """SIGTERM every live process named by the PID files, wait, SIGKILL leftovers.

    Removes the PID files.  Returns a list of messages about what was done.
    """
    notes = []
    pids: dict[int, Path] = {}
    for pf in pidfiles:
        pid = _read_pid(pf)
        if pid and pid > 1 and pid != os.getpid() and _alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
                pids[pid] = pf
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + term_timeout
    while pids and time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            break
        time.sleep(0.05)
    for pid, pf in pids.items():
        if _alive(pid):
            notes.append(f"SIGKILL {pid} ({pf.name})")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pf in pidfiles:
        try:
            pf.unlink()
        except FileNotFoundError:
            pass
    return notes


def _split_kv(text: str) -> dict[str, str]:
    """Parse ``Key=value Key2=value with spaces Key3=...`` (scontrol output)."""
    out: dict[str, str] = {}
    matches = list(re.finditer(r"(?:(?<=\s)|^)([A-Za-z][A-Za-z0-9_:/.\-]*)=", text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        key = m.group(1)
        value = text[m.end() : end].strip()
        out.setdefault(key, value)
    return out


# --------------------------------------------------------------------------- install / availability


def ensure_installed(timeout: float = 1200) -> None:
    """Install ``PACKAGES`` with apt-get when ``slurmctld`` (or another binary) is missing.

    Raises ``SlurmUnavailable`` when that is impossible here (not root, no apt-get,
    apt-get failed) and ``SlurmStartError`` when the installed binaries are unusable
    (slurm-wlm-emulator).
    """
    if sys.platform != "linux":
        raise SlurmUnavailable(f"the Slurm test cluster needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the Slurm test cluster needs root (starts slurmctld/slurmd/munged/mariadbd)")
    missing = _missing_binaries()
    if missing:
        apt = _which("apt-get")
        if apt is None:
            raise SlurmUnavailable(
                f"Slurm binaries missing ({', '.join(missing)}) and apt-get is not available to install "
                f"{' '.join(PACKAGES)}"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=_search_path())
        log = []

        def apt_get(*args: str) -> int:
            cmd = [apt, "-o", "DPkg::Lock::Timeout=300", *args]
            try:
                r = subprocess.run(
                    cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
                )
            except subprocess.TimeoutExpired:
                log.append(f"$ {' '.join(cmd)}  (timed out after {timeout:.0f}s)")
                return 124
            log.append(f"$ {' '.join(cmd)}  (rc={r.returncode})\n{(r.stdout + r.stderr)[-3000:]}")
            return r.returncode

        apt_get("update")  # a failed update may still leave usable package lists: try the install anyway
        if apt_get("install", "-y", *PACKAGES) != 0:
            raise SlurmUnavailable(f"apt-get could not install {' '.join(PACKAGES)}:\n" + "\n".join(log)[-4000:])
        missing = _missing_binaries()
        if missing:
            raise SlurmUnavailable(
                f"after installing {' '.join(PACKAGES)} these are still missing: {', '.join(missing)}"
            )
    for daemon in ("slurmctld", "slurmd"):
        real = os.path.realpath(_which(daemon) or daemon)
        if "emulator" in real:
            raise SlurmStartError(
                f"{daemon} resolves to {real} (slurm-wlm-emulator): front-end-mode binaries cannot run a "
                "multi-node test cluster; `apt-get remove slurm-wlm-emulator` (and reinstall slurmctld slurmd)"
            )


def why_unavailable(install: bool = True) -> str | None:
    """Why a Slurm test cluster truly cannot start here, or None if it should be able to.

    With ``install=True`` the packages are apt-installed when missing.
    """
    try:
        if install:
            ensure_installed()
        else:
            if sys.platform != "linux":
                return f"the Slurm test cluster needs Linux (this is {sys.platform})"
            if os.geteuid() != 0:
                return "the Slurm test cluster needs root"
            missing = _missing_binaries()
            if missing:
                return f"Slurm binaries missing: {', '.join(missing)}"
    except SlurmUnavailable as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- the cluster


class SlurmCluster:
    """A local multi-node Slurm cluster (nodes ``n1..nN``, one partition, one account)."""

    ctld_port = 6817
    dbd_port = 6819
    node_port_base = 17000  # node nX listens on node_port_base + X

    def __init__(
        self,
        nodes: int = 2,
        cpus_per_node: int = 2,
        mem_mb_per_node: int = 4000,
        gpus_per_node: int = 2,
        account: str = "lab",
        partition: str = "debug",
        cpu_nodes: int = 1,
        cpu_partition: str = "cpu",
        cluster_name: str = "lab",
        *,
        def_mem_per_cpu: int = 500,
        min_job_age: int = 600,
        kill_wait: int = 30,
        over_time_limit: int = 0,
        cred_expire: int = 10,
        conf_dir: str | Path = "/etc/slurm",
        run_dir: str | Path = "/run/slurm",
        spool_dir: str | Path = "/var/spool/slurm",
        log_dir: str | Path = "/var/log/slurm",
        db_name: str = "slurm_acct_db",
        db_user: str = "slurm",
        db_password: str = "slurmdbpass",
        start_timeout: float = 60.0,
    ):
        if not 1 <= nodes <= 250:
            raise ValueError("nodes must be in 1..250")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.mem_mb_per_node = mem_mb_per_node
        self.gpus_per_node = gpus_per_node
        self.account = account
        self.partition = partition
        self.cluster_name = cluster_name
        self.def_mem_per_cpu = def_mem_per_cpu
        self.min_job_age = min_job_age
        self.kill_wait = kill_wait
        self.over_time_limit = over_time_limit
        self.cred_expire = cred_expire
        self.conf_dir = Path(conf_dir)
        self.run_dir = Path(run_dir)
        self.spool_dir = Path(spool_dir)
        self.log_dir = Path(log_dir)
        self.db_name = db_name
        self.db_user = db_user
        self.db_password = db_password
        self.start_timeout = start_timeout
        # GPU nodes n1..nN in `partition`, then CPU-only nodes c1..cM in `cpu_partition`
        self.gpu_node_names = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpu_node_names = [f"c{i}" for i in range(1, cpu_nodes + 1)]
        self.node_names = self.gpu_node_names + self.cpu_node_names
        self.cpu_partition = cpu_partition
        self.timings: dict[str, float] = {}
        self.started = False
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ paths

    @property
    def slurm_conf(self) -> Path:
        return self.conf_dir / "slurm.conf"

    @property
    def gpu_dir(self) -> Path:
        return self.run_dir / "fakegpu"

    def _pidfile(self, daemon: str) -> Path:
        return self.run_dir / f"{daemon}.pid"

    def _slurm_pidfiles(self) -> list[Path]:
        return sorted(self.run_dir.glob("slurmd-*.pid")) + [self._pidfile("slurmctld")]

    mariadb_pidfile = Path("/run/mysqld/mysqld.pid")
    munge_pidfile = Path("/run/munge/munged.pid")

    def log_paths(self) -> dict[str, Path]:
        """Every daemon log, by daemon name ("slurmctld", "slurmd-n1", ...)."""
        logs = {
            "slurmctld": self.log_dir / "slurmctld.log",
            "slurmdbd": self.log_dir / "slurmdbd.log",
            "mariadb": self.log_dir / "mariadb.log",
            "munged": Path("/var/log/munge/munged.log"),
        }
        for n in self.node_names:
            logs[f"slurmd-{n}"] = self.log_dir / f"slurmd-{n}.log"
        return logs

    def log_tail(self, name: str, lines: int = 40) -> str:
        return _tail(self.log_paths()[name], lines)

    # ------------------------------------------------------------------ environment / commands

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for Slurm client commands: PATH with sbin, no inherited SLURM_* job variables."""
        env = dict(os.environ if base is None else base)
        for k in list(env):
            if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del env[k]
        env["PATH"] = _search_path() if base is None else env.get("PATH", _search_path())
        if self.conf_dir != Path("/etc/slurm"):
            env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    def run(
        self,
        args: Sequence[str] | str,
        *,
        timeout: float = 30,
        check: bool = True,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command (list, or a string split with shlex) with the cluster's environment."""
        if isinstance(args, str):
            args = shlex.split(args)
        r = subprocess.run(
            list(args),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else self.env(),
        )
        if check and r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
        return r

    def _ok(self, args: Sequence[str], timeout: float = 10) -> bool:
        try:
            return self.run(args, timeout=timeout, check=False).returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return False

    def _wait(
        self,
        what: str,
        predicate,
        timeout: float,
        logs: Sequence[str] = (),
        interval: float = 0.1,
        daemons: Sequence[str] = (),
    ):
        """Poll ``predicate`` until true; fail fast when one of ``daemons`` (slurmctld, slurmd-n1...) died."""
        deadline = time.monotonic() + timeout
        last_exc = None
        while True:
            try:
                if predicate():
                    return
            except Exception as e:  # noqa: BLE001 - report the last one
                last_exc = e
            for d in daemons:
                died = self._daemon_died(d)
                if died:
                    raise self._start_error(f"{died} while waiting for {what}", logs)
            if time.monotonic() > deadline:
                raise self._start_error(
                    f"timed out after {timeout:.0f}s waiting for {what}"
                    + (f" (last error: {last_exc!r})" if last_exc else ""),
                    logs,
                )
            time.sleep(interval)

    def _daemon_died(self, daemon: str) -> str | None:
        """A reason if a Slurm daemon we started is gone: its PID is dead or its log says fatal."""
        pid = _read_pid(self._pidfile(daemon))
        if pid and not _alive(pid):
            return f"{daemon} (pid {pid}) exited"
        log = self.log_paths().get(daemon)
        if log is not None and log.exists():
            fatal = [line for line in _tail(log, 200).splitlines() if "fatal:" in line]
            if fatal:
                return f"{daemon} died: {fatal[-1].strip()}"
        return None

    def _start_error(self, msg: str, logs: Sequence[str]) -> SlurmStartError:
        parts = [msg]
        paths = self.log_paths()
        for name in logs:
            path = paths.get(name, Path(name))
            parts.append(f"--- tail of {path} ---\n{_tail(path)}")
        return SlurmStartError("\n".join(parts))

    def _start_daemon(self, name: str, args: Sequence[str], logs: Sequence[str], *, timeout: float = 30) -> None:
        """Run a self-daemonizing Slurm daemon; raise with its output and log tail if it fails at once."""
        out_path = self.log_dir / f"{name}.startup.out"
        with open(out_path, "w") as out:
            try:
                r = subprocess.run(
                    list(args),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._daemon_env(),
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                raise self._start_error(f"`{' '.join(args)}` did not daemonize within {timeout}s", logs) from None
        if r.returncode != 0:
            raise self._start_error(f"`{' '.join(args)}` exited with {r.returncode}:\n{_tail(out_path)}", logs)

    def _daemon_env(self) -> dict[str, str]:
        env = self.env()
        env.pop("PYTHONPATH", None)
        return env

    # ------------------------------------------------------------------ public API

    def why_unavailable(self, install: bool = True) -> str | None:
        return why_unavailable(install=install)

    def available(self, install: bool = True) -> bool:
        return self.why_unavailable(install=install) is None

    def start_or_reason(self) -> str | None:
        """Start the cluster; return a reason string (and start nothing) if Slurm truly cannot run here.

        Errors while starting a cluster that should work are raised (``SlurmStartError``).
        """
        reason = self.why_unavailable(install=True)
        if reason:
            return reason
        self.start()
        return None

    def is_running(self) -> bool:
        pid = _read_pid(self._pidfile("slurmctld"))
        return bool(pid and _alive(pid)) and self._ok(["scontrol", "ping"], timeout=5)

    def start(self) -> "SlurmCluster":
        """(Re)start the whole cluster from a clean state and wait until every node is idle."""
        ensure_installed()
        t_start = time.monotonic()
        self.timings = {}
        t = t_start

        def step(name: str) -> None:
            nonlocal t
            now = time.monotonic()
            self.timings[name] = round(now - t, 3)
            t = now

        for d in (self.conf_dir, self.run_dir, self.spool_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        # a cluster from an earlier (crashed) session: stop it, keep munged/mariadb running
        self._stop_slurm_daemons()
        self._wipe_state()
        step("stop_previous_and_wipe")

        self._write_hosts()
        self._write_fake_gpus()
        self._write_configs()
        step("configs")

        self._start_munge()
        step("munged")
        self._start_mariadb()
        step("mariadb")
        self._start_slurmdbd()
        step("slurmdbd")
        self._add_accounting_objects()
        step("sacctmgr")

        self._start_daemon("slurmctld", [_which("slurmctld") or "slurmctld", "-c"], ["slurmctld"])
        self._wait(
            "slurmctld to answer `scontrol ping`",
            lambda: "is UP" in self.run(["scontrol", "ping"], timeout=5, check=False).stdout,
            self.start_timeout,
            ["slurmctld"],
            daemons=["slurmctld"],
        )
        step("slurmctld")

        for n in self.node_names:
            self._start_daemon(f"slurmd-{n}", [_which("slurmd") or "slurmd", "-N", n], [f"slurmd-{n}"])
        self._wait(
            f"{len(self.node_names)} idle node(s)",
            lambda: sum(1 for row in self.nodes_info() if row["state"] == "idle") >= len(self.node_names),
            self.start_timeout,
            ["slurmctld", *[f"slurmd-{n}" for n in self.node_names]],
            daemons=["slurmctld", *[f"slurmd-{n}" for n in self.node_names]],
        )
        step("slurmd")
        self.timings["total"] = round(time.monotonic() - t_start, 3)
        self.started = True
        return self

    def stop(self, stop_services: bool = True) -> list[str]:
        """Cancel jobs, stop slurmd/slurmctld/slurmdbd by PID file (SIGTERM, then SIGKILL).

        With ``stop_services`` also stop munged and mariadbd when this harness started them.
        Returns notes about processes that had to be SIGKILLed.
        """
        notes = self._stop_slurm_daemons()
        if stop_services:
            for marker, pidfile in (
                (self.run_dir / "harness-started-mariadb", self.mariadb_pidfile),
                (self.run_dir / "harness-started-munged", self.munge_pidfile),
            ):
                if marker.exists():
                    notes += _stop_pidfiles([pidfile], term_timeout=30)
                    marker.unlink(missing_ok=True)
        self.started = False
        self._release_lock()
        return notes

    # ------------------------------------------------------------------ query helpers

    def nodes_info(self) -> list[dict[str, str]]:
        """One dict per node: name, state, cpus, memory, gres, partition."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N|%t|%T|%c|%m|%G|%P"], timeout=10).stdout
        rows = []
        for line in out.splitlines():
            if not line.strip():
                continue
            name, short, state, cpus, mem, gres, part = line.split("|")
            rows.append(
                dict(name=name, state=state, short_state=short, cpus=cpus, memory=mem, gres=gres, partition=part)
            )
        return rows

    def scontrol_show_node(self, node: str) -> dict[str, str]:
        return _split_kv(self.run(["scontrol", "-o", "show", "node", node], timeout=10).stdout.strip())

    def scontrol_show_job(self, jobid: int | str) -> dict:
        """``scontrol -d show job`` parsed into a dict (first occurrence of each key wins).

        The per-node detail lines (``Nodes=n1 CPU_IDs=0 Mem=500 GRES=gpu:1(IDX:0)``) are
        under the key ``"node_details"`` as a list of dicts.
        """
        out = self.run(["scontrol", "-d", "show", "job", str(jobid)], timeout=10).stdout
        info: dict = {}
        details = []
        for line in out.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("Nodes=") and "CPU_IDs=" in line:
                details.append(_split_kv(line))
                continue
            for k, v in _split_kv(line).items():
                info.setdefault(k, v)
        info["node_details"] = details
        return info

    def sacct(
        self,
        job_ids: Iterable[int | str] | int | str | None = None,
        fields: Sequence[str] = (
            "JobID",
            "JobName",
            "State",
            "ExitCode",
            "NodeList",
            "NNodes",
            "NTasks",
            "NCPUS",
            "ReqMem",
            "AllocTRES",
            "Timelimit",
        ),
        *,
        allocations_only: bool = False,
        extra_args: Sequence[str] = (),
    ) -> list[dict[str, str]]:
        """``sacct -P -n --format=...`` rows as dicts keyed by the given field names.

        ``job_ids=None`` means all jobs of all users since the cluster started.
        ``allocations_only`` adds ``-X`` (no ``.batch``/``.0`` step rows).
        """
        sep = "|#|"  # multi-character: a non-printable delimiter garbles sacct 22.05 output
        keys = [f.split("%", 1)[0] for f in fields]
        args = ["sacct", "-P", "-n", f"--delimiter={sep}", "--format=" + ",".join(keys)]
        if allocations_only:
            args.append("-X")
        if job_ids is None:
            args += ["-a", "--starttime=2000-01-01T00:00:00"]
        else:
            if isinstance(job_ids, (int, str)):
                job_ids = [job_ids]
            args += ["-j", ",".join(str(j) for j in job_ids)]
        args += list(extra_args)
        out = self.run(args, timeout=20).stdout
        rows = []
        for line in out.splitlines():
            if not line:
                continue
            values = line.split(sep)
            if len(values) != len(keys):
                raise ValueError(f"sacct row has {len(values)} fields, expected {len(keys)}: {line!r}")
            rows.append(dict(zip(keys, values)))
        return rows

    def wait_accounted(self, jobid: int | str, timeout: float = 20, interval: float = 0.2) -> dict[str, str]:
        """Wait until slurmdbd holds the finished job's full record; return its ``sacct -X`` row.

        Accounting is asynchronous: for a second or two after a job ends, ``sacct`` may show a
        placeholder allocation row (JobName ``allocation``, NodeList of the batch host only,
        empty Timelimit) built from the step records, already with the final State.
        """
        fields = ("JobID", "JobName", "State", "Timelimit", "NodeList", "ExitCode")
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.sacct(jobid, fields, allocations_only=True) if r["JobID"] == str(jobid)]
            if rows and rows[0]["State"].split()[0] in _TERMINAL_STATES and rows[0]["Timelimit"]:
                return rows[0]
            if time.monotonic() > deadline:
                raise TimeoutError(f"slurmdbd has no complete record of finished job {jobid} after {timeout}s: {rows}")
            time.sleep(interval)

    def sbatch(
        self, args: Sequence[str] = (), script: str | None = None, *, cwd: str | Path | None = None, timeout: float = 30
    ) -> int:
        """Submit (``--parsable``) and return the job id.  ``script`` goes to sbatch's stdin."""
        cmd = ["sbatch", "--parsable", *args]
        r = subprocess.run(
            cmd,
            input=script,
            stdin=None if script is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(),
            cwd=cwd,
        )
        if r.returncode != 0:
            raise subprocess.CalledProcessError(r.returncode, cmd, r.stdout, r.stderr)
        return int(r.stdout.strip().split(";")[0])

    def job_state(self, jobid: int | str) -> str:
        return self.scontrol_show_job(jobid).get("JobState", "")

    def wait_job(
        self, jobid: int | str, states: Iterable[str] = _TERMINAL_STATES, timeout: float = 60, interval: float = 0.2
    ) -> dict:
        """Poll ``scontrol show job`` until JobState is in ``states``; return the parsed job."""
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            info = self.scontrol_show_job(jobid)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {jobid} still {info.get('JobState')} after {timeout}s: {info}")
            time.sleep(interval)

    def describe(self) -> str:
        """Human-readable state for assertion messages: sinfo, squeue and where the logs are."""
        parts = []
        for cmd in (["sinfo", "-N", "-l"], ["squeue", "-a"]):
            try:
                r = self.run(cmd, timeout=10, check=False)
                parts.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
            except Exception as e:  # noqa: BLE001
                parts.append(f"$ {' '.join(cmd)}\n{e!r}")
        parts.append("logs: " + ", ".join(f"{k}={v}" for k, v in self.log_paths().items()))
        return "\n".join(parts)

    # ------------------------------------------------------------------ internals: lock

    def _acquire_lock(self) -> None:
        """One live harness per machine: a second pytest session must not wipe a cluster in use."""
        if self._lock_fd is not None:
            return
        path = self.run_dir / "harness.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SlurmInUse(
                f"another live process (pid {holder or '?'}) holds {path}: its Slurm test cluster is in use"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    # ------------------------------------------------------------------ internals: stop / wipe

    def _stop_slurm_daemons(self) -> list[str]:
        ctld_pid = _read_pid(self._pidfile("slurmctld"))
        if ctld_pid and _alive(ctld_pid):
            self._cancel_all_jobs()
        notes = _stop_pidfiles(self._slurm_pidfiles())
        notes += _stop_pidfiles([self._pidfile("slurmdbd")])
        return notes

    def _cancel_all_jobs(self, timeout: float = 15) -> None:
        """Best effort: cancel every job so no slurmstepd outlives its slurmd."""
        try:
            r = self.run(["squeue", "-h", "-a", "-o", "%A"], timeout=5, check=False)
            ids = [i for i in r.stdout.split() if i.isdigit()]
            if not ids:
                return
            self.run(["scancel", *ids], timeout=10, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = self.run(["squeue", "-h", "-a", "-o", "%A"], timeout=5, check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    return
                time.sleep(0.2)
        except (subprocess.TimeoutExpired, OSError):
            pass

    def _wipe_state(self) -> None:
        for path in [self.spool_dir / "ctld", *self.spool_dir.glob("d-*")]:
            shutil.rmtree(path, ignore_errors=True)
        for name, path in self.log_paths().items():
            if name in ("munged", "mariadb"):
                continue
            path.unlink(missing_ok=True)
        for path in self.log_dir.glob("*.startup.out"):
            path.unlink(missing_ok=True)
        (self.spool_dir / "ctld").mkdir(parents=True, exist_ok=True)
        for n in self.node_names:
            (self.spool_dir / f"d-{n}").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ internals: files

    def _node_addr(self, i: int) -> str:
        return f"127.0.2.{i}"

    def _write_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        lines = text.splitlines()
        add = []
        for i, n in enumerate(self.node_names, start=1):
            pattern = re.compile(rf"^\s*{re.escape(self._node_addr(i))}\s+(.*\s)?{n}(\s|#|$)")
            if not any(pattern.match(line) for line in lines):
                add.append(f"{self._node_addr(i)} {n} # slurm test cluster")
        if add:
            with open(hosts, "a") as f:  # append in place: /etc/hosts is often a bind mount
                if text and not text.endswith("\n"):
                    f.write("\n")
                f.write("\n".join(add) + "\n")

    def _write_fake_gpus(self) -> None:
        self.gpu_dir.mkdir(parents=True, exist_ok=True)
        for g in range(self.gpus_per_node):
            link = self.gpu_dir / f"gpu{g}"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to("/dev/null")

    def slurm_conf_text(self) -> str:
        acct = "\n".join(
            [
                "AccountingStorageType=accounting_storage/slurmdbd",
                "AccountingStorageHost=localhost",
                f"AccountingStoragePort={self.dbd_port}",
                "AccountingStorageTRES=gres/gpu",
                "JobAcctGatherType=jobacct_gather/linux",
                # sample every second: the test jobs last seconds, and sacct reports MaxRSS only
                # from samples (the default, 30 s, leaves it empty for them)
                "JobAcctGatherFrequency=task=1",
            ]
        )
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=cred_expire={self.cred_expire}",
            "CredType=cred/munge",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # no cgroups: works in containers/gVisor; signals reach the whole step process tree
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "ReturnToService=2",
            "JobRequeue=1",
            f"MinJobAge={self.min_job_age}",
            f"KillWait={self.kill_wait}",
            f"OverTimeLimit={self.over_time_limit}",
            "InactiveLimit=0",
            "Waittime=0",
            f"SlurmctldPidFile={self._pidfile('slurmctld')}",
            f"SlurmdPidFile={self.run_dir}/slurmd-%n.pid",
            f"SlurmdSpoolDir={self.spool_dir}/d-%n",
            f"StateSaveLocation={self.spool_dir}/ctld",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "SchedulerType=sched/backfill",
            # re-evaluate pending jobs every second or two (a requeued job waits cred_expire + 1 s for its
            # BeginTime, then for the next scheduling pass: 30-60 s with the defaults)
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={self.def_mem_per_cpu}",
            "GresTypes=gpu",
            "JobCompType=jobcomp/none",
            acct,
            # use the CPUs/memory below, not what slurmd detects on this (small) machine
            "SlurmdParameters=config_overrides",
        ]
        for i, n in enumerate(self.node_names, start=1):
            gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node and n in self.gpu_node_names else ""
            lines.append(
                f"NodeName={n} NodeHostname=localhost NodeAddr={self._node_addr(i)} "
                f"Port={self.node_port_base + i} CPUs={self.cpus_per_node} "
                f"RealMemory={self.mem_mb_per_node}{gres} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.gpu_node_names)} Default=YES MaxTime=INFINITE DefaultTime=60 State=UP"
        )
        if self.cpu_node_names:  # a partition without GPUs, as many clusters have
            lines.append(
                f"PartitionName={self.cpu_partition} Nodes={','.join(self.cpu_node_names)} MaxTime=INFINITE DefaultTime=60 State=UP"
            )
        return "\n".join(lines) + "\n"

    def _write_configs(self) -> None:
        self.slurm_conf.write_text(self.slurm_conf_text())
        gres = self.conf_dir / "gres.conf"
        if self.gpus_per_node:
            gres.write_text(
                f"NodeName={','.join(self.gpu_node_names)} Name=gpu "
                f"File={self.gpu_dir}/gpu[0-{self.gpus_per_node - 1}]\n"
            )
        else:
            gres.write_text("")
        (self.conf_dir / "cgroup.conf").unlink(missing_ok=True)
        dbd = self.conf_dir / "slurmdbd.conf"
        dbd.touch(mode=0o600)
        os.chmod(dbd, 0o600)
        dbd.write_text(
            "\n".join(
                [
                    "AuthType=auth/munge",
                    "DbdHost=localhost",
                    "DbdAddr=127.0.0.1",
                    f"DbdPort={self.dbd_port}",
                    "SlurmUser=root",
                    "DebugLevel=info",
                    f"LogFile={self.log_dir}/slurmdbd.log",
                    f"PidFile={self._pidfile('slurmdbd')}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=localhost",
                    f"StorageUser={self.db_user}",
                    f"StoragePass={self.db_password}",
                    f"StorageLoc={self.db_name}",
                ]
            )
            + "\n"
        )

    # ------------------------------------------------------------------ internals: daemons

    def _munge_works(self) -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5, env=self.env())
            if cred.returncode != 0:
                return False
            r = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5, env=self.env())
            return r.returncode == 0
        except (subprocess.TimeoutExpired, OSError):
            return False

    def _start_munge(self) -> None:
        pid = _read_pid(self.munge_pidfile)
        if pid and _alive(pid) and self._munge_works():
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists() or key.stat().st_size == 0:
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            shutil.chown(key, "munge", "munge")
            os.chmod(key, 0o400)
        for d in (Path("/run/munge"), Path("/var/log/munge"), Path("/var/lib/munge")):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        os.chmod("/run/munge", 0o755)
        if pid and not _alive(pid):
            self.munge_pidfile.unlink(missing_ok=True)
        runuser = _which("runuser")
        munged = _which("munged") or "munged"
        cmd = [runuser, "-u", "munge", "--", munged] if runuser else [munged, "--force"]
        r = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, env=self._daemon_env()
        )
        if r.returncode != 0:
            raise self._start_error(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stdout}{r.stderr}", ["munged"])
        (self.run_dir / "harness-started-munged").touch()
        self._wait("munge credentials (munge -n | unmunge)", self._munge_works, 15, ["munged"])

    def _mariadb_up(self) -> bool:
        return self._ok(["mariadb-admin", "--connect-timeout=2", "ping"], timeout=5)

    def _start_mariadb(self) -> None:
        if not self._mariadb_up():
            run_dir = Path("/run/mysqld")
            run_dir.mkdir(parents=True, exist_ok=True)
            shutil.chown(run_dir, "mysql", "mysql")
            datadir = Path("/var/lib/mysql")
            if not (datadir / "mysql").is_dir():
                r = subprocess.run(
                    [
                        _which("mariadb-install-db") or "mariadb-install-db",
                        "--user=mysql",
                        f"--datadir={datadir}",
                        "--skip-test-db",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    env=self._daemon_env(),
                )
                if r.returncode != 0:
                    raise SlurmStartError(f"mariadb-install-db failed:\n{r.stdout}{r.stderr}")
            log = self.log_paths()["mariadb"]
            with open(log, "a") as out:
                # setsid -f: fork into its own session; no child of ours to reap
                subprocess.run(
                    [
                        "setsid",
                        "-f",
                        _which("mariadbd") or "mariadbd",
                        "--user=mysql",
                        f"--pid-file={self.mariadb_pidfile}",
                        "--skip-log-error",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self._daemon_env(),
                    timeout=30,
                    check=True,
                )
            (self.run_dir / "harness-started-mariadb").touch()
            self._wait("mariadbd (mariadb-admin ping)", self._mariadb_up, self.start_timeout, ["mariadb"], interval=0.2)
        sql = (
            f"DROP DATABASE IF EXISTS `{self.db_name}`; CREATE DATABASE `{self.db_name}`; "
            f"CREATE USER IF NOT EXISTS '{self.db_user}'@'localhost' IDENTIFIED BY '{self.db_password}'; "
            f"ALTER USER '{self.db_user}'@'localhost' IDENTIFIED BY '{self.db_password}'; "
            f"GRANT ALL ON `{self.db_name}`.* TO '{self.db_user}'@'localhost'; FLUSH PRIVILEGES;"
        )
        r = self.run(["mariadb", "-e", sql], timeout=30, check=False)
        if r.returncode != 0:
            raise self._start_error(f"resetting the accounting database failed: {r.stderr}", ["mariadb"])

    def _start_slurmdbd(self) -> None:
        self._start_daemon("slurmdbd", [_which("slurmdbd") or "slurmdbd"], ["slurmdbd"])
        self._wait(
            "slurmdbd (sacctmgr show cluster)",
            lambda: self._ok(["sacctmgr", "-n", "show", "cluster"], timeout=10),
            self.start_timeout,
            ["slurmdbd", "mariadb"],
            interval=0.2,
            daemons=["slurmdbd"],
        )

    def _add_accounting_objects(self) -> None:
        """Cluster, account and root's association; the snakemake plugin validates the account."""
        for args in (
            ["sacctmgr", "-i", "add", "cluster", self.cluster_name],
            ["sacctmgr", "-i", "add", "account", self.account, "Description=test", "Organization=test"],
            ["sacctmgr", "-i", "add", "user", "root", f"Account={self.account}", f"DefaultAccount={self.account}"],
        ):
            r = self.run(args, timeout=30, check=False)
            # rc 1 with "Nothing new added" when it already exists
            if r.returncode != 0 and "nothing new" not in (r.stdout + r.stderr).lower():
                raise self._start_error(f"`{' '.join(args)}` failed: {r.stdout}{r.stderr}", ["slurmdbd"])
        r = self.run(["sacctmgr", "-n", "-P", "show", "assoc", "where", "user=root", "format=account"], timeout=15)
        if self.account not in r.stdout.split():
            raise self._start_error(f"account {self.account!r} has no association for root: {r.stdout!r}", ["slurmdbd"])


# --------------------------------------------------------------------------- CLI


def _main(argv: Sequence[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tests.cluster.slurm", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--cpus-per-node", type=int, default=2)
    p.add_argument("--mem-mb-per-node", type=int, default=4000)
    p.add_argument("--gpus-per-node", type=int, default=2)
    p.add_argument("--account", default="lab")
    p.add_argument("--partition", default="debug")
    a = p.parse_args(argv)
    c = SlurmCluster(a.nodes, a.cpus_per_node, a.mem_mb_per_node, a.gpus_per_node, a.account, a.partition)
    if a.action == "up":
        reason = c.start_or_reason()
        if reason:
            print(f"Slurm unavailable: {reason}", file=sys.stderr)
            return 2
        print(f"cluster up in {c.timings['total']:.2f}s {c.timings}")
        c._release_lock()  # the daemons outlive this process; a later start() may take over
        print(c.describe())
    elif a.action == "down":
        for note in c.stop():
            print(note)
        print("stopped")
    else:
        print("running" if c.is_running() else "not running")
        if c.is_running():
            print(c.describe())
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
