"""Profilers: selection by name, the simple/advanced reports, the torch.profiler trace file, the no-op default."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from conftest import TinyModule

from framework.profiler import (
    AdvancedProfiler,
    PassThroughProfiler,
    Profiler,
    PyTorchProfiler,
    SimpleProfiler,
    resolve_profiler,
)


@pytest.mark.parametrize(("arg", "cls"), [(None, PassThroughProfiler), ("simple", SimpleProfiler),
                                          ("advanced", AdvancedProfiler), ("pytorch", PyTorchProfiler),
                                          ("Simple", SimpleProfiler)])
def test_resolve_by_name(arg, cls):
    assert type(resolve_profiler(arg)) is cls


def test_resolve_instance_and_refusals():
    mine = SimpleProfiler()
    assert resolve_profiler(mine) is mine
    with pytest.raises(ValueError, match="'simple', 'advanced', 'pytorch'"):
        resolve_profiler("fast")
    with pytest.raises(ValueError, match="xla"):
        resolve_profiler("xla")
    with pytest.raises(TypeError, match="`profiler`"):
        resolve_profiler(3)


def test_named_profiler_falls_back_to_trainer_root(tmp_path):
    profiler = resolve_profiler("simple", str(tmp_path))
    profiler.setup("fit", log_dir=None)
    assert profiler.dirpath == str(tmp_path)
    profiler = resolve_profiler("simple", str(tmp_path))
    profiler.setup("fit", log_dir=str(tmp_path / "logs"))
    assert profiler.dirpath == str(tmp_path / "logs")


def test_pass_through_costs_nothing():
    profiler = PassThroughProfiler()
    assert profiler.profile("a") is profiler.profile("b")  # one shared nullcontext: no allocation per call
    with profiler.profile("a"):
        pass
    assert profiler.summary() == ""
    assert not profiler.enabled and SimpleProfiler().enabled


def test_simple_profiler_times_actions_and_reports():
    profiler = SimpleProfiler()
    profiler.setup("fit")
    for _ in range(3):
        with profiler.profile("run_training_batch"):
            time.sleep(0.01)
    with profiler.profile("save_checkpoint"):
        pass
    durations = profiler.recorded_durations["run_training_batch"]
    assert len(durations) == 3 and all(d >= 0.01 for d in durations)
    report = profiler.summary()
    lines = report.splitlines()
    assert lines[0] == "FIT Profiler Report"
    assert "Mean duration (s)" in report and "Num calls" in report and "Percentage %" in report
    rows = [line for line in lines if line.startswith("|  run_training_batch") or line.startswith("|  save_")]
    assert rows[0].startswith("|  run_training_batch")  # sorted by total time, longest first
    assert rows[0].split("|")[3].strip() == "3"


def test_simple_profiler_not_extended_and_misuse():
    profiler = SimpleProfiler(extended=False)
    with profiler.profile("a"):
        pass
    assert "Num calls" not in profiler.summary() and "|  a" in profiler.summary()
    profiler.start("b")
    with pytest.raises(ValueError, match="already started"):
        profiler.start("b")
    with pytest.raises(ValueError, match="never started"):
        profiler.stop("c")


def test_describe_writes_report_file(tmp_path, capsys):
    profiler = SimpleProfiler(filename="perf")
    profiler.setup("fit", local_rank=None, log_dir=str(tmp_path))
    with profiler.profile("step"):
        pass
    profiler.describe()
    assert (tmp_path / "fit-perf.txt").read_text().startswith("FIT Profiler Report")
    assert capsys.readouterr().out == ""
    printed = SimpleProfiler()
    with printed.profile("step"):
        pass
    printed.describe()  # no filename: printed on local rank 0
    assert "Profiler Report" in capsys.readouterr().out
    ranked = SimpleProfiler(dirpath=tmp_path, filename="perf")
    ranked.setup("test", local_rank=1)
    with ranked.profile("step"):
        pass
    ranked.describe()
    assert (tmp_path / "test-perf-1.txt").exists()


def _work() -> float:
    return sum(i * i for i in range(2000))


def test_advanced_profiler_reports_functions(tmp_path):
    profiler = AdvancedProfiler(dirpath=tmp_path, filename="adv", dump_stats=True)
    profiler.setup("fit")
    for _ in range(2):
        with profiler.profile("run_training_batch"):
            _work()
    report = profiler.summary()
    assert "Profile stats for: run_training_batch" in report
    assert "_work" in report
    assert (tmp_path / "fit-adv-run_training_batch.prof").exists()
    with profiler.profile("run_fit"):
        with profiler.profile("run_training_batch"):  # nested: the outer action pauses, no clash
            _work()
        _work()
    assert "_work" in profiler.summary().split("Profile stats for: run_fit")[1]
    with pytest.raises(ValueError, match="line_count_restriction"):
        AdvancedProfiler(line_count_restriction=0)


def test_pytorch_profiler_writes_trace(tmp_path):
    profiler = PyTorchProfiler(dirpath=tmp_path, filename="torch", row_limit=5)
    profiler.setup("fit")
    model = torch.nn.Linear(4, 2)
    for _ in range(2):
        with profiler.profile("run_training_batch"):
            model(torch.randn(3, 4)).sum().backward()
    report = profiler.summary()
    assert "run_training_batch" in report and "[module]Linear" in report
    with open(profiler.trace_path) as f:
        names = {event.get("name") for event in json.load(f)["traceEvents"]}
    assert os.path.basename(profiler.trace_path) == "fit-torch.pt.trace.json"
    assert {"run_training_batch", "[module]Linear", "aten::addmm"} <= names
    assert torch.nn.modules.module._global_forward_pre_hooks == {}  # module-name hooks removed at the end


def test_pytorch_profiler_argument_checks():
    with pytest.raises(ValueError, match="on_trace_ready"):
        PyTorchProfiler(on_trace_ready=lambda p: None)
    with pytest.raises(ValueError, match="sort_by_key"):
        PyTorchProfiler(table_kwargs={"sort_by": "cpu_time"})


def test_custom_profiler_subclass():
    class Counting(Profiler):
        def __init__(self):
            super().__init__()
            self.events = []

        def start(self, action_name):
            self.events.append(("start", action_name))

        def stop(self, action_name):
            self.events.append(("stop", action_name))

    profiler = resolve_profiler(Counting())
    with pytest.raises(RuntimeError):
        with profiler.profile("x"):
            raise RuntimeError  # stop runs even when the block fails
    assert profiler.events == [("start", "x"), ("stop", "x")]


@pytest.mark.parametrize("name", ["simple", "advanced", "pytorch"])
def test_report_survives_teardown_until_described(name, tmp_path, capsys):
    profiler = resolve_profiler(name, str(tmp_path))
    profiler.setup("fit")
    with profiler.profile("run_training_batch"):
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
    profiler.teardown("fit")  # the Trainer may tear down before describing
    profiler.describe()
    out = capsys.readouterr().out
    assert "FIT Profiler Report" in out and "run_training_batch" in out
    profiler.describe()  # described once: the next stage starts afresh
    assert capsys.readouterr().out == ""


# ---- through a real Trainer ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["simple", "advanced", "pytorch"])
def test_trainer_profiler_reports_lightning_actions(make_trainer, make_loader, capsys, name):
    trainer = make_trainer(max_epochs=1, profiler=name)
    trainer.fit(TinyModule(), make_loader(), make_loader())
    out = capsys.readouterr().out
    assert "FIT Profiler Report" in out
    assert "run_training_batch" in out


def test_trainer_profiler_off_by_default(make_trainer, make_loader, capsys):
    from framework.profiler import PassThroughProfiler

    trainer = make_trainer(max_epochs=1)
    trainer.fit(TinyModule(), make_loader())
    assert isinstance(trainer.profiler, PassThroughProfiler)
    assert "Profiler Report" not in capsys.readouterr().out


def test_pytorch_profiler_trace_under_log_dir(make_trainer, make_loader, tmp_path):
    from framework.profiler import PyTorchProfiler

    profiler = PyTorchProfiler(filename="perf")
    make_trainer(max_epochs=1, profiler=profiler).fit(TinyModule(), make_loader())
    assert profiler.trace_path is not None and os.path.exists(profiler.trace_path)
    assert os.path.basename(profiler.trace_path) == "fit-perf.pt.trace.json"


def test_failed_fit_ends_the_torch_profiler(make_trainer, make_loader):
    import torch

    class Fails(TinyModule):
        def training_step(self, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    with pytest.raises(RuntimeError, match="boom"):
        make_trainer(max_epochs=1, profiler="pytorch").fit(Fails(), make_loader())
    assert torch.nn.modules.module._global_forward_pre_hooks == {}
    assert torch.autograd.profiler._is_profiler_enabled is False
