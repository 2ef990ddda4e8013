"""KilnCLI (framework/cli): the real CLI in subprocesses (config files, overrides, class paths, print_config
round trip, resume with --ckpt_path last, bad keys), plus run=False and the key-suggestion helper in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonargparse")

from framework.cli import KilnCLI, LightningCLI  # noqa: E402
from framework.cli.parser import closest_key_hint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "cli_run.py"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.num_sanity_val_steps=0", "--seed_everything=0"]


def cli(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "CLI_REPORT": str(tmp_path / "report.json"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "report.json").read_text())


def test_configs_overrides_class_paths_print_config_round_trip_and_resume(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "default_root_dir": str(tmp_path / "run")},
        "model": {"hidden": 4, "lr": 0.5}, "data": {"batch_size": 8}}))
    (tmp_path / "later.yaml").write_text(yaml.safe_dump({"model": {"lr": 0.25}}))  # merged after base.yaml
    printed = cli(tmp_path, "fit", "--config", "base.yaml", "--config", "later.yaml", *QUIET,
                  "--model.hidden=6", "--optimizer=Adam", "--optimizer.lr=0.01",
                  "--lr_scheduler=StepLR", "--lr_scheduler.step_size=2",
                  "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true",
                  "--trainer.callbacks+=callbacks.LearningRateMonitor", "--print_config").stdout
    config = yaml.safe_load(printed)
    assert config["model"] == {"hidden": 6, "lr": 0.25}
    assert config["optimizer"]["class_path"] == "torch.optim.Adam"
    assert config["lr_scheduler"]["init_args"]["step_size"] == 2
    assert [c["class_path"] for c in config["trainer"]["callbacks"]] == [
        "callbacks.ModelCheckpoint", "callbacks.LearningRateMonitor"]
    assert not (tmp_path / "run").exists()  # --print_config only prints
    (tmp_path / "printed.yaml").write_text(printed)
    assert yaml.safe_load(cli(tmp_path, "fit", "--config", "printed.yaml", "--print_config").stdout) == config

    cli(tmp_path, "fit", "--config", "printed.yaml")
    first = report(tmp_path)
    assert first["hidden"] == 6 and first["lr"] == 0.25 and first["batch_size"] == 8
    assert first["optimizer"] == "Adam" and first["optimizer_lr"] == 0.01 and first["schedulers"] == ["StepLR"]
    assert {"ModelCheckpoint", "LearningRateMonitor", "SaveConfigCallback"} <= set(first["callbacks"])
    assert first["global_step"] == 2 and first["loaded_config"] is None
    saved = yaml.safe_load((Path(first["log_dir"]) / "config.yaml").read_text())
    assert saved["model"] == config["model"] and saved["trainer"]["max_epochs"] == 1

    cli(tmp_path, "fit", "--config", "printed.yaml", "--trainer.max_epochs=3", "--ckpt_path", "last")
    resumed = report(tmp_path)
    assert resumed["global_step"] == 6  # 2 steps per epoch, epochs 2 and 3 only
    assert resumed["loaded_config"]["model"] == config["model"]  # stored with the checkpoint as data
    assert resumed["loaded_config"]["optimizer"]["class_path"] == "torch.optim.Adam"
    assert resumed["log_dir"] != first["log_dir"]


@pytest.mark.parametrize(("args", "config", "expected"), [
    (["--trainer.max_epocs=1"], None, "did you mean '--trainer.max_epochs'"),
    (["--config", "bad.yaml"], {"model": {"hiden": 3}}, "did you mean '--model.hidden'"),
])
def test_an_unknown_key_names_the_closest_valid_one(tmp_path, args, config, expected):
    if config is not None:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    result = cli(tmp_path, "fit", *args, check=False)
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr[-3000:]


def test_run_false_builds_without_running(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from cli_run import Points, Regressor
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.warns(UserWarning, match="configure_optimizers` is replaced by the CLI"):  # never silent
        built = LightningCLI(Regressor, Points, run=False, args=[
            "--trainer.max_epochs=2", f"--trainer.default_root_dir={tmp_path}", "--trainer.precision=bf16-mixed",
            "--model.lr=1e-3", "--data.size=8", "--optimizer=SGD", "--optimizer.lr=0.3", "--seed_everything=5"])
    assert LightningCLI is KilnCLI and built.subcommand is None
    assert built.trainer.max_epochs == 2 and built.model.lr == 1e-3 and built.datamodule.size == 8
    assert built.config["seed_everything"] == 5 and built.config["trainer"]["precision"] == "bf16-mixed"
    optimizer = built.model.configure_optimizers()
    assert isinstance(optimizer, __import__("torch").optim.SGD) and optimizer.defaults["lr"] == 0.3
    assert built.trainer.global_step == 0 and not (tmp_path / "checkpoints").exists()


def test_subclass_mode_takes_the_module_by_class_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    from framework import TrainModule

    args = ["--model=cli_run.Regressor", "--model.hidden=3", "--trainer.max_steps=1", "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path}"]
    for built in (LightningCLI(TrainModule, subclass_mode_model=True, run=False, args=args),
                  LightningCLI(run=False, args=args)):  # no class: any TrainModule by class path
        assert type(built.model).__name__ == "Regressor" and built.model.net[0].out_features == 3
        assert built.datamodule is None


def test_closest_key_hint():
    keys = ["trainer.max_epochs", "trainer.max_steps", "model.lr"]
    assert closest_key_hint("unrecognized arguments: --trainer.max_epoch=3", keys).endswith(
        "did you mean '--trainer.max_epochs'?")
    assert closest_key_hint("unrecognized arguments: --zzz=1", keys) == ""


def test_the_digits_example_has_a_cli_entry(tmp_path):
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "digits.py"), "fit", "--trainer.max_epochs=1",
         "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *QUIET,
         f"--trainer.default_root_dir={tmp_path}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    saved = yaml.safe_load(next(tmp_path.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert saved["trainer"]["max_epochs"] == 1 and saved["model"]["lr"] == 3e-3
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.distributed
def test_a_ddp_run_from_the_cli_relaunches_with_the_same_arguments(tmp_path):
    cli(tmp_path, "fit", "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path / 'run'}", *QUIET)
    result = report(tmp_path)  # rank 0's (written last by either rank: both must agree)
    assert result["global_step"] == 2  # 16 samples / 2 ranks / batches of 4
    assert [p.parent.name for p in (tmp_path / "run").rglob("config.yaml")] == ["version_0"]
