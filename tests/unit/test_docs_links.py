"""Relative links in README.md and docs/*.md lead to files and headings that exist.

Anchors follow GitHub's rule for heading ids: lower case, punctuation other than ``-`` and ``_``
dropped, spaces turned into ``-``, and ``-1``, ``-2``... appended to repeated ids.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.support.docs import ROOT, doc_files, parse_blocks

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (?P<title>.+?)\s*#*\s*$")


def slug(title: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text only
    text = text.lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """The file's lines outside fenced code blocks, numbered from 1."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside: set[int] = set()
    for block in parse_blocks(path):
        inside.update(range(block.line, block.line + len(block.lines) + 2))
    return [(n, line) for n, line in enumerate(lines, start=1) if n not in inside]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m["title"])
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def link_problems(path: Path) -> list[str]:
    problems = []
    for number, line in _prose_lines(path):
        for m in _LINK.finditer(re.sub(r"`[^`]*`", "", line)):
            target = m["target"]
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{number}"
            if not dest.exists():
                problems.append(f"{where}: {target}: no such file")
                continue
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: {target}: no heading with that anchor")
    return problems


def test_relative_links_and_anchors_resolve() -> None:
    problems = [p for path in doc_files() for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_page_of_docs_is_in_the_index() -> None:
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    linked = {m["target"].partition("#")[0] for m in _LINK.finditer(index)}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert sorted(pages - linked) == []


def test_slugs_follow_githubs_rule(tmp_path: Path) -> None:
    assert slug("`[broker.tls]` (`broker.config.TlsConfig`)") == "brokertls-brokerconfigtlsconfig"
    assert slug("Known limits (read these)") == "known-limits-read-these"
    assert slug("1. Operator: certificates and the broker") == (
        "1-operator-certificates-and-the-broker"
    )
    doc = tmp_path / "x.md"
    doc.write_text("# A\n## A\n```text\n# not a heading\n```\n[b](#a-1) [c](#nope) [d](y.md)\n")
    assert anchors(doc) == {"a", "a-1"}
    assert [p.split(": ", 1)[1] for p in link_problems(doc)] == [
        "#nope: no heading with that anchor",
        "y.md: no such file",
    ]
