"""framework.launch and framework.testing: environment detection, the built-in relaunch of a plain script,
failure propagation (no hang), and run_distributed's error reporting."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from framework.launch import ClusterEnvironment, _first_slurm_host, detect_environment, resolve_environment
from framework.testing import DistributedJobError, require_distributed, run_distributed

SCRIPT = Path(__file__).parent / "distributed" / "plain_ddp_script.py"
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "x"}
SLURM = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
         "SLURM_JOB_NUM_NODES": "2", "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "train"}


@pytest.mark.parametrize("env, expected", [
    (TORCHRUN, ClusterEnvironment("torchrun", 8, 3, 1, 1, 2, "10.0.0.1", 29400)),
    ({**TORCHRUN, "KILN_LAUNCHER_PID": "1"}, ClusterEnvironment("kiln", 8, 3, 1, 1, 2, "10.0.0.1", 29400)),
    (SLURM, ClusterEnvironment("slurm", 4, 2, 0, 1, 2, "gpu07", 15000 + 1234)),
    ({**SLURM, "SLURM_JOB_NAME": "bash"}, ClusterEnvironment("none", 1, 0, 0, 0, 1, "127.0.0.1", 0)),
    ({**SLURM, "SLURM_NTASKS": "1"}, ClusterEnvironment("none", 1, 0, 0, 0, 1, "127.0.0.1", 0)),
    ({}, ClusterEnvironment("none", 1, 0, 0, 0, 1, "127.0.0.1", 0)),
])
def test_detect_environment(env, expected):
    assert detect_environment(env) == expected
    assert detect_environment(env).launched == (expected.kind != "none")


@pytest.mark.parametrize("nodelist, host", [
    ("node01", "node01"), ("node[03-05,7],gpu1", "node03"), ("a[1,4],b2", "a1"), ("x-1,y-2", "x-1")])
def test_first_slurm_host(nodelist, host):
    assert _first_slurm_host(nodelist) == host


def test_resolve_environment_refusals(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert not resolve_environment(1).launched  # one process: nothing to launch
    with pytest.raises(ValueError, match="torchrun --nnodes=2"):
        resolve_environment(2, num_nodes=2)
    with pytest.raises(RuntimeError, match="cannot start the other ranks from pytest"):
        resolve_environment(2)  # re-running pytest for rank 1 would re-run the test session
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="devices=2 x num_nodes=1 asks for 2 processes, but the torchrun"):
        resolve_environment(2)


def _run_script(*args: str, timeout: float = 120, mark: str | None = None
                ) -> tuple[subprocess.CompletedProcess, float]:
    """Run the plain script; returns its result and the seconds from the first stderr line containing ``mark``
    (from the start when ``mark`` is None) to its exit, so that a loaded machine's slow start does not count."""
    process = subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**_clean_env(), "OMP_NUM_THREADS": "1"})
    start, seen, out, err = time.monotonic(), [], [], []

    def read(pipe: Any, lines: list[str]) -> None:
        for line in pipe:
            if mark is not None and not seen and mark in line and lines is err:
                seen.append(time.monotonic())
            lines.append(line)

    readers = [threading.Thread(target=read, args=(pipe, lines), daemon=True)
               for pipe, lines in ((process.stdout, out), (process.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    ended = time.monotonic()
    for reader in readers:
        reader.join(10)
    result = subprocess.CompletedProcess(process.args, process.returncode, "".join(out), "".join(err))
    return result, ended - (seen[0] if seen else start)


def _clean_env() -> dict[str, str]:
    import os

    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KILN_LAUNCHER_PID"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}


@require_distributed
def test_plain_script_relaunches_itself_on_two_ranks():
    result, _ = _run_script()
    assert result.returncode == 0, result.stderr
    lines = sorted(re.findall(r"RESULT (.*)", result.stdout))
    assert len(lines) == 2, result.stdout + result.stderr
    assert lines[0].startswith("rank=0 world=2 local=0 launcher=True step=8")
    assert lines[1].startswith("rank=1 world=2 local=1 launcher=True step=8")
    assert lines[0].split("params=")[1] == lines[1].split("params=")[1]  # replicas agree


@require_distributed
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_a_failing_rank_ends_the_job_promptly_with_its_error(fail_rank):
    result, after_error = _run_script("--fail-rank", str(fail_rank), timeout=180, mark=f"boom from rank {fail_rank}")
    assert result.returncode != 0
    assert f"boom from rank {fail_rank}" in result.stderr
    assert "RESULT" not in result.stdout
    assert after_error < 30, after_error  # the other rank does not wait for its collective timeout (30 min)


def _failing_job(fail_rank: int) -> None:
    import os

    print(f"hello from {os.environ['RANK']}", flush=True)
    if int(os.environ["RANK"]) == fail_rank:
        raise ValueError(f"rank {fail_rank} is unhappy")


@require_distributed
def test_run_distributed_reports_the_failing_rank(capsys):
    with pytest.raises(DistributedJobError) as info:
        run_distributed(_failing_job, nproc=2, timeout=60, args=(1,))
    message = str(info.value)
    assert "1 of 2 ranks failed (ranks 1)" in message and "ValueError: rank 1 is unhappy" in message
    results = info.value.results
    assert results[0].returncode == 0 and results[1].returncode == 1
    assert "hello from 0" in results[0].stdout
    assert "[rank 0] hello from 0" in capsys.readouterr().out  # streamed with a rank prefix


def _sleeping_job() -> None:
    time.sleep(60)


@require_distributed
def test_run_distributed_kills_a_job_that_outlives_its_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedJobError, match="did not finish within 2 s"):
        run_distributed(_sleeping_job, nproc=2, timeout=2)
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("bad, error", [(lambda: None, ValueError), ("/no/such/script.py", FileNotFoundError)])
def test_run_distributed_rejects_what_ranks_cannot_run(bad, error):
    with pytest.raises(error, match="script_or_fn"):
        run_distributed(bad, nproc=2)
