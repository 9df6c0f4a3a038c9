"""blobstore against a real Azurite: multi-block round trips in constant memory, commit-on-close,
clear errors for missing containers, missing blobs and refused credentials."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

from blobstore import (
    BlobAuthError,
    BlobChangedError,
    BlobConfig,
    BlobConfigError,
    BlobExistsError,
    BlobNotFoundError,
    BlobReader,
    BlobStore,
    BlobStoreError,
    ContainerNotFoundError,
    open_reader,
    open_writer,
)
from sealing.envelope import OpenReader, SealWriter, new_data_key
from tests.harness.azurite import Azurite
from tests.support.memory import reset_peak_rss, rss

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

MiB = 1 << 20


class PatternSource:
    """``size`` bytes of a fixed random pattern, produced on demand (never all in memory)."""

    def __init__(self, size: int, *, seed: bytes = b"blob") -> None:
        self.remaining = size
        self.pattern = hashlib.shake_256(seed).digest(MiB + 4093)
        self.offset = 0
        self.digest = hashlib.sha256()

    def readinto(self, buffer: WriteableBuffer) -> int:
        out = memoryview(buffer).cast("B")
        n = min(len(out), self.remaining, len(self.pattern) - self.offset)
        out[:n] = self.pattern[self.offset : self.offset + n]
        self.digest.update(out[:n])
        self.offset = (self.offset + n) % len(self.pattern)
        self.remaining -= n
        return n

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(min(size if size >= 0 else MiB, MiB))
        n = self.readinto(buffer)
        return bytes(buffer[:n])


def _service(azurite: Azurite) -> Iterator[BlobServiceClient]:
    client = BlobServiceClient.from_connection_string(azurite.connection_string())
    try:
        yield client
    finally:
        client.close()


def _names(azurite: Azurite, container_url: str) -> list[str]:
    container = container_url.rsplit("/", 1)[1]
    for service in _service(azurite):
        return sorted(b.name for b in service.get_container_client(container).list_blobs())
    return []


def _committed_and_uncommitted(azurite: Azurite, url: str) -> tuple[int, int]:
    _, _, rest = url.partition("://")
    _, container, blob = rest.split("/", 2)
    for service in _service(azurite):
        committed, uncommitted = service.get_blob_client(container, blob).get_block_list("all")
        return len(committed), len(uncommitted)
    return 0, 0


def test_a_sealed_stream_larger_than_many_blocks_round_trips_in_constant_memory(
    azurite: Azurite, blob_container: str
) -> None:
    # Resident memory is measured, not tracemalloc: the SDK's range download calls list() on a
    # generator whose __len__ is the range's byte count, which reserves 8 bytes of address
    # space per byte (never touched, so never resident) and would swamp a tracemalloc peak.
    size = 64 * MiB
    config = BlobConfig(
        connection_string=azurite.connection_string(),
        block_size=4 * MiB,
        read_chunk_size=4 * MiB,
        max_concurrency=2,
    )
    url = f"{blob_container}/party/train.sealed"
    key = new_data_key()
    source = PatternSource(size)
    with BlobStore(config=config) as store:
        # Warm up the connection pool and imports, so they do not count as growth.
        with store.open_writer(f"{blob_container}/warm-up") as w:
            w.write(b"w" * MiB)
        with store.open_reader(f"{blob_container}/warm-up") as r:
            r.read()
        before = reset_peak_rss()
        with store.open_writer(url) as sink, SealWriter(sink, data_key=key, key_id="k1") as w:
            assert w.copy_from(source) == size
        upload_growth = rss()[0] - before
        assert store.size(url) > size
        opened = hashlib.sha256()
        before = reset_peak_rss()
        with store.open_reader(url) as raw:
            assert isinstance(raw, BlobReader) and raw.size > size
            with OpenReader(raw, data_key=key) as reader:
                buffer = bytearray(MiB)
                total = 0
                while n := reader.readinto(buffer):
                    opened.update(memoryview(buffer)[:n])
                    total += n
        download_growth = rss()[0] - before
    assert total == size and opened.digest() == source.digest.digest()
    # 17 blocks of 4 MiB were staged and committed; memory stayed a few blocks, not 64 MiB.
    # Up to six blocks in flight is constant memory: the one being filled, one per staging
    # thread and the SDK's copy of each request body (8-17 MiB measured); a stream held whole
    # would be 64 MiB and more.
    assert _committed_and_uncommitted(azurite, url) == (17, 0)
    bound = 6 * config.block_size
    assert bound < size // 2
    assert upload_growth < bound, f"upload grew RSS by {upload_growth / MiB:.1f} MiB"
    assert download_growth < bound, f"download grew RSS by {download_growth / MiB:.1f} MiB"


def test_parallel_staging_keeps_block_order(blob_config: BlobConfig, blob_container: str) -> None:
    config = BlobConfig(
        connection_string=blob_config.connection_string,
        block_size=64 << 10,
        read_chunk_size=100 << 10,
        max_concurrency=4,
    )
    url = f"{blob_container}/order.bin"
    source = PatternSource(3 * MiB + 12345, seed=b"order")
    with open_writer(url, config=config) as w:
        while chunk := source.read(50_000):
            w.write(chunk)
    with open_reader(url, config=config) as r:
        assert hashlib.sha256(r.read()).digest() == source.digest.digest()


def test_an_exception_in_the_block_commits_nothing(
    azurite: Azurite, blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/aborted.sealed"
    with pytest.raises(RuntimeError), open_writer(url, config=blob_config) as w:
        w.write(b"x" * (blob_config.block_size * 3 + 5))
        raise RuntimeError("the producer died")
    assert _names(azurite, blob_container) == []
    with pytest.raises(BlobNotFoundError):
        open_reader(url, config=blob_config)


def test_an_aborted_overwrite_leaves_the_old_blob_whole(
    azurite: Azurite, blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/kept.sealed"
    with open_writer(url, config=blob_config) as w:
        w.write(b"old content")
    with pytest.raises(RuntimeError), open_writer(url, overwrite=True, config=blob_config) as w:
        w.write(b"n" * (blob_config.block_size * 2))
        raise RuntimeError("stop")
    with open_reader(url, config=blob_config) as r:
        assert r.read() == b"old content"
    # The staged blocks exist only as uncommitted blocks of the old blob.
    assert _committed_and_uncommitted(azurite, url) == (1, 2)


def test_an_empty_stream_commits_an_empty_blob(
    blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/empty"
    with open_writer(url, config=blob_config):
        pass
    with open_reader(url, config=blob_config) as r:
        assert r.read() == b""


def test_no_overwrite_unless_asked_and_the_commit_is_conditional(
    blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/once"
    with BlobStore(config=blob_config) as store:
        first = store.open_writer(url)
        second = store.open_writer(url)
        first.write(b"first")
        second.write(b"second")
        first.close()
        # Both opened while the name was free; only the first commit wins.
        with pytest.raises(BlobExistsError, match="already exists"):
            second.close()
        with pytest.raises(BlobExistsError):
            store.open_writer(url)
        with store.open_reader(url) as r:
            assert r.read() == b"first"
        with store.open_writer(url, overwrite=True) as w:
            w.write(b"third")
        with store.open_reader(url) as r:
            assert r.read() == b"third"


def test_a_blob_replaced_while_read_fails_instead_of_mixing_versions(
    blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/moving"
    with BlobStore(config=blob_config) as store:
        with store.open_writer(url) as w:
            w.write(b"a" * (blob_config.read_chunk_size * 3))
        with store.open_reader(url) as r:
            assert r.read(10) == b"a" * 10
            with store.open_writer(url, overwrite=True) as w:
                w.write(b"b" * (blob_config.read_chunk_size * 3))
            with pytest.raises(BlobChangedError):
                r.read()


def test_missing_container_and_missing_blob_are_named(
    blob_config: BlobConfig, blob_container: str
) -> None:
    with BlobStore(config=blob_config) as store:
        for call in (
            lambda: store.open_reader("azure://devstoreaccount1/no-such-container/x"),
            lambda: store.open_writer("azure://devstoreaccount1/no-such-container/x"),
            lambda: store.size("azure://devstoreaccount1/no-such-container/x"),
        ):
            with pytest.raises(ContainerNotFoundError, match="container does not exist") as info:
                call()
            assert info.value.__cause__ is not None
        with pytest.raises(BlobNotFoundError, match="blob does not exist"):
            store.open_reader(f"{blob_container}/no-such-blob")
        assert not store.exists(f"{blob_container}/no-such-blob")
        with pytest.raises(BlobNotFoundError):
            store.delete(f"{blob_container}/no-such-blob")


def test_a_wrong_account_key_is_an_auth_error(
    azurite: Azurite, blob_config: BlobConfig, blob_container: str
) -> None:
    url = f"{blob_container}/secret"
    with open_writer(url, config=blob_config) as w:
        w.write(b"data")
    wrong = base64.b64encode(b"not the key" * 6).decode()
    bad = BlobConfig(connection_string=azurite.connection_string(account_key=wrong))
    calls: list[Callable[[], object]] = [
        lambda: open_reader(url, config=bad),
        lambda: open_writer(url, config=bad),
    ]
    for call in calls:
        with pytest.raises(BlobAuthError, match="refused the credentials") as info:
            call()
        assert wrong not in str(info.value)
    with pytest.raises(BlobConfigError, match="not 'otheraccount'"):
        open_reader("azure://otheraccount/c01/x", config=blob_config)


def test_sas_tokens_from_config_and_from_the_url(
    azurite: Azurite, blob_config: BlobConfig, blob_container: str
) -> None:
    container = blob_container.rsplit("/", 1)[1]
    url = f"{blob_container}/shared.sealed"
    with open_writer(url, config=blob_config) as w:
        w.write(b"for the publisher")
    read_only = generate_blob_sas(
        azurite.account,
        container,
        "shared.sealed",
        account_key=azurite.account_key,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.now(UTC) + timedelta(minutes=10),
    )
    sas_config = BlobConfig(auth="sas", sas_token=read_only, account_url=azurite.account_url)
    with open_reader(url, config=sas_config) as r:
        assert r.read() == b"for the publisher"
    https_style = f"{azurite.account_url}/{container}/shared.sealed?{read_only}"
    with open_reader(https_style, config=BlobConfig(auth="anonymous")) as r:
        assert r.read() == b"for the publisher"
    # Read-only: writing is refused as an auth error, and the message never shows the token.
    with pytest.raises(BlobAuthError) as info:
        with open_writer(
            f"{azurite.account_url}/{container}/new?{read_only}", config=BlobConfig()
        ) as w:
            w.write(b"x")
    assert "sig=" not in str(info.value)


def test_writes_fail_cleanly_when_the_service_goes_away(blob_container: str) -> None:
    # A config pointing at a closed port: the failure is a BlobStoreError, not a crash.
    config = BlobConfig(
        connection_string=(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=AAAA;"
            "BlobEndpoint=http://127.0.0.1:9/devstoreaccount1;"
        ),
        retry_total=0,
        connect_timeout_seconds=2,
    )
    with pytest.raises(BlobStoreError, match="unreachable"):
        open_reader(f"{blob_container}/x", config=config)


def test_one_store_serves_many_threads(blob_config: BlobConfig, blob_container: str) -> None:
    errors: list[BaseException] = []
    with BlobStore(config=blob_config) as store:

        def work(i: int) -> None:
            try:
                url = f"{blob_container}/t{i}"
                with store.open_writer(url) as w:
                    w.write(bytes([i]) * 300_000)
                with store.open_reader(url) as r:
                    assert r.read() == bytes([i]) * 300_000
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
