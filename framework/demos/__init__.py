"""Small models and datasets for tests and bug reports, under the names Lightning's ``demos`` uses."""

from framework.demos.boring_classes import (
    BoringDataModule,
    BoringModel,
    DemoModel,
    ManualOptimBoringModel,
    RandomDataset,
    RandomDictDataset,
    RandomIterableDataset,
    RandomIterableDatasetWithLen,
)

__all__ = ["BoringDataModule", "BoringModel", "DemoModel", "ManualOptimBoringModel", "RandomDataset",
           "RandomDictDataset", "RandomIterableDataset", "RandomIterableDatasetWithLen"]
