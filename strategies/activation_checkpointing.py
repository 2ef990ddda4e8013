"""Activation checkpointing for sharded strategies (``activation_checkpointing_policy``, Lightning's name).

Matching modules recompute their forward during backward instead of keeping activations. The
recomputation wraps ``forward`` on the instance (non-reentrant ``torch.utils.checkpoint``), so module
hooks (FSDP's) stay outside, state-dict keys do not change (no ``_checkpoint_wrapped_module.``) and a
later ``torch.compile`` of the block traces the checkpointed forward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

Policy = set[type[nn.Module]] | Callable[[nn.Module], bool] | None


def policy_matcher(policy: Policy, argument: str = "activation_checkpointing_policy"
                   ) -> Callable[[nn.Module], bool] | None:
    """``None`` | a set/list of module classes | ``callable(module) -> bool`` → a predicate (or None)."""
    if policy is None:
        return None
    if isinstance(policy, (set, frozenset, list, tuple)):
        classes = tuple(policy)
        if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"{argument}={policy!r} must hold nn.Module subclasses, e.g. {{TransformerBlock}}.")
        return lambda module: isinstance(module, classes)
    if callable(policy) and not isinstance(policy, type):
        return policy
    raise TypeError(f"{argument}={policy!r} is not valid; pass None, a set of nn.Module classes (e.g. "
                    "{TransformerBlock}) or callable(module) -> bool.")


def apply_activation_checkpointing(root: nn.Module, match: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """Checkpoint the forward of every outermost submodule of ``root`` that ``match`` selects."""
    done: list[nn.Module] = []
    inside: set[int] = set()
    for module in root.modules():
        if module is root or id(module) in inside or not match(module):
            continue
        if not getattr(module, "_kiln_checkpointed", False):
            module.forward = _checkpointed(module.forward)
            object.__setattr__(module, "_kiln_checkpointed", True)
        done.append(module)
        inside.update(id(m) for m in module.modules())
    return done


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
