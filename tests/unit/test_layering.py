"""The package layers, enforced: every import of our code (module level, function level and
typing-only alike) is read with :mod:`ast` and checked against the rules of
docs/architecture.md.

Layers, bottom to top:

1. The shared bottom: ``cleanroom`` itself (configuration, logs, the loopback helper, the
   context-manager bases of ``cleanroom.closing``) and the generated protocol code
   ``cleanroom.v1``. It imports no application code.
2. The leaves: ``sealing``, ``evidence``, ``pki``, ``blobstore`` and the workload SDK
   ``workload``. Each imports the bottom and, where listed, another leaf below it; nothing above.
3. The broker (``broker``): the bottom and the leaves it needs (``sealing``, ``evidence``,
   ``pki``); never the sidecar, the workload SDK or ``blobstore``.
4. The sidecar (``sidecar``): the bottom, the leaves, and of the broker only its public client
   (:data:`BROKER_PUBLIC_CLIENT`).
5. The application (``cleanroom.app``: the ``cleanroom`` command, the demo, the emulators, the
   software TPM launcher) may import every package but no command-line module; the
   ``cleanroom`` command (``cleanroom.app.cli``) and each package's ``__main__`` are the entry
   points and may import anything.

Inside the broker, the gRPC layer (``broker.server``) calls the core (``broker.core``: the use
cases and their composition root) and nothing below it: it never imports the storage, the audit
log, the nonces or the KEK registry (:data:`BELOW_THE_CORE`). The core never imports the gRPC
layer.

A package's own command-line module (``<package>.cli``, ``broker.admin_cli``) follows its
package's rules and may also use a leaf (``sealing.cli`` reads and writes Azure blobs through
``blobstore``); only the entry points import a command-line module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BOTTOM = "cleanroom"
APP = "cleanroom.app"
LEAVES = frozenset({"sealing", "evidence", "pki", "blobstore", "workload"})
PACKAGES = frozenset({BOTTOM, APP, "broker", "sidecar", *LEAVES})

#: The modules of the broker that the sidecar (and a party's tools) may import: the typed gRPC
#: client, the byte layouts of registered and released keys, and the broker's errors.
BROKER_PUBLIC_CLIENT = frozenset(
    {"broker.client", "broker.client_errors", "broker.keyseal", "broker.errors"}
)

#: The broker's gRPC layer and its core (the use cases, wired by ``broker.core.compose``).
BROKER_SERVER = "broker.server"
BROKER_CORE = "broker.core"
#: What only the core (and the code that opens its resources, ``broker.app``) may reach: the
#: gRPC layer goes through the use cases instead.
BELOW_THE_CORE = (
    "broker.storage",
    "broker.audit",
    "broker.nonces",
    "broker.custody",
    "broker.rotation",
)

#: Which packages each layer's package may import (its own package always).
ALLOWED: dict[str, frozenset[str]] = {
    BOTTOM: frozenset(),
    "sealing": frozenset({BOTTOM}),
    "evidence": frozenset({BOTTOM}),
    "pki": frozenset({BOTTOM}),
    "workload": frozenset({BOTTOM}),
    "blobstore": frozenset({BOTTOM, "sealing"}),
    "broker": frozenset({BOTTOM, "sealing", "evidence", "pki"}),
    "sidecar": frozenset({BOTTOM, "broker", *LEAVES}),
    APP: PACKAGES,
}

#: The ``cleanroom`` command: it dispatches to each package's command-line module.
DISPATCHER = "cleanroom.app.cli"

#: Command-line modules: they follow their package's rules and may also use a leaf.
CLI_MODULES = frozenset(
    {
        "broker.cli",
        "broker.admin_cli",
        "broker.admin_status",
        "broker.admin_common",
        "broker.migrate_cli",
        "sealing.cli",
        "pki.cli",
        "sidecar.cli",
    }
)


def package_of(module: str) -> str | None:
    """The layer package of a dotted module name, or None for third-party code."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if parts[0] == BOTTOM and len(parts) > 1 and parts[1] == "app":
        return APP
    return parts[0]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (or ``module.name`` for ``from module import name``)
    where: str  # file:line


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[Import]:
    """Every import statement in ``path``, wherever it is (module, function, TYPE_CHECKING)."""
    source = module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, where)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                yield Import(source, f"{module}.{alias.name}", where)


