"""MkDocs hooks: the benchmarks page shows benchmarks/RESULTS.md's targets table and ratios.png as they are
in the repository at build time, so the page cannot go stale."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PLACEHOLDER = "<!-- benchmarks/RESULTS.md: targets -->"


def targets_section() -> str:
    """RESULTS.md from its "## Targets" heading up to (excluding) its chart and "## Details"."""
    text = RESULTS.read_text(encoding="utf-8")
    start = text.index("## Targets")
    end = text.index("## Details", start)
    section = text[start:end].replace("![ratios vs targets](ratios.png)", "")
    return section.replace("## Targets", "### Targets", 1).replace("\n### ", "\n#### ")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001
    if PLACEHOLDER in markdown:
        markdown = markdown.replace(PLACEHOLDER, targets_section())
    return markdown


def on_files(files, config):  # noqa: ANN001
    files.append(File("benchmarks/ratios.png", str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
