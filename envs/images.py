"""Image references, one way everywhere: PIL images to PNG bytes and data URIs, and back.

Datasets, env observations, engines and the SGLang client all exchange images as data URIs, file
paths (or ``file://``), bare base64 strings or PIL images. http(s) URLs are refused on purpose:
rollouts and training must not depend on the network (data preparation fetches URLs into local
files once), and a URL that resolves differently later would silently train on another image.
Decoded images are always RGB, as the processors expect.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_DECODE_ERRORS = (OSError, Image.DecompressionBombError, SyntaxError, ValueError)


class ImageLoadError(ValueError):
    """An image reference could not be turned into an image; the message says which and why."""


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes that depend only on the pixels: no metadata chunks, fixed compression settings,
    so the same image always encodes to the same bytes (lossless: the server sees our pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def to_data_uri(image: Image.Image, format: str = "PNG") -> str:
    """``data:image/<format>;base64,...`` for ``image`` (PNG unless asked otherwise)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_data_uri expects a PIL.Image.Image, got {type(image).__name__}")
    fmt = format.upper()
    if fmt == "PNG":
        data = encode_png(image)
    else:
        buffer = io.BytesIO()
        to_save = image.convert("RGB") if fmt in ("JPEG", "JPG") and image.mode != "RGB" else image
        to_save.save(buffer, format="JPEG" if fmt == "JPG" else fmt)
        data = buffer.getvalue()
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(data).decode('ascii')}"


def describe(item: str, limit: int = 60) -> str:
    """A reference short enough for an error message (data URIs can be megabytes)."""
    return item if len(item) <= limit else f"{item[: limit - 3]}..."


def _decode(source: io.BytesIO | Path, where: str) -> Image.Image:
    try:
        with Image.open(source) as image:
            image.load()
            return image.convert("RGB")
    except _DECODE_ERRORS as error:
        raise ImageLoadError(f"image {where} does not decode ({type(error).__name__}: {error})") from error


def load_image(item: str | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image, a ``data:`` URI, a file path (or ``file://`` URL) or a
    bare base64 string. Raises ImageLoadError for http(s) URLs and anything unreadable."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if not isinstance(item, str):
        raise ImageLoadError(f"an image must be a data URI, a file path or a PIL image, got {type(item).__name__}")
    if item.startswith(("http://", "https://")):
        raise ImageLoadError(
            f"image {describe(item)!r} is a URL; images are read from local files and data URIs only. Run "
            "the data preparation step (examples/geo3k_vlm_multi_turn/prepare_data.py) to fetch them into "
            "local files, or send a data URI (envs.images.to_data_uri)"
        )
    if item.startswith("data:"):
        header, sep, payload = item.partition(",")
        if not sep or ";base64" not in header:
            raise ImageLoadError(
                f"data URI {describe(item)} is not base64-encoded; write it as data:image/png;base64,<payload>"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
        except binascii.Error as error:
            raise ImageLoadError(f"data URI {describe(item)} has an invalid base64 payload ({error})") from error
        return _decode(io.BytesIO(raw), f"data URI {describe(item)}")
    path = Path(item.removeprefix("file://")).expanduser()
    # A long run of base64 characters that names no file is bare base64 (slime accepts it too).
    if not path.is_file() and len(item) >= 64 and _BASE64.fullmatch(item):
        try:
            raw = base64.b64decode(item, validate=True)
        except binascii.Error as error:
            raise ImageLoadError(f"string {describe(item)} is neither a file nor valid base64 ({error})") from error
        return _decode(io.BytesIO(raw), f"base64 string {describe(item)}")
    if not path.is_file():
        raise ImageLoadError(f"image file {item} does not exist")
    return _decode(path, str(path))
