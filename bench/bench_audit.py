"""The cluster's serialization points on PostgreSQL: audit appends and nonce consumption per
second with 1, 4, 16 and 64 concurrent appenders, each with its own engine (a broker replica of
its own), against a baseline measured in the same run on the same server: the same rows
inserted into an unchained table, one transaction each, at the same concurrency.

Every attestation appends to the audit log (a challenge's record with its nonce, then the
release's records with its session), so the audit append's ceiling is the ceiling of the whole
cluster, however many brokers share the database. The ratio to the baseline is what the
chain's sequencing costs.

The server is a private PostgreSQL (``tests.harness.postgres``) with ``fsync`` on, as in
production (``--no-fsync`` turns it off, as the tests run it); ``--url`` uses a server of
yours instead (the benchmark creates one table of its own there and appends to the audit log).
Appenders are threads spread over ``--processes`` processes; each opens its own ``Store``.
At the end the chain that all of them appended to is verified.

    python -m bench.bench_audit [--seconds 3] [--appenders 1,4,16,64] [--processes 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

WORKLOADS = ("plain", "audit", "nonce")
LABELS = {
    "plain": "plain INSERT (baseline)",
    "audit": "audit append",
    "nonce": "nonce consume",
}

#: Nonces issued before each nonce phase, spread over its appenders (consumed at most once).
NONCE_POOL = 60_000

_PLAIN = sa.Table(
    "bench_plain_records",
    sa.MetaData(),
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("decision", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("evidence_digest", sa.Text, nullable=False),
    sa.Column("parties", sa.Text, nullable=False),
    sa.Column("previous_hash", sa.Text, nullable=False),
    sa.Column("record_hash", sa.Text, nullable=False),
)
_PLAIN_PARTIES = sa.Table(
    "bench_plain_parties",
    sa.MetaData(),
    sa.Column("party", sa.Text, primary_key=True),
    sa.Column("id", sa.BigInteger, primary_key=True),
)


def _entry(i: int) -> Any:
    from broker.model import AuditEntry

    return AuditEntry(
        actor="spiffe://bench.example/sidecar/s1",
        action="key.release",
        subject=f"key-{i % 7}",
        decision="allow",
        reason="session 6c1f0a9e, approval a1",
        evidence_digest=secrets.token_hex(32),
        parties=("advertiser",),
    )


def _plain_row(i: int) -> dict[str, Any]:
    return {
        "recorded_at": datetime.now(UTC),
        "actor": "spiffe://bench.example/sidecar/s1",
        "action": "key.release",
        "subject": f"key-{i % 7}",
        "decision": "allow",
        "reason": "session 6c1f0a9e, approval a1",
        "evidence_digest": secrets.token_hex(32),
        "parties": '["advertiser"]',
        "previous_hash": "0" * 64,
        "record_hash": secrets.token_hex(32),
    }


def _operation(workload: str, store: Any, nonces: list[bytes]) -> Callable[[int], None]:
    """One appender's operation: ``op(i)`` does the i-th append (or consumption)."""
    from broker.audit import AuditLog
    from broker.nonces import NonceService

    if workload == "audit":
        log = AuditLog(store)

        def append(i: int) -> None:
            # What an attestation's challenge and release do: a decision's unit of work on
            # the hot path, with its record.
            with store.fast_unit_of_work("bench append") as uow:
                log.append_in(uow, [_entry(i)])

        return append
    if workload == "nonce":
        service = NonceService(store)
        return lambda i: service.consume(nonces[i], "ak-bench")
    insert_record = store.fast.prepare(
        sa.insert(_PLAIN)
        .values({c.name: sa.bindparam(c.name) for c in _PLAIN.c if c.name != "id"})
        .returning(_PLAIN.c.id)
    )
    insert_party = store.fast.prepare(sa.insert(_PLAIN_PARTIES))

    def plain(i: int) -> None:
        # The rows an append writes (the record and its party index row), in one transaction
        # on the same driver path, with nothing to serialize on.
        with store.fast.session("plain insert", write=True, transaction=True) as cur:
            row = cur.one(insert_record, _plain_row(i))
            assert row is not None
            cur.execute(insert_party, {"party": "advertiser", "id": row.id})

    return plain


def _appender(
    url: str,
    workload: str,
    nonces: list[bytes],
    sync: tuple[Any, Any, Any],
    results: list[int],
    errors: list[str],
) -> None:
    from broker.storage import Store

    ready, go, window = sync
    try:
        with Store.open(url, migrate=False, pool_size=1, max_overflow=1) as store:
            op = _operation(workload, store, nonces)
            # A short warm-up of the same work (connections, prepared statements), then every
            # appender starts at the same moment.
            warm = min(20, len(nonces) // 4) if workload == "nonce" else 20
            for i in range(warm):
                op(i)
            op_count = warm
            ready.wait(timeout=300)
            go.wait(timeout=300)
            start_at, end_at = window[0], window[1]
            while time.time() < start_at:
                time.sleep(0.001)
            done = 0
            while True:
                if workload == "nonce" and op_count >= len(nonces):
                    errors.append("nonce pool exhausted (raise --nonces)")
                    break
                op(op_count)
                op_count += 1
                if time.time() > end_at:
                    break
                done += 1
            results.append(done)
    except Exception as e:  # reported by the parent; the benchmark fails loudly
        errors.append(f"{type(e).__name__}: {e}")
        for barrier in (ready, go):
            barrier.abort()


def _process(
    url: str,
    workload: str,
    nonce_lists: list[list[bytes]],
    sync: tuple[Any, Any, Any],
    out: Any,
) -> None:
    results: list[int] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=_appender, args=(url, workload, n, sync, results, errors))
        for n in nonce_lists
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put((sum(results), errors))


