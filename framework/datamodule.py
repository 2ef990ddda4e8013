"""DataModule: the data side of a run in one object (Lightning's ``LightningDataModule``).

It owns preparation (``prepare_data``: once per node, or once in all with
``prepare_data_per_node = False``), per-process ``setup(stage)``/``teardown(stage)``, the four
dataloader hooks, the batch-transfer hooks, its own checkpointed state (``state_dict`` /
``load_state_dict``, stored under the class's ``__qualname__`` as in Lightning) and hyperparameters.
The Trainer calls it; ``dataloader_hook`` and ``datamodule_checkpoint_entries`` are the two functions
it uses to ask.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any

from framework.hparams import HyperparametersMixin
from framework.loading import load_from_checkpoint, restricted_classmethod
from framework.module_hooks import DataHooks

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from framework.trainer import Trainer

__all__ = ["DataModule", "dataloader_hook", "datamodule_checkpoint_entries", "restore_datamodule",
           "DATALOADER_HOOKS"]

DATALOADER_HOOKS = {"fit": "train_dataloader", "validate": "val_dataloader", "test": "test_dataloader",
                    "predict": "predict_dataloader"}


class DataModule(HyperparametersMixin, DataHooks):
    """Subclass and override the hooks you need; every one is optional.

    A dataloader hook that is not overridden means "no data for that stage" (validation is skipped,
    ``trainer.test`` refuses with a clear error), as in Lightning.
    """

    name: str | None = None
    CHECKPOINT_HYPER_PARAMS_KEY = "datamodule_hyper_parameters"
    CHECKPOINT_HYPER_PARAMS_NAME = "datamodule_hparams_name"
    CHECKPOINT_HYPER_PARAMS_TYPE = "datamodule_hparams_type"

    def __init__(self) -> None:
        super().__init__()
        self.trainer: Trainer | None = None
        self.prepare_data_per_node: bool = True
        self.allow_zero_length_dataloader_with_multiple_devices: bool = False

    # ---- lifecycle ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download / write data to disk: one process per node (or one overall), before ``setup``. Set no state
        here: other processes do not run it."""

    def setup(self, stage: str) -> None:
        """Build datasets on every process; ``stage`` is "fit", "validate", "test" or "predict"."""

    def teardown(self, stage: str) -> None:
        """Release what ``setup`` built; called on every process at the end of each stage."""

    def on_exception(self, exception: BaseException) -> None:
        """Called when the run fails with ``exception`` (before the Trainer re-raises it)."""

    # ---- data -------------------------------------------------------------------------------------
    def train_dataloader(self) -> Any:
        """The training data: a DataLoader (or any iterable of batches)."""
        raise NotImplementedError(_not_implemented(self, "train_dataloader"))

    def val_dataloader(self) -> Any:
        """Validation data: one loader or a list of them (``dataloader_idx`` tells them apart)."""
        raise NotImplementedError(_not_implemented(self, "val_dataloader"))

    def test_dataloader(self) -> Any:
        """Test data: one loader or a list of them."""
        raise NotImplementedError(_not_implemented(self, "test_dataloader"))

    def predict_dataloader(self) -> Any:
        """Prediction data: one loader or a list of them."""
        raise NotImplementedError(_not_implemented(self, "predict_dataloader"))

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints (plain data and tensors; never pickled)."""
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    @restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, map_location: Any = None,
                             hparams_file: str | os.PathLike | None = None, **kwargs: Any) -> Any:
        """Rebuild the datamodule from a checkpoint's ``datamodule_hyper_parameters`` (``kwargs`` override
        them) and restore its ``state_dict``. ``checkpoint_path`` may be a URL or ``<dirpath>/last``."""
        return load_from_checkpoint(cls, checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                    **kwargs)

    # ---- construction from datasets ---------------------------------------------------------------------
    @classmethod
    def from_datasets(cls, train_dataset: Dataset | Iterable[Dataset] | None = None,
                      val_dataset: Dataset | Iterable[Dataset] | None = None,
                      test_dataset: Dataset | Iterable[Dataset] | None = None,
                      predict_dataset: Dataset | Iterable[Dataset] | None = None,
                      batch_size: int = 1, num_workers: int = 0, **datamodule_kwargs: Any) -> DataModule:
        """A datamodule serving the given datasets (a dataset, or a list/dict of them) through DataLoaders;
        the training ones shuffle. ``batch_size``/``num_workers`` also go to ``__init__`` when it takes them."""
        import torch
        from torch.utils.data import DataLoader, IterableDataset

        pin = torch.cuda.is_available()  # Lightning pins always; without CUDA pinning only warns

        def loaders(datasets: Any, shuffle: bool) -> Any:
            if isinstance(datasets, Mapping):
                return {k: loaders(v, shuffle) for k, v in datasets.items()}
            if isinstance(datasets, (list, tuple)):
                return type(datasets)(loaders(d, shuffle) for d in datasets)
            return DataLoader(datasets, batch_size=batch_size, num_workers=num_workers, pin_memory=pin,
                              shuffle=shuffle and not isinstance(datasets, IterableDataset))

        params = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        special = {k: v for k, v in {"batch_size": batch_size, "num_workers": num_workers}.items()
                   if takes_any or k in params}
        datamodule = cls(**datamodule_kwargs, **special)
        for hook, datasets, shuffle in (("train_dataloader", train_dataset, True),
                                        ("val_dataloader", val_dataset, False),
                                        ("test_dataloader", test_dataset, False),
                                        ("predict_dataloader", predict_dataset, False)):
            if datasets is not None:
                setattr(datamodule, hook, _bind(loaders, datasets, shuffle))
        return datamodule

    def __str__(self) -> str:
        """One line per dataloader hook with its dataset sizes (``None`` where it is not available)."""
        lines = []
        for label, hook in (("Train dataloader", "train_dataloader"), ("Validation dataloader", "val_dataloader"),
                            ("Test dataloader", "test_dataloader"), ("Predict dataloader", "predict_dataloader")):
            try:
                described = _describe(getattr(self, hook)())
            except Exception:
                described = "None"
            lines.append(f"{{{label}: {described}}}")
        return os.linesep.join(lines)


def _bind(make: Callable[[Any, bool], Any], datasets: Any, shuffle: bool) -> Callable[[], Any]:
    return lambda: make(datasets, shuffle)


def _describe(loaders: Any) -> str:
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return " ; ".join(f"{i}. {_describe(dl)}" for i, dl in enumerate(loaders, start=1))
    dataset = getattr(loaders, "dataset", None)
    return f"size={len(dataset)}" if isinstance(dataset, Sized) else "size=NA"


def _not_implemented(dm: DataModule, hook: str) -> str:
    return (f"{type(dm).__name__}.{hook}() is not implemented; define it on the DataModule (or pass the "
            "dataloaders to the Trainer method directly).")


def dataloader_hook(source: Any, stage: str) -> Callable[[], Any] | None:
    """The bound dataloader hook of ``source`` (a DataModule or TrainModule) for ``stage`` ("fit",
    "validate", "test", "predict"), or None when it does not provide one. A hook assigned on the instance
    (``from_datasets``, ``dm.val_dataloader = ...``) counts; ``None`` assigned there disables it."""
    name = DATALOADER_HOOKS.get(stage)
    if name is None:
        raise ValueError(f"stage={stage!r}: expected one of {sorted(DATALOADER_HOOKS)}.")
    if name in getattr(source, "__dict__", {}):
        hook = source.__dict__[name]
        return hook if callable(hook) else None
    impl = getattr(type(source), name, None)
    if impl is None or impl is getattr(DataModule, name):
        return None
    return getattr(source, name)


def datamodule_checkpoint_entries(datamodule: DataModule | None) -> dict[str, Any]:
    """The datamodule's checkpoint entry ``{type(dm).__qualname__: dm.state_dict()}`` (empty when its
    state is empty or there is no datamodule), as Lightning stores it."""
    if datamodule is None:
        return {}
    state = datamodule.state_dict()
    return {type(datamodule).__qualname__: state} if state else {}


def restore_datamodule(datamodule: DataModule | None, checkpoint: Mapping[str, Any]) -> None:
    """Give ``datamodule`` its state back from a loaded checkpoint dict (no-op without an entry)."""
    if datamodule is not None and type(datamodule).__qualname__ in checkpoint:
        datamodule.load_state_dict(checkpoint[type(datamodule).__qualname__])
