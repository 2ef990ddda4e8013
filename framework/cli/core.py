"""KilnCLI: LightningCLI's interface over Kiln's Trainer, built on jsonargparse (the ``kiln[cli]`` extra).

``KilnCLI(Model, Data)`` reads ``fit|validate|test|predict`` plus ``--config`` files and dotted flags,
builds the module, the DataModule and the Trainer from their ``__init__`` type hints, and runs the
subcommand. ``run=False`` only parses and builds (for scripts that call the Trainer themselves).
"""

from __future__ import annotations

import inspect
from types import MethodType
from typing import Any

from framework.cli.save_config import SaveConfigCallback
from framework.trainer import Trainer

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Trainer-method arguments the CLI fills itself, never taken from the command line.
_METHOD_SKIP = {"model", "module", "train_dataloaders", "val_dataloaders", "dataloaders", "datamodule"}


def _parser_class() -> type:
    try:
        from framework.cli.parser import KilnArgumentParser
    except ModuleNotFoundError as err:
        if err.name != "jsonargparse":
            raise
        raise ModuleNotFoundError("KilnCLI needs jsonargparse: pip install 'kiln[cli]'", name="jsonargparse") from err
    return KilnArgumentParser


def _import_builtins() -> None:
    """Load the lazily exported built-in callbacks and loggers, so jsonargparse resolves short class names
    (``--trainer.callbacks+=EarlyStopping``) as Lightning's CLI does."""
    import callbacks
    import framework.loggers

    for package in (callbacks, framework.loggers):
        for name in getattr(package, "__all__", ()):
            getattr(package, name)


def instantiate_class(args: Any, init: dict[str, Any]) -> Any:
    """Build ``init["class_path"]`` with positional ``args`` and ``init["init_args"]`` (Lightning's helper)."""
    import importlib

    path = init["class_path"]
    if "." in path:
        module_name, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name)
    else:  # a short name of a built-in (a logger, profiler, strategy or callback)
        cls = _builtin_by_name(path)
    positional = args if isinstance(args, tuple) else (args,)
    return cls(*positional, **dict(init.get("init_args") or {}))


def _builtin_by_name(name: str) -> type:
    import importlib

    for package in ("framework.loggers", "framework.profiler", "strategies", "callbacks", "framework.precision"):
        found = getattr(importlib.import_module(package), name, None)
        if isinstance(found, type):
            return found
    raise ValueError(f"class_path {name!r} is not a built-in Kiln class: give the full import path "
                     f"(e.g. 'my_package.module.{name}')")


def _instantiate_nested(value: Any) -> Any:
    """Trainer arguments typed ``Any`` (logger, profiler, strategy, plugins) keep jsonargparse's
    ``{"class_path": ..., "init_args": ...}`` dicts; build them here."""
    if isinstance(value, list):
        return [_instantiate_nested(v) for v in value]
    if isinstance(value, dict) and "class_path" in value:
        return instantiate_class((), {"class_path": value["class_path"], "init_args": value.get("init_args")})
    return value


