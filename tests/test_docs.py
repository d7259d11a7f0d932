"""The repository documents itself: every docs/ reference resolves, and nothing cites files it lacks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
# Documents that earlier drafts cited but that never shipped in the repository.
OUTSIDE = re.compile(r"\b(PAPER|DESIGN|STYLE)\.md\b")
DOC_REF = re.compile(r"docs/([\w-]+\.md)(?: sections? (\d+)(?:-(\d+))?)?")


def _tracked_text_files():
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        path = ROOT / name
        if path.suffix in {".py", ".md", ".sh", ".cpp", ".toml", ""} and path.is_file():
            yield path, path.read_text(errors="replace")


def test_nothing_cites_documents_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}"
                 for p, text in _tracked_text_files() for m in OUTSIDE.finditer(text)
                 if p.name != "test_docs.py"]
    assert not offenders, f"cite docs/ instead: {offenders}"


def test_every_docs_reference_names_an_existing_file_and_section():
    sections = {}
    for doc in (ROOT / "docs").glob("*.md"):
        sections[doc.name] = {int(n) for n in re.findall(r"^## (\d+)\.", doc.read_text(), flags=re.M)}
    broken = []
    for path, text in _tracked_text_files():
        for m in DOC_REF.finditer(text):
            name, first, last = m.group(1), m.group(2), m.group(3)
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            if name not in sections:
                broken.append(where)
            elif first is not None:
                wanted = range(int(first), int(last or first) + 1)
                if not set(wanted) <= sections[name]:
                    broken.append(where)
    assert not broken, broken


def test_method_sections_are_the_five_the_code_cites():
    text = (ROOT / "docs" / "method.md").read_text()
    assert re.findall(r"^## (\d+)\.", text, flags=re.M) == ["1", "2", "3", "4", "5"]
