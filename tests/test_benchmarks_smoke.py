"""The benchmark scripts run end to end at tiny sizes, check what they compare, and report honestly.

One ``run_all.py --quick`` run (every benchmark with ``--json``, in its own interpreter) feeds most
tests; the import benchmark, which needs fresh interpreters by the dozen, runs in-process on torch and
Kiln only. Figures at these sizes mean nothing; what is tested is that every script works, that each
one's equivalence checks passed, and that the report marks misses and failures.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def quick_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``run_all.py --quick`` started in the background (the in-process import test runs meanwhile)."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.Popen([sys.executable, str(BENCH / "run_all.py"), "--quick", "--skip", "import", "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def quick_run(quick_job) -> tuple[int, str, Path, dict]:
    proc, out = quick_job
    stdout, stderr = proc.communicate(timeout=540)
    data = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    return proc.returncode, stdout[-3000:] + stderr[-3000:], out, {e["name"]: e for e in data.get("entries", [])}


def test_import_benchmark_runs(quick_job, monkeypatch: pytest.MonkeyPatch) -> None:
    import bench_import

    # Each interpreter times torch and then Kiln, so Kiln alone still yields its ratio to torch.
    monkeypatch.setattr(bench_import, "CONTENDERS", {"kiln": bench_import.KILN})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench_import.main(["--repeats", "5", "--json"]) == 0
    result = json.loads(out.getvalue())
    assert set(result["results"]) == {"kiln"} and result["results"]["kiln"]["ratio_to_torch"] > 1.0


def test_run_all_writes_the_report_and_chart(quick_run) -> None:
    returncode, output, out, entries = quick_run
    assert returncode == 0, output
    report = (out / "RESULTS.md").read_text()
    for heading in ("## Targets (DESIGN.md §6)", "| CPU |", "| Versions |", "| Load average", "## Reproduce"):
        assert heading in report
    assert "run_all.py --quick" in report  # the exact command
    assert (out / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(entries) == {"bench_overhead", "bench_checkpoint", "bench_resume", "bench_ddp", "bench_gpu",
                            "bench_compile", "bench_model_parallel"}


@pytest.mark.parametrize("name, equivalent", [
    ("bench_overhead", lambda r: all(m["kiln"]["weights_match"] for m in r["results"].values())),
    ("bench_checkpoint", lambda r: r["states_equal"] and len(r["checks"]) == 3),
    ("bench_resume", lambda r: r["resumed_batches_match"] and r["replay_ratio"] > 0),
    ("bench_ddp", lambda r: r["weights_match"] and r["memory_weights_match"] and r["max_weight_diff"] == 0),
    ("bench_gpu", lambda r: r["skipped"] != torch.cuda.is_available()
     and (r["skipped"] == ("CUDA is not available" in r.get("reason", "")))),
    ("bench_compile", lambda r: r["weights_match"] and r["backend"] == "aot_eager"),
    ("bench_model_parallel", lambda r: r["weights_match"] and r["checks"][0]["ratio"] < 0.5),
])
def test_each_benchmark_ran_and_its_contenders_agree(quick_run, name: str, equivalent) -> None:
    entry = quick_run[3][name]
    assert entry["ok"], entry.get("error")
    assert entry["result"]["benchmark"] == name.removeprefix("bench_")
    assert equivalent(entry["result"])
    import report

    assert all(c["name"] in report.TARGET_LABELS for c in entry["result"].get("checks", [])), "a target without a label"


def test_checkpoint_benchmark_rejects_a_wrong_restore() -> None:
    import bench_checkpoint

    net = bench_checkpoint.build_net(8, 1)
    optimizer = torch.optim.AdamW(net.parameters())
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    reference = bench_checkpoint.Reference(net, optimizer)
    restored = bench_checkpoint.build_net(8, 1)
    restored.load_state_dict(net.state_dict())
    reference.check("exact copy", restored, optimizer.state_dict())
    with torch.no_grad():
        restored[0].bias[0] += 1e-6
    with pytest.raises(bench_checkpoint.Mismatch, match="0.bias"):
        reference.check("off by 1e-6", restored, optimizer.state_dict())


def _entry(benchmark: str, checks: list[dict], ok: bool = True) -> dict:
    return {"name": f"bench_{benchmark}", "ok": ok, "seconds": 1.0, "load_before": 0.5, "command": "x",
            "result": {"benchmark": benchmark, "checks": checks}, "error": None if ok else "boom"}


def test_report_marks_pass_miss_and_failure_with_reasons(tmp_path: Path) -> None:
    import report
    import run_all

    check = {"name": "DDP per step (2 processes)", "measured": "kiln ddp", "baseline": "raw ddp", "measured_s": 0.002,
             "baseline_s": 0.001, "target": 1.1}
    entries = [_entry("ddp", [{**check, "ratio": 1.05, "passed": True}]),
               _entry("ddp", [{**check, "ratio": 2.0, "passed": False}]),
               _entry("ddp", [{**check, "ratio": 1.0, "passed": True}], ok=False),
               {"name": "bench_resume", "ok": False, "seconds": 1.0, "load_before": 0.5, "error": "Traceback\nKeyError: x"}]
    results = [r["result"] for r in report.summary_rows(entries)]
    assert results[:3] == ["PASS", "MISS", "FAILED (boom)"] and results[3].startswith("FAILED (KeyError: x")
    meta = run_all.run_meta([], False, (0.5, 0.6))
    text = run_all.markdown(entries, meta, None)
    reason, plan = report.MISS_NOTES.get(check["name"], ("not analysed yet", "profile it"))
    assert "### Misses: reason and plan" in text and reason in text and plan.split()[0] in text


def test_overhead_over_processes_reports_each_process_and_the_median():
    out = subprocess.run([sys.executable, str(BENCH / "bench_overhead_processes.py"), "--processes", "2",
                          "--repeats", "1", "--steps", "20", "--json"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    result = json.loads(out)
    ratios = result["per_process"]
    assert len(ratios) == 2 and all(len(r) == 2 and r[0] > 0 and r[1] > 0 for r in ratios)
    assert result["median_wall"] == pytest.approx(sum(r[0] for r in ratios) / 2)
    assert "cpu" in result["machine"]
