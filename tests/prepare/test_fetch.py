"""Fetching images into the store: failures become reasons, retries are bounded, reruns fetch nothing."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from envs.geo3k.prepare import (
    FetchLimits,
    ImageCheckError,
    ImageStore,
    decode_image_bytes,
    fetch_images,
    fetch_images_async,
    url_key,
)

from .conftest import diagram_png

FAST = FetchLimits(timeout_s=5.0, retries=2, backoff_s=0.01, concurrency=4)


def test_fetches_each_url_once_into_hash_named_files(image_server, tmp_path):
    store = ImageStore(tmp_path / "images")
    urls = [image_server.url("/img/a1"), image_server.url("/img/b1"), image_server.url("/img/a1")]
    summary = fetch_images(urls, store, FAST)

    assert (summary.fetched, summary.present, summary.failures) == (2, 0, [])
    assert list(summary.results) == urls[:2]
    for url in urls[:2]:
        result = summary.results[url]
        assert result.status == "fetched"
        assert result.attempts == 1
        assert result.path == store.root / f"{url_key(url)}.png"
        assert result.path.read_bytes() == diagram_png(url.rsplit("/", 1)[1])
    assert image_server.hits["/img/a1"] == 1
    assert sorted(os.listdir(store.root)) == sorted(f"{url_key(url)}.png" for url in urls[:2])


def test_second_run_fetches_nothing(image_server, tmp_path):
    store = ImageStore(tmp_path / "images")
    urls = [image_server.url("/img/resume1"), image_server.url("/img/resume2")]
    first = fetch_images(urls, store, FAST)
    second = fetch_images(urls, store, FAST)

    assert (first.fetched, first.present) == (2, 0)
    assert (second.fetched, second.present) == (0, 2)
    assert [r.attempts for r in second.results.values()] == [0, 0]
    assert [r.path for r in second.results.values()] == [r.path for r in first.results.values()]
    assert image_server.hits["/img/resume1"] == image_server.hits["/img/resume2"] == 1


def test_404_fails_at_once(image_server, tmp_path):
    url = image_server.url("/missing")
    result = fetch_images([url], ImageStore(tmp_path), FAST).results[url]
    assert (result.status, result.path, result.attempts) == ("failed", None, 1)
    assert result.reason == "HTTP 404 Not Found"


def test_timeout_is_retried_then_reported(image_server, tmp_path):
    url = image_server.url("/sleep")
    limits = FetchLimits(timeout_s=0.2, retries=1, backoff_s=0.01)
    result = fetch_images([url], ImageStore(tmp_path), limits).results[url]
    assert (result.status, result.attempts) == ("failed", 2)
    assert result.reason == "timed out after 0.2 s (2 attempts)"


def test_slow_response_within_the_timeout_succeeds(image_server, tmp_path):
    url = image_server.url("/slow")
    result = fetch_images([url], ImageStore(tmp_path), FetchLimits(timeout_s=5.0)).results[url]
    assert (result.status, result.attempts) == ("fetched", 1)
    assert result.path.read_bytes() == diagram_png("slow")


def test_body_that_is_not_an_image_is_rejected_without_retry(image_server, tmp_path):
    url = image_server.url("/html")
    store = ImageStore(tmp_path)
    result = fetch_images([url], store, FAST).results[url]
    assert (result.status, result.attempts) == ("failed", 1)
    assert result.reason == (
        "not an image: PIL does not recognize its format (the body starts b'<html>not an image</html>')"
    )
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/big", "Content-Length 50000 is over the limit of 10000 bytes (raise --max-image-bytes)"),
        ("/big-chunked", "body is over the limit of 10000 bytes (raise --max-image-bytes)"),
    ],
)
def test_oversized_body_is_rejected_and_leaves_no_file(image_server, tmp_path, path, reason):
    url = image_server.url(path)
    store = ImageStore(tmp_path / "images")
    limits = FetchLimits(max_bytes=10_000, retries=2, backoff_s=0.01)
    result = fetch_images([url], store, limits).results[url]
    assert (result.status, result.attempts, result.reason) == ("failed", 1, reason)
    assert not store.root.exists() or os.listdir(store.root) == []


def test_too_many_pixels_is_rejected(image_server, tmp_path):
    url = image_server.url("/many-pixels")
    limits = FetchLimits(max_pixels=1_000_000)
    result = fetch_images([url], ImageStore(tmp_path), limits).results[url]
    assert result.status == "failed"
    assert result.reason == "3000x3000 = 9000000 pixels, over the limit of 1000000 (raise --max-image-pixels)"


def test_503_is_retried_and_then_succeeds(image_server, tmp_path):
    url = image_server.url("/flaky/f1")
    result = fetch_images([url], ImageStore(tmp_path), FAST).results[url]
    assert (result.status, result.attempts) == ("fetched", 2)
    assert result.path.read_bytes() == diagram_png("f1")
    assert image_server.hits["/flaky/f1"] == 2


def test_retries_are_bounded(image_server, tmp_path):
    url = image_server.url("/down")
    before = image_server.hits["/down"]
    result = fetch_images([url], ImageStore(tmp_path), FAST).results[url]
    assert (result.status, result.attempts) == ("failed", 3)
    assert result.reason == "HTTP 503 Service Unavailable (3 attempts)"
    assert image_server.hits["/down"] - before == 3


def test_connection_refused_is_a_reason(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the fetch: nothing listens there
    url = f"http://127.0.0.1:{port}/x.png"
    result = fetch_images([url], ImageStore(tmp_path), FetchLimits(retries=1, backoff_s=0.01)).results[url]
    assert (result.status, result.attempts) == ("failed", 2)
    assert result.reason.startswith("ClientConnectorError: Cannot connect to host 127.0.0.1:")
    assert result.reason.endswith("(2 attempts)")


async def test_many_urls_concurrently_with_mixed_outcomes(image_server, tmp_path):
    urls = [image_server.url(f"/img/many{k}") for k in range(12)] + [image_server.url("/missing")]
    summary = await fetch_images_async(urls, ImageStore(tmp_path), FetchLimits(concurrency=3))
    assert (summary.fetched, summary.present, len(summary.failures)) == (12, 0, 1)
    assert summary.failures[0].url == image_server.url("/missing")


def test_a_failed_write_leaves_neither_the_image_nor_a_partial_file(tmp_path, monkeypatch):
    store = ImageStore(tmp_path)

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.put("k" * 32, b"data", ".png")
    assert os.listdir(tmp_path) == []
    assert store.find("k" * 32) is None


def test_decode_image_bytes_checks():
    limits = FetchLimits(max_bytes=100_000, max_pixels=48 * 48)
    image = decode_image_bytes(diagram_png("x"), limits)
    assert (image.format, image.size) == ("PNG", (48, 48))
    with pytest.raises(ImageCheckError, match=r"^49x48 = 2352 pixels, over the limit of 2304 "):
        import io

        buffer = io.BytesIO()
        Image.new("RGB", (49, 48)).save(buffer, format="PNG")
        decode_image_bytes(buffer.getvalue(), limits)
    with pytest.raises(ImageCheckError, match=r"^100001 bytes, over the limit of 100000 bytes"):
        decode_image_bytes(b"\0" * 100_001, limits)


def test_limits_are_validated():
    with pytest.raises(ValueError, match=r"^FetchLimits.timeout_s must be a positive number, got 0$"):
        FetchLimits(timeout_s=0)
    with pytest.raises(ValueError, match=r"^FetchLimits.retries must be >= 0, got -1$"):
        FetchLimits(retries=-1)
    assert [FetchLimits(backoff_s=0.5, max_backoff_s=3).backoff(r) for r in (1, 2, 3, 4)] == [
        0.5,
        1.0,
        2.0,
        3,
    ]
