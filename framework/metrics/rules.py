"""Where ``self.log`` may be called, and what it does there by default (Lightning 2.x's table).

Each hook that may log has one of three kinds: *per-step* hooks of training (a step value by default),
*per-step* hooks of evaluation (an epoch value by default) — both may log either way — and *epoch* hooks,
which may only log epoch values. Hooks listed with ``None`` run outside any step or epoch (setup,
checkpointing, prediction, data transfer): logging there is an error, as in Lightning.
"""

from __future__ import annotations

from typing import NamedTuple

from framework.exceptions import MisconfigurationException


class LogRule(NamedTuple):
    """Allowed and default ``on_step``/``on_epoch`` values of ``self.log`` inside one hook."""

    allowed_on_step: tuple[bool, ...]
    allowed_on_epoch: tuple[bool, ...]
    default_on_step: bool
    default_on_epoch: bool


TRAIN_STEP = LogRule((False, True), (False, True), True, False)
EVAL_STEP = LogRule((False, True), (False, True), False, True)
EPOCH = LogRule((False,), (True,), False, True)

_TRAIN_STEP_HOOKS = (
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward", "backward",
    "on_after_backward", "on_before_optimizer_step", "optimizer_step", "configure_gradient_clipping",
    "clip_gradients", "on_before_zero_grad", "optimizer_zero_grad",
)
_EVAL_STEP_HOOKS = (
    "validation_step", "test_step", "on_validation_batch_start", "on_validation_batch_end",
    "on_test_batch_start", "on_test_batch_end",
)
_EPOCH_HOOKS = (
    "on_train_start", "on_validation_start", "on_test_start", "on_train_epoch_start", "on_train_epoch_end",
    "on_validation_epoch_start", "on_validation_epoch_end", "on_test_epoch_start", "on_test_epoch_end",
)
_NO_LOGGING_HOOKS = (
    "lr_scheduler_step", "on_fit_start", "on_fit_end", "on_sanity_check_start", "on_sanity_check_end",
    "on_train_end", "on_validation_end", "on_test_end", "on_predict_start", "on_predict_end",
    "on_predict_epoch_start", "on_predict_epoch_end", "on_before_batch_transfer", "transfer_batch_to_device",
    "on_after_batch_transfer", "on_predict_batch_start", "on_predict_batch_end", "on_exception", "state_dict",
    "on_save_checkpoint", "on_load_checkpoint", "load_state_dict", "setup", "teardown", "configure_sharded_model",
    "configure_model", "predict_step", "configure_optimizers", "train_dataloader", "val_dataloader",
    "test_dataloader", "predict_dataloader", "prepare_data", "configure_callbacks", "on_validation_model_zero_grad",
    "on_validation_model_eval", "on_test_model_eval", "on_validation_model_train", "on_test_model_train",
)

RULES: dict[str, LogRule | None] = {
    **{name: TRAIN_STEP for name in _TRAIN_STEP_HOOKS},
    **{name: EVAL_STEP for name in _EVAL_STEP_HOOKS},
    **{name: EPOCH for name in _EPOCH_HOOKS},
    **{name: None for name in _NO_LOGGING_HOOKS},
}


def rule_for(fx: str) -> LogRule:
    """The rule of hook ``fx``; raises where Lightning refuses ``self.log`` (MisconfigurationException, a
    ValueError; RuntimeError for a function that is no hook at all, as there)."""
    try:
        rule = RULES[fx]
    except KeyError:
        raise RuntimeError(f"self.log() was called inside {fx!r}, a function Kiln does not know how to log from; "
                           "log from a step or epoch hook (see framework.metrics.rules.RULES).") from None
    if rule is None:
        raise MisconfigurationException(f"self.log() cannot be called inside {fx}(): it runs outside any step or epoch. Log "
                           "from a step or epoch hook, or write to the logger directly (self.logger.log_metrics or "
                           "self.logger.experiment).")
    return rule


def resolve_levels(fx: str, name: str, on_step: bool | None, on_epoch: bool | None) -> tuple[bool, bool]:
    """``on_step``/``on_epoch`` with the hook's defaults filled in, checked against what the hook allows."""
    rule = rule_for(fx)
    step = rule.default_on_step if on_step is None else on_step
    epoch = rule.default_on_epoch if on_epoch is None else on_epoch
    if step not in rule.allowed_on_step:
        raise MisconfigurationException(f"self.log({name!r}, on_step={step}) is not allowed inside {fx}(): there on_step must be "
                         f"one of {rule.allowed_on_step}.")
    if epoch not in rule.allowed_on_epoch:
        raise MisconfigurationException(f"self.log({name!r}, on_epoch={epoch}) is not allowed inside {fx}(): there on_epoch must "
                         f"be one of {rule.allowed_on_epoch}.")
    if not (step or epoch):
        raise MisconfigurationException(f"self.log({name!r}, on_step=False, on_epoch=False) would log nothing; set one to True.")
    return step, epoch
