"""ModelSummary: Lightning's table (golden text), depth, in/out sizes, modes, leftovers, and the callback."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.model_summary import ModelSummary as ModelSummaryCallback
from framework import Trainer, TrainModule
from framework.model_summary import ModelSummary, human_readable_count, summarize


class Net(nn.Module):
    def __init__(self, example: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 512), nn.BatchNorm1d(512))
        if example:
            self.example_input_array = torch.zeros(10, 256)

    def forward(self, x):
        return self.net(x)


GOLDEN_DEPTH_1 = """\
  | Name | Type       | Params | Mode  | In sizes  | Out sizes
--------------------------------------------------------------------
0 | net  | Sequential | 132 K  | train | [10, 256] | [10, 512]
--------------------------------------------------------------------
132 K     Trainable params
0         Non-trainable params
132 K     Total params
0.530     Total estimated model params size (MB)
3         Modules in train mode
0         Modules in eval mode"""

GOLDEN_ALL = """\
  | Name  | Type        | Params | Mode  | In sizes  | Out sizes
----------------------------------------------------------------------
0 | net   | Sequential  | 132 K  | train | [10, 256] | [10, 512]
1 | net.0 | Linear      | 131 K  | train | [10, 256] | [10, 512]
2 | net.1 | BatchNorm1d | 1.0 K  | train | [10, 512] | [10, 512]
----------------------------------------------------------------------
132 K     Trainable params
0         Non-trainable params
132 K     Total params
0.530     Total estimated model params size (MB)
3         Modules in train mode
0         Modules in eval mode"""


def test_golden_tables():  # the text of Lightning's documented example
    model = Net()
    assert str(summarize(model)) == GOLDEN_DEPTH_1
    assert str(summarize(model, max_depth=-1)) == GOLDEN_ALL
    assert model.training and model.net[1].training  # the example forward ran in eval mode, then restored


def test_without_example_input_frozen_and_eval_layers():
    model = Net(example=False)
    model.net[0].requires_grad_(False)
    model.net[1].eval()
    summary = summarize(model, max_depth=2)
    assert summary.layer_names == ["net", "net.0", "net.1"]
    assert summary.param_nums == [132608, 131584, 1024] and summary.trainable_parameters == 1024
    text = str(summary)
    assert "In sizes" not in text
    assert "131 K     Non-trainable params" in text
    assert "1         Modules in eval mode" in text and "2         Modules in train mode" in text
    assert summarize(model, max_depth=1).layer_names == ["net"]
    assert summarize(model, max_depth=0).layer_names == []


def test_half_precision_size_and_leftover_params():
    model = nn.Module()
    model.layer = nn.Linear(1000, 1000).half()
    model.scale = nn.Parameter(torch.ones(10))  # owned by the root: listed as "other params"
    summary = summarize(model)
    assert summary.model_size == pytest.approx((1001000 * 2 + 10 * 4) / 1e6)
    assert "  | other params | n/a " in str(summary)


def test_multiple_inputs_and_unknown_sizes():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.unused = nn.Linear(3, 2), nn.Linear(2, 2)
            self.example_input_array = (torch.zeros(4, 3), torch.zeros(4, 2))

        def forward(self, x, y):
            return self.a(x) + y

    summary = summarize(Two())
    assert summary.in_sizes == [[4, 3], "?"] and summary.out_sizes == [[4, 2], "?"]


@pytest.mark.parametrize(("n", "text"), [(0, "0  "), (123, "123  "), (1234, "1.2 K"), (2e6, "2.0 M"),
                                         (3e9, "3.0 B"), (4e14, "400 T"), (5e15, "5,000 T")])
def test_human_readable_count(n, text):
    assert human_readable_count(n) == text


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_depth"):
        ModelSummary(Net(), max_depth=-2)
    with pytest.raises(ValueError, match="max_depth"):
        ModelSummaryCallback(max_depth="1")
    with pytest.raises(TypeError, match="header_style"):
        ModelSummaryCallback(header_style="bold")


class Module(TrainModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.example_input_array = torch.zeros(2, 4)

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_prints_at_fit_start(tmp_path, capsys):
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    trainer = Trainer(max_steps=1, callbacks=[ModelSummaryCallback(max_depth=-1)], logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(Module(), DataLoader(data, batch_size=4))
    out = capsys.readouterr().out
    assert "0 | body | Linear | 40     | train | [2, 4]   | [2, 8]" in out
    assert "1 | head | Linear | 9      | train | [2, 8]   | [2, 1]" in out
    assert "49        Total params" in out


@pytest.mark.parametrize(("name", "kiln_way"), [("RichModelSummary", "ModelSummary"),
                                                ("RichProgressBar", "TQDMProgressBar")])
def test_lightning_rich_callbacks_name_the_kiln_way(name, kiln_way):
    import callbacks

    with pytest.raises(ImportError, match=kiln_way):
        getattr(callbacks, name)


def test_model_summary_printed_when_enabled(make_trainer, make_loader, capsys):
    make_trainer(max_epochs=1, enable_model_summary=True).fit(TinyModule(), make_loader())  # Trainer default
    out = capsys.readouterr().out
    assert "0 | layer | Linear | 5      | train" in out and "5         Total params" in out
    make_trainer(max_epochs=1, enable_model_summary=False).fit(TinyModule(), make_loader())
    assert "Total params" not in capsys.readouterr().out
