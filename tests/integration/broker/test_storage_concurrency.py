"""Separate processes racing on one database, as broker replicas do.

Each worker is a fresh interpreter (multiprocessing "spawn") with its own Store and connection
pool; a barrier lines them up so that they really run at the same time (before every nonce
and every append).
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from broker.audit import AuditLog
from broker.errors import NonceReplayError
from broker.model import AuditEntry
from broker.nonces import NonceService
from broker.storage import Store

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]

NONCES = 200
APPENDS = 100


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    url = request.getfixturevalue("postgres_url")
    assert isinstance(url, str)
    return url


# --- workers (module level: spawn imports them by name) ------------------------------------


def _consume_all(url: str, nonces: list[bytes], barrier: Barrier, out: Any) -> None:
    try:
        with Store.open(url, migrate=False, pool_size=2) as store:
            service = NonceService(store, ttl_seconds=600)
            won: list[int] = []
            replays = 0
            for i, nonce in enumerate(nonces):
                # Line up before every nonce: each one is a head-to-head race.
                barrier.wait(timeout=60)
                try:
                    service.consume(nonce, "ak-race")
                    won.append(i)
                except NonceReplayError:
                    replays += 1
            out.put(("ok", won, replays))
    except BaseException as e:  # reported to the parent, which fails the test
        out.put(("error", repr(e), 0))


def _append_all(url: str, worker: int, barrier: Barrier, out: Any) -> None:
    try:
        with Store.open(url, migrate=False, pool_size=2) as store:
            log = AuditLog(store)
            for i in range(APPENDS):
                barrier.wait(timeout=60)
                e = AuditEntry(
                    actor=f"worker-{worker}",
                    action="test",
                    subject=str(i),
                    decision="allow",
                    parties=(f"p{worker}",),
                )
                if i % 10 == 0:
                    log.append_many(
                        [
                            e,
                            AuditEntry(
                                actor=f"worker-{worker}",
                                action="batch",
                                subject=str(i),
                                decision="allow",
                            ),
                        ]
                    )
                else:
                    log.append(e)
            out.put(("ok", worker, 0))
    except BaseException as e:
        out.put(("error", repr(e), 0))


def _open(url: str, barrier: Barrier, out: Any) -> None:
    try:
        barrier.wait(timeout=60)
        with Store.open(url, migrate=True, pool_size=1) as store:
            store.list_eks()
        out.put(("ok", None, 0))
    except BaseException as e:
        out.put(("error", repr(e), 0))


def _race(target: Callable[..., None], *args_per_worker: tuple[Any, ...]) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args_per_worker))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in args_per_worker]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r[1] for r in results if r[0] == "error"]
    assert not errors, errors
    return results


# --- tests ---------------------------------------------------------------------------------


def test_two_processes_racing_for_the_same_nonces_win_each_once(db_url: str) -> None:
    with Store.open(db_url) as store:
        service = NonceService(store, ttl_seconds=600)
        nonces = [service.issue("ak-race")[0] for _ in range(NONCES)]
    results = _race(_consume_all, (db_url, nonces), (db_url, nonces))
    wins = [i for r in results for i in r[1]]
    replays = sum(r[2] for r in results)
    assert sorted(wins) == list(range(NONCES)), "every nonce accepted exactly once"
    assert replays == NONCES
    # Both processes won some: they really raced rather than running one after the other.
    assert all(r[1] for r in results), [len(r[1]) for r in results]


def test_concurrent_appends_from_two_processes_keep_one_chain(db_url: str) -> None:
    with Store.open(db_url) as store:
        AuditLog(store).append(
            AuditEntry(actor="parent", action="start", subject="", decision="allow")
        )
    _race(_append_all, (db_url, 1), (db_url, 2))
    per_worker = APPENDS + APPENDS // 10
    with Store.open(db_url) as store:
        log = AuditLog(store)
        report = log.verify_chain_or_raise()
        assert report.records_checked == 1 + 2 * per_worker
        records = []
        after = 0
        while batch := log.list_records(after_sequence=after, limit=1000):
            records.extend(batch)
            after = batch[-1].sequence
        assert [r.sequence for r in records] == list(range(1, 2 + 2 * per_worker))
        for w in (1, 2):
            mine = [r for r in records if r.actor == f"worker-{w}"]
            assert len(mine) == per_worker
            assert len(log.list_records(party=f"p{w}", limit=1000)) == APPENDS
        actors = [r.actor for r in records[1:]]
        switches = sum(a != b for a, b in itertools.pairwise(actors))
        assert switches > 1, "the two writers interleaved"


def test_replicas_migrating_a_fresh_database_at_once(db_url: str) -> None:
    _race(_open, (db_url,), (db_url,), (db_url,))
    with Store.open(db_url, migrate=False) as store, store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert conn.execute(sa.text("SELECT count(*) FROM audit_head")).scalar() == 1


def test_threads_of_one_process_share_a_store(db_url: str) -> None:
    """What one broker does under load: many threads, one Store, one pool."""
    with Store.open(db_url, pool_size=4, max_overflow=4) as store:
        service = NonceService(store, ttl_seconds=600)
        log = AuditLog(store)
        nonces = [service.issue("ak-threads")[0] for _ in range(100)]
        start = threading.Barrier(8)

        def worker(seed: int) -> list[int]:
            order = list(range(len(nonces)))
            random.Random(seed).shuffle(order)
            won = []
            start.wait(timeout=30)
            for i in order:
                try:
                    service.consume(nonces[i], "ak-threads")
                except NonceReplayError:
                    continue
                won.append(i)
                log.append(
                    AuditEntry(
                        actor=f"thread-{seed}", action="nonce", subject=str(i), decision="allow"
                    )
                )
            return won

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(worker, range(8)))
        assert sorted(i for r in results for i in r) == list(range(len(nonces)))
        assert log.verify_chain_or_raise().records_checked == len(nonces)
        assert sum(1 for r in results if r) > 1, "several threads won nonces"
