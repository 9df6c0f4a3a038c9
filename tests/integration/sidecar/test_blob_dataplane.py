"""The sidecar's data path over Azurite: blob inputs by URL scheme, sealed blob outputs."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from blobstore import BlobConfig, BlobStore, open_reader, open_writer
from sealing.envelope import OpenReader, SealWriter, new_data_key, read_header
from sealing.keys import generate_recipient_key
from sidecar.dataplane import inputs
from sidecar.dataplane.blob import BlobInput, BlobOutputSink, register_blob_inputs
from sidecar.dataplane.errors import InputSourceError, OutputExistsError, OutputStoreError
from sidecar.dataplane.inputs import InputSpec, input_source_for, plaintext_size
from sidecar.dataplane.outputs import Recipient


@pytest.fixture
def store(blob_config: BlobConfig) -> Iterator[BlobStore]:
    with BlobStore(config=blob_config) as s:
        yield s


@pytest.fixture
def scheme_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private copy of the input scheme registry, so registering does not leak."""
    monkeypatch.setattr(inputs, "_registry", dict(inputs._registry))


def test_blob_inputs_are_found_by_scheme_and_read(
    store: BlobStore, blob_container: str, scheme_registry: None
) -> None:
    key = new_data_key()
    plain = os.urandom(700_000)
    url = f"{blob_container}/inputs/adv.sealed"
    with store.open_writer(url) as sink, SealWriter(sink, data_key=key, key_id="adv-k") as w:
        w.write(plain)
    register_blob_inputs(store)
    with pytest.raises(ValueError, match="already registered"):
        register_blob_inputs(store)
    source = input_source_for(InputSpec(name="adv", url=url, key_id="adv-k"))
    assert isinstance(source, BlobInput) and source.name == "adv"
    assert source.size == store.size(url)
    with source.open() as f:
        header = read_header(f)
        assert plaintext_size(header, source.size or 0) == len(plain)
        with OpenReader(f, data_key=key, header=header) as reader:
            assert reader.read() == plain


def test_blob_input_errors_are_input_source_errors(store: BlobStore, blob_container: str) -> None:
    missing = BlobInput(name="x", url=f"{blob_container}/missing.sealed", store=store)
    assert missing.size is None
    with pytest.raises(InputSourceError, match="blob does not exist"):
        missing.open()
    with pytest.raises(InputSourceError, match="container does not exist"):
        BlobInput(name="y", url="azure://devstoreaccount1/nope/x", store=store).open()
    with pytest.raises(InputSourceError, match="not a blob URL"):
        BlobInput(name="z", url="/local/file", store=store)


def test_outputs_are_sealed_into_blobs_and_committed_only_when_complete(
    store: BlobStore, blob_container: str, blob_config: BlobConfig
) -> None:
    alice = generate_recipient_key()
    sink = BlobOutputSink(f"{blob_container}/outputs/", store=store, chunk_size=64 << 10)
    recipients = [Recipient("advertiser", alice.public_key())]
    out = sink.open_output("insights/report.csv", recipients=recipients)
    with pytest.raises(OutputExistsError, match="being written"):
        sink.open_output("insights/report.csv", recipients=recipients)
    body = os.urandom(500_000)
    out.write(body[:123])
    out.write(body[123:])
    url = sink.url_for("insights/report.csv")
    assert not store.exists(url)
    receipt = out.commit()
    assert receipt.location == f"{blob_container}/outputs/insights/report.csv.sealed"
    assert receipt.plaintext_bytes == len(body) and receipt.sealed_bytes == store.size(url)
    assert receipt.recipients == ("advertiser",)
    with open_reader(url, config=blob_config) as f, OpenReader(f, private_key=alice) as reader:
        assert reader.read() == body
        assert reader.key_id == receipt.key_id
    # An existing output is never replaced.
    with pytest.raises(OutputExistsError):
        sink.open_output("insights/report.csv", recipients=recipients)
    # An aborted output leaves nothing behind.
    partial = sink.open_output("model.bin", recipients=recipients)
    partial.write(os.urandom(300_000))
    partial.abort()
    partial.abort()
    assert not store.exists(sink.url_for("model.bin"))


def test_an_output_that_appears_meanwhile_is_not_overwritten(
    store: BlobStore, blob_container: str, blob_config: BlobConfig
) -> None:
    sink = BlobOutputSink(blob_container, store=store)
    alice = generate_recipient_key()
    out = sink.open_output("race", recipients=[Recipient("advertiser", alice.public_key())])
    out.write(b"mine")
    with open_writer(sink.url_for("race"), config=blob_config) as w:
        w.write(b"theirs")
    with pytest.raises(OutputExistsError):
        out.commit()
    with open_reader(sink.url_for("race"), config=blob_config) as f:
        assert f.read() == b"theirs"


def test_bad_output_locations(store: BlobStore) -> None:
    with pytest.raises(OutputStoreError, match="not a blob URL"):
        BlobOutputSink("/tmp/outputs", store=store)
    sink = BlobOutputSink("azure://devstoreaccount1/no-such-container", store=store)
    alice = generate_recipient_key()
    with pytest.raises(OutputStoreError, match="container does not exist"):
        sink.open_output("x", recipients=[Recipient("a", alice.public_key())])
    # The sidecar's preflight lists what is there before attesting: a missing container fails
    # it the same way.
    with pytest.raises(OutputStoreError, match="container does not exist"):
        sink.existing_outputs()


def test_existing_outputs_are_listed_and_replaced_only_when_told_to(
    store: BlobStore, blob_container: str, blob_config: BlobConfig
) -> None:
    for name in ("run-1/a.sealed", "run-1/sub/b.sealed", "run-1/notes.txt", "run-10/c.sealed"):
        with open_writer(f"{blob_container}/{name}", config=blob_config) as w:
            w.write(b"earlier")
    sink = BlobOutputSink(f"{blob_container}/run-1", store=store)
    # Under the prefix "run-1/" only (not "run-10/"), sealed outputs only, in name order.
    assert sink.existing_outputs() == [
        f"{blob_container}/run-1/a.sealed",
        f"{blob_container}/run-1/sub/b.sealed",
    ]
    assert sink.existing_outputs(limit=1) == [f"{blob_container}/run-1/a.sealed"]
    assert BlobOutputSink(f"{blob_container}/run-2", store=store).existing_outputs() == []

    alice = generate_recipient_key()
    recipients = [Recipient("advertiser", alice.public_key())]
    replacing = BlobOutputSink(f"{blob_container}/run-1", store=store, replace=True)
    out = replacing.open_output("a", recipients=recipients)
    out.write(b"this run's output")
    out.commit()
    with open_reader(replacing.url_for("a"), config=blob_config) as f:
        with OpenReader(f, private_key=alice) as reader:
            assert reader.read() == b"this run's output"
