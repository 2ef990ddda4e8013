"""XLAStrategy: train on an XLA device (TPU, or CPU/GPU through PJRT) with torch_xla.

XLA tensors are lazy: operations are recorded into a graph that runs when it is cut with
``torch_xla.sync()``. The strategy cuts it once per optimizer step (after the update), after each
evaluation step, and the device loader cuts it before handing out the next batch, so every step compiles
to the same few graphs. Batches reach the device through a background ``ParallelLoader`` (what
``MpDeviceLoader`` wraps), gradients are all-reduced at the optimizer step, and checkpoints are written
from CPU copies. torch_xla is imported only when this strategy is built.

Every ``torch_xla.sync()`` advances the device RNG seed, so exact resume needs the same cuts in the
original and the resumed run between the checkpoint and the next random draw: the cut points above are
tied to batches and steps (both loader modes cut before every batch), checkpoint saving reads tensors
back without a cut, and nothing else here cuts the graph.

Topology comes from the PJRT runtime: launch several replicas with torch_xla's own launcher
(``torch_xla.launch``/``xmp.spawn``); Kiln does not start XLA processes itself.
"""

from __future__ import annotations

import pickle
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from framework.batch_transfer import move_data_to_device
from strategies.base import Strategy

if TYPE_CHECKING:
    from framework.module import TrainModule

_EVAL_STEPS = ("validation_step", "test_step", "predict_step")


def import_torch_xla() -> Any:
    """Import torch_xla, or raise an ImportError that says how to install a matching build."""
    try:
        import torch_xla
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch_xla", None):
            raise
        raise ModuleNotFoundError(
            "strategy='xla' (or accelerator='xla'/'tpu') needs torch_xla, which is not installed. Install "
            f"the torch_xla release that matches your torch {torch.__version__.split('+')[0]} (torch_xla X.Y "
            "requires torch X.Y), e.g. `pip install 'torch==2.9.0' 'torch_xla==2.9.0'` (`pip install "
            "'kiln[xla]'` pulls torch_xla too), and select the device with PJRT_DEVICE=TPU|CUDA|CPU. "
            "`nox -s xla` builds such an environment and runs the XLA tests.",
            name="torch_xla",
        ) from exc
    except ImportError as exc:
        raise ImportError(
            f"torch_xla is installed but failed to import ({exc}). torch_xla X.Y only works with torch X.Y; "
            f"this environment has torch {torch.__version__}. Install matching versions."
        ) from exc
    return torch_xla


