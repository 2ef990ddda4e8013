"""Crash test: a training process is killed with SIGKILL at random moments (mid-step, mid-save,
mid-rotation) and restarted each time with ``ckpt_path="last"``; it must end bit-identical to a run
that was never interrupted, and its checkpoint folder must hold only complete checkpoints.

The kill points are random per run; the seed is in every failure message (set ``KILN_CRASH_SEED`` to
replay one).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from framework.checkpoint import list_checkpoints
from framework.testing import state_differences

SCRIPT = Path(__file__).parent / "scripts" / "resumable_run.py"
TIMEOUT = 120  # per process
EPOCHS, SAMPLES, BATCH = 3, 64, 4
TOTAL_STEPS = EPOCHS * SAMPLES // BATCH
ARGS = ["--max-epochs", str(EPOCHS), "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--hidden", "512",
        "--workers", "0", "--precision", "16-mixed", "--every-n-steps", "2", "--total-limit", "2"]


def launch(root: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    env.pop("PL_GLOBAL_SEED", None)
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), *ARGS, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(TIMEOUT, process.kill)  # a hang fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    process.watchdog = watchdog  # type: ignore[attr-defined]
    return process


def reap(process: subprocess.Popen) -> tuple[int, str]:
    output = process.stdout.read()
    process.wait()
    process.watchdog.cancel()  # type: ignore[attr-defined]
    return process.returncode, output


def run_until_killed(root: Path, out: Path, kill_at_step: int, delay: float) -> tuple[bool, int, str]:
    """Resume ("last") and SIGKILL the run ``delay`` s after it reports step ``kill_at_step`` (before that
    step's checkpoint is written). Returns (killed, last step seen, output)."""
    process = launch(root, out, "--ckpt", "last", "--progress")
    seen, lines = -1, []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("step "):
                seen = int(line.split()[1])
                if seen >= kill_at_step:
                    time.sleep(delay)
                    process.send_signal(signal.SIGKILL)
                    break
    finally:
        if process.poll() is None and seen < kill_at_step:  # error path: don't leave it running
            process.kill()
        returncode, rest = reap(process)
    output = "".join(lines) + rest
    return returncode == -signal.SIGKILL, seen, output


def non_hidden(dirpath: Path) -> list[str]:
    return sorted(n for n in os.listdir(dirpath) if not n.startswith(".")) if dirpath.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(8 * TIMEOUT)
def test_sigkill_at_random_moments_then_resume_last_is_bit_exact(tmp_path):
    seed = int(os.environ.get("KILN_CRASH_SEED", random.SystemRandom().randrange(2**31)))
    rng = random.Random(seed)
    about = f"(KILN_CRASH_SEED={seed})"
    reference = launch(tmp_path / "reference", tmp_path / "reference.safetensors")  # runs alongside the kills

    root, out = tmp_path / "crashy", tmp_path / "crashy.safetensors"
    step, kills, log = 0, 0, []
    while kills < 4 and step < TOTAL_STEPS - 4:  # each kill lands in the first half of what is left
        target = rng.randint(step + 1, step + max(1, (TOTAL_STEPS - 4 - step) // 2))
        delay = rng.uniform(0.0, 0.03)
        killed, step, output = run_until_killed(root, out, target, delay)
        log.append(f"kill {delay * 1000:.0f}ms after step {target}: killed={killed}, read up to step {step}, "
                   f"left {sorted(os.listdir(root / 'checkpoints')) if (root / 'checkpoints').exists() else []}")
        assert killed or out.exists(), f"{about} run failed:\n{output[-3000:]}"
        kills += killed
        # whatever the moment of the kill, every visible entry is a complete checkpoint
        complete = sorted(Path(m.path).name for m in list_checkpoints(str(root / "checkpoints")))
        assert non_hidden(root / "checkpoints") == complete, f"{about} {log}"
    assert kills >= 3, f"{about} only {kills} kills landed: {log}"
    print(about, *log, sep="\n")  # shown with pytest -rP

    returncode, output = reap(launch(root, out, "--ckpt", "last"))
    assert returncode == 0, f"{about} final run failed:\n{output[-3000:]}"
    returncode, output = reap(reference)
    assert returncode == 0, f"reference run failed:\n{output[-3000:]}"

    from safetensors.torch import load_file

    resumed, expected = load_file(str(out)), load_file(str(tmp_path / "reference.safetensors"))
    different = state_differences(resumed, expected)  # each differing entry with its max abs diff
    assert not different, f"{about} differs from the uninterrupted run in {different}; {log}"
    assert int(resumed["global_step"]) == TOTAL_STEPS
    # total_limit=2 kept, and the leftovers of cut-short saves/deletions were cleaned up at the restart
    assert len(os.listdir(root / "checkpoints")) == 2, f"{about} {sorted(os.listdir(root / 'checkpoints'))}"
