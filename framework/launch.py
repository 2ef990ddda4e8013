"""Process launching: find the job's topology, or start the other ranks of a plain ``python script.py``.

``detect_environment`` reads a launcher's environment: torchrun (and any launcher that sets torchrun's
variables, including Kiln's own relaunch and ``framework.testing.run_distributed``) or SLURM (``srun``).
When none is present and several processes are requested, ``launch_processes`` re-runs the current
script for ranks 1..N-1 with torchrun's variables set, and this process becomes rank 0. Multi-node jobs
go through torchrun's rendezvous; Kiln starts processes on the local node only.

Failure handling (no hangs): rank 0 watches its children and, when one exits with an error, stops the
others and exits with that code; a child whose launcher died exits too; an uncaught exception in rank 0
stops the children. The failing rank's traceback is on the terminal (children share rank 0's stdio).
"""

from __future__ import annotations

import atexit
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

_LAUNCHER_PID = "KILN_LAUNCHER_PID"
_PREEMPTED = 75  # callbacks.preemption.PREEMPTED_EXIT_CODE (not imported: this module stays torch-free)
_INTERRUPTED = 130  # callbacks.preemption.INTERRUPTED_EXIT_CODE: a rank stopped cleanly after Ctrl-C
_POLL_S = 0.2
_KILL_GRACE_S = 3.0


@dataclass(frozen=True)
class ClusterEnvironment:
    """Topology of this process: who launched it and where the rendezvous is."""

    kind: str  # "torchrun" | "slurm" | "kiln" (relaunched by Kiln) | "none"
    world_size: int
    global_rank: int
    local_rank: int
    node_rank: int
    local_world_size: int
    master_addr: str
    master_port: int

    @property
    def launched(self) -> bool:
        """True when an external launcher (or Kiln's relaunch) created the processes."""
        return self.kind != "none"