class XLAStrategy(Strategy):
    """One XLA device per process (PJRT). Options:

    - ``parallel_loader``: upload batches in a background thread (torch_xla's ``ParallelLoader``). Set
      it to False when a ``num_workers=0`` dataset draws from the global RNG in ``__getitem__`` and the
      run must be bit-exact on resume: the background thread would draw those numbers ahead of the step.
      (Iterable datasets with ``state_dict`` and ``num_workers=0`` are always loaded inline, since their
      saved position must match the batches actually trained.)
    - ``parallel_loader_kwargs``: forwarded to ``ParallelLoader`` (``loader_prefetch_size``,
      ``device_prefetch_size``, ``host_to_device_transfer_threads``, ...).
    """

    name = "xla"

    def __init__(self, accelerator: str = "xla", devices: int = 1, num_nodes: int = 1, *,
                 parallel_loader: bool = True, parallel_loader_kwargs: dict[str, Any] | None = None) -> None:
        import_torch_xla()
        if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
            raise ValueError(f"devices={devices!r} is not valid for XLAStrategy; use an int >= 1.")
        if parallel_loader_kwargs is not None and not isinstance(parallel_loader_kwargs, dict):
            raise TypeError(f"parallel_loader_kwargs={parallel_loader_kwargs!r} must be a dict of "
                            "torch_xla ParallelLoader arguments or None.")
        # The accelerator is whatever PJRT_DEVICE selects; `accelerator` is kept for reporting only.
        super().__init__(accelerator="xla", devices=devices, num_nodes=num_nodes)
        self.parallel_loader = bool(parallel_loader)
        self.parallel_loader_kwargs = dict(parallel_loader_kwargs or {})
        # Not touching the runtime before setup_environment: xmp.spawn refuses an initialised parent.
        self._root_device = torch.device("xla")
        self._topology = (1, 0, 0)  # (world_size, global_rank, local_rank), read from PJRT at setup
        self._reduced: set[int] = set()  # optimizers whose gradients are already all-reduced this step
        self._loaders: weakref.WeakSet[_XLADeviceLoader] = weakref.WeakSet()

    # ---- topology ---------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._topology[0]

    @property
    def global_rank(self) -> int:
        return self._topology[1]

    @property
    def local_rank(self) -> int:
        return self._topology[2]

    def setup_environment(self) -> None:
        torch_xla = import_torch_xla()
        import torch_xla.runtime as xr

        self._root_device = torch_xla.device()
        world = xr.world_size()
        requested = self.num_devices * self.num_nodes
        if requested > 1 and requested != world:
            raise ValueError(
                f"devices={self.num_devices} x num_nodes={self.num_nodes} asks for {requested} XLA replicas but "
                f"the PJRT runtime of this process has {world}. Kiln does not start XLA processes: launch the "
                "script with torch_xla's launcher (torch_xla.launch(fn) or xmp.spawn(fn), which use every "
                "device PJRT_DEVICE exposes) and leave devices='auto' so the runtime's topology is used."
            )
        self._topology = (world, xr.global_ordinal(), xr.local_ordinal()) if world > 1 else (1, 0, 0)
        super().setup_environment()

    # ---- model and steps ----------------------------------------------------------------------------
    def wrap_module(self, module: TrainModule) -> torch.nn.Module:
        """Move the module to the XLA device keeping tied weights tied; steps run on it directly."""
        move_keeping_ties(module, self.root_device)
        return module

    def step_function(self, name: str) -> Callable[..., Any]:
        step = getattr(self.module, name)
        if name not in _EVAL_STEPS:
            return step
        import torch_xla

        def step_and_sync(*args: Any) -> Any:
            # One graph per evaluation step, so its outputs are materialised and every step reuses it.
            output = step(*args)
            torch_xla.sync()
            return output

        return step_and_sync

    @property
    def needs_batch_transfer(self) -> bool:
        return False  # the loaders from process_dataloader yield batches already on the device

    def process_dataloader(self, dataloader: Any, *, stage: str, seed: int, use_distributed_sampler: bool,
                           even_batches: bool, limit_batches: int | float | None = None) -> Any:
        prepared = super().process_dataloader(dataloader, stage=stage, seed=seed,
                                              use_distributed_sampler=use_distributed_sampler,
                                              even_batches=even_batches, limit_batches=limit_batches)
        background = self.parallel_loader and not _has_own_position(prepared)
        loader = _XLADeviceLoader.wrap(prepared, self.root_device, background, self.parallel_loader_kwargs)
        self._loaders.add(loader)
        return loader

    # ---- backward and step --------------------------------------------------------------------------
    def _reduce_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        if self.world_size > 1 and id(optimizer) not in self._reduced:
            import torch_xla.core.xla_model as xm

            xm.reduce_gradients(optimizer)
            self._reduced.add(id(optimizer))

    def clip_gradients(self, optimizer: torch.optim.Optimizer, clip_val: float, algorithm: str) -> torch.Tensor | None:
        self._reduce_gradients(optimizer)  # clip the global gradient, not this replica's
        return super().clip_gradients(optimizer, clip_val, algorithm)

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any] | None = None,
                       **kwargs: Any) -> bool:
        """``xm.optimizer_step`` through the precision plugin: all-reduce, step, then cut the graph (a closure runs
        once first: the gradients it makes are reduced before the step)."""
        import torch_xla

        if closure is not None:
            closure()
        self._reduce_gradients(optimizer)
        stepped = self.precision.optimizer_step(optimizer, **kwargs)
        self._reduced.discard(id(optimizer))
        torch_xla.sync()
        return stepped

    # ---- collectives ------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "mean") -> torch.Tensor:
        if op not in _REDUCE_OPS:
            raise ValueError(f"op={op!r} is not supported; use one of {sorted(_REDUCE_OPS)}.")
        if self.world_size == 1:
            return tensor
        import torch_xla.core.xla_model as xm

        scale = 1.0 / self.world_size if op == "mean" else 1.0
        return xm.all_reduce(getattr(xm, _REDUCE_OPS[op]), tensor.to(self.root_device), scale=scale)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        import torch_xla.core.xla_model as xm

        return xm.all_gather(tensor.to(self.root_device).unsqueeze(0), dim=0)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch_xla.core.xla_model as xm

        return [pickle.loads(p) for p in xm.rendezvous("kiln.all_gather_object", pickle.dumps(obj))]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        import torch_xla.core.xla_model as xm

        payload = pickle.dumps(obj) if self.global_rank == src else b""
        return pickle.loads(xm.rendezvous("kiln.broadcast", payload)[src])

    def barrier(self, name: str | None = None) -> None:
        if self.world_size > 1:
            import torch_xla.core.xla_model as xm

            xm.rendezvous(name or "kiln.barrier")

    # ---- checkpoint state: written from CPU copies -------------------------------------------------------
    def module_state_dict(self) -> dict[str, Any]:
        return to_cpu(self.module.state_dict())

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return to_cpu(optimizer.state_dict())

    def teardown(self) -> None:
        """Run what is still queued on the device and stop the background loaders."""
        if self._root_device.index is not None:
            import torch_xla

            torch_xla.sync()
        for loader in list(self._loaders):
            loader.close()
        self._loaders = weakref.WeakSet()
        self._reduced.clear()
        super().teardown()


