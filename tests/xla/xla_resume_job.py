"""A training run on the XLA device that checkpoints and resumes (used by test_xla_strategy.py).

Imported by the test for the uninterrupted run, and run as a script for the resume in a fresh process:
    python xla_resume_job.py ROOT MAX_STEPS CKPT_PATH OUT_FILE PARALLEL_LOADER(0|1)
The model has dropout (XLA RNG), tied weights and Adam with a step LR schedule; the loader shuffles.
"""

from __future__ import annotations

import os
import sys
from typing import Any

os.environ.setdefault("PJRT_DEVICE", "CPU")

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from callbacks import ModelCheckpoint  # noqa: E402
from framework import Trainer, TrainModule, seed_everything  # noqa: E402
from strategies import XLAStrategy  # noqa: E402

CHECKPOINT_EVERY = 3  # steps; 5 batches per epoch, so the step-3 checkpoint is mid-epoch


class DropoutTiedNet(TrainModule):
    def __init__(self) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(4, 4, bias=False)
        self.decode = torch.nn.Linear(4, 4)
        self.decode.weight = self.encode.weight
        self.dropout = torch.nn.Dropout(0.3)
        self.head = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        hidden = self.dropout(torch.tanh(self.decode(torch.tanh(self.encode(x)))))
        return torch.nn.functional.mse_loss(self.head(hidden), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=0.05)
        return [optimizer], [{"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.5), "interval": "step"}]


def train(root: str, max_steps: int, ckpt_path: str | None = None, parallel_loader: bool = True
          ) -> dict[str, torch.Tensor]:
    """Fit on the XLA device (checkpointing every CHECKPOINT_EVERY steps); the final weights on CPU."""
    seed_everything(7)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(40, 4, generator=g), torch.randn(40, 1, generator=g))
    module = DropoutTiedNet()
    checkpoints = ModelCheckpoint(dirpath=os.path.join(root, "checkpoints"), every_n_train_steps=CHECKPOINT_EVERY,
                                  save_top_k=-1)
    trainer = Trainer(strategy=XLAStrategy(parallel_loader=parallel_loader), max_steps=max_steps,
                      callbacks=[checkpoints], logger=False, enable_progress_bar=False, default_root_dir=root)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True), ckpt_path=ckpt_path)
    assert module.decode.weight is module.encode.weight, "tied weights came apart"
    return {name: tensor.cpu() for name, tensor in module.state_dict().items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    root, max_steps, ckpt_path, out_file, parallel_loader = sys.argv[1:6]
    weights = train(root, int(max_steps), ckpt_path, parallel_loader == "1")
    weights.pop("decode.weight")  # safetensors refuses shared tensors; it equals encode.weight
    save_file(weights, out_file)
