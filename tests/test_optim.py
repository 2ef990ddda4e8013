"""configure_optimizers in every contract form, its refusals, and LR scheduler stepping during fit."""

from __future__ import annotations

import pytest
import torch

from framework.exceptions import MisconfigurationException
from framework.optim import LRSchedulerConfig, parse_optimizers, step_schedulers


def make_opt(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def step_lr(opt, gamma=0.5):
    return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=gamma)


# ---- parsing ------------------------------------------------------------------------------------------
def test_single_optimizer():
    opt = make_opt()
    assert parse_optimizers(opt) == ([opt], [])


@pytest.mark.parametrize("container", [list, tuple])
def test_several_optimizers(container):
    a, b = make_opt(), make_opt()
    assert parse_optimizers(container([a, b])) == ([a, b], [])


@pytest.mark.parametrize("as_list", [True, False])
def test_optimizers_and_schedulers_tuple(as_list):
    a, b = make_opt(), make_opt()
    sa, sb = step_lr(a), step_lr(b)
    optimizers, configs = parse_optimizers(([a, b], [sb, sa]) if as_list else ([a], sa))
    assert optimizers == ([a, b] if as_list else [a])
    expected = [(sb, 1), (sa, 0)] if as_list else [(sa, 0)]
    assert [(c.scheduler, c.optimizer_index) for c in configs] == expected
    assert all(c.interval == "epoch" and c.frequency == 1 for c in configs)  # Lightning's defaults


def test_dict_forms():
    opt = make_opt()
    assert parse_optimizers({"optimizer": opt}) == ([opt], [])
    sched = step_lr(opt)
    _, [config] = parse_optimizers({"optimizer": opt, "lr_scheduler": sched})
    assert config.scheduler is sched and config.interval == "epoch"
    _, [config] = parse_optimizers({"optimizer": opt, "lr_scheduler": {
        "scheduler": sched, "interval": "step", "frequency": 3, "name": "warmup", "strict": False}})
    assert (config.interval, config.frequency, config.name, config.strict) == ("step", 3, "warmup", False)


def test_list_of_dicts_binds_each_scheduler_to_its_optimizer():
    a, b = make_opt(), make_opt()
    sb = step_lr(b)
    optimizers, [config] = parse_optimizers([{"optimizer": a}, {"optimizer": b, "lr_scheduler": sb}])
    assert optimizers == [a, b] and config.optimizer_index == 1


def test_plateau_monitor_from_outer_or_inner_dict():
    opt = make_opt()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    _, [config] = parse_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "val_loss"})
    assert config.monitor == "val_loss" and config.needs_metric
    _, [config] = parse_optimizers({"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "acc"}})
    assert config.monitor == "acc"


def test_prebuilt_config_is_accepted():
    opt = make_opt()
    config = LRSchedulerConfig(step_lr(opt), interval="step")
    assert parse_optimizers(([opt], [config]))[1] == [config]


def _foreign_scheduler():
    opt = make_opt()
    return {"optimizer": opt, "lr_scheduler": step_lr(make_opt())}


# (what configure_optimizers returned, expected error type, words the message must contain)
BAD_RESULTS = [
    ("none", lambda: None, TypeError, ["returned None", "must return an optimizer"]),
    ("empty list", lambda: [], ValueError, ["empty list"]),
    ("empty tuple", lambda: (), ValueError, ["empty tuple"]),
    ("string", lambda: "adam", TypeError, ["returned str", "must return an optimizer"]),
    ("module", lambda: torch.nn.Linear(1, 1), TypeError, ["Linear", "must return an optimizer"]),
    ("params", lambda: [torch.nn.Parameter(torch.zeros(1))], TypeError, ["must return an optimizer"]),
    ("opt and sched flat", lambda: (lambda o: (o, step_lr(o)))(make_opt()), TypeError, ["tuple"]),
    ("mixed list", lambda: [make_opt(), "x"], TypeError, ["must return an optimizer"]),
    ("non-optimizer in tuple", lambda: (["sgd"], []), TypeError, ["str 'sgd'", "where an optimizer was expected"]),
    ("dict without optimizer", lambda: {"lr_scheduler": None}, ValueError, ["keys ['lr_scheduler']", '"optimizer"']),
    ("misspelt key", lambda: {"optimizer": make_opt(), "scheduler": 1}, ValueError, ["'scheduler'", "lr_scheduler"]),
    ("dict optimizer not an optimizer", lambda: {"optimizer": "sgd"}, TypeError, ["str 'sgd'"]),
    ("not a scheduler", lambda: (lambda o: ([o], ["cosine"]))(make_opt()), TypeError, ["'cosine'",
                                                                                       "not an LR scheduler"]),
    ("foreign optimizer", _foreign_scheduler, ValueError, ["did not return", "from one of the returned"]),
    ("scheduler dict without scheduler", lambda: {"optimizer": make_opt(), "lr_scheduler": {"interval": "step"}},
     ValueError, ['needs a "scheduler" key', "['interval']"]),
    ("unknown scheduler key", lambda: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o), "every": 2}})(make_opt()), ValueError, ["['every']", "frequency"]),
    ("bad interval", lambda: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o), "interval": "batch"}})(make_opt()), ValueError, ["interval='batch'", '"step"']),
    ("bad frequency", lambda: (lambda o: {"optimizer": o, "lr_scheduler": {
        "scheduler": step_lr(o), "frequency": 0}})(make_opt()), ValueError, ["frequency=0", "int >= 1"]),
    ("plateau without monitor", lambda: (lambda o: {"optimizer": o, "lr_scheduler":
                                                    torch.optim.lr_scheduler.ReduceLROnPlateau(o)})(make_opt()),
     ValueError, ["ReduceLROnPlateau needs a metric", '"monitor"']),
]