class KilnCLI:
    """Lightning's ``LightningCLI`` for Kiln: same arguments, same attributes (``parser``, ``config``,
    ``config_init``, ``subcommand``, ``model``, ``datamodule``, ``trainer``), same override points
    (``add_arguments_to_parser``, ``before_<subcommand>``/``after_<subcommand>``, ``configure_optimizers``)."""

    def __init__(self, model_class: type | None = None, datamodule_class: type | None = None,
                 save_config_callback: type[SaveConfigCallback] | None = SaveConfigCallback,
                 save_config_kwargs: dict[str, Any] | None = None, trainer_class: type = Trainer,
                 trainer_defaults: dict[str, Any] | None = None, seed_everything_default: bool | int = True,
                 parser_kwargs: dict[str, Any] | None = None, subclass_mode_model: bool = False,
                 subclass_mode_data: bool = False, args: list[str] | dict[str, Any] | None = None,
                 run: bool = True, auto_configure_optimizers: bool = True) -> None:
        if model_class is None and not subclass_mode_model:
            from framework.module import TrainModule
            model_class, subclass_mode_model = TrainModule, True
        if datamodule_class is None and subclass_mode_data:
            from framework.datamodule import DataModule
            datamodule_class = DataModule
        self.model_class, self.datamodule_class = model_class, datamodule_class
        self.subclass_mode_model, self.subclass_mode_data = subclass_mode_model, subclass_mode_data
        self.save_config_callback = save_config_callback
        self.save_config_kwargs = dict(save_config_kwargs or {})
        self.trainer_class = trainer_class
        self.trainer_defaults = dict(trainer_defaults or {})
        self.seed_everything_default = seed_everything_default
        self.auto_configure_optimizers = auto_configure_optimizers
        self.parser_kwargs = dict(parser_kwargs or {})

        self.subcommand: str | None = None
        self.parser = self._build_parser(run)
        self.config = self.parser.parse_object(args) if isinstance(args, dict) else self.parser.parse_args(args)
        if run:
            self.subcommand = self.config["subcommand"]
        self._set_seed()
        self.before_instantiate_classes()
        self.instantiate_classes()
        self.after_instantiate_classes()
        if run:
            self._run_subcommand(self.subcommand)

    # -- parser ---------------------------------------------------------------------------------
    def _new_parser(self, **kwargs: Any) -> Any:
        return _parser_class()(**{**self.parser_kwargs, **kwargs})

    def _build_parser(self, run: bool) -> Any:
        _import_builtins()
        if not run:
            parser = self._new_parser(description="Kiln CLI")
            self._add_arguments(parser)
            return parser
        parser = self._new_parser(description="Kiln CLI")
        commands = parser.add_subcommands(required=True, dest="subcommand")
        self._subcommand_parsers: dict[str, Any] = {}
        for name in SUBCOMMANDS:
            sub = self._new_parser(description=f"Runs Trainer.{name}")
            self._add_arguments(sub)
            skip = _METHOD_SKIP & set(inspect.signature(getattr(self.trainer_class, name)).parameters)
            sub.add_method_arguments(self.trainer_class, name, skip=skip)
            commands.add_subcommand(name, sub, help=f"Runs Trainer.{name}")
            self._subcommand_parsers[name] = sub
        return parser

    def _add_arguments(self, parser: Any) -> None:
        parser.add_argument("--seed_everything", type=bool | int, default=self.seed_everything_default,
                            help="True: a random seed (recorded in the config); an int: that seed; False: none")
        parser.add_class_arguments(self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
                                   sub_configs=True)
        if self.trainer_defaults:
            parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        if self.subclass_mode_model:
            parser.add_subclass_arguments(self.model_class, "model", fail_untyped=False, required=True)
        else:
            parser.add_class_arguments(self.model_class, "model", fail_untyped=False, sub_configs=True)
        if self.datamodule_class is not None:
            if self.subclass_mode_data:
                parser.add_subclass_arguments(self.datamodule_class, "data", fail_untyped=False, required=True)
            else:
                parser.add_class_arguments(self.datamodule_class, "data", fail_untyped=False, sub_configs=True)
        if self.auto_configure_optimizers:
            parser.add_optimizer_args()
            parser.add_lr_scheduler_args()
        self.add_arguments_to_parser(parser)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Override to add arguments or ``parser.link_arguments(...)``."""

    def _parser(self, subcommand: str | None) -> Any:
        return self.parser if subcommand is None else self._subcommand_parsers[subcommand]

    def _get(self, config: Any, key: str, default: Any = None) -> Any:
        return config.get(str(self.subcommand), config).get(key, default)

    # -- instantiation ------------------------------------------------------------------------
    def _set_seed(self) -> None:
        from framework.seed import seed_everything

        cfg = self.config.get(str(self.subcommand), self.config)
        seed = cfg.get("seed_everything")
        if seed is False or seed is None:
            return
        cfg["seed_everything"] = seed_everything(None if seed is True else int(seed))

    def before_instantiate_classes(self) -> None:
        """Override to run code after parsing and before building the classes."""

    def after_instantiate_classes(self) -> None:
        """Override to run code after building the classes."""

    def instantiate_classes(self) -> None:
        parser = self._parser(self.subcommand)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in 4.49
        self.config_init = instantiate(self.config.get(str(self.subcommand), self.config))
        if self.subcommand is not None:
            self.config_init = {self.subcommand: self.config_init}
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model()
        self.trainer = self.instantiate_trainer()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        trainer_init = self._get(self.config_init, "trainer", default={})
        trainer_init = trainer_init.as_dict() if hasattr(trainer_init, "as_dict") else dict(trainer_init)
        config = {k: _instantiate_nested(v) if k != "callbacks" else v for k, v in trainer_init.items()}
        config.update(kwargs)
        callbacks_init = self._get(self.config_init, "trainer", default={}).get("callbacks")
        config["callbacks"] = callbacks_init
        callbacks = config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        extra = self.trainer_defaults.get("callbacks")
        if extra is not None and extra is not config.get("callbacks"):
            callbacks += extra if isinstance(extra, list) else [extra]
        if self.save_config_callback is not None and not config.get("fast_dev_run", False):
            parser = self._parser(self.subcommand)
            callbacks.append(self.save_config_callback(
                parser, self.config.get(str(self.subcommand), self.config), **self.save_config_kwargs))
        config["callbacks"] = callbacks
        return self.trainer_class(**config)

    @staticmethod
    def configure_optimizers(module: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        """What the module's ``configure_optimizers`` returns when ``--optimizer`` is given."""
        if lr_scheduler is None:
            return optimizer
        import torch

        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            monitor = getattr(lr_scheduler, "monitor", None)
            if monitor is None:
                raise ValueError("--lr_scheduler ReduceLROnPlateau needs a metric to monitor: subclass it with a "
                                 "`monitor` attribute, or implement configure_optimizers in the module")
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "monitor": monitor}}
        return [optimizer], [lr_scheduler]

    def _add_configure_optimizers_method_to_model(self) -> None:
        if not self.auto_configure_optimizers or self.model is None:
            return
        optimizer_init = self._get(self.config_init, "optimizer")
        scheduler_init = self._get(self.config_init, "lr_scheduler")
        if not optimizer_init:
            if scheduler_init:
                raise ValueError("--lr_scheduler was given without --optimizer: pass --optimizer=<class path> too, "
                                 "or build the scheduler in the module's configure_optimizers")
            return
        from framework.hooks import overrides
        from framework.module import TrainModule

        if overrides(self.model, "configure_optimizers", TrainModule):
            import warnings

            warnings.warn(f"`{type(self.model).__name__}.configure_optimizers` is replaced by the CLI's "
                          "--optimizer/--lr_scheduler (KilnCLI.configure_optimizers)", stacklevel=2)
        optimizer_init, scheduler_init = _as_dict(optimizer_init), _as_dict(scheduler_init)
        cli = self

        def configure_optimizers(module: Any) -> Any:
            # Built when the Trainer asks (after configure_model/placement), over the module's parameters.
            optimizer = instantiate_class(module.parameters(), optimizer_init)
            scheduler = instantiate_class(optimizer, scheduler_init) if scheduler_init else None
            return cli.configure_optimizers(module, optimizer, scheduler)

        self.model.configure_optimizers = MethodType(configure_optimizers, self.model)

    # -- running -------------------------------------------------------------------------------
    def _run_subcommand(self, subcommand: str) -> None:
        before = getattr(self, f"before_{subcommand}", None)
        if callable(before):
            before()
        kwargs = {k: v for k, v in dict(self.config_init[subcommand]).items()
                  if k in inspect.signature(getattr(self.trainer_class, subcommand)).parameters}
        kwargs["model"] = self.model
        if self.datamodule is not None:
            kwargs["datamodule"] = self.datamodule
        getattr(self.trainer, subcommand)(**kwargs)
        after = getattr(self, f"after_{subcommand}", None)
        if callable(after):
            after()


def _as_dict(init: Any) -> dict[str, Any] | None:
    if not init:
        return None
    plain = init.as_dict() if hasattr(init, "as_dict") else dict(init)
    return {"class_path": plain["class_path"], "init_args": dict(plain.get("init_args") or {})}


LightningCLI = KilnCLI
