"""Elastic restarts (framework.elastic): torchrun with its defaults restarts every worker when one dies; the
restarted round must rendezvous cleanly (torch's shared store still holds the previous round's keys) and
``resume="auto"`` must pick up the newest checkpoint, ending bit-identical to a run that was never interrupted.

Real jobs: ``tests/scripts/elastic_run.py`` under ``python -m torch.distributed.run`` on 2 CPU processes (one
node, and two agents of one process each), gloo. The round agreement itself is also tested in-process against a
real TCPStore holding stale keys.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework import elastic
from framework.launch import find_free_port
from framework.testing import require_distributed

SCRIPT = Path(__file__).parent / "scripts" / "elastic_run.py"
JOB_TIMEOUT = 400  # seconds per torchrun job (the CI machine may be loaded); a hang fails instead of blocking
_TOPOLOGY = re.compile(r"TOPOLOGY rank=(\d+) local_rank=(\d+) node_rank=(\d+) world=(\d+) restart=(\d+)")


class Torchrun:
    """One ``torchrun`` agent running elastic_run.py, its output collected as it comes."""

    def __init__(self, root: Path, *torchrun_args: str, script_args: tuple[str, ...] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if k not in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KILN_LAUNCHER_PID", "PL_GLOBAL_SEED",
            "TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")}
        env.update(PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.out = root, root / "final.safetensors"
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "--monitor-interval", "0.2",
                   str(SCRIPT), "--root", str(root), "--out", str(self.out), *script_args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = JOB_TIMEOUT) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: text in self.output or self.process.poll() is not None, timeout) \
                and text in self.output

    def finish(self, timeout: float = JOB_TIMEOUT) -> int:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            pytest.fail(f"torchrun did not end within {timeout}s:\n{self.output[-5000:]}")
        self.reader.join(10)
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def standalone(root: Path, *script_args: str, restarts: int = 2) -> Torchrun:
    return Torchrun(root, "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}", script_args=script_args)


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_bit_identical(result: Path, reference: Path, about: str) -> None:
    a, b = load(result), load(reference)
    assert a.keys() == b.keys(), about
    assert not [k for k in b if not torch.equal(a[k], b[k])], f"{about}: differs from the uninterrupted run"


class References:
    """Uninterrupted 2-process runs per strategy, started on first use (alongside the job under test) and shared
    by the tests of this module."""

    def __init__(self, tmp_path_factory) -> None:
        self.factory, self.jobs = tmp_path_factory, {}

    def start(self, strategy: str) -> None:
        if strategy not in self.jobs:
            self.jobs[strategy] = standalone(self.factory.mktemp(f"reference-{strategy}"), "--strategy", strategy,
                                             restarts=0)

    def __call__(self, strategy: str) -> Path:
        self.start(strategy)
        job = self.jobs[strategy]
        assert job.finish() == 0, job.output[-5000:]
        return job.out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = References(tmp_path_factory)
    yield refs
    for job in refs.jobs.values():
        if job.process.poll() is None:
            os.killpg(job.process.pid, signal.SIGKILL)


# ---- real torchrun jobs ------------------------------------------------------------------------------------------


@require_distributed
@pytest.mark.distributed
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_restarts_after_a_killed_and_a_raising_rank_end_bit_identical(tmp_path, references, strategy):
    """torchrun --standalone --max-restarts=2: rank 1 is SIGKILLed at step 7 (checkpoints every 3 steps), the
    restarted round resumes from step 6 by itself, then rank 0 raises at step 11; the third round finishes."""
    references.start(strategy)  # runs alongside
    job = standalone(tmp_path, "--strategy", strategy, "--faults", "sigkill:1:7,raise:0:11")
    assert job.finish() == 0, job.output[-6000:]
    out = job.output
    assert "rank 1 injecting sigkill at step 7" in out and "rank 0 injecting raise at step 11" in out
    rounds = sorted({int(m[4]) for m in _TOPOLOGY.findall(out)})
    assert rounds == [0, 1, 2], out[-6000:]
    assert "connectFullMesh" not in out and out.count("done") == 2
    assert_bit_identical(job.out, references(strategy), f"{strategy} restarted twice")


@require_distributed
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_two_torchrun_agents_one_process_each(tmp_path, references):
    """--nnodes=2 on localhost (c10d rendezvous): ranks, local ranks and node ranks, disjoint shards covering the
    data, and a result bit-identical to one node of two processes — across a restart in which only the node whose
    worker died counts one (the other agent restarts for the membership change with TORCHELASTIC_RESTART_COUNT=0),
    so every node must learn that this is a restart from the shared store."""
    references.start("ddp")
    port = find_free_port()
    agents = [Torchrun(tmp_path, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                       f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=kiln-test", "--max-restarts=1",
                       script_args=("--num-nodes", "2", "--devices", "1", "--faults", "sigkill:1:11"))
              for _ in range(2)]
    codes = [agent.finish() for agent in agents]
    out = "".join(agent.output for agent in agents)
    assert codes == [0, 0], out[-6000:]
    topology = [tuple(map(int, m)) for m in _TOPOLOGY.findall(out)]
    assert len(topology) == 4 and all(world == 2 and local == 0 for _, local, _, world, _ in topology), topology
    # global rank, local rank, node rank, world size, in each round (ranks follow the nodes)
    assert sorted({t[:4] for t in topology}) == [(0, 0, 0, 2), (1, 0, 1, 2)], topology
    # the restart round: TORCHELASTIC_RESTART_COUNT is 1 on the node whose worker died, 0 on the other
    assert sorted(t[4] for t in topology) == [0, 0, 0, 1] and "rank 1 injecting sigkill at step 11" in out, topology
    seen = {int(r): set(map(int, ids.split(", "))) for r, ids in re.findall(r"SEEN rank=(\d) ids=\[([^\]]*)\]", out)}
    assert seen.keys() == {0, 1} and not seen[0] & seen[1] and seen[0] | seen[1] == set(range(64)), seen
    assert_bit_identical(agents[0].out, references("ddp"), "two nodes, restarted once")


# ---- the round agreement, in-process against a real TCPStore -------------------------------------------------


def _agree(port: int, world: int, delays: list[float]) -> list[tuple[str, int]]:
    results: list = [None] * world

    def run(rank: int) -> None:
        time.sleep(delays[rank])
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=30))
        try:
            results[rank] = elastic.agree_round(store, rank, world, timeout_s=30)
        except BaseException as exc:  # reported by the assertion below
            results[rank] = exc

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=st.integers(2, 4), data=st.data())
def test_every_round_agrees_on_a_fresh_id_although_old_keys_remain(world, data):
    """Whoever comes first — rank 0 or the others, in any order — the ranks of each round agree on one id never
    used before, and count the rounds, while every earlier round's asks, answers and acks are still stored."""
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    seen_ids = set()
    for number in (1, 2, 3):
        delays = data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.3]), min_size=world, max_size=world))
        results = _agree(server.port, world, delays)
        assert all(isinstance(r, tuple) for r in results), results
        assert len(set(results)) == 1 and results[0][1] == number, (delays, results)
        assert results[0][0] not in seen_ids
        seen_ids.add(results[0][0])


