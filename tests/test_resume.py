"""Bit-exact resume in a fresh process: a run resumed from a mid-epoch or an epoch-boundary checkpoint
ends with exactly the weights, Adam moments, LR and loss scale of the uninterrupted run — with shuffling,
dropout, two dataloader workers, fp16 AMP, per-step and per-epoch LR schedulers, accumulation, and
checkpoints written synchronously or in the background (``async_save``).

Each run is ``tests/scripts/resumable_run.py`` in its own interpreter; results are compared through the
safetensors file each run writes at its end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.checkpoint import list_checkpoints, read_state

SCRIPT = Path(__file__).parent / "scripts" / "resumable_run.py"
TIMEOUT = 180


def start(root: Path, out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("PL_GLOBAL_SEED", None)  # the script seeds itself; nothing may leak in from this process
    return subprocess.Popen([sys.executable, str(SCRIPT), "--root", str(root), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(process: subprocess.Popen) -> None:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{process.args} did not finish in {TIMEOUT}s:\n{output[-3000:]}")
    assert process.returncode == 0, f"{process.args} failed:\n{output[-3000:]}"


def run_all(*processes: subprocess.Popen) -> None:
    try:
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_identical(resumed: Path, reference: Path) -> None:
    a, b = load(resumed), load(reference)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{resumed.name} differs from the uninterrupted run in {different}"


def pick_checkpoints(dirpath: Path, batches_per_epoch: int) -> tuple[str, str]:
    """(a checkpoint in the middle of epoch 1, one at the end of epoch 0), checked by their loop state."""
    mid = boundary = None
    for manifest in list_checkpoints(str(dirpath)):
        loop = read_state(manifest.path, "trainer")["loop"]
        if loop["epoch"] == 1 and not loop["epoch_finished"] and 0 < loop["batches_done"] < batches_per_epoch:
            mid = manifest.path
        if loop["epoch"] == 0 and loop["epoch_finished"]:
            boundary = manifest.path
    assert mid and boundary, f"expected mid-epoch and epoch-end checkpoints in {sorted(os.listdir(dirpath))}"
    return mid, boundary


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT + 60)
@pytest.mark.parametrize("accumulate, samples, saving", [(1, 40, "sync"), (2, 36, "async")],
                         ids=["no-accumulation", "accumulate-2-async-save"])
def test_fresh_process_resume_is_bit_exact(tmp_path, accumulate, samples, saving):
    # 36 samples in batches of 4 with accumulation 2: windows of 2, 2, 2, 2, 1 (a short tail window)
    common = ["--accumulate", str(accumulate), "--samples", str(samples), "--max-epochs", "3",
              "--precision", "16-mixed", "--workers", "2", "--every-n-steps", "3"]
    # the uninterrupted run writes the checkpoints to resume from (in the background with async_save)
    run_all(start(tmp_path / "full", tmp_path / "full.safetensors", *common,
                  *(["--async-save"] if saving == "async" else [])))
    batches = samples // 4
    mid, boundary = pick_checkpoints(tmp_path / "full" / "checkpoints", batches)

    processes = [start(tmp_path / "mid", tmp_path / "mid.safetensors", *common, "--ckpt", mid),
                 start(tmp_path / "boundary", tmp_path / "boundary.safetensors", *common, "--ckpt", boundary)]
    if accumulate == 1:
        # the data position does not depend on the number of workers: resume without any, counting fetches
        consumed = read_state(mid, "trainer")["loop"]["batches_done"]
        processes.append(start(tmp_path / "mid0", tmp_path / "mid0.safetensors", *common, "--ckpt", mid,
                               "--workers", "0", "--count-file", str(tmp_path / "count")))
        # resuming the finished run's newest checkpoint ("last") trains and fetches nothing more
        processes.append(start(tmp_path / "full", tmp_path / "again.safetensors", *common, "--ckpt", "last",
                               "--workers", "0", "--count-file", str(tmp_path / "count-again")))
    run_all(*processes)

    reference = tmp_path / "full.safetensors"
    assert load(reference)["skipped_steps"] > 0, "fp16 overflow steps (scaler state) should be exercised"
    assert_identical(tmp_path / "mid.safetensors", reference)
    assert_identical(tmp_path / "boundary.safetensors", reference)
    if accumulate == 1:
        assert_identical(tmp_path / "mid0.safetensors", reference)
        # no replay: only the items of the batches after the checkpoint were fetched
        remaining_batches = (batches - consumed) + batches * (3 - 2)
        assert int((tmp_path / "count").read_text()) == remaining_batches * 4
        assert_identical(tmp_path / "again.safetensors", reference)
        assert int((tmp_path / "count-again").read_text()) == 0


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("resumable_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_right_before_a_mid_epoch_validation_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # restored after the test (seed_everything sets it)
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    script = _script_module()
    from torch.utils.data import DataLoader

    from callbacks import ModelCheckpoint
    from framework import Trainer, seed_everything

    class SampledValidation(script.DropoutNet):
        def validation_step(self, batch, batch_idx):  # e.g. a VAE drawing samples
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x) + 0.1 * torch.randn_like(y), y))

    def run(root: Path, ckpt_path: str | None = None) -> tuple[dict, dict]:
        seed_everything(7)
        module = SampledValidation()
        trainer = Trainer(default_root_dir=str(root), max_epochs=2, val_check_interval=3, precision="32-true",
                          logger=False, enable_progress_bar=False, callbacks=[ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)])
        trainer.fit(module, DataLoader(script.IndexedDataset(40), batch_size=4, shuffle=True),
                    DataLoader(script.IndexedDataset(8), batch_size=4), ckpt_path=ckpt_path)
        return script.final_state(trainer, module), {k: float(v) for k, v in trainer.callback_metrics.items()}

    reference, reference_metrics = run(tmp_path / "full")
    # step 6 = batch 5 of epoch 0: saved at its batch end, then validation ran (val_check_interval=3)
    resumed, metrics = run(tmp_path / "resumed", str(tmp_path / "full" / "checkpoints" / "epoch=0-step=6.ckpt"))
    assert metrics == reference_metrics
    assert not [k for k in reference if not torch.equal(reference[k], resumed[k])]
