"""Processed images shared across episodes, keyed by content.

slime hands generate ``n_samples_per_prompt`` deep copies of each prompt, images included, so
without a cache every image of a group is processed (and PNG-encoded for SGLang) n times. Here
each distinct image is processed once per processor and encoded once per engine; episodes of a
group share the tensors (read only: the trainer concatenates, never writes them). Bounded LRU.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class ProcessedImage:
    image: Image.Image
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # (1, 3)
    # engine -> what that engine is sent for this image (weak keys: an id could be reused by a new engine)
    payloads: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def image_digest(image: Image.Image) -> bytes:
    # A cache key, not a security boundary: SHA-1 is the fastest hashlib digest here (about 2x
    # blake2b on a 448x448 image) and releases the GIL while it runs.
    digest = hashlib.sha1()
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.digest()


class ProcessedImageCache:
    def __init__(self, max_entries: int = 1024) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[int, bytes], ProcessedImage] = OrderedDict()
        self._in_flight: dict[tuple[int, bytes], threading.Lock] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, processing: Any, image: Image.Image) -> ProcessedImage:
        """The processed form of ``image`` under ``processing``."""
        key = (id(processing), image_digest(image))
        entry = self._lookup(key)
        if entry is not None:
            return entry
        with self._lock:
            key_lock = self._in_flight.setdefault(key, threading.Lock())
        # The n copies of a group arrive together: one thread processes, the others wait for it.
        with key_lock:
            entry = self._lookup(key)
            if entry is None:
                mm = processing.process_images([image])
                entry = ProcessedImage(image, mm["pixel_values"], mm["image_grid_thw"])
                with self._lock:
                    self.misses += 1
                    self._items[key] = entry
                    while len(self._items) > self.max_entries:
                        self._items.popitem(last=False)
                    self._in_flight.pop(key, None)
        return entry

    def _lookup(self, key: tuple[int, bytes]) -> ProcessedImage | None:
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return entry

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
