"""Reading the docs for the tests that guard them: the documentation files and their fenced
code blocks, with the tests each block names as its guards."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


#: Info-string languages that mean "shell commands".
SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console", "zsh"})


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    #: 1-based line number of the opening fence.
    line: int
    language: str
    attributes: tuple[str, ...]
    #: The block's lines, with the fence's indentation removed.
    lines: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    @property
    def runnable(self) -> bool:
        return "runnable" in self.attributes

    @property
    def external(self) -> bool:
        return "external" in self.attributes

    @property
    def guards(self) -> tuple[str, ...]:
        return tuple(
            a.removeprefix("guarded-by=") for a in self.attributes if a.startswith("guarded-by=")
        )

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass
class _Open:
    line: int
    indent: str
    fence: str
    info: str
    lines: list[str] = field(default_factory=list)


class FenceError(ValueError):
    """A Markdown file has a fence that is never closed."""


def parse_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order.

    Raises:
        FenceError: a fence is opened and never closed.
    """
    source = path.read_text(encoding="utf-8") if text is None else text
    blocks: list[Block] = []
    current: _Open | None = None
    for number, line in enumerate(source.splitlines(), start=1):
        m = _FENCE.match(line)
        if current is None:
            if m:
                current = _Open(number, m["indent"], m["fence"], m["info"].strip())
            continue
        if (
            m
            and not m["info"].strip()
            and m["fence"][0] == current.fence[0]
            and len(m["fence"]) >= len(current.fence)
        ):
            tokens = current.info.split()
            blocks.append(
                Block(
                    path=path,
                    line=current.line,
                    language=tokens[0] if tokens else "",
                    attributes=tuple(tokens[1:]),
                    lines=tuple(current.lines),
                )
            )
            current = None
            continue
        current.lines.append(line.removeprefix(current.indent))
    if current is not None:
        raise FenceError(f"{path}:{current.line}: the fence is never closed")
    return blocks


def doc_files() -> list[Path]:
    """README.md and every Markdown file under docs/, in a stable order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
