"""cleanup_stale never removes a running save's staging dir (framework/checkpoint/owner.py, discovery.py).

The writers and the cleaning process are real, separate processes: a process that starts ``fit`` on a
folder another process is saving into must leave that save alone, and clear only what a dead one left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from framework.checkpoint import cleanup_stale, list_checkpoints, read_manifest, read_state
from framework.checkpoint.owner import OWNER_PREFIX, owner_gone, owner_record

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = textwrap.dedent("""
    import sys, torch
    from framework.checkpoint import begin_checkpoint, commit_checkpoint, write_state
    staging = begin_checkpoint(sys.argv[1])
    entries = write_state(staging, "model", {"w": torch.arange(4.0)})
    print("staged", staging.dir, flush=True)
    sys.stdin.readline()  # the save is in flight until the test says go on
    entries += write_state(staging, "trainer", {"step": 1})
    commit_checkpoint(staging, entries, {"global_step": 1})
    print("committed", flush=True)
""")

SECOND_FIT = textwrap.dedent("""
    import sys, torch
    from torch.utils.data import DataLoader, TensorDataset
    from callbacks import ModelCheckpoint
    from framework import Trainer, TrainModule

    class Net(TrainModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=sys.argv[2],
                      callbacks=[ModelCheckpoint(dirpath=sys.argv[1], every_n_train_steps=1, filename="other")])
    trainer.fit(Net(), data)
    print("second fit done", flush=True)
""")


def _spawn(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _staged(writer: subprocess.Popen) -> str:
    line = writer.stdout.readline()
    if not line.startswith("staged "):
        writer.kill()
        pytest.fail(f"writer did not stage: {line!r} {writer.stderr.read()[-2000:]}")
    return line.split(" ", 1)[1].strip()


def test_second_process_starting_fit_leaves_a_running_save_alone(tmp_path):
    dirpath = str(tmp_path / "checkpoints")
    writer = _spawn(WRITER, os.path.join(dirpath, "first"))
    try:
        staging = _staged(writer)
        second = _spawn(SECOND_FIT, dirpath, str(tmp_path / "second"))  # its ModelCheckpoint.setup cleans dirpath
        out, err = second.communicate(timeout=300)
        assert second.returncode == 0 and "second fit done" in out, err[-3000:]
        assert os.path.isdir(staging), "the running save's staging dir was deleted"
        out, err = writer.communicate("go\n", timeout=120)
        assert writer.returncode == 0 and "committed" in out, err[-3000:]
    finally:
        writer.kill()
    first = os.path.join(dirpath, "first")
    assert read_manifest(first).global_step == 1 and read_state(first, "trainer") == {"step": 1}
    assert not [n for n in os.listdir(first) if n.startswith(OWNER_PREFIX)]  # owner records never ship
    others = [m for m in list_checkpoints(dirpath) if m.path != first]
    assert [m.global_step for m in others] == [1]  # the second process saved too


def test_staging_of_a_killed_writer_is_removed_at_once_and_a_live_ones_never(tmp_path):
    dirpath = str(tmp_path)
    live = _spawn(WRITER, os.path.join(dirpath, "live"))
    dead = _spawn(WRITER, os.path.join(dirpath, "dead"))
    try:
        live_staging, dead_staging = _staged(live), _staged(dead)
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=60)
        cleaner = _spawn("import sys, json\nfrom framework.checkpoint import cleanup_stale\n"
                         "print(json.dumps(cleanup_stale(sys.argv[1], max_age_s=0)))", dirpath)
        out, err = cleaner.communicate(timeout=120)
        assert cleaner.returncode == 0, err[-3000:]
        assert json.loads(out.strip().splitlines()[-1]) == [dead_staging]  # young, but its writer is gone
        assert os.path.isdir(live_staging) and not os.path.exists(dead_staging)
        out, err = live.communicate("go\n", timeout=120)
        assert live.returncode == 0 and "committed" in out, err[-3000:]
    finally:
        live.kill()
        dead.kill()
    assert read_manifest(os.path.join(dirpath, "live")).global_step == 1


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_owner_verdicts():
    assert owner_gone(owner_record()) is False  # this process
    assert owner_gone(owner_record(_dead_pid())) is True
    other_host = {**json.loads(owner_record()), "host": "another-host"}
    assert owner_gone(json.dumps(other_host).encode()) is None  # cannot tell from here: judged by age
    reused = {**json.loads(owner_record()), "start": "1"}  # this pid, but a process that started earlier
    assert owner_gone(json.dumps(reused).encode()) is True
    assert owner_gone(b"not json") is None


def test_unprovable_owner_is_judged_by_age(tmp_path):
    staging = tmp_path / ".c.tmp-abc"
    staging.mkdir()
    (staging / f"{OWNER_PREFIX}x").write_bytes(json.dumps({**json.loads(owner_record()), "host": "h2"}).encode())
    assert cleanup_stale(str(tmp_path), max_age_s=3600) == []
    old = time.time() - 7200
    os.utime(staging / f"{OWNER_PREFIX}x", (old, old))
    os.utime(staging, (old, old))
    assert cleanup_stale(str(tmp_path), max_age_s=3600) == [str(staging)]


def test_an_init_scratch_dir_without_an_owner_record_goes_after_the_grace_period(tmp_path):
    """A writer SIGKILLed between making its scratch dir and writing its owner record leaves an empty dir."""
    import os
    import time

    from framework.checkpoint import cleanup_stale
    from framework.checkpoint.discovery import INIT_GRACE_S

    old = tmp_path / ".epoch=0-step=5.ckpt.init-abc"
    fresh = tmp_path / ".epoch=0-step=6.ckpt.init-def"
    old.mkdir()
    fresh.mkdir()
    past = time.time() - INIT_GRACE_S - 5
    os.utime(old, (past, past))
    cleanup_stale(str(tmp_path))
    assert not old.exists() and fresh.exists()


def test_an_owner_record_is_never_visible_half_written(tmp_path, monkeypatch):
    """Killed between writing its record and renaming it in, a writer leaves no record at all (never an empty
    one); an empty record left by an older writer counts as a dead owner after the grace period."""
    import os
    import time

    from framework.checkpoint import cleanup_stale
    from framework.checkpoint.discovery import INIT_GRACE_S
    from framework.checkpoint.owner import OWNER_PREFIX, owner_record
    from framework.checkpoint.save import _write_owner
    from framework.checkpoint.storage import locate

    staging = tmp_path / ".epoch=0-step=2.ckpt.tmp-abc"
    staging.mkdir()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(os, "rename", killed)
    try:
        _write_owner(locate(str(staging)))
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert not [p for p in os.listdir(staging) if p.startswith(OWNER_PREFIX)]

    dead = owner_record(pid=2**22 + 12345)  # no such process
    (staging / f"{OWNER_PREFIX}a").write_bytes(dead)
    (staging / f"{OWNER_PREFIX}b").write_bytes(b"")  # died mid-write, before records were renamed in
    past = time.time() - INIT_GRACE_S - 5
    for path in staging.iterdir():
        os.utime(path, (past, past))
    assert cleanup_stale(str(tmp_path)) == [str(staging)]
