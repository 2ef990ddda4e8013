"""Small datasets the data tests share: a map-style one that counts loads, resumable streams (tests/test_data*.py)."""

from __future__ import annotations

from torch.utils.data import Dataset, IterableDataset


class CountingDataset(Dataset):
    """Map-style dataset of ``n`` ints that counts ``__getitem__`` calls."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.calls += 1
        return index


class StreamDataset(IterableDataset):
    """Iterable of ints from a resumable position; ``sized`` decides whether it has a __len__."""

    def __init__(self, n: int, stateful: bool = True) -> None:
        self.n, self.position, self.yielded = n, 0, 0
        if stateful:
            self.state_dict = lambda: {"position": self.position}
            self.load_state_dict = lambda state: setattr(self, "position", state["position"])

    def __iter__(self):
        while self.position < self.n:
            value = self.position
            self.position += 1
            self.yielded += 1
            yield value
        self.position = 0


class SizedStreamDataset(StreamDataset):
    def __len__(self) -> int:
        return self.n