def detect_environment(environ: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """The topology described by the environment (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        kind = "kiln" if _LAUNCHER_PID in env else "torchrun"
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return ClusterEnvironment(
            kind, world, int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"])),
            int(env.get("GROUP_RANK", env.get("NODE_RANK", 0))), local_world,
            env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if _is_slurm_job(env):
        world = int(env["SLURM_NTASKS"])
        nodes = max(1, int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1))))
        return ClusterEnvironment(
            "slurm", world, int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
            int(env.get("SLURM_NODEID", 0)), max(1, world // nodes),
            env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1")),
            int(env.get("MASTER_PORT") or 15000 + int(env.get("SLURM_JOB_ID", 0)) % 5000))
    return ClusterEnvironment("none", 1, 0, 0, 0, 1, "127.0.0.1", 0)


def _is_slurm_job(env: Mapping[str, str]) -> bool:
    """An ``srun`` task of a multi-task job (an interactive allocation with one task is not)."""
    if "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return False
    return env.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"node[03-05,7],gpu1"`` → ``"node03"``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^(.*?)\[([^\]]+)\]", first)
    if not match:
        return first
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0]


def find_free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_environment(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1"
                         ) -> dict[str, str]:
    """The variables torchrun sets for ``rank`` of a single-node job of ``world_size`` processes."""
    return {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "NODE_RANK": "0",
        "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    }


def resolve_environment(num_processes: int, num_nodes: int = 1) -> ClusterEnvironment:
    """The environment for a job of ``num_processes`` per node × ``num_nodes``, relaunching if needed.

    Under a launcher the environment is used as is (its world size wins; a different explicit request
    is an error). Without one, ``num_nodes > 1`` is refused (use torchrun) and ``num_processes > 1``
    re-runs this script for the other ranks. Also starts the watchdogs of a Kiln-launched job.
    """
    env = detect_environment()
    requested = num_processes * num_nodes
    if env.launched:
        if requested > 1 and requested != env.world_size:
            raise ValueError(
                f"devices={num_processes} x num_nodes={num_nodes} asks for {requested} processes, but the "
                f"{env.kind} launcher started {env.world_size}. Make them agree (or pass devices='auto').")
        if env.kind == "kiln":
            _watch_launcher()
        return env
    if requested == 1:
        return env
    if num_nodes > 1:
        raise ValueError(
            f"num_nodes={num_nodes} needs a multi-node launcher: start the script on every node with "
            f"`torchrun --nnodes={num_nodes} --nproc-per-node={num_processes} --rdzv-backend=c10d "
            "--rdzv-endpoint=HOST:PORT script.py` (or srun under SLURM).")
    launch_processes(num_processes)
    return detect_environment()


# ---- the built-in relaunch -------------------------------------------------------------------------
_children: list[subprocess.Popen] = []
_lock = threading.Lock()
_rank0_failed = False
_stopping = False  # set once rank 0 stops the children itself: the watchdog then stays quiet


def script_command(argv: list[str] | None = None) -> list[str]:
    """The command that re-runs the current program (``python [-flags] script.py args`` or ``-m pkg``)."""
    argv = list(sys.argv if argv is None else argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    interpreter = [sys.executable, *subprocess._args_from_interpreter_flags()]
    if spec is not None and spec.name and spec.name != "__main__":
        name = spec.name[: -len(".__main__")] if spec.name.endswith(".__main__") else spec.name
        if name.split(".")[0] == "pytest":
            raise RuntimeError(_NO_RELAUNCH.format(what="pytest"))
        return [*interpreter, "-m", name, *argv[1:]]
    script = argv[0] if argv else ""
    if not script or script == "-c" or not os.path.isfile(script) or getattr(main, "__file__", None) is None:
        raise RuntimeError(_NO_RELAUNCH.format(what="an interactive session or `python -c`"))
    if os.path.basename(script).startswith(("pytest", "py.test")):
        raise RuntimeError(_NO_RELAUNCH.format(what="pytest"))
    return [*interpreter, os.path.abspath(script), *argv[1:]]


_NO_RELAUNCH = (
    "Kiln cannot start the other ranks from {what}: it re-runs the current script for them. Put the "
    "training in a script and run `python script.py` (Kiln starts the other ranks), launch it with "
    "`torchrun --nproc-per-node=N script.py`, or, in tests, use framework.testing.run_distributed."
)


def launch_processes(num_processes: int) -> None:
    """Start ranks 1..N-1 as copies of this program and make this process rank 0 (single node)."""
    command = script_command()
    port = find_free_port()
    base = {**os.environ, _LAUNCHER_PID: str(os.getpid())}
    for rank in range(1, num_processes):
        env = {**base, **torchrun_environment(rank, num_processes, port)}
        _children.append(subprocess.Popen(command, env=env, cwd=os.getcwd()))
    os.environ.update(torchrun_environment(0, num_processes, port))
    os.environ[_LAUNCHER_PID] = str(os.getpid())
    _install_rank0_failure_hook()
    atexit.register(_wait_for_children)
    threading.Thread(target=_watch_children, name="kiln-child-watchdog", daemon=True).start()


def _watch_children() -> None:
    """Rank 0: when a child fails, stop the others and exit (rank 0 may be blocked in a collective)."""
    while True:
        time.sleep(_POLL_S)
        with _lock:
            if _stopping:
                return
            for rank, child in enumerate(_children, start=1):
                code = child.poll()
                # A preempted rank exits once all ranks agreed to stop and its checkpoint is committed: rank 0
                # exits the same way on its own (and with that code, from _wait_for_children).
                if code not in (None, 0, _PREEMPTED, _INTERRUPTED):
                    _stderr(f"[kiln] rank {rank} exited with code {code}; stopping the other ranks.")
                    _terminate_children()
                    sys.stdout.flush()
                    os._exit(code if code > 0 else 1)
            if all(child.poll() is not None for child in _children):
                return


def _terminate_children() -> None:
    global _stopping
    _stopping = True
    alive = [child for child in _children if child.poll() is None]
    for child in alive:
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + _KILL_GRACE_S
    for child in alive:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def _install_rank0_failure_hook() -> None:
    previous = sys.excepthook

    def hook(exc_type, exc, tb):  # type: ignore[no-untyped-def]
        global _rank0_failed
        _rank0_failed = True
        previous(exc_type, exc, tb)

    sys.excepthook = hook


def _wait_for_children() -> None:
    """Rank 0 at exit: stop the children if rank 0 failed, else wait for them and report a failure."""
    if _rank0_failed:
        _stderr("[kiln] rank 0 failed; stopping the other ranks.")
        with _lock:
            _terminate_children()
        return
    # Closing rank 0's connections makes a child that still waits on rank 0 in a collective fail fast.
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    while any(child.poll() is None for child in _children):
        time.sleep(_POLL_S)
    with _lock:
        failed = [(rank, child.returncode) for rank, child in enumerate(_children, start=1) if child.returncode]
    if failed:
        rank, code = failed[0]
        _stderr(f"[kiln] rank {rank} exited with code {code}.")
        sys.stdout.flush()
        os._exit(code if code > 0 else 1)


def _watch_launcher() -> None:
    """Ranks started by Kiln exit when their launcher (rank 0) is gone, instead of waiting on it."""
    launcher = int(os.environ[_LAUNCHER_PID])
    if launcher == os.getpid() or getattr(_watch_launcher, "started", False):
        return
    _watch_launcher.started = True  # type: ignore[attr-defined]

    def watch() -> None:
        while True:
            time.sleep(_POLL_S * 2)
            if os.getppid() != launcher:
                _stderr(f"[kiln] rank {os.environ.get('RANK')}: rank 0 (pid {launcher}) exited; stopping.")
                os._exit(1)

    threading.Thread(target=watch, name="kiln-launcher-watchdog", daemon=True).start()


def _stderr(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
