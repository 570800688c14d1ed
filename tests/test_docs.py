"""The documentation holds together: README.md is a short front door, and no link is dangling.

Every relative link in README.md and docs/*.md must point at a file that exists, and a link
with an ``#anchor`` at a heading of that file (GitHub's slugs). Links inside code are not
links, and web addresses are not checked (the tests run offline).
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

README_MAX_LINES = 300
# [text](target) and ![alt](target), with an optional "title"
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def documentation() -> list[Path]:
    """README.md and every page of docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def prose(markdown: str) -> str:
    """``markdown`` without fenced blocks and inline code, where brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of ``page``'s headings (a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def broken_links(page: Path) -> list[str]:
    """Each relative link of ``page`` whose file (or heading) does not exist, and why."""
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # https:, mailto:, ...
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_readme_is_a_short_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_every_relative_link_points_at_an_existing_file():
    broken = [problem for page in documentation() for problem in broken_links(page)]
    assert broken == []


def test_the_pictures_in_docs_stay_referenced():
    linked = {
        (page.parent / target).resolve()
        for page in documentation()
        for target in LINK.findall(prose(page.read_text()))
    }
    for picture in sorted((REPO / "docs").glob("*.png")):
        assert picture.resolve() in linked, f"{picture.name} is not shown anywhere"


def test_the_link_check_finds_what_is_broken(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-with-code) [web](https://example.org/x.md)\n"
        "[gone](missing.md) [bad anchor](there.md#nowhere) ![gone](pic.png)\n"
        "`[not a link](inside-code.md)`\n```\n[nor](this.md)\n```\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no such file)",
        "page.md: there.md#nowhere (no such heading)",
        "page.md: pic.png (no such file)",
    ]


def contract_rows() -> dict[str, str]:
    """The layers of each package's contract in pyproject.toml, as architecture.md writes them."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    rows = {}
    for contract in contracts["contracts"]:
        if contract["type"] == "layers" and contract["containers"] != ["gluon_ft"]:
            package = contract["containers"][0].removeprefix("gluon_ft.")
            layers = (f"`{layer.replace('|', chr(92) + '|')}`" for layer in contract["layers"])
            rows[package] = " -> ".join(layers)
    return rows


def test_architecture_md_states_the_contracts_of_pyproject():
    page = (REPO / "docs" / "architecture.md").read_text()
    stale = {
        package: row
        for package, row in contract_rows().items()
        if f"| `{package}/` | {row} |" not in page
    }
    assert stale == {}, "docs/architecture.md: update the package table to these layers"
