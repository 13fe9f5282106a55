"""The release plumbing: the version is written once (``curvkern.__version__``), the build reads it
without importing curvkern, the changelog and the benchmark report carry the same one, and the pre-commit
hooks run the tool versions requirements-dev.txt pins for ``make lint``."""

import re
import subprocess
import sys
from pathlib import Path

import torch

import curvkern
from curvkern.bench.report import collect_machine_info

ROOT = Path(__file__).resolve().parents[1]
# Files that may quote the version besides its source: the changelog's history and the benchmark results,
# which record the version they measured.
MAY_QUOTE_THE_VERSION = ("CHANGELOG.md", "bench/results/")
BINARY_SUFFIXES = {".png"}


def tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return listed.split()


def test_the_build_reads_the_version_from_the_source_without_importing_it():
    # setuptools evaluates `__version__ = "..."` from the syntax tree; were that to fail it would import
    # curvkern (and torch) in the build. A fresh interpreter shows which happened.
    script = (
        "import sys\n"
        "from setuptools.config.pyprojecttoml import read_configuration\n"
        f"project = read_configuration({str(ROOT / 'pyproject.toml')!r})['project']\n"
        "print(project['version'], 'curvkern' in sys.modules, 'torch' in sys.modules)\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert completed.stdout.split() == [curvkern.__version__, "False", "False"]


def test_the_version_is_written_once():
    version = re.compile(rf"(?<![\w.]){re.escape(curvkern.__version__)}(?![\w.])")
    quoting = sorted(
        name
        for name in tracked_files()
        if not name.startswith(MAY_QUOTE_THE_VERSION)
        and Path(name).suffix not in BINARY_SUFFIXES
        and (ROOT / name).is_file()
        and version.search((ROOT / name).read_text(errors="replace"))
    )
    assert quoting == ["curvkern/__init__.py"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = {attr = "curvkern.__version__"}' in pyproject


def test_the_changelog_has_a_section_for_the_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(curvkern.__version__)}\]", changelog, re.MULTILINE)


def test_the_benchmark_report_records_the_same_version():
    assert collect_machine_info(torch.device("cpu"))["curvkern_version"] == curvkern.__version__


def test_pre_commit_runs_the_pinned_tool_versions():
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), re.MULTILINE))
    hooks = dict(re.findall(r"repo: \S+/([\w-]+)\n\s+rev: v(\S+)", (ROOT / ".pre-commit-config.yaml").read_text()))
    assert hooks == {"ruff-pre-commit": pins["ruff"], "mirrors-clang-format": pins["clang-format"]}