def test_a_rank_that_never_comes_is_named_after_the_timeout():
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not join"):
        elastic.agree_round(server, 0, 2, timeout_s=0.3)


def test_without_torchruns_shared_store_the_process_group_is_left_to_env(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert elastic.process_group_store(0, 2, timedelta(seconds=5)) is None
    assert not elastic.uses_shared_store({"TORCHELASTIC_USE_AGENT_STORE": "False", "MASTER_PORT": "1"})
    assert elastic.uses_shared_store({"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_PORT": "1"})


# ---- resume="auto" ---------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_dir(make_trainer, tiny_module_cls, make_loader, tmp_path) -> str:
    make_trainer(enable_checkpointing=True).fit(tiny_module_cls(), make_loader())
    return str(tmp_path / "checkpoints")


@pytest.fixture
def first_attempt(monkeypatch):
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(elastic, "_round", None)
    return monkeypatch


def resolve(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = elastic.resolve_ckpt_path(*args, **kwargs)
    return path, [str(w.message) for w in caught]


@pytest.mark.parametrize("variable", ["TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"])
def test_a_restart_resumes_from_last(first_attempt, checkpoint_dir, variable):
    assert resolve(None, "auto", checkpoint_dir) == (None, [])  # the first attempt: as given
    first_attempt.setenv(variable, "1")
    assert resolve(None, "auto", checkpoint_dir) == ("last", [])
    assert resolve(None, None, checkpoint_dir) == (None, [])  # resume=None: always as given
    assert resolve("last", "auto", None) == ("last", [])


def test_a_restart_round_counted_by_the_shared_store_resumes_too(first_attempt, checkpoint_dir):
    first_attempt.setattr(elastic, "_round", 2)  # this node's agent restarted for another node's failure
    assert elastic.restart_count() == 1 and resolve(None, "auto", checkpoint_dir) == ("last", [])


def test_a_restart_before_the_first_checkpoint_starts_over_and_says_so(first_attempt, tmp_path):
    first_attempt.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    path, said = resolve(None, "auto", str(tmp_path / "none-yet"))
    assert path is None and len(said) == 1 and "holds no complete checkpoint yet" in said[0] \
        and "starts from scratch" in said[0]
    path, said = resolve("init/ckpt", "auto", str(tmp_path / "none-yet"))
    assert path == "init/ckpt" and "starts from ckpt_path='init/ckpt'" in said[0]
    path, said = resolve(None, "auto", None)
    assert path is None and "checkpointing is off" in said[0]


def test_a_restart_prefers_the_runs_newest_checkpoint_over_ckpt_path_and_says_so(first_attempt, checkpoint_dir):
    first_attempt.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    path, said = resolve("pretrained/ckpt", "auto", checkpoint_dir)
    assert path == "last" and len(said) == 1 and "instead of ckpt_path='pretrained/ckpt'" in said[0] \
        and "resume=None" in said[0]


def test_rank_0_decides_for_every_rank(first_attempt, checkpoint_dir):
    first_attempt.setenv("TORCHELASTIC_RESTART_COUNT", "0")  # this node did not count the restart; rank 0's did
    assert resolve(None, "auto", checkpoint_dir, rank=1, broadcast=lambda _: (True, None)) == ("last", [])
    assert resolve(None, "auto", checkpoint_dir, rank=1, broadcast=lambda _: (False, "note")) == (None, [])


@pytest.mark.parametrize("bad", ["always", True, False, "last", 1])
def test_bad_resume_values_are_refused(bad):
    with pytest.raises(ValueError, match=rf"resume={bad!r} is not valid; use 'auto'"):
        elastic.check_resume(bad)