def _issue_nonces(url: str, count: int) -> list[bytes]:
    from broker.storage import Store
    from broker.storage.schema import nonces as nonces_table

    now = datetime.now(UTC)
    pool = [secrets.token_bytes(32) for _ in range(count)]
    with Store.open(url, migrate=False) as store:
        with store.transaction("bench: issue nonces", write=True) as conn:
            conn.execute(
                sa.insert(nonces_table),
                [
                    {
                        "nonce": n,
                        "ak_name": "ak-bench",
                        "issued_at": now,
                        "expires_at": now + timedelta(hours=1),
                        "used_at": None,
                    }
                    for n in pool
                ],
            )
    return pool


def _measure(
    url: str, workload: str, appenders: int, processes: int, seconds: float, nonces: int
) -> float:
    """Operations per second of ``appenders`` concurrent appenders over ``processes``."""
    procs = min(processes, appenders)
    pool = _issue_nonces(url, nonces) if workload == "nonce" else []
    per = len(pool) // appenders if pool else 0
    lists = [pool[i * per : (i + 1) * per] for i in range(appenders)]
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    # Every appender opens its store and warms up, then waits at ``ready``; the window is set
    # once all are there (process start-up on a loaded machine takes a while), and ``go``
    # releases them.
    ready = ctx.Barrier(appenders + 1)
    go = ctx.Barrier(appenders + 1)
    window = ctx.Array("d", 2)
    children = [
        ctx.Process(
            target=_process,
            args=(url, workload, lists[p::procs], (ready, go, window), out),
        )
        for p in range(procs)
    ]
    for c in children:
        c.start()
    try:
        ready.wait(timeout=300)
        window[0] = time.time() + 0.2
        window[1] = window[0] + seconds
        go.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass  # an appender failed: its error comes through the queue
    total = 0
    problems: list[str] = []
    for _ in children:
        n, errors = out.get(timeout=seconds + 300)
        total += n
        problems.extend(errors)
    for c in children:
        c.join()
    if problems:
        raise SystemExit(f"{workload} x{appenders}: {problems[0]}")
    return total / seconds


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} / {five:.2f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per figure")
    parser.add_argument(
        "--appenders", default="1,4,16,64", help="comma-separated concurrency levels"
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="processes the appenders are spread over"
    )
    parser.add_argument("--url", help="a PostgreSQL URL to use instead of a private server")
    parser.add_argument(
        "--no-fsync", action="store_true", help="run the private server with fsync off"
    )
    parser.add_argument(
        "--nonces",
        type=int,
        default=NONCE_POOL,
        help="nonces issued before each nonce figure (each is consumed at most once)",
    )
    parser.add_argument(
        "--broker-rate",
        type=float,
        default=250.0,
        help="one broker's attestations/s (docs/benchmarks.md), for the replica estimate",
    )
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.appenders.split(",") if x.strip()]

    from broker.audit import AuditLog
    from broker.storage import Store

    server = None
    url = args.url
    if url is None:
        from tests.harness.postgres import start_postgres

        server = start_postgres(fsync=not args.no_fsync)
        url = server.url
    try:
        with Store.open(url) as store:
            _PLAIN.metadata.create_all(store.engine)
            _PLAIN_PARTIES.metadata.create_all(store.engine)
            with store.engine.connect() as conn:
                version = conn.exec_driver_sql("SHOW server_version").scalar()
                fsync = conn.exec_driver_sql("SHOW fsync").scalar()
        print(
            f"PostgreSQL {version} (fsync {fsync}), appenders over {args.processes} processes, "
            f"each its own Store; {args.seconds:g} s per figure; load average {_load()}"
        )
        print(
            f"{'appenders':>9}  {LABELS['plain']:>24}  {LABELS['audit'] + '/s':>16}  "
            f"{'x baseline':>10}  {LABELS['nonce'] + '/s':>16}  {'x baseline':>10}"
        )
        ceiling = 0.0
        for n in levels:
            rates = {
                w: _measure(url, w, n, args.processes, args.seconds, args.nonces) for w in WORKLOADS
            }
            ceiling = max(ceiling, rates["audit"])
            print(
                f"{n:>9}  {rates['plain']:>22,.0f}/s  {rates['audit']:>16,.0f}  "
                f"{rates['audit'] / rates['plain']:>9.2f}x  {rates['nonce']:>16,.0f}  "
                f"{rates['nonce'] / rates['plain']:>9.2f}x",
                flush=True,
            )
        with Store.open(url, migrate=False) as store:
            started = time.perf_counter()
            # verify_chain seals whatever is still pending first (batch sequencing).
            report = AuditLog(store).verify_chain()
            took = time.perf_counter() - started
        print(
            f"audit chain after the run: {'verifies' if report.valid else 'BROKEN'}, "
            f"{report.records_checked:,} records (sealing what was pending and verifying "
            f"took {took:.2f} s)"
        )
        # An attestation appends twice: its challenge's record (with the nonce) and its
        # release's records (with the session), each one append of the log.
        per_broker = 2 * args.broker_rate
        print(
            f"audit append ceiling: {ceiling:,.0f} appends/s = {ceiling / 2:,.0f} attestations/s "
            f"= {ceiling / per_broker:.1f} brokers at {args.broker_rate:g} attestations/s each"
        )
        print(f"load average at the end {_load()}")
        if not report.valid:
            raise SystemExit(f"audit chain broken: {report.problem}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
