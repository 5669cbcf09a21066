"""A local image server on 127.0.0.1 that misbehaves on request, and helpers for source parquet files.

The server runs on its own event loop in a background thread, so both the synchronous entry points
(which start their own loop) and async tests can talk to it. Routes:

- ``/img/<name>``: a PNG whose pixels depend on ``name``;
- ``/missing``: 404; ``/sleep``: answers after 1.5 s; ``/slow``: streams an image in chunks over ~0.3 s;
- ``/html``: 200 with an HTML body; ``/big``: a 50,000-byte body with Content-Length;
  ``/big-chunked``: the same without Content-Length; ``/many-pixels``: a 3000x3000 PNG;
- ``/flaky/<name>``: 503 on the first request for each name, then the image; ``/down``: always 503.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from PIL import Image, ImageDraw


def diagram_png(name: str, size: int = 48) -> bytes:
    """A small PNG whose pixels depend on ``name``."""
    shade = zlib.crc32(name.encode()) % 200
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).line([(4, size - 4), (size - 4, 4)], fill=(shade, 0, 255 - shade), width=3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ImageServer:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/img/{name}", self._image)
        app.router.add_get("/missing", self._missing)
        app.router.add_get("/sleep", self._sleep)
        app.router.add_get("/slow", self._slow)
        app.router.add_get("/html", self._html)
        app.router.add_get("/big", self._big)
        app.router.add_get("/big-chunked", self._big_chunked)
        app.router.add_get("/many-pixels", self._many_pixels)
        app.router.add_get("/flaky/{name}", self._flaky)
        app.router.add_get("/down", self._down)
        # Cancel a handler whose client went away (the timeout test), so shutdown does not wait for it.
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    def _count(self, request: web.Request) -> None:
        self.hits[request.path] += 1

    async def _image(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=diagram_png(request.match_info["name"]), content_type="image/png")

    async def _missing(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPNotFound()

    async def _sleep(self, request: web.Request) -> web.Response:
        self._count(request)
        await asyncio.sleep(1.5)
        return web.Response(body=diagram_png("sleep"), content_type="image/png")

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        body = diagram_png("slow")
        step = len(body) // 3 + 1
        for start in range(0, len(body), step):
            await asyncio.sleep(0.1)
            await response.write(body[start : start + step])
        await response.write_eof()
        return response

    async def _html(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(text="<html>not an image</html>", content_type="image/png")

    async def _big(self, request: web.Request) -> web.Response:
        self._count(request)
        return web.Response(body=b"\x89PNG" + b"\0" * 49_996, content_type="image/png")

    async def _big_chunked(self, request: web.Request) -> web.StreamResponse:
        self._count(request)
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(10):
            await response.write(b"\0" * 5_000)
        await response.write_eof()
        return response

    async def _many_pixels(self, request: web.Request) -> web.Response:
        self._count(request)
        buffer = io.BytesIO()
        Image.new("L", (3000, 3000), 255).save(buffer, format="PNG")
        return web.Response(body=buffer.getvalue(), content_type="image/png")

    async def _flaky(self, request: web.Request) -> web.Response:
        self._count(request)
        if self.hits[request.path] == 1:
            raise web.HTTPServiceUnavailable()
        return web.Response(body=diagram_png(request.match_info["name"]), content_type="image/png")

    async def _down(self, request: web.Request) -> web.Response:
        self._count(request)
        raise web.HTTPServiceUnavailable()


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    server.start()
    yield server
    server.stop()


def write_processed_parquet(path: Path, rows: list[tuple[str, str, list[str]]]) -> Path:
    """A file in the processed dataset's schema: problem, answer, images (list of strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "problem": [row[0] for row in rows],
            "answer": [row[1] for row in rows],
            "images": [row[2] for row in rows],
        },
        schema=pa.schema(
            [("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(pa.string()))]
        ),
    )
    pq.write_table(table, path)
    return path


ORIGINAL_SCHEMA = pa.schema(
    [
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("id", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("ground_truth", pa.string()),
    ]
)


def write_original_parquet(path: Path, rows: list[dict]) -> Path:
    """A file in hiyouga/geometry3k's schema: embedded images as {"bytes", "path"} structs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: [row[name] for row in rows] for name in ORIGINAL_SCHEMA.names}
    pq.write_table(pa.table(columns, schema=ORIGINAL_SCHEMA), path)
    return path
