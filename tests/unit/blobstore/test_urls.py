"""Which locations blobstore accepts, and how it shows them (never with a SAS token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobstore.errors import BlobUrlError
from blobstore.urls import BlobLocation, LocalLocation, is_blob_url, parse_location


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("data/in.sealed", "data/in.sealed"),
        ("/abs/in.sealed", "/abs/in.sealed"),
        ("file:///abs/in%20x.sealed", "/abs/in x.sealed"),
        ("file://localhost/abs/in.sealed", "/abs/in.sealed"),
        ("C:\\data\\in.sealed", "C:\\data\\in.sealed"),
        ("data:v1/x", "data:v1/x"),
    ],
)
def test_paths_and_file_urls_are_local(url: str, path: str) -> None:
    assert parse_location(url) == LocalLocation(Path(path))
    assert parse_location(Path(path)) == LocalLocation(Path(path))


def test_azure_urls() -> None:
    loc = parse_location("azure://acct01/inputs/party/a%20b.sealed")
    assert loc == BlobLocation(account="acct01", container="inputs", blob="party/a b.sealed")
    assert isinstance(loc, BlobLocation) and loc.account_url is None
    assert str(loc) == "azure://acct01/inputs/party/a b.sealed"


def test_https_urls_carry_endpoint_and_sas_but_never_show_the_sas() -> None:
    loc = parse_location("https://acct01.blob.core.windows.net/inputs/x.sealed?sv=2024&sig=SECRET")
    assert isinstance(loc, BlobLocation)
    assert (loc.account, loc.container, loc.blob) == ("acct01", "inputs", "x.sealed")
    assert loc.account_url == "https://acct01.blob.core.windows.net"
    assert loc.sas_token == "sv=2024&sig=SECRET"
    assert "SECRET" not in str(loc) and "SECRET" not in repr(loc)


def test_sovereign_suffix_and_loopback_path_style() -> None:
    cn = parse_location(
        "https://acct01.blob.core.chinacloudapi.cn/c01/x", endpoint_suffix="core.chinacloudapi.cn"
    )
    assert isinstance(cn, BlobLocation) and cn.account == "acct01"
    emu = parse_location("http://127.0.0.1:10000/devstoreaccount1/c01/dir/x.sealed")
    assert emu == BlobLocation(
        "devstoreaccount1",
        "c01",
        "dir/x.sealed",
        account_url="http://127.0.0.1:10000/devstoreaccount1",
    )


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("azure://acct01/inputs", "container>/<blob"),
        ("azure://acct01/inputs/", "container>/<blob"),
        ("azure://Acct/inputs/x", "storage account"),
        ("azure://acct01/In_puts/x", "container name"),
        ("azure://acct01/ab/x", "container name"),
        ("azure://acct01/a--b/x", "container name"),
        ("azure://acct01/inputs/a//b", "empty segment"),
        ("azure://acct01/inputs/a/../b", "'..'"),
        ("azure://acct01/inputs/x?sig=1", "no query"),
        ("azure://acct01/inputs/x#frag", "fragment"),
        ("http://acct01.blob.core.windows.net/inputs/x", "plain http"),
        ("https://example.com/inputs/x", "not a blob endpoint"),
        ("ftp://host/x", "unsupported scheme"),
        ("file://otherhost/x", "local file"),
        ("", "empty"),
    ],
)
def test_bad_urls_are_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(BlobUrlError) as info:
        parse_location(url)
    assert why in str(info.value)
    assert isinstance(info.value, OSError)


def test_is_blob_url() -> None:
    assert is_blob_url("azure://a/b/c") and is_blob_url("https://x") and is_blob_url("HTTP://x")
    assert not is_blob_url("file:///x") and not is_blob_url("x/y") and not is_blob_url("-")
