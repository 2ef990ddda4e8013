"""Training jobs run on every rank of a real DeepSpeed job by tests/test_deepspeed.py (``run_distributed``).

Each job trains small models through ``Trainer(strategy=DeepSpeedStrategy(...))`` over gloo on CPU and
rank 0 writes what the test checks (final weights, losses, counters) to a ``torch.save`` file in ``out``.
Several scenarios share one job because starting DeepSpeed costs seconds per process.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from callbacks import Callback  # noqa: E402
from framework import Trainer, TrainModule, seed_everything  # noqa: E402
from strategies import DeepSpeedStrategy  # noqa: E402

FEATURES = 4
HIDDEN = 8


class IndexedData(Dataset):
    """Item ``i`` is a pure function of ``i`` (so any process can rebuild any batch)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + int(index))
        x = torch.randn(FEATURES, generator=g)
        return x, torch.randn(1, generator=g) + x.sum(0, keepdim=True)


class RankStream(torch.utils.data.IterableDataset):
    """An iterable (length-unknown) stream of this rank's items ``rank::world`` out of ``size``."""

    def __init__(self, size: int) -> None:
        self.data = IndexedData(size)

    def __iter__(self) -> Any:
        from framework import DistributedState

        state = DistributedState()
        for index in range(state.process_index, len(self.data), state.num_processes):
            yield self.data[index]


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


class Regression(TrainModule):
    """MLP regression; ``optimizer``: "sgd" or "adamw" (+ a per-step LR scheduler); optional input dropout."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = make_net()
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.optimizer_name = optimizer
        self.lr = lr
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.dropout(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x).float(), y)
        self.losses.append(loss.detach())
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x).float(), y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SumLossRegression(Regression):
    """Returns the loss summed over the batch; Kiln divides by the window's global item count."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y, reduction="sum")

    def num_items(self, batch: Any) -> int:
        return len(batch[0])


class ManualRegression(Regression):
    """Manual optimization: the step calls manual_backward and the optimizer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return loss


class TwoOptimizers(Regression):
    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)]


def trainer(stage: int, root: str, **kwargs: Any) -> Trainer:
    kwargs.setdefault("max_epochs", 2)
    return Trainer(strategy=DeepSpeedStrategy(accelerator="cpu", devices=2, stage=stage), accelerator="cpu",
                   devices=2, logger=False, enable_progress_bar=False, default_root_dir=root,
                   enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs)


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    """Full fp32 weights (gathered under ZeRO-3; collective)."""
    return {k: v.float().clone() for k, v in t.strategy.module_state_dict().items()}


def train(out: str) -> None:
    """Every stage, accumulation with a short tail, num_items, clipping, uneven data, bf16, the refusal."""
    results: dict[str, Any] = {}
    loader = DataLoader(IndexedData(16), batch_size=2)  # 8 per rank -> 4 batches per epoch
    for stage in (1, 2, 3):
        module = Regression()
        t = trainer(stage, out)
        t.fit(module, loader)
        results[f"stage{stage}"] = {"weights": weights(t), "global_step": t.global_step,
                                    "losses": torch.stack(module.losses)}
    results["predict"] = len(t.predict(module, loader))  # ZeRO-3 engine after fit
    tail_loader = DataLoader(IndexedData(20), batch_size=2)  # 5 batches per rank: windows of 3 and 2
    t = trainer(2, out, accumulate_grad_batches=3)
    t.fit(Regression(), tail_loader)
    results["accumulate"] = {"weights": weights(t), "global_step": t.global_step}
    t = trainer(2, out, accumulate_grad_batches=3)  # same windows, discovered by looking ahead in a stream
    t.fit(Regression(), DataLoader(RankStream(20), batch_size=2))
    results["accumulate_stream"] = {"weights": weights(t), "global_step": t.global_step}
    t = trainer(3, out, accumulate_grad_batches=3)
    t.fit(SumLossRegression(lr=0.01), tail_loader)
    results["num_items"] = {"weights": weights(t), "global_step": t.global_step}
    t = trainer(2, out, gradient_clip_val=0.05)
    t.fit(Regression(), loader)
    results["clip"] = {"weights": weights(t), "global_step": t.global_step}
    t = trainer(2, out)
    t.fit(ManualRegression(), loader)
    results["manual"] = {"weights": weights(t), "global_step": t.global_step}
    t = trainer(2, out, even_batches=False)  # 17 items: rank 0 has 3 batches of 4, 4, 1; rank 1 has 2
    t.fit(Regression(), DataLoader(IndexedData(17), batch_size=4))
    results["uneven"] = {"weights": weights(t), "global_step": t.global_step}
    for stage, precision in ((2, "bf16-mixed"), (3, "bf16-true")):
        module = Regression("adamw", lr=0.02)
        bf16_loader = DataLoader(IndexedData(32), batch_size=4)
        t = trainer(stage, out, precision=precision, max_epochs=4)
        t.fit(module, bf16_loader, bf16_loader)
        results[precision] = {"losses": torch.stack(module.losses).float(), "skipped": t.skipped_steps,
                              "dtype": next(module.parameters()).dtype, "val_loss": t.callback_metrics["val_loss"],
                              "plugin": type(t.precision_plugin).__name__}
    try:
        trainer(2, out).fit(TwoOptimizers(), loader)
    except ValueError as exc:
        results["two_optimizers"] = str(exc)
    from deepspeed.accelerator import get_accelerator

    results["fp16"] = {"supported": bool(get_accelerator().is_fp16_supported()), "error": None}
    try:
        trainer(2, out, precision="16-mixed", max_steps=2).fit(Regression(), loader)
    except ValueError as exc:
        results["fp16"]["error"] = str(exc)
    results["fp16_overflow"] = fp16_overflow()
    if t.is_global_zero:
        torch.save(results, os.path.join(out, "train.pt"))


class OverflowOnce(Regression):
    """fp16 with an SGD + per-step StepLR; the loss of batch ``bad`` is inf, so that step must be skipped."""

    def __init__(self, bad: int) -> None:
        super().__init__("sgd", lr=0.05)
        self.bad = bad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if batch_idx == self.bad else loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AfterEachBatch(Callback):
    """Records the engine's loss scale, the LR and the weights after every batch."""

    def __init__(self) -> None:
        self.scales: list[float] = []
        self.lrs: list[float] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.scales.append(float(trainer.strategy.engine.optimizer.loss_scale))
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.weights.append({k: v.detach().float().clone() for k, v in module.state_dict().items()})


