"""``run_distributed``: a real job of ``nproc`` processes on this machine with torchrun's environment, each
rank's output streamed with a ``[rank i]`` prefix; a failing or hanging job raises with every failing rank's
stderr."""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from framework.launch import find_free_port, torchrun_environment

_FAILURE_GRACE_S = 10.0  # after one rank fails, how long the others get to fail (or finish) on their own
_TAIL_CHARS = 4000


class DistributedJobError(RuntimeError):
    """A rank of a ``run_distributed`` job failed or the job timed out; the message holds their stderr."""

    def __init__(self, message: str, results: list[RankResult]) -> None:
        super().__init__(message)
        self.results = results


@dataclass
class RankResult:
    """What one rank did: its exit code (None if it was killed at the timeout) and its output."""

    rank: int
    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    killed: bool = field(default=False, repr=False)


def run_distributed(script_or_fn: str | os.PathLike | Callable[..., Any], nproc: int = 2, *,
                    timeout: float = 120.0, args: Sequence[Any] = (), env: dict[str, str] | None = None,
                    cwd: str | os.PathLike | None = None, stream: bool = True) -> list[RankResult]:
    """Run a script or a module-level function on ``nproc`` local processes and wait for all of them.

    - ``script_or_fn``: a path to a Python script (``args`` become its command-line arguments), or a
      function defined at module level (called as ``fn(*args)`` on every rank; ``args`` are pickled).
    - ``timeout``: seconds for the whole job; on expiry every rank is killed and the error says so.
    - ``env``: extra environment variables (``OMP_NUM_THREADS`` defaults to 1 per rank).
    Returns one :class:`RankResult` per rank when all exit with code 0; otherwise raises
    :class:`DistributedJobError` with each failing rank's exit code and stderr.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc={nproc!r} is not valid; pass an int >= 1.")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} is not valid; pass a positive number of seconds.")
    with tempfile.TemporaryDirectory(prefix="kiln-dist-") as tmp:
        command = _command(script_or_fn, args, Path(tmp))
        port = find_free_port()
        base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        base.pop("KILN_LAUNCHER_PID", None)
        procs = [subprocess.Popen(command, env={**base, **torchrun_environment(rank, nproc, port)},
                                  cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  errors="replace", start_new_session=True)
                 for rank in range(nproc)]
        outputs = [([], []) for _ in procs]
        readers = [threading.Thread(target=_pump, args=(pipe, buffer, f"[rank {rank}] ", sink, stream),
                                    daemon=True)
                   for rank, proc in enumerate(procs)
                   for pipe, buffer, sink in ((proc.stdout, outputs[rank][0], sys.stdout),
                                              (proc.stderr, outputs[rank][1], sys.stderr))]
        for reader in readers:
            reader.start()
        timed_out, killed = _wait(procs, timeout)
        for reader in readers:
            reader.join(5.0)
    results = [RankResult(rank, None if rank in killed else proc.returncode, "".join(outputs[rank][0]),
                          "".join(outputs[rank][1]), killed=rank in killed)
               for rank, proc in enumerate(procs)]
    if timed_out:
        raise DistributedJobError(f"the {nproc}-process job did not finish within {timeout:g} s and was killed "
                                  "(ranks that wait in a collective another rank never joins hang like this)."
                                  + _report(results, everyone=True), results)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise DistributedJobError(
            f"{len(failed)} of {nproc} ranks failed (ranks {', '.join(str(r.rank) for r in failed)})."
            + _report(failed), results)
    return results


def _wait(procs: list[subprocess.Popen], timeout: float) -> tuple[bool, set[int]]:
    """Wait for all ranks; after the first failure give the rest a grace period, then kill them."""
    deadline = time.monotonic() + timeout
    grace_end = None
    while True:
        codes = [proc.poll() for proc in procs]
        if all(code is not None for code in codes):
            return False, set()
        now = time.monotonic()
        if grace_end is None and any(code not in (None, 0) for code in codes):
            grace_end = now + _FAILURE_GRACE_S
        if now >= deadline or (grace_end is not None and now >= grace_end):
            killed = {rank for rank, code in enumerate(codes) if code is None}
            for rank in killed:
                _kill_group(procs[rank])
            return now >= deadline and grace_end is None, killed
        time.sleep(0.05)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the rank and its children (dataloader workers)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()


def _pump(pipe: Any, buffer: list[str], prefix: str, sink: Any, stream: bool) -> None:
    for line in iter(pipe.readline, ""):
        buffer.append(line)
        if stream:
            try:
                sink.write(prefix + line)
                sink.flush()
            except (ValueError, OSError):  # the sink was closed (e.g. pytest capture ended)
                stream = False
    pipe.close()


def _report(results: list[RankResult], everyone: bool = False) -> str:
    parts = []
    for r in results:
        state = "killed" if r.killed else f"exit code {r.returncode}"
        text = r.stderr if r.stderr.strip() or not everyone else r.stdout
        tail = text[-_TAIL_CHARS:] if text.strip() else "<no output>"
        parts.append(f"\n--- rank {r.rank} ({state}), stderr ---\n{tail.rstrip()}")
    return "".join(parts)


_BOOTSTRAP = """
import importlib, importlib.util, pickle, sys
module_name, file, qualname, args_file = sys.argv[1:5]
try:
    module = importlib.import_module(module_name)
except ImportError:
    spec = importlib.util.spec_from_file_location("__kiln_job__", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["__kiln_job__"] = module
    spec.loader.exec_module(module)
target = module
for part in qualname.split("."):
    target = getattr(target, part)
with open(args_file, "rb") as f:
    args = pickle.load(f)
target(*args)
"""


def _command(script_or_fn: Any, args: Sequence[Any], tmp: Path) -> list[str]:
    if callable(script_or_fn):
        fn = script_or_fn
        qualname = getattr(fn, "__qualname__", "")
        file = inspect.getsourcefile(fn) if hasattr(fn, "__code__") else None
        if "<" in qualname or file is None or fn.__module__ == "__main__" and not os.path.isfile(file):
            raise ValueError(f"script_or_fn={fn!r} must be a function defined at module level in a file (not a "
                             "lambda, closure or interactive definition), so that every rank can import it.")
        args_file = tmp / "args.pkl"
        args_file.write_bytes(pickle.dumps(tuple(args)))
        module_name = fn.__module__ if fn.__module__ != "__main__" else "__kiln_job_main__"
        directory = os.path.dirname(os.path.abspath(file))
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {directory!r})\n" + _BOOTSTRAP,
                module_name, file, qualname, str(args_file)]
    path = Path(script_or_fn)
    if not path.is_file():
        raise FileNotFoundError(f"script_or_fn={str(script_or_fn)!r} is neither a file nor a function; pass the "
                                "path of a Python script or a module-level function.")
    return [sys.executable, str(path.resolve()), *map(str, args)]


# ---- skip decorators ------------------------------------------------------------------------------
