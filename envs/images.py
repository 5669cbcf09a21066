"""Image references, one way everywhere: PIL images to PNG bytes and data URIs, and back.

Datasets, env observations, engines and the SGLang client all exchange images as data URIs, file
paths (or ``file://``), bare base64 strings or PIL images. http(s) URLs are refused on purpose:
rollouts and training must not depend on the network (data preparation fetches URLs into local
files once), and a URL that resolves differently later would silently train on another image.
Decoded images are always RGB, as the processors expect. One pixel limit (``MAX_IMAGE_PIXELS``)
applies to every source, checked from the header before any pixel is decoded: a 10000x10000 PNG
is a few hundred kilobytes on disk and 300 MB decoded (more again in the processor).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash
from PIL import Image

try:  # optional: slime's image pins numpy 1.26, which recent pyarrow releases refuse to import with
    import pyarrow
except ImportError:
    pyarrow = None

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_DECODE_ERRORS = (OSError, Image.DecompressionBombError, SyntaxError, ValueError)
#: The most pixels an image may have (width x height), whatever its source. Far above what the
#: Qwen-VL processors keep (they resize to about 12.8 M pixels at most), far below what exhausts
#: memory; data preparation refuses larger downloads with the same number.
MAX_IMAGE_PIXELS = 6144 * 6144


class ImageLoadError(ValueError):
    """An image reference could not be turned into an image; the message says which and why."""


#: ``image.info`` key under which :func:`load_image` keeps the bytes an image was decoded from.
ORIGINAL_BYTES = "vlm_multiturn.original"
#: Formats whose original bytes are sent to the engine as they are: every PIL build decodes them.
_SENT_AS_IS = frozenset({"PNG", "JPEG"})
_EXIF_ORIENTATION = 0x0112


class OriginalBytes(NamedTuple):
    """The file an image was decoded from, and the digest of the pixels decoding gave. The bytes
    stand for the image only while its pixels still have that digest: ``info`` survives copies,
    ``resize`` and in-place drawing alike, and only the digest tells a modified image apart."""

    format: str
    data: bytes
    digest: bytes


def pixel_digest(image: Image.Image) -> bytes:
    """A content key for ``image``: mode, size, palette and every byte of pixel storage.

    A cache key, not a security boundary (XXH3-128). Every copy of a group's image is hashed, so
    the pixels are read where Pillow keeps them, through its Arrow export (zero-copy), not through
    ``tobytes()``, which repacks them into a fresh buffer: 0.08 against 0.23 ms for a 448x448 RGB
    image, and hundreds of episodes hash their prompt image at once when a batch starts. The
    storage of an RGB pixel has a fourth, unused byte that some Pillow operations set differently
    (``resize`` leaves 0, a decoded PNG has 255): two such images with equal pixels get different
    keys (never confused; at worst processed twice). Images Pillow cannot export (rows in more
    than one block, Pillow older than 11.2) or that run without pyarrow are hashed through
    ``tobytes()``.
    """
    digest = xxhash.xxh3_128()
    digest.update(f"{image.mode}:{image.size}".encode())
    if image.mode in ("P", "PA"):  # the pixels are palette indices
        digest.update(bytes(image.getpalette() or ()))
    buffers = _stored_buffers(image)
    if buffers is None:
        digest.update(b"packed:")
        digest.update(image.tobytes())
    else:
        digest.update(b"stored:")
        for buffer in buffers:
            if buffer is not None:
                digest.update(buffer)
    return digest.digest()


def _stored_buffers(image: Image.Image) -> list[Any] | None:
    """The image's storage as Arrow buffers (no copy), or None where Arrow cannot export it."""
    if pyarrow is None:
        return None
    try:
        # Validity bitmaps are absent (a PIL image has no nulls); the last buffer is the pixels.
        return pyarrow.array(image).buffers()
    except (TypeError, ValueError, pyarrow.ArrowException):
        return None


def engine_image(image: Image.Image) -> tuple[str, bytes]:
    """(MIME type, bytes) to send an inference engine for ``image``, lossless: decoding the bytes
    with PIL gives exactly ``image``'s pixels, which the trainer's processor sees.

    An image :func:`load_image` decoded from a PNG or JPEG file, still as decoded, is sent as that
    file (no decode-and-re-encode); any other image as a PNG written for speed (see
    :func:`fast_png`)."""
    original = image.info.get(ORIGINAL_BYTES)
    if isinstance(original, OriginalBytes) and original.digest == pixel_digest(image):
        return f"image/{original.format.lower()}", original.data
    return "image/png", fast_png(image)