def fp16_overflow() -> dict[str, Any]:
    """fp16 overflow under ZeRO-2: the skipped step leaves the weights and the LR alone and lowers the scale.

    DeepSpeed's CPU accelerator reports no fp16 on CPUs without AVX512-FP16; torch runs fp16 on any CPU, so the
    capability flag is overridden for this run and DeepSpeed's real fp16 path (loss scaling, overflow, skip) runs.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    accelerator.is_fp16_supported = lambda: True
    try:
        return _fp16_overflow_run()
    finally:
        del accelerator.is_fp16_supported


def _fp16_overflow_run() -> dict[str, Any]:
    module = OverflowOnce(bad=1)
    record = AfterEachBatch()
    strategy = DeepSpeedStrategy(accelerator="cpu", devices=2, stage=2,
                                 config={"fp16": {"initial_scale_power": 8}})  # 2**8: only the inf loss overflows
    t = Trainer(strategy=strategy, accelerator="cpu", devices=2, precision="16-mixed", max_epochs=1, logger=False,
                enable_progress_bar=False, enable_checkpointing=False, callbacks=[record])
    t.fit(module, DataLoader(IndexedData(16), batch_size=2))
    return {"weights": record.weights, "scales": record.scales, "lrs": record.lrs, "skipped": t.skipped_steps,
            "global_step": t.global_step, "dtype": next(module.parameters()).dtype}


def resume(out: str) -> None:
    """ZeRO-2 and ZeRO-3: checkpoint mid-epoch, resume in a fresh Trainer, validate from a checkpoint."""
    for stage in (2, 3):
        resume_stage(out, stage)
    torch.save({"refused": malicious_file_refused(out)}, os.path.join(out, "unpickle.pt"))


class _Exploit:
    def __reduce__(self) -> Any:
        return (os.system, ("echo pwned",))


def malicious_file_refused(out: str) -> str:
    """Load a pickle that would run code through the engine's checkpoint reader; the error text, or ''."""
    from strategies.deepspeed_checkpoint import SafeCheckpointEngine

    path = os.path.join(out, f"evil-{os.environ.get('RANK', '0')}.pt")
    torch.save({"optimizer_state_dict": _Exploit()}, path)
    try:
        SafeCheckpointEngine(None).load(path)
    except Exception as exc:  # torch raises UnpicklingError naming the forbidden global
        return f"{type(exc).__name__}: {exc}"
    return ""


def resume_stage(out: str, stage_n: int) -> None:
    """Run A trains 10 steps (AdamW, per-step StepLR, shuffled data) saving every 4 steps; run B resumes the
    step-4 checkpoint (mid-epoch) in a fresh Trainer; run C validates the step-8 one. Rank 0 saves it all."""
    from callbacks import ModelCheckpoint

    root = os.path.join(out, f"stage{stage_n}")
    # ZeRO-3 checkpoints through an fsspec URL (the engine's files are staged locally and copied)
    ckpt_dir = f"local://{root}/ckpt" if stage_n == 3 else os.path.join(root, "ckpt")
    loader = DataLoader(IndexedData(24), batch_size=2, shuffle=True)  # 6 batches per rank and epoch
    seed_everything(7)
    every = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)
    run_a = trainer(stage_n, root, max_steps=10, max_epochs=None, callbacks=[every], enable_checkpointing=True)
    run_a.fit(Regression("adamw", lr=0.01, dropout=0.2), loader)
    final_a = final_state(run_a)
    saved = sorted(os.listdir(os.path.join(root, "ckpt")))
    seed_everything(123)  # resuming must restore every RNG and the data order itself
    run_b = trainer(stage_n, root, max_steps=10, max_epochs=None)
    module_b = Regression("adamw", lr=0.01, dropout=0.2)
    run_b.fit(module_b, loader, ckpt_path=f"{ckpt_dir}/epoch=0-step=4.ckpt")
    final_b = final_state(run_b)
    # evaluation from the checkpoint in a third Trainer: weights only, through validate()
    run_c = trainer(stage_n, root)
    metrics = run_c.validate(Regression(), loader, ckpt_path=f"{ckpt_dir}/{saved[-1]}")
    if run_a.is_global_zero:
        torch.save({"a": final_a, "b": final_b, "ckpt": [os.path.join(root, "ckpt", n) for n in saved], "val": metrics,
                    "b_losses": torch.stack(module_b.losses)}, os.path.join(out, f"resume{stage_n}.pt"))


def final_state(t: Trainer) -> dict[str, Any]:
    optimizer = t.optimizers[0]
    return {"weights": weights(t), "global_step": t.global_step, "lr": optimizer.param_groups[0]["lr"],
            "epoch": t.current_epoch}


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