def move_keeping_ties(module: torch.nn.Module, device: torch.device) -> None:
    """``module.to(device)``, then re-tie shared parameters.

    CPU and XLA tensors cannot swap storage in place, so ``Module.to`` gives each module its own new
    Parameter and a weight shared by two modules (tied embeddings) would silently train as two copies.
    """
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for submodule in module.modules():
        for name, param in submodule.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(param), []).append((submodule, name))
    module.to(device)
    for (first, first_name), *aliases in (group for group in owners.values() if len(group) > 1):
        shared = getattr(first, first_name)
        for submodule, name in aliases:
            setattr(submodule, name, shared)


_REDUCE_OPS = {"sum": "REDUCE_SUM", "mean": "REDUCE_SUM", "max": "REDUCE_MAX", "min": "REDUCE_MIN"}


def to_cpu(tree: Any) -> Any:
    """CPU copies of the XLA tensors in a state tree, fetched in one transfer; aliases stay aliases."""
    import torch_xla.core.xla_model as xm

    xla_tensors: dict[int, torch.Tensor] = {}

    def collect(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            if node.device.type == "xla":
                xla_tensors.setdefault(id(node), node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(tree)
    if not xla_tensors:
        return tree
    ids = list(xla_tensors)
    # _maybe_convert_to_cpu syncs pending work and copies all tensors in one call (what xm.save uses);
    # it converts plain tensors only, hence detach() (a Parameter is a subclass).
    copies = dict(zip(ids, xm._maybe_convert_to_cpu([xla_tensors[i].detach() for i in ids])))

    def convert(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return copies.get(id(node), node)
        if isinstance(node, dict):
            converted = type(node)((k, convert(v)) for k, v in node.items())
            if hasattr(node, "_metadata"):  # Module.state_dict's version info, used by load_state_dict
                converted._metadata = node._metadata
            return converted
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(*(convert(v) for v in node))
        if isinstance(node, (list, tuple)):
            return type(node)(convert(v) for v in node)
        return node

    return convert(tree)


def _has_own_position(loader: DataLoader) -> bool:
    """An iterable dataset that checkpoints its own position (read in the main thread, one batch at a time)."""
    dataset = loader.dataset
    return (isinstance(dataset, IterableDataset) and loader.num_workers == 0
            and callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None)))


class _XLADeviceLoader(DataLoader):
    """A prepared DataLoader whose iterator yields batches already on the XLA device.

    It shares the prepared loader's sampler, generator and dataset (so epoch seeding, O(1) resume and
    ``len`` work unchanged) and iterates that loader through torch_xla's ``ParallelLoader`` (background
    upload; the graph is cut before each batch) or, inline, in this thread.
    """

    @classmethod
    def wrap(cls, cpu_loader: DataLoader, device: torch.device, background: bool,
             parallel_kwargs: dict[str, Any]) -> _XLADeviceLoader:
        loader = cls.__new__(cls)
        loader.__dict__.update(vars(cpu_loader))  # DataLoader.__init__ must not run again
        loader.__dict__.update(_kiln_cpu_loader=cpu_loader, _kiln_device=device, _kiln_background=background,
                               _kiln_parallel_kwargs=parallel_kwargs, _kiln_parallel=None)
        return loader

    def __iter__(self) -> Any:
        self.close()
        if not self._kiln_background:
            return _inline_batches(self._kiln_cpu_loader, self._kiln_device)
        import torch_xla.distributed.parallel_loader as pl

        self._kiln_parallel = pl.ParallelLoader(self._kiln_cpu_loader, [self._kiln_device],
                                                **self._kiln_parallel_kwargs)
        return self._kiln_parallel.per_device_loader(self._kiln_device)

    def close(self) -> None:
        """Stop the background upload of an epoch that was not read to its end."""
        parallel, self._kiln_parallel = self._kiln_parallel, None
        if parallel is not None:
            parallel.close()


def _inline_batches(cpu_loader: DataLoader, device: torch.device) -> Any:
    import torch_xla

    for batch in cpu_loader:
        torch_xla.sync()  # the cut ParallelLoader makes before each batch, first included (see the module doc)
        yield move_data_to_device(batch, device)