def engine_data_uri(image: Image.Image) -> str:
    mime, data = engine_image(image)
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def fast_png(image: Image.Image) -> bytes:
    """PNG bytes for an RGB or L image, written for encoding speed: no row filter and zlib level 1.
    Pillow's encoder always chooses a filter per row, which costs more than the compression itself
    (about 6 ms of the 9 ms Pillow takes for a 448x448 diagram at any level; this takes about 3 ms
    and the file is 40% larger). Other modes go through Pillow."""
    if image.mode not in ("RGB", "L"):
        return encode_png(image)
    width, height = image.size
    channels = 3 if image.mode == "RGB" else 1
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 0  # each row's filter type: none
    rows[:, 1:] = np.asarray(image).reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows, 1)),
            _chunk(b"IEND", b""),
        )
    )


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


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


def _too_large(width: int, height: int, max_pixels: int, where: str) -> ImageLoadError | None:
    if width * height <= max_pixels:
        return None
    return ImageLoadError(
        f"{where} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
        "(envs.images.MAX_IMAGE_PIXELS); downscale it"
    )


def _decode(source: io.BytesIO | Path, where: str, max_pixels: int) -> Image.Image:
    try:
        raw = source.read_bytes() if isinstance(source, Path) else source.getvalue()
        with Image.open(io.BytesIO(raw)) as image:
            # The size comes from the header: an oversized image is refused before it is decoded.
            error = _too_large(*image.size, max_pixels, f"image {where}")
            if error is not None:
                raise error
            image.load()
            rgb = image.convert("RGB")
            # Keep the file for the engine when PIL's decoding of it is the trainer's image as is.
            # Not when RGB came from a conversion (engines convert RGBA, palettes and CMYK their
            # own way), nor with an EXIF rotation (an engine may apply it, this module does not).
            if (
                image.format in _SENT_AS_IS
                and image.mode == "RGB"
                and image.getexif().get(_EXIF_ORIENTATION, 1) == 1
            ):
                rgb.info[ORIGINAL_BYTES] = OriginalBytes(image.format, raw, pixel_digest(rgb))
            return rgb
    except _DECODE_ERRORS as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"image {where} does not decode ({type(error).__name__}: {error})") from error


def check_image(item: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """The image's (width, height), read from its header, after checks that decode no pixels: the
    reference resolves, the format is recognized, the size is within ``max_pixels``, and for PNG
    every chunk's CRC (which covers the compressed pixel data: a truncated or bit-flipped file
    fails). Other formats are decoded in full, having no cheaper check. Raises ImageLoadError."""
    source, where = _source(item)
    try:
        with Image.open(source) as image:
            size = image.size
            error = _too_large(*size, max_pixels, f"image {where}")
            if error is not None:
                raise error
            if image.format == "PNG":
                image.verify()
            else:
                image.load()
            return size
    except _DECODE_ERRORS as error:
        if isinstance(error, ImageLoadError):
            raise
        raise ImageLoadError(f"image {where} does not decode ({type(error).__name__}: {error})") from error


def load_image(item: str | Image.Image, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from a PIL image, a ``data:`` URI, a file path (or ``file://`` URL) or a
    bare base64 string. Raises ImageLoadError for http(s) URLs, anything unreadable, and images of
    more than ``max_pixels`` pixels."""
    if isinstance(item, Image.Image):
        error = _too_large(*item.size, max_pixels, "a PIL image")
        if error is not None:
            raise error
        return item if item.mode == "RGB" else item.convert("RGB")
    source, where = _source(item)
    return _decode(source, where, max_pixels)


def _source(item: Any) -> tuple[io.BytesIO | Path, str]:
    """What PIL should open for a string reference, and how to name it in an error."""
    if not isinstance(item, str):
        raise ImageLoadError(
            f"an image must be a data URI, a file path or a PIL image, got {type(item).__name__}"
        )
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
            raise ImageLoadError(
                f"data URI {describe(item)} has an invalid base64 payload ({error})"
            ) from error
        return io.BytesIO(raw), f"data URI {describe(item)}"
    path = Path(item.removeprefix("file://")).expanduser()
    # A long run of base64 characters that names no file is bare base64 (slime accepts it too).
    if not path.is_file() and len(item) >= 64 and _BASE64.fullmatch(item):
        try:
            raw = base64.b64decode(item, validate=True)
        except binascii.Error as error:
            raise ImageLoadError(
                f"string {describe(item)} is neither a file nor valid base64 ({error})"
            ) from error
        return io.BytesIO(raw), f"base64 string {describe(item)}"
    if not path.is_file():
        raise ImageLoadError(f"image file {item} does not exist")
    return path, str(path)
