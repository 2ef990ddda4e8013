"""DeepSpeedStrategy: real 2-process DeepSpeed jobs over gloo on CPU, plus config and refusal checks.

The jobs (``tests/distributed/ds_jobs.py``) train through the Trainer; the references here are plain
single-process PyTorch loops on the big batch each optimizer step covers (two ranks of batch B = one
process of batch 2B), compared at 1e-5. Two jobs cover everything, since starting DeepSpeed costs
seconds per process: ``train`` (stages 1–3, accumulation, num_items, clipping, uneven data, bf16,
refusals) and ``resume`` (checkpoint → resume bit-exact under ZeRO-2 and ZeRO-3).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from framework import Trainer
from framework.precision import resolve_precision
from framework.testing import require_deepspeed, run_distributed
from strategies import DeepSpeedStrategy, resolve_strategy

JOBS = Path(__file__).parent / "distributed" / "ds_jobs.py"
sys.path.insert(0, str(JOBS.parent))
from ds_jobs import IndexedData, Regression, make_net  # noqa: E402

TOL = 1e-5


def _run_job(name: str, out: Path) -> None:
    run_distributed(JOBS, 2, args=(name, out), timeout=240, env={"DS_ACCELERATOR": "cpu"}, stream=False)


@pytest.fixture(scope="module")
def train_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ds_train")
    _run_job("train", out)
    return torch.load(out / "train.pt", weights_only=False)


@pytest.fixture(scope="module")
def resume_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ds_resume")
    _run_job("resume", out)
    results: dict[Any, Any] = {stage: torch.load(out / f"resume{stage}.pt", weights_only=False) for stage in (2, 3)}
    results["refused"] = torch.load(out / "unpickle.pt")["refused"]
    return results


def reference(windows: list[list[int]], epochs: int, lr: float, clip: float | None = None,
              rank_windows: list[list[list[int]]] | None = None) -> dict[str, torch.Tensor]:
    """Plain SGD, one step per window on the mean loss of the window's items.

    ``rank_windows`` (uneven data): per step, each active rank's items; the step's gradient is the mean
    over active ranks of their batch-mean gradients.
    """
    data = IndexedData(1 + max(i for w in (windows or sum(rank_windows, [])) for i in w))
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    steps = rank_windows or [[w] for w in windows]
    for _ in range(epochs):
        for parts in steps:
            for items in parts:
                x = torch.stack([data[i][0] for i in items])
                y = torch.stack([data[i][1] for i in items])
                (torch.nn.functional.mse_loss(net(x), y) / len(parts)).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
    return {f"net.{k}": v.detach() for k, v in net.state_dict().items()}


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=TOL, msg=key)


BATCHES_OF_4 = [list(range(4 * k, 4 * k + 4)) for k in range(4)]  # rank r takes r::2 -> ranks' batches of 2


# ---- real 2-process jobs ------------------------------------------------------------------------------
@require_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_match_one_process_with_twice_the_batch(train_results: dict[str, Any], stage: int) -> None:
    result = train_results[f"stage{stage}"]
    assert result["global_step"] == 8
    assert_weights_close(result["weights"], reference(BATCHES_OF_4, epochs=2, lr=0.1))


@require_deepspeed
def test_zero3_trains_and_predicts(train_results: dict[str, Any]) -> None:
    losses = train_results["stage3"]["losses"]
    assert losses[4:].mean() < losses[:4].mean()  # second epoch below the first
    assert train_results["predict"] == 4


@require_deepspeed
@pytest.mark.parametrize("scenario", ["accumulate", "accumulate_stream"])
def test_accumulation_with_short_tail_window_equals_big_batch(train_results: dict[str, Any], scenario: str) -> None:
    # 5 batches of 2 per rank, accumulate 3: windows of 3 and 2 batches = global items 0..11 and 12..19;
    # "accumulate_stream" has no length, so the tail is found at its last batch and its gradients rescaled
    result = train_results[scenario]
    assert result["global_step"] == 4
    assert_weights_close(result["weights"], reference([list(range(12)), list(range(12, 20))], epochs=2, lr=0.1))


@require_deepspeed
def test_num_items_sum_loss_is_the_window_mean_under_zero3(train_results: dict[str, Any]) -> None:
    result = train_results["num_items"]
    assert_weights_close(result["weights"], reference([list(range(12)), list(range(12, 20))], epochs=2, lr=0.01))


@require_deepspeed
def test_gradient_clip_val_maps_onto_the_engine(train_results: dict[str, Any]) -> None:
    assert_weights_close(train_results["clip"]["weights"], reference(BATCHES_OF_4, epochs=2, lr=0.1, clip=0.05))


@require_deepspeed
def test_manual_optimization_steps_the_engine(train_results: dict[str, Any]) -> None:
    result = train_results["manual"]
    assert result["global_step"] == 8
    assert_weights_close(result["weights"], reference(BATCHES_OF_4, epochs=2, lr=0.1))


@require_deepspeed
def test_uneven_batches_average_over_real_batches_only(train_results: dict[str, Any]) -> None:
    # 17 items, batch 4: rank 0 has [0,2,4,6] [8,10,12,14] [16], rank 1 has [1,3,5,7] [9,11,13,15] (+ a ghost)
    steps = [[[0, 2, 4, 6], [1, 3, 5, 7]], [[8, 10, 12, 14], [9, 11, 13, 15]], [[16]]]
    result = train_results["uneven"]
    assert result["global_step"] == 6
    assert_weights_close(result["weights"], reference([], epochs=2, lr=0.1, rank_windows=steps))


@require_deepspeed
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_runs_in_the_engine(train_results: dict[str, Any], precision: str) -> None:
    result = train_results[precision]
    assert result["plugin"] == "DeepSpeedPrecision" and result["dtype"] == torch.bfloat16
    assert result["skipped"] == 0
    losses = result["losses"]
    assert torch.isfinite(losses).all() and losses[-4:].mean() < losses[:4].mean()
    assert math.isfinite(float(result["val_loss"]))


@require_deepspeed
def test_fp16_on_a_cpu_without_fp16_is_refused_with_the_fix(train_results: dict[str, Any]) -> None:
    fp16 = train_results["fp16"]
    if fp16["supported"]:
        assert fp16["error"] is None
    else:
        assert "bf16-mixed" in fp16["error"] and "16-mixed" in fp16["error"]


@require_deepspeed
def test_fp16_overflow_skips_the_step_lowers_the_scale_and_holds_the_scheduler(train_results: dict[str, Any]) -> None:
    result = train_results["fp16_overflow"]  # batch 1's loss is inf; SGD with StepLR(step_size=1, gamma=0.5)
    assert result["dtype"] == torch.float16
    assert result["global_step"] == 4 and result["skipped"] == 1
    before, after = result["weights"][0], result["weights"][1]
    assert all(torch.equal(before[k], after[k]) for k in before)  # the skipped step changed nothing
    assert not all(torch.equal(after[k], result["weights"][2][k]) for k in after)  # the next one did
    assert result["scales"] == [256.0, 128.0, 128.0, 128.0]  # halved once, at the overflow
    assert result["lrs"] == [0.025, 0.025, 0.0125, 0.00625]  # no scheduler step for the skipped step


@require_deepspeed
def test_several_optimizers_are_refused_in_a_real_job(train_results: dict[str, Any]) -> None:
    message = train_results["two_optimizers"]
    assert "2 optimizers" in message and "single engine" in message
    assert "'ddp'" in message and "parameter group" in message


@require_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact(resume_results: dict[str, Any], stage: int) -> None:
    result = resume_results[stage]
    a, b = result["a"], result["b"]
    assert a["global_step"] == b["global_step"] == 10 and a["epoch"] == b["epoch"]
    assert a["lr"] == b["lr"]  # the per-step scheduler resumed too
    assert len(result["b_losses"]) == 6  # batches 4..9 only: no replay
    for key, value in a["weights"].items():
        assert torch.equal(value, b["weights"][key]), key


@require_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_holds_loadable_full_weights(resume_results: dict[str, Any], stage: int) -> None:
    from framework.checkpoint import read_manifest
    from framework.checkpoint.consolidate import load_weights

    result = resume_results[stage]
    path = result["ckpt"][-1]  # step 8, what run C validated under this stage
    manifest = read_manifest(path)
    assert manifest.strategy == "deepspeed" and manifest.world_size == 2
    assert any(name.startswith("deepspeed/state/") for name in manifest.files)
    module = Regression()
    load_weights(path, module)
    data = IndexedData(24)
    x = torch.stack([data[i][0] for i in range(24)])
    y = torch.stack([data[i][1] for i in range(24)])
    with torch.no_grad():
        want = torch.nn.functional.mse_loss(module(x), y).item()
    assert result["val"][0]["val_loss"] == pytest.approx(want, rel=1e-5)


@require_deepspeed
def test_engine_files_are_loaded_without_unpickling_arbitrary_objects(resume_results: dict[str, Any]) -> None:
    assert "UnpicklingError" in resume_results["refused"] and "system" in resume_results["refused"]


# ---- in-process checks (no process group, no engine) -------------------------------------------
@require_deepspeed
def test_registry_names_select_the_stage() -> None:
    assert resolve_strategy("deepspeed", accelerator="cpu", devices=2).stage == 2
    for stage in (1, 2, 3):
        strategy = resolve_strategy(f"deepspeed_stage_{stage}", accelerator="cpu", devices=2)
        assert isinstance(strategy, DeepSpeedStrategy) and strategy.stage == stage


def test_missing_deepspeed_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    for make in (lambda: Trainer(strategy="deepspeed", accelerator="cpu", logger=False, max_epochs=1),
                 lambda: DeepSpeedStrategy(stage=3)):
        with pytest.raises(ImportError, match=r"pip install kiln\[deepspeed\]"):
            make()


@require_deepspeed
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"stage": 4}, "stage=4"),
    ({"stage": 2, "offload_parameters": True}, "offload_parameters=True needs ZeRO stage 3"),
    ({"stage": 2, "config": {"zero_optimization": {"stage": 3}}}, "contradicts"),
    ({"config": 3}, "must be a dict"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        DeepSpeedStrategy(**kwargs)


def _config(strategy_kwargs: dict[str, Any] | None = None, **trainer_kwargs: Any) -> dict[str, Any]:
    """The engine config the strategy would build for a Trainer with ``trainer_kwargs`` (no engine built)."""
    strategy = DeepSpeedStrategy(accelerator="cpu", **(strategy_kwargs or {}))
    trainer = Trainer(strategy=strategy, accelerator="cpu", logger=False, max_epochs=1, **trainer_kwargs)
    strategy.module = Regression()
    strategy.connect_precision(trainer.precision_plugin)
    return strategy._training_config(trainer.gradient_clip_val, trainer.gradient_clip_algorithm)


@require_deepspeed
def test_engine_config_maps_kiln_arguments(tmp_path: Path) -> None:
    config = _config(precision="bf16-mixed", gradient_clip_val=0.5)
    assert config["zero_optimization"]["stage"] == 2
    assert config["gradient_accumulation_steps"] == 1 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is True and "fp16" not in config
    assert _config()["gradient_clipping"] == 0.0  # DeepSpeed's default of 1.0 would clip silently
    fp16 = _config(precision="16-mixed")["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0 and fp16["hysteresis"] == 1  # dynamic, backs off at once
    offload = _config({"stage": 3, "offload_optimizer": True, "offload_parameters": True})["zero_optimization"]
    assert offload["stage"] == 3 and offload["offload_optimizer"]["device"] == offload["offload_param"]["device"]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": False}, "fp16": {"enabled": False}}))
    from_file = _config({"config": str(path)})
    assert from_file["zero_optimization"] == {"stage": 3, "overlap_comm": False}


@require_deepspeed
@pytest.mark.parametrize(("strategy_config", "trainer_kwargs", "match"), [
    ({"gradient_accumulation_steps": 4}, {}, r"accumulate_grad_batches=4"),
    ({"optimizer": {"type": "Adam"}}, {}, r"configure_optimizers\(\)"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, r"configure_optimizers\(\)"),
    ({"gradient_clipping": 1.0}, {"gradient_clip_val": 0.5}, r"gradient_clip_val=0.5.*contradicts"),
    ({}, {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}, r"clips by the global gradient norm"),
    ({"fp16": {"enabled": True}}, {"precision": "bf16-mixed"}, r"contradicts Trainer\(precision='bf16-mixed'\)"),
    ({"bf16": {"enabled": True}}, {}, r"contradicts Trainer\(precision='32-true'\)"),
])
def test_config_contradicting_kiln_arguments_is_refused(strategy_config: dict[str, Any],
                                                        trainer_kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _config({"config": strategy_config}, **trainer_kwargs)


@require_deepspeed
def test_unsupported_precisions_and_optimizer_counts_are_refused() -> None:
    strategy = DeepSpeedStrategy(accelerator="cpu")
    with pytest.raises(ValueError, match="'64-true' is not supported by strategy='deepspeed'"):
        strategy.connect_precision(resolve_precision("64-true"))

    class CustomMixed(type(resolve_precision("bf16-mixed"))):  # a subclass changes numerics the engine would skip
        pass

    with pytest.raises(ValueError, match="is a custom plugin"):
        strategy.connect_precision(CustomMixed(torch.bfloat16))
    net = make_net()
    optimizers = [torch.optim.SGD(net[0].parameters(), lr=0.1), torch.optim.SGD(net[2].parameters(), lr=0.1)]
    with pytest.raises(ValueError, match="exactly one optimizer"):
        strategy.setup_optimizers(optimizers)


def test_importing_the_strategy_does_not_import_deepspeed() -> None:
    code = "import sys, framework, callbacks, strategies, strategies.deepspeed; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent, timeout=60)


@require_deepspeed
def test_three_ranks_resume_bit_exact(tmp_path: Path) -> None:
    """Issue #19's table under ZeRO-2: the engine reduces fixed flat buffers, so a resume at 3 ranks (where the
    order of a sum matters) is bit-exact without anything like DDP's bucket replay."""
    import resume_jobs

    cases = [({"deepspeed_stage": 2}, 3)]
    run_distributed(resume_jobs.resume_job, nproc=3, timeout=600, args=(str(tmp_path), cases, False),
                    env={"DS_ACCELERATOR": "cpu"})
