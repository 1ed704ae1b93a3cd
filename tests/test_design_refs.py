"""Every section reference (the section sign, SIGN below) resolves inside the repository: one to
docs/design.md names a section that exists, and a section of the paper is cited with "arXiv 2508.10395",
so no reference points at a document the repository lacks."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SOURCES = ("xqcli", "kernels", "tests", "bench", "docs", "scripts", "README.md")
SUFFIXES = {".py", ".md", ".sh"}
SIGN = "\u00a7"  # written escaped so this file cites nothing


def cited_files() -> list[Path]:
    out = []
    for name in SOURCES:
        path = ROOT / name
        out += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    return out


def test_section_references_resolve():
    sections = set(re.findall(r"^## \u00a7(\d+) ", DESIGN.read_text(encoding="utf-8"), re.MULTILINE))
    assert sections, "docs/design.md has no numbered sections"
    bad = []
    for path in cited_files():
        in_design = path == DESIGN
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if SIGN not in line or (in_design and line.startswith("## " + SIGN)):
                continue
            where = f"{path.relative_to(ROOT)}:{n}"
            paper = "arXiv 2508.10395" in line
            ours = in_design or "design.md" in line
            if not (paper or ours):
                bad.append(f"{where}: cites neither docs/design.md nor arXiv 2508.10395: {line.strip()}")
            elif ours and not paper:
                missing = set(re.findall(r"\u00a7(\d+)", line)) - sections
                if missing:
                    bad.append(f"{where}: docs/design.md has no section {', '.join(sorted(missing))}: {line.strip()}")
    assert not bad, "\n".join(bad)
