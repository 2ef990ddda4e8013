"""Jobs for tests/test_reshard.py: a run stopped on W processes and resumed on W' (``framework.reshard``).

Each rank records the sample ids of every training batch (``Regression.seen``) and writes them, with the
number of optimizer steps and the warnings it saw, to ``<root>/<phase>-rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import warnings

from dist_common import Regression, loader

from callbacks import ModelCheckpoint
from framework import Trainer

SAMPLES, BATCH = 48, 2


def phase(root: str, name: str, accumulate: int, max_steps: int, resume: bool) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    module = Regression()
    trainer = Trainer(devices=world, strategy="ddp", max_epochs=1, max_steps=max_steps,
                      accumulate_grad_batches=accumulate, default_root_dir=root, logger=False,
                      enable_progress_bar=False, callbacks=[ModelCheckpoint(every_n_train_steps=2)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(SAMPLES, BATCH, shuffle=True), ckpt_path="last" if resume else None)
    record = {"ids": [ids for ids, ghost in module.seen if not ghost], "global_step": trainer.global_step,
              "warnings": [str(w.message) for w in caught]}
    with open(os.path.join(root, f"{name}-rank{rank}.json"), "w") as f:
        json.dump(record, f)
