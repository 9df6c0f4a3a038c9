"""Every shell block in README.md and docs/*.md is either run or guarded by a named test.

A fenced block's info string says how it is kept honest:

* ``sh runnable``: ``tests/integration/test_docs.py`` runs it, with the other runnable blocks of
  the same file, in order, in a fresh directory.
* ``sh guarded-by=<test node id>`` (one or more): a test that runs the same commands; this
  module checks that every named test function exists (by parsing its file, not importing it).
* ``sh external``: third-party commands that need something the project cannot provide here
  (an Azure subscription, a systemd host); allowed only when every command is one of
  :data:`EXTERNAL_PROGRAMS`, so no ``cleanroom`` command can hide behind it.

Blocks in other languages (``text``, ``toml``, ``json``, ``python``, ...) show output, files or
code and are exempt. A fence without an info string is refused, so an unmarked shell block
cannot slip through. The helpers here are also used by ``tests/integration/test_docs.py``.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from tests.support.docs import (
    ROOT,
    Block,
    FenceError,
    doc_files,
    parse_blocks,
)

#: Programs an ``sh external`` block may run: none of them is ours.
EXTERNAL_PROGRAMS = frozenset({"az", "systemctl", "journalctl", "spire-server", "sudo"})


def all_blocks() -> list[Block]:
    return [b for p in doc_files() for b in parse_blocks(p)]


def find_test(node_id: str) -> str | None:
    """Why ``node_id`` (``path::function`` or ``path::Class::method``, an optional ``[param]``
    suffix) does not name a test function, or ``None`` when it does."""
    path_text, sep, rest = node_id.partition("::")
    if not sep or not rest:
        return f"{node_id!r} is not a test node id (path::test_function)"
    path = ROOT / path_text
    if not path_text.startswith("tests/") or path.suffix != ".py" or not path.is_file():
        return f"{path_text} is not a test file under tests/"
    names = re.sub(r"\[.*\]$", "", rest).split("::")
    scope: list[ast.stmt] = ast.parse(path.read_text(encoding="utf-8")).body
    for i, name in enumerate(names):
        last = i == len(names) - 1
        wanted: tuple[type[ast.stmt], ...] = (
            (ast.FunctionDef, ast.AsyncFunctionDef) if last else (ast.ClassDef,)
        )
        found = [n for n in scope if isinstance(n, wanted) and getattr(n, "name", None) == name]
        if not found:
            return f"{path_text} has no {'test function' if last else 'class'} {name!r}"
        node = found[0]
        if last and not name.startswith("test"):
            return f"{path_text}::{name} is not a test (its name must start with 'test')"
        if isinstance(node, ast.ClassDef):
            scope = node.body
    return None


#: A placeholder such as <EK_ID> stands for one argument, not for two redirections.
_PLACEHOLDER = re.compile(r"<[A-Za-z_][^<>\s]*>")


def invocations(block: Block) -> list[list[str]]:
    """Every command of a shell block as its argument list (program first): continuations
    joined, comments skipped, each part of a pipeline or list (``|``, ``&&``, ``;``) its own
    command, ``VAR=value`` prefixes and redirections (with their files) left out."""
    found: list[list[str]] = []
    text = _PLACEHOLDER.sub("PLACEHOLDER", block.text)
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        redirect = False
        for token in lexer:
            if redirect:
                redirect = False  # the file a redirection names
            elif token and set(token) <= set("<>&") and set(token) & set("<>"):
                redirect = True
            elif token and set(token) <= set("|&;()"):
                if current:
                    found.append(current)
                current = []
            elif current or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", token):
                current.append(token)
        if current:
            found.append(current)
    return found


def commands(block: Block) -> list[str]:
    """The program of every command of a shell block (see :func:`invocations`)."""
    return [argv[0] for argv in invocations(block)]


def block_problems(block: Block) -> list[str]:
    """What is wrong with one block's marking (empty when it is fine)."""
    if not block.language:
        return [f"{block.where}: a fence needs an info string (sh runnable, text, toml, ...)"]
    if not block.is_shell:
        if block.runnable or block.guards or block.external:
            return [f"{block.where}: only shell blocks are run or guarded ({block.language})"]
        return []
    kinds = sum((block.runnable, bool(block.guards), block.external))
    if kinds == 0:
        return [
            f"{block.where}: a shell block must be 'runnable', 'guarded-by=<test>' or 'external'"
        ]
    if kinds > 1:
        return [f"{block.where}: choose one of runnable, guarded-by and external"]
    problems = []
    for guard in block.guards:
        why = find_test(guard)
        if why is not None:
            problems.append(f"{block.where}: guard {why}")
    if block.external:
        ours = [p for p in commands(block) if p not in EXTERNAL_PROGRAMS]
        if ours:
            problems.append(
                f"{block.where}: an external block may only run {sorted(EXTERNAL_PROGRAMS)}, "
                f"not {ours}"
            )
    unknown = [
        a
        for a in block.attributes
        if a not in ("runnable", "external") and not a.startswith("guarded-by=")
    ]
    if unknown:
        problems.append(f"{block.where}: unknown attribute(s) {unknown}")
    return problems


