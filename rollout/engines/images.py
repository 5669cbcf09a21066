"""Images as engines exchange them: PIL images to data URIs and back, file paths, base64 strings.

The SGLang client sends images as data URIs; the local engine and server accept data URIs, file
paths, bare base64 strings and PIL images. http(s) URLs are refused on purpose: rollouts must not
depend on the network, and a URL that resolves differently on the trainer would silently train on a
different image. Decoded images are always RGB, like the processor's input.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")


class ImageLoadError(ValueError):
    """An image reference could not be turned into an image; the message says which and why."""


def to_data_uri(image: Image.Image, format: str = "PNG") -> str:
    """Encode ``image`` as ``data:image/<format>;base64,...`` (lossless PNG by default, so the image
    the server decodes is pixel-identical to the one the trainer processes)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"to_data_uri expects a PIL.Image.Image, got {type(image).__name__}")
    buffer = io.BytesIO()
    fmt = format.upper()
    to_save = image.convert("RGB") if fmt in ("JPEG", "JPG") and image.mode != "RGB" else image
    to_save.save(buffer, format="JPEG" if fmt == "JPG" else fmt)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"data:image/{fmt.lower()};base64,{encoded}"


def _describe(item: str) -> str:
    return repr(item if len(item) <= 60 else item[:57] + "...")


def _open_bytes(data: bytes, origin: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"{origin} does not hold a readable image ({exc})") from exc
    return image.convert("RGB")


def load_image(item: str | Image.Image) -> Image.Image:
    """An RGB PIL image from a PIL image, a ``data:`` URI, a file path (or ``file://`` URL) or a
    bare base64 string. Raises ImageLoadError for http(s) URLs and anything unreadable."""
    if isinstance(item, Image.Image):
        return item if item.mode == "RGB" else item.convert("RGB")
    if not isinstance(item, str):
        raise ImageLoadError(
            f"an image must be a data URI, a file path or a PIL image, got {type(item).__name__}"
        )
    if item.startswith(("http://", "https://")):
        raise ImageLoadError(
            f"image {_describe(item)} is an http(s) URL; this engine does not fetch from the network. "
            "Download the image and send it as a data URI (rollout.engines.images.to_data_uri) or a file path."
        )
    if item.startswith("data:"):
        header, sep, payload = item.partition(",")
        if not sep or ";base64" not in header:
            raise ImageLoadError(
                f"data URI {_describe(item)} is not base64-encoded; expected 'data:image/png;base64,<data>'"
            )
        try:
            data = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            raise ImageLoadError(f"data URI {_describe(item)} has invalid base64 ({exc})") from exc
        return _open_bytes(data, f"data URI {_describe(item)}")
    path = Path(item.removeprefix("file://")).expanduser()
    # A long string of base64 characters that names no file is bare base64 (slime accepts it too).
    if not path.is_file() and len(item) >= 64 and _BASE64.fullmatch(item):
        try:
            data = base64.b64decode(item, validate=True)
        except binascii.Error as exc:
            raise ImageLoadError(
                f"string {_describe(item)} is neither a file nor valid base64 ({exc})"
            ) from exc
        return _open_bytes(data, f"base64 string {_describe(item)}")
    if not path.is_file():
        raise ImageLoadError(
            f"image {_describe(item)} is not a data URI and no file exists at that path; "
            "send a data URI ('data:image/png;base64,...'), an existing file path, or a PIL image"
        )
    return _open_bytes(path.read_bytes(), f"file {str(path)!r}")
