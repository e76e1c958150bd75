"""The docs a newcomer reads stay true to the code: docs/PLAN.md is what the schema's docstrings
generate, every plan field has a docstring, and the README and docs/ link to pages, headings and
repository paths that exist. No ranks start here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.plan import reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Other Markdown files whose repository paths must exist too (they are linked from the pages).
NOTES = [ROOT / "slurm" / "NOTES-cluster.md", ROOT / "bench" / "RESULTS.md"]
README_MAX_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
# A code span that names a file or folder of this repository: `harness/plan/load.py`, `bench/`.
REPO_PATH = re.compile(r"(?:harness|bench|tests|plans|slurm|docs|launch|ds_configs)/[\w./-]*")
# Folders the programs write (bench/out/): named in the docs, absent from a checkout.
WRITTEN = tuple(line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.startswith("/"))


def prose(page: Path) -> str:
    """The page without its fenced code blocks (drawings and shell sessions are not links)."""
    return FENCE.sub("", page.read_text())


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as '-'."""
    found = set()
    for heading in re.findall(r"^#+ +(.+?) *$", prose(page), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug if slug not in found else next(f"{slug}-{n}" for n in range(1, 100) if f"{slug}-{n}" not in found))
    return found


def test_the_plan_reference_is_generated_from_the_schema():
    written, generated = (ROOT / "docs" / "PLAN.md").read_text().splitlines(), reference.render().splitlines()
    if written != generated:
        line = next((n for n, (a, b) in enumerate(zip(written, generated), 1) if a != b), min(len(written), len(generated)) + 1)
        pytest.fail(f"docs/PLAN.md is stale from line {line} on (the plan schema changed): regenerate it with\n"
                    f"    {reference.REGENERATE}")


def test_every_plan_field_has_a_docstring():
    missing = reference.undocumented()
    assert missing == [], (f"plan fields without a docstring (add one under the field in harness/plan/, "
                           f"then run `{reference.REGENERATE}`): {missing}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_reach_pages_and_headings_that_exist(page: Path):
    dead = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            dead.append(f"{target}: no {path}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            dead.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert dead == []


@pytest.mark.parametrize("page", PAGES + NOTES, ids=lambda page: str(page.relative_to(ROOT)))
def test_repository_paths_named_in_the_docs_exist(page: Path):
    """A `harness/...` (or bench/, tests/, ...) path in a code span names a file or folder that is
    there: modules move, and the docs must move with them."""
    named = {match for span in CODE_SPAN.findall(prose(page)) if (match := REPO_PATH.fullmatch((span.split() or [""])[0]))}
    missing = sorted(match[0] for match in named if not (ROOT / match[0]).exists() and not match[0].startswith(WRITTEN))
    assert missing == []


def test_the_readme_is_a_page_a_newcomer_reads_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES, "README.md: move the details to a page of docs/ and link it"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(readme)}
    assert [page.name for page in PAGES[1:] if page not in linked] == []
    assert "pip install -e '.[dev]' && harness demo\npytest\n" in readme  # the two set-up commands
