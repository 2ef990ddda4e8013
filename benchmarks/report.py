"""Turns the benchmarks' JSON results into the rows, sections and chart of RESULTS.md (used by run_all.py).

A row per target of DESIGN.md §6 (PASS/MISS) plus reference rows (Lightning, Accelerate, other
baselines) marked "ref". ``MISS_NOTES`` holds, per target, the reason and the plan printed when that
target is missed; ``PROFILE_NOTES`` what profiling found and what was changed.
"""

from __future__ import annotations

from typing import Any

TARGET_LABELS = {  # key -> (benchmark, measurement)
    "overhead_mlp": ("overhead", "Per step, tiny MLP (1 thread, loss logged every step)"),
    "import": ("import", "`import framework, callbacks, strategies` vs `import torch`"),
    "checkpoint save": ("checkpoint", "Save, ~50M params + AdamW (through the Trainer)"),
    "checkpoint restore": ("checkpoint", "Restore into model + fresh AdamW (inside `fit(ckpt_path)`)"),
    "async save: loop blocked": ("checkpoint", "Async save: time the loop is blocked vs a sync save"),
    "resume cost flat in position": ("resume", "Resume cost at batch 10,000 vs batch 10 of an epoch"),
    "DDP per step (2 processes)": ("ddp", "DDP per step, 2 CPU processes (gloo)"),
    "FSDP memory per rank (params + optimizer)": ("ddp", "FSDP vs DDP per-rank params + optimizer memory"),
    "Compiled step, transformer block": ("compile", "Compiled step, transformer block: `compile=` vs raw compiled loop"),
    "2x2 mesh memory per rank (params + optimizer)": (
        "model_parallel", "2x2 mesh (FSDP2 x TP) vs DDP per-rank params + optimizer memory, 4 processes"),
}

# Printed under "Misses" when a target is missed: (reason, plan). Figures from profiling on the 2-core machine.
MISS_NOTES: dict[str, tuple[str, str]] = {
    "async save: loop blocked": (
        "Measured as the save call plus the wait before the next optimizer step, after the next step's forward/"
        "backward ran (batch of 2 rows). The save call takes ~3 ms; the 576 MiB snapshot copy (~60-110 ms) runs on "
        "a second thread, and the step that must wait copies what that thread has not reached (0.06 with one "
        "busy process on the 2-vCPU VM; 0.22 before the loop helped). A miss means both vCPUs were taken.",
        "On a GPU the copy is device-to-pinned-host (bench_gpu.py); a smaller snapshot (sharded state) copies less."),
    "checkpoint save": (
        "cProfile of `trainer.save_checkpoint` (576 MiB, 5 saves, 2-vCPU Intel Xeon VM, 2026-12-03): ~135 ms per save "
        "in write(2) (page-cache copy and allocation, page-aligned 256 KiB chunks into fallocate'd blocks), ~16 ms in "
        "xxh3 over each chunk right after its write, ~6 ms Python (state flattening, manifest, rename). Raw "
        "safetensors writes the same bytes unaligned (~148 ms) and hashes nothing, so the ratio is the checksum's "
        "share minus the alignment gain: 1.03-1.05 measured.",
        "If a machine misses: compare `write(2)` time per MiB against `disk sequential write (page cache)` in the "
        "same run (the ceiling), then the hash's share; hashing on the second core would lower wall time only."),
    "checkpoint restore": (
        "Kiln reads the optimizer state in 256 KiB preadv chunks into fresh tensors, hashing each chunk as it "
        "lands (raw: the library's pread of the same tensors), and maps the model file (private map, every byte "
        "hashed through the map, then copied into the module, as raw's mmap `load_file`). Above raw: the xxh3 "
        "pass over the model's pages (~25 ms at memory speed) and the Trainer's restore (~15 ms: skeletons, "
        "validation, scheduler, RNG, loop). Peak memory: 576 MiB added (384 optimizer state + one transient "
        "model copy: the mapped file) vs raw's 384 (it frees the model map before reading the optimizer).",
        "Everything is read and verified before anything is applied (a failed restore changes nothing), which "
        "keeps the model map alive next to the optimizer state; the hash pass is the price of verification."),
    "DDP per step (2 processes)": (
        "Profiled (cProfile, rank 0, 1,030 steps of each): Kiln adds ~58 Python calls per step (loop bookkeeping, "
        "`self.log`, progress bar, pitfall checks) — tens of µs against a 3-5 ms step whose time is mostly the "
        "gloo all-reduce waiting for the other rank. With both ranks on the machine's only two cores, which "
        "other processes share, that wait swings by ±30 % from run to run; the paired ratio moved between 0.99 "
        "and 1.18 over four runs today, the CPU-time ratio between 1.03 and 1.15.",
        "Re-measure on an idle machine (or with more cores than ranks); if it stays above 1.10 there, trim the "
        "per-step bookkeeping the profile lists (it is shared with the single-process loop, which measures "
        "1.02-1.07)."),
    "overhead_mlp": (
        "A tiny MLP step is ~0.5 ms of work, so a few µs of framework code per step or other processes' load "
        "show up (see the CPU-time ratio in the details).",
        "Profile `Trainer.fit` on the MLP with cProfile and move per-step work out of the hot path."),
    "import": ("Kiln's own modules or a dependency imported eagerly.",
               "`python benchmarks/bench_import.py --importtime` lists the slowest imports; make them lazy."),
}

