"""Where a run's dataloaders come from, and when they are requested.

Loaders passed to ``fit``/``validate``/... win; otherwise the DataModule's ``*_dataloader`` hooks when a
DataModule is given (a hook it does not override means no data for that stage), else the module's. They are requested lazily — validation loaders at the sanity check,
the training loader just before ``on_train_start`` — so ``setup`` hooks run first, as in Lightning.
Each loader is prepared by the strategy (distributed sampler, seeds, resumable position) into a
``DataFeed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framework.data import DataFeed

if TYPE_CHECKING:
    from framework.trainer import Trainer

LIMIT_NAMES = {"fit": "limit_train_batches", "validate": "limit_val_batches", "test": "limit_test_batches",
               "predict": "limit_predict_batches"}


class StageData:
    """The feeds of one run, built on first use and rebuilt on ``reload``."""

    def __init__(self, trainer: Trainer, given: dict[str, Any], datamodule: Any, seed: int) -> None:
        self.t, self.given, self.datamodule, self.seed = trainer, given, datamodule, seed
        self._feeds: dict[str, list[DataFeed]] = {}

    def feeds(self, stage: str, reload: bool = False) -> list[DataFeed]:
        if stage not in self._feeds or reload:
            self._feeds[stage] = self._build(stage)
        return self._feeds[stage]

    def train_feed(self, reload: bool = False) -> DataFeed:
        feeds = self.feeds("fit", reload)
        if len(feeds) > 1:
            raise ValueError("trainer.fit() takes one training dataloader; combine several into one dataset "
                             "(e.g. torch.utils.data.ConcatDataset) first.")
        if not feeds:
            if self.t.limits["fit"] == 0:
                raise ValueError("limit_train_batches=0 leaves nothing to train; use a count >= 1, a fraction > 0, "
                                 "or None for every batch.")
            raise ValueError("trainer.fit() got no training data: pass train_dataloaders=..., a datamodule=..., or "
                             "define train_dataloader() on the module.")
        self.t.num_training_batches = feeds[0].num_batches
        return feeds[0]

    def loaders_given(self, stage: str) -> bool:
        """Whether ``stage`` has data without requesting it from a hook (for warnings only)."""
        return self.given.get(stage) is not None

    def reload_due(self, epoch: int) -> bool:
        every = self.t.reload_dataloaders_every_n_epochs
        return bool(every) and epoch % every == 0

    def loaders(self, stage: str) -> list[Any]:
        """The raw loaders for ``stage`` (given, then DataModule, then module hook)."""
        given = self.given.get(stage)
        if given is None:
            from framework.datamodule import dataloader_hook

            # With a DataModule only its hooks count, and one it does not override means "no data for this
            # stage" (Lightning's rule); without one, the module's hooks.
            owner = self.datamodule if self.datamodule is not None else self.t.module
            hook = dataloader_hook(owner, stage)
            if hook is not None:
                given = hook()
        if given is None:
            return []
        if isinstance(given, dict):
            given = list(given.values())
        return list(given) if isinstance(given, (list, tuple)) else [given]

    def _build(self, stage: str) -> list[DataFeed]:
        t = self.t
        limit = t.limits[stage]
        if limit == 0:
            return []
        loaders = self.loaders(stage)
        if stage == "fit" and t.overfit_batches:
            loaders = [_without_shuffle(loader) for loader in loaders]
        feeds = [DataFeed(t.strategy.process_dataloader(
            loader, stage=stage, seed=self.seed, use_distributed_sampler=t.use_distributed_sampler,
            even_batches=t.even_batches, limit_batches=limit), limit, LIMIT_NAMES[stage]) for loader in loaders]
        counts = [feed.num_batches for feed in feeds]
        if stage == "validate":
            t.num_val_batches = counts
        elif stage in ("test", "predict"):
            setattr(t, f"num_{stage}_batches", counts)
        return feeds


def _without_shuffle(loader: Any) -> Any:
    """overfit_batches trains on the same first batches every epoch: a shuffling loader is rebuilt in order."""
    import warnings

    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, RandomSampler):
        return loader
    warnings.warn("overfit_batches is set and the training dataloader shuffles; it is read in order instead so "
                  "that every epoch sees the same batches.", stacklevel=6)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=False, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers)
