"""SingleDeviceStrategy: one process, one device (CPU, one GPU, MPS)."""

from __future__ import annotations

import torch

from strategies.base import Strategy


class SingleDeviceStrategy(Strategy):
    """Train on one device in this process; the default when only one device is used."""

    name = "single_device"

    def __init__(self, device: str | torch.device = "cpu", accelerator: str | None = None) -> None:
        device = torch.device(device)
        super().__init__(accelerator=accelerator or device.type, devices=1)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self._root_device = device

    def setup_environment(self) -> None:
        if self._root_device.type == "cuda":
            torch.cuda.set_device(self._root_device)
        super().setup_environment()
