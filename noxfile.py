"""Nox sessions: tests, lint, demo, docs, bench, and xla (its own, large environment).

Every session that needs torch installs the pinned CPU build first, and passes the same
constraints file to every later install so that no dependency can swap it for another build.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = str(ROOT / ".ci" / "constraints.txt")
TORCH = "torch==2.13.0"
XLA_TORCH = ("torch==2.9.0", "torch_xla==2.9.0")

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True


def _install(session: nox.Session, *args: str) -> None:
    """Install `args` with the torch pin applied; never builds DeepSpeed's compiled ops."""
    session.install("-c", CONSTRAINTS, *args, env={"DS_BUILD_OPS": "0"})


def _install_torch_and_project(session: nox.Session, extras: str = "") -> None:
    _install(session, TORCH)
    _install(session, f".[{extras}]" if extras else ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (DeepSpeed included, on CPU). Extra arguments go to pytest."""
    _install_torch_and_project(session, "test,deepspeed")
    session.run("pytest", *session.posargs, env={"DS_ACCELERATOR": "cpu"})


@nox.session
def lint(session: nox.Session) -> None:
    """Static checks with ruff (configured in pyproject.toml)."""
    session.install("ruff")
    session.run("ruff", "check", *(session.posargs or ["."]))


@nox.session
def demo(session: nox.Session) -> None:
    """Train the example classifier on scikit-learn's bundled digits (no download)."""
    _install_torch_and_project(session, "examples")
    session.run("python", "examples/digits.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with `mkdocs build --strict` (broken links, missing API
    references and any other warning fail). The API pages import the packages, hence torch."""
    _install_torch_and_project(session, "docs,cli")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def bench(session: nox.Session) -> None:
    """Run the benchmarks against the raw loop, Lightning and Accelerate.

    `nox -s bench` runs benchmarks/run_all.py: every benchmarks/bench_*.py, then writes
    benchmarks/RESULTS.md and ratios.png; `nox -s bench -- --json` runs every script with `--json`;
    `nox -s bench -- bench_overhead --steps 200` runs one script with its own arguments.
    """
    _install_torch_and_project(session)
    _install(session, "pytorch-lightning", "accelerate", "matplotlib")
    args = list(session.posargs)
    if not args:
        session.run("python", "benchmarks/run_all.py")
        return
    if args and not args[0].startswith("-"):
        name = args.pop(0).removeprefix("benchmarks/").removesuffix(".py")
        scripts = [ROOT / "benchmarks" / f"{name}.py"]
    else:
        scripts = sorted((ROOT / "benchmarks").glob("bench_*.py"))
    for script in scripts:
        session.run("python", str(script.relative_to(ROOT)), *args)


@nox.session
def xla(session: nox.Session) -> None:
    """Run tests/xla on torch_xla's CPU PJRT device. Needs ~7 GB (torch 2.9.0 with CUDA libs)."""
    if not (ROOT / "tests" / "xla").is_dir():
        session.skip("tests/xla does not exist yet")
    # One resolve, so the project's `torch>=2.4` cannot move torch off the version torch_xla needs.
    session.install(*XLA_TORCH, ".[test]", env={"DS_BUILD_OPS": "0"})
    session.run("pytest", "tests/xla", *session.posargs, env={"PJRT_DEVICE": "CPU"})
