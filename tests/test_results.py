"""The validate/test results table: Lightning's plain-text layout, golden text included."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyModule

from framework.results import format_results_table, print_results

BAR = "─" * 60


def test_golden_single_dataloader():
    text = format_results_table([{"val_loss": 0.25, "val_acc": torch.tensor(0.5)}], "validate", width=60)
    assert text.splitlines() == [
        BAR,
        "     Validate metric           DataLoader 0",
        BAR,
        "         val_acc                    0.5",
        "        val_loss                   0.25",
        BAR,
    ]


def test_dataloader_columns_suffix_dropped_and_missing_cells():
    results = [{"test_loss/dataloader_idx_0": 1.5, "shared": 2},
               {"test_loss/dataloader_idx_1": 0.5, "shared": 2, "only_1/dataloader_idx_1": 3.0}]
    lines = format_results_table(results, "test", width=90).splitlines()
    assert lines[1].split() == ["Test", "metric", "DataLoader", "0", "DataLoader", "1"]
    body = {line.split()[0]: line.split()[1:] for line in lines[3:-1]}
    assert body == {"only_1": ["3.0"], "shared": ["2", "2"], "test_loss": ["1.5", "0.5"]}
    only_1 = next(line for line in lines if line.strip().startswith("only_1"))
    assert only_1.index("3.0") > lines[1].index("DataLoader 1")  # the value sits in the second column


def test_columns_that_do_not_fit_continue_in_a_second_table():
    results = [{"loss": float(i)} for i in range(3)]
    text = format_results_table(results, "test", width=60)  # 25-wide cells: one metric column + 1 per table
    headers = [line for line in text.splitlines() if "metric" in line]
    assert [h.split()[-1] for h in headers] == ["0", "1", "2"]


def test_long_metric_names_wrap():
    name = "a" * 40
    lines = format_results_table([{name: 1.0}], "validate", width=60).splitlines()
    assert [line.split() for line in lines[3:-1]] == [["a" * 30, "1.0"], ["a" * 10]]


def test_tensor_lists_and_empty():
    assert format_results_table([{}], "test") == ""
    assert "[1.0, 2.0]" in format_results_table([{"v": torch.tensor([1.0, 2.0])}], "test", width=80)


def test_printed_on_global_zero_only(capsys):
    print_results([{"loss": 1.0}], "test", is_global_zero=False)
    assert capsys.readouterr().out == ""
    print_results([{"loss": 1.0}], "test")
    out = capsys.readouterr().out
    assert "Test metric" in out and "loss" in out
    print_results([{}], "test")
    assert capsys.readouterr().out == ""


# ---- through a real Trainer ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_results_table_printed_unless_quiet(make_trainer, make_loader, capsys, stage):
    trainer = make_trainer()
    module = TinyModule()
    results = getattr(trainer, stage)(module, make_loader())
    out = capsys.readouterr().out
    title = "Validate metric" if stage == "validate" else "Test metric"
    metric = "val_loss" if stage == "validate" else "test_loss"
    assert title in out and "DataLoader 0" in out
    (row,) = [line for line in out.splitlines() if metric in line]
    assert row.split() == [metric, str(results[0][metric])]
    getattr(trainer, stage)(module, make_loader(), verbose=False)
    assert capsys.readouterr().out == ""