@pytest.mark.parametrize(("result", "error", "words"), [b[1:] for b in BAD_RESULTS], ids=[b[0] for b in BAD_RESULTS])
def test_wrong_shapes_are_refused(result, error, words):
    with pytest.raises(error) as info:
        parse_optimizers(result())
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_wrong_shape_from_module_fails_fit(make_trainer, tiny_module_cls, make_loader):
    class Bad(tiny_module_cls):
        def configure_optimizers(self):
            return {"optimizer": torch.optim.SGD(self.parameters(), lr=0.1), "lr_scheduler": {"interval": "step"}}

    with pytest.raises(ValueError, match='needs a "scheduler" key'):
        make_trainer().fit(Bad(), make_loader())


# ---- stepping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("interval", "frequency", "count", "steps"), [
    ("step", 1, 6, 6), ("step", 2, 6, 3), ("step", 4, 6, 1), ("epoch", 1, 3, 3), ("epoch", 3, 6, 2)])
def test_step_schedulers_honours_interval_and_frequency(interval, frequency, count, steps):
    opt = make_opt()
    configs = [LRSchedulerConfig(step_lr(opt), interval=interval, frequency=frequency)]
    opt.step()  # no gradients, no change; avoids torch's "scheduler before optimizer" warning
    other = "epoch" if interval == "step" else "step"
    for n in range(1, count + 1):
        step_schedulers(configs, interval, n)
        step_schedulers(configs, other, n)  # the other interval never advances this scheduler
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5**steps)


def test_skipped_step_holds_back_step_schedulers_only():
    opt = make_opt()
    by_step = LRSchedulerConfig(step_lr(opt), interval="step")
    step_schedulers([by_step], "step", 1, skipped=True)
    assert opt.param_groups[0]["lr"] == 1.0


def test_plateau_strictness():
    opt = make_opt()
    config = LRSchedulerConfig(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), monitor="val_loss")
    with pytest.raises(RuntimeError, match=r"monitors 'val_loss', which was not logged; available: \['loss'\]"):
        step_schedulers([config], "epoch", 1, {"loss": torch.tensor(1.0)})
    config.strict = False
    step_schedulers([config], "epoch", 1, {"loss": torch.tensor(1.0)})  # skipped silently


def _scheduled_module(base, spec, lr=1.0):
    class M(base):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=lr)
            return spec(opt)

    return M()


@pytest.mark.parametrize(("spec", "epochs", "accumulate", "expected_steps"), [
    # 5 batches per epoch
    (lambda o: {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "interval": "step"}}, 2, 1, 10),
    (lambda o: {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "interval": "step", "frequency": 3}},
     2, 1, 3),
    # With accumulation a step scheduler follows optimizer steps (3 per epoch: 2+2+1), not batches.
    (lambda o: {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "interval": "step"}}, 2, 2, 6),
    (lambda o: {"optimizer": o, "lr_scheduler": step_lr(o)}, 3, 1, 3),
    (lambda o: ([o], [step_lr(o)]), 3, 1, 3),
    (lambda o: {"optimizer": o, "lr_scheduler": {"scheduler": step_lr(o), "frequency": 2}}, 5, 1, 2),
])
def test_fit_steps_schedulers(make_trainer, tiny_module_cls, make_loader, spec, epochs, accumulate, expected_steps):
    module = _scheduled_module(tiny_module_cls, spec, lr=1e-3)
    trainer = make_trainer(max_epochs=epochs, accumulate_grad_batches=accumulate)
    trainer.fit(module, make_loader(20, batch_size=4))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**expected_steps)


@pytest.mark.parametrize(("improving", "expected_lr"), [(True, 1e-3), (False, 1e-3 * 0.5**2)])
def test_fit_reduce_lr_on_plateau_reads_validation_metric(make_trainer, tiny_module_cls, make_loader, improving,
                                                          expected_lr):
    class M(tiny_module_cls):
        def validation_step(self, batch, batch_idx):
            self.log("val_metric", 10.0 - self.current_epoch if improving else 1.0)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1e-3)
            plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "val_metric"}}

    trainer = make_trainer(max_epochs=3)
    trainer.fit(M(), make_loader(), make_loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr)


def test_fit_plateau_on_missing_metric_names_it(make_trainer, tiny_module_cls, make_loader):
    class M(tiny_module_cls):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=1e-3)
            return {"optimizer": opt, "monitor": "val_acc",
                    "lr_scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt)}

    with pytest.raises(RuntimeError, match="'val_acc', which was not logged.*val_loss"):
        make_trainer().fit(M(), make_loader(), make_loader())


def test_schedulers_follow_lightnings_rules_for_custom_and_manual_use():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Custom:  # not a torch scheduler, but stateful
        def __init__(self):
            self.n = 0

        def step(self, metric=None):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    with pytest.raises(TypeError, match="override the module's lr_scheduler_step"):
        parse_optimizers(([opt], [Custom()]))
    with pytest.raises(MisconfigurationException, match="doesn't follow PyTorch's LRScheduler"):  # Lightning's
        parse_optimizers(([opt], [Custom()]))
    assert parse_optimizers(([opt], [Custom()]), custom_step=True)[1][0].scheduler.n == 0
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a metric"):
        parse_optimizers(([opt], [plateau]))
    parse_optimizers(([opt], [plateau]), automatic=False)  # manual optimization: the user steps it
    with pytest.warns(RuntimeWarning, match=r"\['monitor'\], but the keys will be ignored.*manual optimization"):
        parse_optimizers({"optimizer": opt, "lr_scheduler": plateau, "monitor": "loss"}, automatic=False)
