"""One small model that logs in every way ``self.log`` offers, runnable on Kiln or on Lightning.

    python log_parity.py kiln|lightning OUT.json

Runs twice — batch sizes passed to self.log explicitly, then inferred from the batches — and writes what
each framework reports — callback metrics seen by a callback during training, after
validation and after fit, the progress-bar metrics, logged metrics, and validate()/test() results — as
JSON, so that tests/test_metrics_parity.py can compare the two runs number for number.
"""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset

FRAMEWORK, OUT = sys.argv[1], sys.argv[2]
EXPLICIT = False

if FRAMEWORK == "lightning":
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import Logger as LoggerBase

    Module, Trainer, Callback = pl.LightningModule, pl.Trainer, pl.Callback
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "num_sanity_val_steps": 0, "enable_model_summary": False}
else:
    from callbacks import Callback
    from framework import Trainer
    from framework import TrainModule as Module
    from framework.loggers import Logger as LoggerBase

    # no sanity-check validation in either run (Lightning's is switched off below)
    trainer_kwargs = {"num_sanity_val_steps": 0} if "num_sanity_val_steps" in inspect.signature(Trainer).parameters \
        else {}


class RecordingLogger(LoggerBase):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self):
        return "rec"

    @property
    def version(self):
        return 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append({k: float(v) for k, v in metrics.items() if k != "epoch"})


def floats(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def size(x: torch.Tensor) -> dict:
    return {"batch_size": len(x)} if EXPLICIT else {}


class LogEverything(Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(2, 1)
        self.train_mean = torchmetrics.MeanMetric()
        self.val_mean = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("loss", loss, prog_bar=True)
        self.log("x_mean", x.mean(), on_epoch=True, **size(x))
        self.log("x_sum", x.sum(), on_step=False, on_epoch=True, reduce_fx="sum")
        self.log("x_max", x.max(), on_step=False, on_epoch=True, reduce_fx="max")
        self.log("x_min", x.min(), on_step=False, on_epoch=True, reduce_fx=torch.min)
        self.log_dict({"a": y.mean(), "b": 2 * y.mean()}, on_step=False, on_epoch=True, prog_bar=True, **size(x))
        self.log("hidden", y.sum(), logger=False, on_epoch=True, **size(x))
        self.log("count", 1)
        self.log("flag", True, on_epoch=True, on_step=False, **size(x))
        self.train_mean(x.sum(dim=1))
        self.log("metric", self.train_mean, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y), prog_bar=True, **size(x))
        self.log("val_x", x.mean(), on_step=True, **size(x))
        self.log("val_max", x.max(), reduce_fx="max")
        self.val_mean.update(y)
        self.log("val_metric", self.val_mean)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.layer(x), y), **size(x))
        self.log_dict({"test_x": x.mean(), "test_y": y.mean()}, **size(x))

    def on_train_epoch_start(self):
        self.log("start", float(self.current_epoch))

    def on_train_epoch_end(self):
        self.log("end", 10.0 + self.current_epoch)

    def on_validation_epoch_end(self):
        self.log("val_end", 7.0, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class LogFromCallback(Callback):
    """Callbacks log through the module too, with the hook's defaults (step in training, epoch in validation)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        module.log("cb_train", outputs["loss"] * 2 if isinstance(outputs, dict) else outputs * 2)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        module.log("cb_val", batch[0].sum(), **size(batch[0]))


class Snapshots(Callback):
    def __init__(self) -> None:
        self.batches: list[dict[str, float]] = []
        self.validation: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches.append(floats(trainer.callback_metrics))

    def on_validation_end(self, trainer, module):
        self.validation.append(floats(trainer.callback_metrics))


def loader(n: int, batch_size: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g)),
                      batch_size=batch_size)


def run() -> dict:
    module, snapshots, logger = LogEverything(), Snapshots(), RecordingLogger()
    trainer = Trainer(max_epochs=2, logger=logger, callbacks=[LogFromCallback(), snapshots], enable_checkpointing=False,
                      enable_progress_bar=False, log_every_n_steps=1, **trainer_kwargs)
    trainer.fit(module, loader(10, 4, 0), [loader(7, 3, 1), loader(5, 2, 2)])
    result = {
        "batches": snapshots.batches, "validation": snapshots.validation,
        "callback_metrics": floats(trainer.callback_metrics),
        "progress_bar": floats(trainer.progress_bar_metrics),
        "epoch_rows": [row for row in logger.rows if "x_sum" in row],
        "validate": trainer.validate(module, [loader(7, 3, 1), loader(5, 2, 2)], verbose=False)
        if FRAMEWORK == "lightning" else trainer.validate(module, [loader(7, 3, 1), loader(5, 2, 2)]),
        "test": trainer.test(module, loader(9, 4, 3), verbose=False) if FRAMEWORK == "lightning"
        else trainer.test(module, loader(9, 4, 3)),
        "weights": [float(v) for v in module.layer.weight.flatten()],
    }
    return result


def main() -> None:
    global EXPLICIT
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    results = {}
    for EXPLICIT in (True, False):
        results["explicit" if EXPLICIT else "inferred"] = run()
    with open(OUT, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