def our_files() -> list[Path]:
    out = []
    for top in sorted({p.split(".")[0] for p in PACKAGES}):
        out.extend(sorted((ROOT / top).rglob("*.py")))
    return out


def resolve(target: str) -> str:
    """``pkg.mod.name`` -> the module it names: ``pkg.mod`` unless ``pkg.mod.name`` is a module
    or package in the tree."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ROOT.joinpath(*parts[:n])
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts[:n])
    return target


def violation(imp: Import) -> str | None:
    """Why ``imp`` breaks a rule, or None when it does not."""
    src_pkg = package_of(imp.source)
    dst_pkg = package_of(imp.target)
    if src_pkg is None or dst_pkg is None:
        return None
    if imp.source.endswith("__main__") or imp.source == DISPATCHER:
        return None  # the entry points (``cleanroom``, ``python -m``) may import anything
    target = resolve(imp.target)
    if (target in CLI_MODULES and imp.source not in CLI_MODULES) or (
        dst_pkg == APP and src_pkg != APP
    ):
        return f"{imp.source} imports the command-line module {target}"
    if src_pkg == dst_pkg == "broker":
        return _broker_violation(imp.source, target)
    if src_pkg == dst_pkg:
        return None
    allowed = ALLOWED[src_pkg]
    if imp.source in CLI_MODULES:
        allowed = allowed | LEAVES
    if dst_pkg not in allowed:
        return f"{imp.source} ({src_pkg}) must not import {target} ({dst_pkg})"
    if src_pkg == "sidecar" and dst_pkg == "broker" and target not in BROKER_PUBLIC_CLIENT:
        return f"{imp.source} imports {target}, not the broker's public client"
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _broker_violation(source: str, target: str) -> str | None:
    """The broker's inner rule: the gRPC layer calls the core, never what is below it; the core
    never calls the gRPC layer."""
    if _within(source, BROKER_SERVER) and any(_within(target, m) for m in BELOW_THE_CORE):
        return f"{source} (the gRPC layer) reaches below the core: {target}"
    if _within(source, BROKER_CORE) and _within(target, BROKER_SERVER):
        return f"{source} (the core) imports the gRPC layer: {target}"
    return None


def test_every_import_respects_the_layers() -> None:
    problems = [
        f"{imp.where}: {why}"
        for path in our_files()
        for imp in imports_of(path)
        if (why := violation(imp)) is not None
    ]
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


#: What the core must not import: it writes no SQL (no SQLAlchemy, no schema tables) but calls
#: the repositories of :mod:`broker.storage` inside its units of work.
SQL_MODULES = ("sqlalchemy", "broker.storage.schema")

#: The modules that open the core's resources or drive it from a command line: they reach the
#: audit log only through a use case, never themselves.
ABOVE_THE_AUDIT_LOG = ("broker.app", "broker.kek_rotate", *sorted(CLI_MODULES))


def core_violation(imp: Import) -> str | None:
    """Why ``imp`` puts SQL in the core, or the audit log in the layers above it; else None."""
    target = resolve(imp.target)
    if _within(imp.source, BROKER_CORE) and any(_within(target, m) for m in SQL_MODULES):
        return f"{imp.source} (the core) writes SQL: it imports {target}"
    if imp.source in ABOVE_THE_AUDIT_LOG and _within(target, "broker.audit"):
        return f"{imp.source} reaches the audit log past the core: {target}"
    return None


def test_the_core_writes_no_sql_and_only_the_core_appends_audit_records() -> None:
    """The core's queries live in the storage repositories; ``broker init`` and the other
    commands record their decisions through the core's use cases."""
    problems = [
        f"{imp.where}: {why}"
        for path in our_files()
        for imp in imports_of(path)
        if (why := core_violation(imp)) is not None
    ]
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "target", "forbidden"),
    [
        ("broker.core.operations", "sqlalchemy", True),
        ("broker.core.custody", "sqlalchemy.update", True),
        ("broker.core.custody", "broker.storage.schema.kek_fingerprints", True),
        ("broker.core.custody", "broker.storage.Store", False),
        ("broker.storage.repositories.keks", "sqlalchemy", False),
        ("broker.app", "broker.audit.AuditLog", True),
        ("broker.app", "broker.core.compose.build_broker", False),
        ("broker.core.compose", "broker.audit.AuditLog", False),
    ],
)
def test_the_core_rules_catch_what_they_should(source: str, target: str, forbidden: bool) -> None:
    assert (core_violation(Import(source, target, "x.py:1")) is not None) is forbidden


