"""The semantics the code follows are written in the repository: every docs/ page that code, tests or the
README point to exists, and nothing points outside the repository (to specs a user never gets)."""

import re
import subprocess
from pathlib import Path

from curvkern.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".cpp", ".h", ".toml", ".txt", ""}


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [ROOT / name for name in listed.split() if Path(name).suffix in TEXT_SUFFIXES and (ROOT / name).is_file()]


def test_no_reference_leaves_the_repository():
    outside = re.compile(r"\bshared/(specs|design)")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if outside.search(line) and path.name != "test_docs.py"
    ]
    assert not offenders, f"references to files users never get: {offenders}"


def test_every_docs_page_referred_to_exists():
    page = re.compile(r"\bdocs/([\w-]+\.md)")
    referred = {name for path in tracked_text_files() for name in page.findall(path.read_text(errors="replace"))}
    assert {Path(family.docs).name for family in FAMILIES.values()} <= referred
    missing = sorted(name for name in referred if not (ROOT / "docs" / name).is_file())
    assert not missing, f"docs pages referred to but absent: {missing}"