# --- the checks -------------------------------------------------------------------------------


def test_every_shell_block_is_runnable_guarded_or_external() -> None:
    problems = [p for block in all_blocks() for p in block_problems(block)]
    assert not problems, "\n".join(problems)


def test_the_readme_has_runnable_blocks_and_the_docs_are_found() -> None:
    blocks = all_blocks()
    files = {b.path.name for b in blocks}
    assert {"README.md", "operations.md", "manual-recipe.md"} <= files
    readme = [b for b in blocks if b.path.name == "README.md"]
    assert any(b.runnable for b in readme)
    assert any(b.runnable for b in blocks if b.path.name == "manual-recipe.md")


def test_ci_runs_make_test() -> None:
    """Guards the README's ``make test``: CI (.ci/run) runs exactly it, and it runs pytest."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^\s*make test\b", ci, re.MULTILINE), ".ci/run does not call `make test`"
    recipe = _make_recipe("test")
    assert any("/bin/pytest" in line for line in recipe), recipe
    assert "setup" in _make_prerequisites("test")


def test_make_demo_runs_cleanroom_demo() -> None:
    """Guards the README's ``make demo`` together with tests/integration/test_demo.py, which runs
    ``cleanroom demo`` itself: the target installs everything, then runs that command."""
    assert _make_recipe("demo") == ["$(VENV)/bin/cleanroom demo"]
    assert "setup" in _make_prerequisites("demo")


def _makefile() -> list[str]:
    return (ROOT / "Makefile").read_text(encoding="utf-8").splitlines()


def _make_prerequisites(target: str) -> list[str]:
    for line in _makefile():
        if line.startswith(f"{target}:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"the Makefile has no target {target!r}")


def _make_recipe(target: str) -> list[str]:
    lines = _makefile()
    for i, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            recipe = []
            for body in lines[i + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip())
            return recipe
    raise AssertionError(f"the Makefile has no target {target!r}")


# --- the helpers themselves -----------------------------------------------------------------


def test_parse_blocks_reads_info_strings_indentation_and_lines(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"
    text = "# T\n```sh runnable\necho a\n```\n* item\n  ```text\n  shown\n  ````\n~~~\nbare\n~~~\n"
    blocks = parse_blocks(doc, text)
    assert [(b.line, b.language, b.attributes, b.lines) for b in blocks] == [
        (2, "sh", ("runnable",), ("echo a",)),
        (6, "text", (), ("shown",)),
        (9, "", (), ("bare",)),
    ]
    with pytest.raises(FenceError, match=r"x\.md:1"):
        parse_blocks(doc, "```sh\necho never closed\n")


def test_block_problems_catch_every_kind_of_mistake(tmp_path: Path) -> None:
    doc = tmp_path / "x.md"

    def problems(info: str, body: str = "cleanroom --help") -> list[str]:
        (block,) = parse_blocks(doc, f"```{info}\n{body}\n```\n")
        return [p.split(": ", 1)[1] for p in block_problems(_relocated(block))]

    assert problems("sh runnable") == []
    assert problems("text") == []
    assert problems("sh guarded-by=tests/unit/test_docs_guards.py::test_ci_runs_make_test") == []
    assert problems("") == ["a fence needs an info string (sh runnable, text, toml, ...)"]
    assert "must be 'runnable'" in problems("sh")[0]
    assert "must be 'runnable'" in problems("console")[0]
    assert "choose one" in problems("sh runnable external")[0]
    assert (
        "no test function 'test_nope'"
        in problems("sh guarded-by=tests/unit/test_docs_guards.py::test_nope")[0]
    )
    assert "not a test file" in problems("sh guarded-by=tests/nope.py::test_x")[0]
    assert "not a test node id" in problems("sh guarded-by=tests/unit/test_docs_guards.py")[0]
    assert (
        "not a test (its name"
        in problems("sh guarded-by=tests/unit/test_docs_guards.py::find_test")[0]
    )
    assert "only shell blocks" in problems("toml runnable")[0]
    assert "unknown attribute" in problems("sh runnable fast")[0]
    assert problems("sh external", "az login\nsystemctl start x") == []
    assert "not ['cleanroom']" in problems("sh external", "az login\ncleanroom demo")[0]


def test_find_test_resolves_classes_and_parameters() -> None:
    this = "tests/unit/test_docs_guards.py"
    assert find_test(f"{this}::test_find_test_resolves_classes_and_parameters") is None
    assert find_test(f"{this}::test_find_test_resolves_classes_and_parameters[x-1]") is None
    assert "no class 'Nope'" in str(find_test(f"{this}::Nope::test_x"))


def test_commands_joins_continuations_and_skips_comments(tmp_path: Path) -> None:
    (block,) = parse_blocks(
        tmp_path / "x.md",
        "```sh\n# a comment\naz keyvault key create \\\n    --name k   # trailing\n\n"
        "FOO=1 cleanroom demo < in > out | tee x && az logout; sudo true\n"
        "az role create --id <principal id>\n```\n",
    )
    assert commands(block) == ["az", "cleanroom", "tee", "az", "sudo", "az"]


def _relocated(block: Block) -> Block:
    # Blocks made from tmp_path files are reported relative to the repository root.
    return Block(
        path=ROOT / "x.md",
        line=block.line,
        language=block.language,
        attributes=block.attributes,
        lines=block.lines,
    )


# --- cleanroom commands in blocks that are not run -------------------------------------------


def cleanroom_invocations(block: Block) -> list[list[str]]:
    """The arguments of the ``cleanroom`` commands in a shell block (see :func:`invocations`)."""
    return [argv[1:] for argv in invocations(block) if Path(argv[0]).name == "cleanroom"]


def test_cleanroom_commands_in_guarded_and_external_blocks_parse() -> None:
    """Blocks that no test runs verbatim must still be commands the CLI accepts, so a renamed
    option or a usage summary (``[--x A|B]``) shown as a command is caught."""
    import contextlib
    import io

    from cleanroom.app.cli import build_parser

    problems = []
    for block in all_blocks():
        if not block.is_shell or block.runnable:
            continue
        for argv in cleanroom_invocations(block):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    build_parser(argv[0] if argv else None).parse_args(argv)
            except SystemExit as e:
                if e.code not in (0, None):
                    last = err.getvalue().strip().splitlines()[-1:]
                    problems.append(f"{block.where}: cleanroom {shlex.join(argv)}: {last}")
    assert not problems, "\n".join(problems)


def test_the_invocation_finder_sees_what_a_shell_runs() -> None:
    block = Block(
        path=ROOT / "README.md",
        line=1,
        language="sh",
        attributes=(),
        lines=(
            "# cleanroom not-a-command",
            "X=1 .venv/bin/cleanroom seal -r a.pub in \\",
            "  -o out && cleanroom open -k a.key out | head > f.txt",
            "echo cleanroom",
            "cleanroom keygen --out a [--kem x25519|mlkem768-x25519]",
            "cleanroom admin ak revoke <AK_NAME> --reason r < /dev/null",
        ),
    )
    assert cleanroom_invocations(block) == [
        ["seal", "-r", "a.pub", "in", "-o", "out"],
        ["open", "-k", "a.key", "out"],
        ["keygen", "--out", "a", "[--kem", "x25519"],
        ["admin", "ak", "revoke", "PLACEHOLDER", "--reason", "r"],
    ]