PROFILE_NOTES = """
- **Checkpoint save (#16)**: the library's `serialize_file` followed by an xxh3 pass over the written file from
  the page cache cost 1.30x raw (the pass alone 17 %, at memory speed). Kiln writes the file itself in the
  library's layout (byte-identical to `safetensors.torch.save`, tested) in 256 KiB write() calls, hashing each
  chunk right after its write while it is still in L2, and reserves the blocks first with fallocate. That
  still measured 1.12-1.14x raw here; cProfile (5 saves): 149 ms per save in write(2), 19 ms in xxh3, 6 ms
  Python. Micro-rounds of the same tensors showed the write itself as the difference: the safetensors header
  leaves the data at an unaligned file offset, so every 256 KiB write straddled page boundaries (148 ms per
  576 MiB; 135 ms when the chunks end on multiples of 256 KiB in the file). Chunks now end there, for reads too
  (tested): save 1.12-1.14 → 1.03-1.05 (CPU included), restore 1.08 → 1.02-1.03. Restore: one pass (hash as
  each chunk lands), and the model file is mapped instead of read into a fresh copy. Async:
  `AsyncCheckpointWriter.reserve()` moves the first save's page faults off the loop.
- **Disk vs saves** (same run, MiB/s of state, medians; Intel Xeon VM, 2026-12-03 19:50): durable (`fsync=True`):
  disk sequential write 1758, Kiln 1464 (83 % of the disk), raw safetensors + fsync 1459; page cache: Kiln 3658,
  raw safetensors 3809, the disk-write probe 6260 (page-aligned 256 KiB writes of one cache-resident buffer into
  reserved blocks: the ceiling of the page-cache copy; the savers also read 576 MiB from memory and Kiln hashes it).
- **Resume**: flat (Kiln positions its sampler); a loader that Kiln must replay costs 65-85× more at batch
  10,000 than at batch 10, which shows that this benchmark would catch a replaying resume.
- **Per step / DDP** (cProfile, Kiln vs raw, same steps): Kiln adds ~45 Python calls per step on one process
  (~58 under DDP: loop bookkeeping, `self.log`, progress bar, pitfall checks), tens of µs per step. Under DDP
  1.12 of 1.65 s of a Kiln run are inside `backward` (the gloo all-reduce waiting for the other rank), so
  the DDP ratio follows the machine's load: 0.99, 1.18, 1.11 and 1.02 in four runs today.
"""


# ---- formatting ---------------------------------------------------------------------------------------
def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _row(key: str, kiln: str, baseline: str, ratio: float | None, target: float | None, passed: bool | None,
         benchmark: str | None = None, measurement: str | None = None, failed: str | None = None) -> dict[str, Any]:
    bench, label = TARGET_LABELS.get(key, (benchmark, measurement or key))
    if failed:
        result = f"FAILED ({failed})"
    elif passed is None:
        result = "ref"
    else:
        result = "PASS" if passed else "MISS"
    return {"key": key, "benchmark": bench or benchmark, "measurement": measurement or label, "kiln": kiln,
            "baseline": baseline, "ratio": "—" if ratio is None else f"{ratio:.3f}",
            "target": "—" if target is None else f"≤ {target:g}", "result": result, "ratio_value": ratio,
            "target_value": target}


