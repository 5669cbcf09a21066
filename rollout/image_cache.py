"""Processed images shared across episodes, keyed by content.

slime hands generate ``n_samples_per_prompt`` deep copies of each prompt, images included, so
without a cache every image of a group is processed (and PNG-encoded for SGLang) n times. Here
each distinct image is processed once per processor and encoded once per engine; episodes of a
group share the tensors (read only: the trainer concatenates, never writes them). Bounded LRU.

A request needs only the image's pad count, which follows from its size (the processor's resize
rule), and what the engine is sent; ``pixel_values`` are needed only when the sample is finished.
So an entry knows its pad count at once and computes its tensors in the background, on a thread
of its own: an episode's first request does not wait for image processing. When the tensors
arrive, their grid is checked against the predicted count. For the Qwen-VL PIL processor the
tensors come from :class:`PixelRule` (the processor's arithmetic as a per-byte table: 3-4 ms
instead of 10 for a 448x448 image, bit for bit the same).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from envs.images import pixel_digest as image_digest
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


def predicted_pad_count(processing: Any, image: Image.Image) -> int | None:
    """The image's pad count from its size alone (the rule vLLM and SGLang use for placeholders),
    or None for a processor that cannot say without processing the image."""
    image_processor = getattr(processing.processor, "image_processor", None)
    count_patches = getattr(image_processor, "get_number_of_image_patches", None)
    if count_patches is None:
        return None
    width, height = image.size
    return int(count_patches(height, width, {})) // processing.merge_size**2


class PixelRule:
    """The Qwen-VL PIL image processor's arithmetic for one RGB image, done in one table lookup.

    transformers' ``Qwen2VLImageProcessorPil`` resizes (PIL, bicubic, to ``smart_resize``'s size),
    then per pixel computes ``float32(float64(v) * rescale_factor)``, subtracts the channel mean and
    divides by the channel std in float32, then reorders into patches with each frame repeated
    ``temporal_patch_size`` times: 10-11 ms for a 448x448 image, most of it float arithmetic over
    the whole image. A pixel value has 256 possible bytes per channel, so the same arithmetic done
    once per byte value gives a table whose lookup is bit for bit the processor's result (about
    1 ms). :meth:`for_processor` builds a rule only for that processor class with the settings
    this mirrors, and :class:`ProcessedImageCache` checks the rule against the processor itself on
    the first image before trusting it."""

    def __init__(self, image_processor: Any) -> None:
        size = image_processor.size
        self.min_pixels, self.max_pixels = (
            _size_value(size, "shortest_edge"),
            _size_value(size, "longest_edge"),
        )
        self.patch = int(image_processor.patch_size)
        self.merge = int(image_processor.merge_size)
        self.temporal = int(image_processor.temporal_patch_size)
        self.resample = image_processor.resample
        values = np.arange(256, dtype=np.float64) * float(image_processor.rescale_factor)
        scaled = values.astype(np.float32)
        mean = np.asarray(image_processor.image_mean, dtype=np.float32)
        std = np.asarray(image_processor.image_std, dtype=np.float32)
        self.table = ((scaled[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)  # (3, 256)

    @classmethod
    def for_processor(cls, processing: Any) -> PixelRule | None:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        ip = getattr(processing.processor, "image_processor", None)
        if type(ip) is not Qwen2VLImageProcessorPil:
            return None
        if not (ip.do_resize and ip.do_rescale and ip.do_normalize and ip.do_convert_rgb):
            return None
        try:
            return cls(ip)
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        width, height = image.size
        factor = self.patch * self.merge
        new_h, new_w = smart_resize(
            height, width, factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), resample=self.resample)
        p, m, t = self.patch, self.merge, self.temporal
        gh, gw = new_h // p, new_w // p
        pixels = np.asarray(image)  # (H, W, 3) uint8
        # (H, W, C) -> (C, gh/m, gw/m, m, m, p, p): per channel, the processor's patch order, still
        # one byte a value (the reorder is cheapest before the values grow to four bytes).
        blocks = pixels.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(6, 0, 3, 1, 4, 2, 5)
        blocks = np.ascontiguousarray(blocks).reshape(3, gh * gw, p * p)
        out = np.empty((gh * gw, 3, t, p * p), dtype=np.float32)
        for channel in range(3):
            values = self.table[channel].take(blocks[channel])
            for frame in range(t):
                out[:, channel, frame] = values
        return torch.from_numpy(out.reshape(gh * gw, 3 * t * p * p)), torch.tensor(
            [[1, gh, gw]], dtype=torch.int64
        )


def _size_value(size: Any, key: str) -> int:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key)
    return int(value)


def _process(
    processing: Any, image: Image.Image, pad_count: int | None, rule: PixelRule | None = None
) -> ImageTensors:
    if rule is not None and image.mode == "RGB":
        pixel_values, grid = rule(image)
    else:
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
        # id(processing) -> its PixelRule once checked against the processor, or None
        self._rules: dict[int, PixelRule | None] = {}

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
            tensors = self._pixel_executor().submit(self._tensors, processing, image, pad_count)
            entry = ProcessedImage(image, tensors, pad_count)
            self._items[key] = entry
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return entry

    def _tensors(self, processing: Any, image: Image.Image, pad_count: int | None) -> ImageTensors:
        """On the pixel thread: the image's tensors, through the processor's PixelRule once the rule
        has given the processor's own output for a first RGB image (a transformers release that
        changes the arithmetic turns the rule off; that image's tensors are the processor's)."""
        key = id(processing)
        if key in self._rules or image.mode != "RGB":
            return _process(processing, image, pad_count, self._rules.get(key))
        rule = PixelRule.for_processor(processing)
        expected = _process(processing, image, pad_count)
        if rule is not None:
            pixel_values, grid = rule(image)
            if not (
                torch.equal(pixel_values, expected.pixel_values)
                and torch.equal(grid, expected.image_grid_thw)
            ):
                rule = None
        self._rules[key] = rule
        return expected

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