@pytest.mark.parametrize(
    ("source", "target", "forbidden"),
    [
        ("broker.core.attestation", "sidecar.run", True),
        ("broker.policy", "blobstore.store", True),
        ("broker.quote", "workload.client", True),
        ("sidecar.run.attest", "broker.custody", True),
        ("sidecar.run.attest", "broker.client.BrokerClient", False),
        ("sidecar.run.attest", "broker.keyseal.open_release", False),
        ("blobstore.store", "sidecar.dataplane.outputs", True),
        ("evidence.pcr", "broker.errors", True),
        ("cleanroom.config", "broker.config", True),
        ("cleanroom.config", "cleanroom.app.cli", True),
        ("cleanroom.app.demo.run", "broker.admin_cli", True),
        ("cleanroom.app.cli", "sidecar.cli", False),
        ("cleanroom.app.demo.narrate", "sealing.cli", True),
        ("cleanroom.app.demo.run", "broker.manifests", False),
        ("broker.core.compose", "broker.admin_cli", True),
        ("sealing.cli", "blobstore.open_reader", False),
        ("sealing.envelope", "blobstore.open_reader", True),
        ("broker.__main__", "cleanroom.app.cli", False),
        ("sidecar.run.attest", "broker.client_errors.ClientSetupError", False),
        ("broker.server.servicers", "broker.storage.store.Store", True),
        ("broker.server.status_report", "broker.storage.migrate", True),
        ("broker.server.server", "broker.nonces.NonceService", True),
        ("broker.server.interceptor", "broker.audit.AuditLog", True),
        ("broker.server.servicers", "broker.rotation", True),
        ("broker.server.servicers", "broker.core.compose.Broker", False),
        ("broker.server.server", "broker.app.open_broker", False),
        ("broker.core.attestation", "broker.server.status", True),
        ("broker.core.compose", "broker.storage.Store", False),
        ("broker.app", "broker.storage.migrate.head_revision", False),
    ],
)
def test_the_rules_catch_what_they_should(source: str, target: str, forbidden: bool) -> None:
    """The checker itself: a rule that accepts everything would pass the test above."""
    assert (violation(Import(source, target, "x.py:1")) is not None) is forbidden


def test_the_checker_sees_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sidecar.run import runner\n")
    tree = ast.parse(module.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert [n.module for n in found] == ["sidecar.run"]


def test_tests_import_no_test_module_and_no_benchmark() -> None:
    """Shared test code lives in tests/support (and tests/harness, tests/vectors): a test never
    imports another test module, and only the benchmarks' own tests import ``bench``."""
    problems = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        benchmark_test = {"bench"} & set(path.relative_to(ROOT / "tests").parts[:2])
        for imp in imports_of(path):
            module = resolve(imp.target)
            last = module.rpartition(".")[2]
            if module.startswith("tests.") and last.startswith("test_"):
                problems.append(f"{imp.where}: imports the test module {module}")
            if module.split(".")[0] == "bench" and not benchmark_test:
                problems.append(f"{imp.where}: imports the benchmark {module}")
    assert not problems, "\n".join(problems)


#: The core's use cases and the broker that holds them: only the composition root builds them.
CORE_CLASSES = frozenset(
    {
        "Broker",
        "Enrollment",
        "Attestation",
        "PolicyAdministration",
        "KeyCustody",
        "LocalKekRotator",
        "KekFingerprintRecorder",
        "Operations",
    }
)
COMPOSITION_ROOT = Path("broker/core/compose.py")


def test_only_the_composition_root_builds_the_core() -> None:
    """The server, the commands, the benchmarks and the tests get their broker from
    ``build_broker`` (through ``broker.app.open_broker``): nobody else wires a use case."""
    problems = []
    for top in ("broker", "cleanroom", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel == COMPOSITION_ROOT:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name | ast.Attribute)
                    and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr)
                    in CORE_CLASSES
                    # Test helpers name their own classes alike (a ``Broker`` process handle);
                    # only keyword-built objects with the core's constructor arguments count.
                    and any(k.arg in {"store", "trail", "enrollment"} for k in node.keywords)
                ):
                    problems.append(f"{rel}:{node.lineno}")
    assert not problems, "the core built outside broker/core/compose.py:\n" + "\n".join(problems)
