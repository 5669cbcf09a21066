"""Processed images shared across episodes, keyed by content.

slime hands generate ``n_samples_per_prompt`` deep copies of each prompt, images included, so
without a cache every image of a group is processed (and PNG-encoded for SGLang) n times. Here
each distinct image is processed once per processor and encoded once per engine; episodes of a
group share the tensors (read only: the trainer concatenates, never writes them). Bounded LRU.

A request needs only the image's pad count, which follows from its size (the processor's resize
rule), and what the engine is sent; ``pixel_values`` are needed only when the sample is finished.
So an entry knows its pad count at once and computes its tensors in the background, on a thread
of its own: an episode's first request does not wait for image processing (about 5-10 ms per
448x448 image on a CPU core, which a batch of hundreds of prompts would otherwise queue for).
When the tensors arrive, their grid is checked against the predicted count.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import xxhash
from PIL import Image

try:  # optional: slime's image pins numpy 1.26, which recent pyarrow releases refuse to import with
    import pyarrow
except ImportError:
    pyarrow = None

from rollout.processing import ImagePadMismatch


class ImageTensors(NamedTuple):
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # (1, 3)
    pad_count: int


@dataclass
class ProcessedImage:
    image: Image.Image
    tensors: Future  # of ImageTensors; resolved in the background, see the module docstring
    predicted_pad_count: int | None
    # engine -> what that engine is sent for this image (weak keys: an id could be reused by a new engine)
    payloads: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pad_count(self) -> int:
        """Known at once when predicted; otherwise it waits for the processor."""
        if self.predicted_pad_count is not None:
            return self.predicted_pad_count
        return self.tensors.result().pad_count


def image_digest(image: Image.Image) -> bytes:
    """A content key for ``image``: mode, size, palette and every byte of pixel storage.

    A cache key, not a security boundary (XXH3-128). Every copy of a group's image is hashed, so
    the pixels are read where Pillow keeps them, through its Arrow export (zero-copy), not through
    ``tobytes()``, which repacks them into a fresh buffer: 0.08 against 0.23 ms for a 448x448 RGB
    image, and hundreds of episodes hash their prompt image at once when a batch starts. The
    storage of an RGB pixel has a fourth, unused byte that some Pillow operations set differently
    (``resize`` leaves 0, a decoded PNG has 255): two such images with equal pixels get different
    keys and are processed once each, never confused. Images Pillow cannot export (rows in more
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


def predicted_pad_count(processing: Any, image: Image.Image) -> int | None:
    """The image's pad count from its size alone (the rule vLLM and SGLang use for placeholders),
    or None for a processor that cannot say without processing the image."""
    image_processor = getattr(processing.processor, "image_processor", None)
    count_patches = getattr(image_processor, "get_number_of_image_patches", None)
    if count_patches is None:
        return None
    width, height = image.size
    return int(count_patches(height, width, {})) // processing.merge_size**2


def _process(processing: Any, image: Image.Image, pad_count: int | None) -> ImageTensors:
    mm = processing.process_images([image])
    pixel_values, grid = mm["pixel_values"], mm["image_grid_thw"]
    (produced,) = processing.pads_per_image(grid)
    if pad_count is not None and produced != pad_count:
        raise ImagePadMismatch(
            f"the processor gave a {image.size[0]}x{image.size[1]} image {produced} pads, but its size "
            f"predicted {pad_count} (a processor setting that get_number_of_image_patches ignores?)"
        )
    return ImageTensors(pixel_values, grid, produced)


class ProcessedImageCache:
    def __init__(self, max_entries: int = 1024, executor: Executor | None = None) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[int, bytes], ProcessedImage] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = executor
        self.hits = 0
        self.misses = 0

    def get(self, processing: Any, image: Image.Image) -> ProcessedImage:
        """The processed form of ``image`` under ``processing``; its tensors may still be on the way."""
        key = (id(processing), image_digest(image))
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
            pad_count = predicted_pad_count(processing, image)
            tensors = self._pixel_executor().submit(_process, processing, image, pad_count)
            entry = ProcessedImage(image, tensors, pad_count)
            self._items[key] = entry
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return entry

    def _pixel_executor(self) -> Executor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="rollout-pixels")
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def payload(self, entry: ProcessedImage, engine: Any) -> Any:
        """What ``engine`` is sent for the image: its ``prepare_image`` result, computed once per
        (image, engine); the PIL image itself for engines that take images as they are."""
        prepare = getattr(engine, "prepare_image", None)
        if prepare is None:
            return entry.image
        with entry.lock:
            try:
                payload = entry.payloads.get(engine)
                if payload is None:
                    payload = entry.payloads[engine] = prepare(entry.image)
            except TypeError:  # an engine that cannot be weakly referenced: encode every time
                payload = prepare(entry.image)
        return payload
