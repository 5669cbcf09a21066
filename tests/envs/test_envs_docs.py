"""docs/pitfalls.md and docs/environments.md stay true: every test a pitfall names exists, every
citation of a pitfall in code or tests names a heading of the page."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PITFALLS = ROOT / "docs" / "pitfalls.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def _tracked_sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_every_pitfall_names_tests_that_exist() -> None:
    text = PITFALLS.read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    assert len(sections) >= 23
    for section in sections:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section)
        assert cited, f"pitfall {section.splitlines()[0]!r} names no test"
        for path, name in cited:
            source = (ROOT / path).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, flags=re.M), f"{path}::{name} does not exist"


def test_citations_name_headings_of_the_page() -> None:
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", PITFALLS.read_text(), flags=re.M)}
    cited: list[tuple[Path, str]] = []
    for path in _tracked_sources():
        text = path.read_text(errors="replace")
        assert not re.search(r"PITFALLS \d", text), f"{path} cites a numbered pitfall outside the repository"
        for match in re.finditer(r"docs/pitfalls\.md((?:#[a-z0-9-]+(?:, )?)+)", text):
            cited += [(path, anchor) for anchor in re.findall(r"#([a-z0-9-]+)", match.group(1))]
    assert len(cited) >= 15
    assert [(str(p), a) for p, a in cited if a not in anchors] == []


def test_the_readme_links_the_env_contract() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Writing an environment", 1)[1].split("\n## ", 1)[0]
    assert "docs/environments.md" in section
