"""Strategy names → classes, imported lazily so ``import strategies`` stays cheap.

``resolve_strategy`` turns the Trainer's ``strategy=``/``accelerator=``/``devices=`` arguments into one
Strategy instance; new strategies register with ``register_strategy(name, "module:Class", **defaults)``.
"""

from __future__ import annotations

import difflib
import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the Trainer imports this module: importing strategies.base here would close a cycle
    from strategies.base import Strategy

_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {}


def register_strategy(name: str, target: str, **defaults: Any) -> None:
    """Register ``name`` for ``"package.module:ClassName"`` built with ``defaults``."""
    _REGISTRY[name] = (target, defaults)


register_strategy("single_device", "strategies.single:SingleDeviceStrategy")
register_strategy("ddp", "strategies.ddp:DDPStrategy")
register_strategy("fsdp", "strategies.fsdp:FSDPStrategy")
register_strategy("model_parallel", "strategies.model_parallel:ModelParallelStrategy")
register_strategy("deepspeed", "strategies.deepspeed:DeepSpeedStrategy", stage=2)
for _stage in (1, 2, 3):
    register_strategy(f"deepspeed_stage_{_stage}", "strategies.deepspeed:DeepSpeedStrategy", stage=_stage)
register_strategy("xla", "strategies.xla:XLAStrategy")
# Lightning's preset names that map onto Kiln's strategies.
for _flag in (True, False):
    register_strategy(f"ddp_find_unused_parameters_{str(_flag).lower()}", "strategies.ddp:DDPStrategy",
                      find_unused_parameters=_flag)
register_strategy("fsdp_cpu_offload", "strategies.fsdp:FSDPStrategy", cpu_offload=True)
register_strategy("deepspeed_stage_2_offload", "strategies.deepspeed:DeepSpeedStrategy", stage=2,
                  offload_optimizer=True)
register_strategy("deepspeed_stage_3_offload", "strategies.deepspeed:DeepSpeedStrategy", stage=3,
                  offload_optimizer=True, offload_parameters=True)

# Lightning's names whose launcher Kiln does not have: refused with the reason and the Kiln way.
_NO_SPAWN = ("Kiln has no spawn/fork launcher: the Trainer, module and callbacks would be pickled into each process "
             "and only rank 0's results copied back. Use strategy='ddp': a plain `python script.py` re-runs the "
             "script for the other ranks (or start it with torchrun); in tests, framework.testing.run_distributed "
             "runs a module-level function on N processes.")
_REFUSED = {name: _NO_SPAWN for name in (
    "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true",
    "ddp_fork_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true",
    "ddp_notebook_find_unused_parameters_false", "xla_debug")}
_REFUSED["xla_debug"] = "Kiln's XLA strategy has no debug preset; use strategy='xla' and torch_xla's own debug flags."
_REFUSED["deepspeed_stage_3_offload_nvme"] = ("Kiln's DeepSpeed strategy offloads to CPU memory only; pass "
                                              "strategy=DeepSpeedStrategy(config={...}) with DeepSpeed's NVMe "
                                              "offload settings instead.")

ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "xla", "tpu")


def available_strategies() -> list[str]:
    return ["auto", *_REGISTRY]


def resolve_accelerator(accelerator: str) -> str:
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator={accelerator!r} is not known; use one of {ACCELERATORS}.")
    if accelerator == "gpu":
        return "cuda"
    if accelerator == "tpu":
        return "xla"
    if accelerator != "auto":
        return accelerator
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("PJRT_DEVICE") and "torch_xla" in __import__("sys").modules:
        return "xla"
    return "cpu"


def resolve_devices(devices: int | str | list[int], accelerator: str) -> int:
    """Number of devices (processes) per node requested by ``devices=``."""
    if isinstance(devices, bool):
        raise TypeError(f"devices={devices!r} is not valid; use an int >= 1, a list of device indices, or 'auto'.")
    if devices == "auto" or devices == -1:
        if accelerator == "cuda":
            import torch

            return max(1, torch.cuda.device_count())
        return 1
    if isinstance(devices, (list, tuple)):
        if not devices:
            raise ValueError("devices=[] selects no device; pass at least one index or 'auto'.")
        return len(devices)
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices={devices!r} is not valid; use an int >= 1, a list of device indices, or 'auto'.")
    return devices


def resolve_strategy(strategy: str | Strategy, *, accelerator: str = "auto", devices: Any = "auto",
                     num_nodes: int = 1) -> Strategy:
    """Build the Strategy for the Trainer's arguments (an instance is used as given, after its
    ``configure_topology`` hook, if any, took the arguments it was not constructed with)."""
    from strategies.base import Strategy

    accelerator = resolve_accelerator(accelerator)
    if isinstance(strategy, Strategy):
        configure = getattr(strategy, "configure_topology", None)  # fills what the instance was not given
        if configure is not None:
            configure(accelerator, resolve_devices(devices, accelerator), num_nodes)
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy={strategy!r} must be a name ({', '.join(available_strategies())}) or a "
                        "strategies.Strategy instance.")
    num_devices = resolve_devices(devices, accelerator)
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes!r} is not valid; use an int >= 1.")
    world = num_devices * num_nodes
    if strategy == "auto":
        if accelerator == "xla":
            strategy = "xla"
        else:
            strategy = "ddp" if world > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single_device"
    if strategy in _REFUSED:
        raise ValueError(f"strategy={strategy!r} (Lightning's) is not supported. {_REFUSED[strategy]}")
    if strategy not in _REGISTRY:
        names = available_strategies()
        close = [n for n in names if n.split("_")[0] == strategy.split("_")[0]] or difflib.get_close_matches(
            strategy, names, n=1, cutoff=0.6)
        raise ValueError(
            f"strategy={strategy!r} is not a known strategy. Use one of {', '.join(available_strategies())}"
            + (f" (did you mean {close[0]!r}?)" if close else "") + ", or pass a strategies.Strategy instance."
        )
    if strategy == "single_device":
        if world > 1:
            raise ValueError(f"strategy='single_device' cannot use devices={devices!r} x num_nodes={num_nodes}; "
                             "use strategy='ddp' (or 'auto') for several devices.")
        device = "cuda" if accelerator == "cuda" else accelerator
        if isinstance(devices, (list, tuple)) and accelerator == "cuda":
            device = f"cuda:{devices[0]}"
        from strategies.single import SingleDeviceStrategy

        return SingleDeviceStrategy(device)
    target, defaults = _REGISTRY[strategy]
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(accelerator=accelerator, devices=num_devices, num_nodes=num_nodes, **defaults)