# ---- summary rows per benchmark ---------------------------------------------------------------------------
def _overhead(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for model, res in r["results"].items():
        raw, kiln = res["raw"], res.get("kiln")
        name = "tiny MLP" if model == "mlp" else "small transformer block"
        if kiln is not None:
            failed = None if kiln["weights_match"] else "Kiln's weights differ from the raw loop's"
            target = r["target_ratio"] if model == "mlp" else None
            rows.append(_row(
                "overhead_mlp" if model == "mlp" else f"overhead_{model}", f"{kiln['us_per_step']:.0f} µs/step",
                f"raw loop {raw['us_per_step']:.0f} µs/step", kiln["ratio_to_raw"], target,
                kiln["ratio_to_raw"] <= target if target else None, "overhead", f"Per step, {name}, Kiln", failed))
        for other in ("lightning", "accelerate"):
            if other in res:
                rows.append(_row(f"overhead_{model}_{other}", f"{res[other]['us_per_step']:.0f} µs/step (not Kiln)",
                                 f"raw loop {raw['us_per_step']:.0f} µs/step", res[other]["ratio_to_raw"], None, None,
                                 "overhead", f"Per step, {name}, {other.capitalize()}"))
    return rows


def _import(r: dict[str, Any]) -> list[dict[str, Any]]:
    res = r["results"]
    torch_ms = res["torch"]["median_ms"]
    rows = [_row("import", f"{res['kiln']['median_ms']:.0f} ms", f"torch {torch_ms:.0f} ms",
                 res["kiln"]["ratio_to_torch"], r["target_ratio"], res["kiln"]["ratio_to_torch"] <= r["target_ratio"])]
    for other in ("lightning", "accelerate"):
        if other in res:
            rows.append(_row(f"import_{other}", f"{res[other]['median_ms']:.0f} ms (not Kiln)", f"torch {torch_ms:.0f} ms",
                             res[other]["ratio_to_torch"], None, None, "import", f"`import` {other} vs torch"))
    return rows


def _checks(r: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    rows = []
    for c in r.get("checks", []):
        if "measured_bytes" in c:
            kiln, base = fmt_bytes(c["measured_bytes"]), f"{c['baseline']} {fmt_bytes(c['baseline_bytes'])}"
        else:
            kiln, base = fmt_time(c["measured_s"]), f"{c['baseline']} {fmt_time(c['baseline_s'])}"
        key = prefix + c["name"]
        rows.append(_row(key, kiln, base, c["ratio"], c["target"], c["passed"], r["benchmark"],
                         c["name"] if prefix else None))
    return rows


def _checkpoint(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = _checks(r)
    med = r["median_s"]

    def ref(key: str, label: str, measured: str, baseline: str) -> None:
        if measured in med and baseline in med:
            rows.append(_row(key, f"{fmt_time(med[measured])} ({measured.split(':')[0]})",
                             f"{baseline.split(':')[0]} {fmt_time(med[baseline])}", med[measured] / med[baseline],
                             None, None, "checkpoint", label))

    ref("ckpt_torch_save", "torch.save vs safetensors save (no Kiln)", "raw torch: save", "raw safetensors: save")
    ref("ckpt_lightning_save", "Lightning `save_checkpoint` vs raw safetensors save", "lightning: save",
        "raw safetensors: save")
    ref("ckpt_fit_first_batch", "Kiln vs Lightning: `fit(ckpt_path)` → first batch", "kiln sync: fit_to_first_batch",
        "lightning: fit_to_first_batch")
    return rows


def _resume(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    near, far = r["positions"]
    for c in r["checks"]:
        rows.append(_row(c["name"], f"{fmt_time(c['measured_s'])} ({c['measured']})",
                         f"{c['baseline']} {fmt_time(c['baseline_s'])}", c["ratio"], c["target"], c["passed"],
                         measurement=f"Resume cost at batch {far:,} vs batch {near:,} of an epoch"))
    if "replay_ratio" in r:
        rows.append(_row("resume_replay", f"{fmt_time(r['median_s'][f'replaying @{far}'])} (@{far})",
                         f"@{near} {fmt_time(r['median_s'][f'replaying @{near}'])}", r["replay_ratio"], None, None,
                         "resume", "A loader Kiln must replay (custom batch_sampler), for contrast"))
    return rows


def _gpu(r: dict[str, Any]) -> list[dict[str, Any]]:
    if r.get("skipped"):
        row = _row("gpu", "—", "—", None, None, None, "gpu", "GPU variants (overhead, checkpoint, DDP)")
        return [{**row, "result": f"SKIPPED ({r['reason']})"}]
    return _checks(r, prefix="gpu: ")


READERS = {"overhead": _overhead, "import": _import, "checkpoint": _checkpoint, "resume": _resume,
           "ddp": _checks, "gpu": _gpu, "compile": _checks, "model_parallel": _checks}


def summary_rows(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e in entries:
        r = e.get("result")
        if r is None:
            if e["name"].removeprefix("bench_") in READERS:
                rows.append({**_row(e["name"], "—", "—", None, None, None, e["name"].removeprefix("bench_"),
                                    "(did not produce a result)"), "result": f"FAILED ({_first_line(e.get('error'))})"})
            continue
        new = READERS[r["benchmark"]](r)
        if not e["ok"]:
            for row in new:
                if row["result"] in ("PASS", "MISS"):
                    row["result"] = f"FAILED ({_first_line(e.get('error'))})"
        rows += new
    return rows


def _first_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


# ---- details ----------------------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def detail_sections(entries: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for e in entries:
        out += [f"### {e['name']}", ""]
        r = e.get("result")
        if r is None:
            if e.get("text"):
                out += ["Not one of the targets' benchmarks; its output, verbatim:", "", "```", e["text"].rstrip(), "```"]
            else:
                out += [f"FAILED: {e.get('error')}"]
            out.append("")
            continue
        try:
            out += _details(r) + [""]
        except (KeyError, TypeError, ValueError) as exc:  # a malformed result must not lose the whole report
            out += [f"(details unavailable: {type(exc).__name__}: {exc})", ""]
    if PROFILE_NOTES:
        out += ["## Profiling notes", "", PROFILE_NOTES.strip(), ""]
    return out


def _details(r: dict[str, Any]) -> list[str]:
    kind = r["benchmark"]
    if kind == "overhead":
        out = []
        for model, res in r["results"].items():
            out += [f"{model}: batch {'×'.join(map(str, r['batch_shapes'][model]))}, {r['steps'][model]} timed steps "
                    f"after {r['warmup']}, {r['repeats']} rounds, 1 thread", ""]
            out += _table(["contender", "µs/step", "× raw", "CPU µs/step", "CPU × raw", "weights == raw (max Δ)"], [
                [n, x["us_per_step"], x["ratio_to_raw"], x["cpu_us_per_step"], x["cpu_ratio_to_raw"],
                 f"{'yes' if x['weights_match'] else 'NO'} ({x['max_weight_diff']:.1e})"] for n, x in res.items()]) + [""]
        return out
    if kind == "import":
        return [f"{r['repeats']} fresh interpreters per contender, interleaved; ratio within each interpreter", ""] + _table(
            ["contender", "median ms", "ms on top of torch", "× torch", "CPU × torch"],
            [[n, x["median_ms"], x["extra_over_torch_ms"], x["ratio_to_torch"], x["cpu_ratio_to_torch"]]
             for n, x in r["results"].items()])
    if kind == "checkpoint":
        head = (f"{r['parameters'] / 1e6:.1f}M parameters, {fmt_bytes(r['state_bytes'])} with AdamW state, on "
                f"{r.get('device', 'cpu')}, {r['repeats']} rotated rounds; every restore equal to the saved state")
        return [head, ""] + _table(["contender: measurement", "median ms", "min ms", "CPU ms"], [
            [n, 1e3 * v, 1e3 * min(r["runs_s"][n]), 1e3 * r["cpu_median_s"][n]] for n, v in r["median_s"].items()]) + [
            "", "Ratios (wall; CPU in brackets): " + "; ".join(
                f"{c['name']} {c['ratio']:.3f} ({c['cpu_ratio']:.3f})" for c in r["checks"])]
    if kind == "resume":
        return [f"`fit(ckpt_path)` → first training step; {r['repeats']} rounds, batch size {r['batch_size']}; every "
                "resume checked: batch index, batch content, restored weights", ""] + _table(
            ["loader @ position", "median ms", "min ms"],
            [[n, 1e3 * v, 1e3 * min(r["runs_s"][n])] for n, v in r["median_s"].items()])
    if kind == "ddp":
        out = [f"{r['world_size']} processes on {r['device']}, {r['backend']}, {r['threads_per_rank']} thread each, batch "
               f"{r['batch_per_rank']} per rank, {r['steps']} timed steps, {r['repeats']} rounds; weights == raw: "
               f"{'yes' if r['weights_match'] else 'NO'} (max Δ {r['max_weight_diff']:.1e})", ""]
        out += _table(["contender (rank 0)", "µs/step", "CPU µs/step"],
                      [[n, v, r["cpu_us_per_step"][n]] for n, v in r["us_per_step"].items()])
        if "memory_by_rank" in r:
            out += ["", f"Memory (MLP width {r['memory_width']}, AdamW), per rank; FSDP full weights == DDP's: "
                    f"{'yes' if r['memory_weights_match'] else 'NO'} (max Δ {r['fsdp_vs_ddp_weight_diff']:.1e})", ""]
            out += _table(["rank", "strategy", "params", "optimizer state", "full model"], [
                [rank, s, fmt_bytes(m["param_bytes"]), fmt_bytes(m["optimizer_bytes"]), fmt_bytes(m["full_param_bytes"])]
                for rank, per in enumerate(r["memory_by_rank"]) for s, m in per.items()])
        return out
    if kind == "gpu":
        if r.get("skipped"):
            return [f"Skipped: {r['reason']}. Run `python benchmarks/bench_gpu.py` on a CUDA machine."]
        out = [f"Device: {r.get('gpu', r['device'])}", ""]
        out += _table(["model", "contender", "µs/step", "× raw", "weights == raw"], [
            [m, n, x["us_per_step"], x["ratio_to_raw"], "yes" if x["weights_match"] else "NO"]
            for m, res in r["overhead"].items() for n, x in res.items()])
        for part in ("checkpoint", "ddp"):
            if r[part].get("benchmark"):
                out += ["", f"{part}:", ""] + _details(r[part])
            else:
                out += ["", f"{part}: {r[part].get('reason') or r[part].get('stderr')}"]
        return out
    if kind == "compile":
        return [f"Transformer block, batch {'×'.join(map(str, r['batch_shape']))}, backend {r['backend']}, "
                f"{r['steps']} timed steps after {r['warmup']} (compilation), {r['repeats']} rounds, 1 thread; "
                f"weights == raw: {'yes' if r['weights_match'] else 'NO'} (max Δ {r['max_weight_diff']:.1e})", ""] + _table(
            ["contender", "µs/step", "CPU µs/step"],
            [[n, v, r["cpu_us_per_step"][n]] for n, v in r["us_per_step"].items()])
    if kind == "model_parallel":
        return [f"{r['blocks']} MLP blocks of width {r['width']}, AdamW, {r['steps']} steps on {r['world_size']} processes; "
                f"2x2 full weights == DDP's: {'yes' if r['weights_match'] else 'NO'} (max Δ {r['weight_diff']:.1e})",
                ""] + _table(["rank", "strategy", "params", "optimizer state"], [
                    [rank, s, fmt_bytes(m["param_bytes"]), fmt_bytes(m["optimizer_bytes"])]
                    for rank, per in enumerate(r["memory_by_rank"]) for s, m in per.items()])
    return ["```", str(r)[:4000], "```"]


# ---- chart ------------------------------------------------------------------------------------------------
def write_chart(entries: list[dict[str, Any]], path: str) -> str | None:
    """Bars of ratio / target per target (the line at 1 is the target), and the per-step and import ratios of
    Kiln, Lightning and Accelerate; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in summary_rows(entries) if r["target_value"] is not None and r["ratio_value"] is not None]
    compared = [(r["measurement"], r["ratio_value"]) for r in summary_rows(entries)
                if r["ratio_value"] is not None and (r["key"].startswith("overhead") or r["key"].startswith("import"))]
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4.0, 0.5 * max(len(rows), len(compared)) + 1.5)))
    ax = axes[0]
    labels = [f"{r['measurement'][:60]}" for r in rows]
    values = [r["ratio_value"] / r["target_value"] for r in rows]
    colors = ["#2a9d8f" if r["result"] == "PASS" else "#e76f51" for r in rows]
    ax.barh(range(len(rows)), values, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    for i, r in enumerate(rows):
        ax.text(values[i], i, f" {r['ratio']} ({r['target']})", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio / target  (≤ 1 meets the target; green PASS, red MISS)")
    ax.set_title("Kiln vs its targets (DESIGN.md §6)")
    ax.set_xlim(0, max([1.2, *values]) * 1.3)
    ax = axes[1]
    ax.barh(range(len(compared)), [v for _, v in compared], color="#264653")
    ax.axvline(1.0, color="black", linewidth=1)
    for i, (_, v) in enumerate(compared):
        ax.text(v, i, f" {v:.2f}×", va="center", fontsize=8)
    ax.set_yticks(range(len(compared)), [m[:60] for m, _ in compared], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("× baseline (raw loop per step; torch for imports)")
    ax.set_title("Kiln, Lightning, Accelerate vs the raw baseline")
    ax.set_xlim(0, max([1.5, *(v for _, v in compared)]) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
