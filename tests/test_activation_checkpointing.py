"""strategies.activation_checkpointing: recomputation in backward, same gradients, unchanged state-dict keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strategies.activation_checkpointing import apply_activation_checkpointing, policy_matcher


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.lin(x))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.Sequential(Block(), Block()), nn.Linear(4, 1))


@pytest.mark.parametrize("policy", [{Block}, lambda m: isinstance(m, Block)])
def test_checkpointed_blocks_recompute_and_give_the_same_gradients(policy):
    plain, checkpointed = _model(), _model()
    keys = list(checkpointed.state_dict())
    done = apply_activation_checkpointing(checkpointed, policy_matcher(policy))
    assert len(done) == 3 and list(checkpointed.state_dict()) == keys  # no wrapper prefix in the keys
    x = torch.randn(5, 4)
    for model in (plain, checkpointed):
        model(x).sum().backward()
    blocks = [m for m in checkpointed.modules() if isinstance(m, Block)]
    assert [b.calls for b in blocks] == [2, 2, 2]  # forward, then the recomputation in backward
    for p, q in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_applying_twice_does_not_nest():
    model = _model()
    apply_activation_checkpointing(model, policy_matcher({Block}))
    apply_activation_checkpointing(model, policy_matcher({Block}))
    model(torch.randn(2, 4)).sum().backward()
    assert model[0].calls == 2


@pytest.mark.parametrize("policy, match", [(42, "42"), ({int}, "nn.Module subclasses"), (set(), "nn.Module"),
                                           (Block, "not valid")])
def test_bad_policies_name_the_argument(policy, match):
    with pytest.raises(TypeError, match=f"activation_checkpointing_policy.*{match}"):
        policy_matcher(policy)
