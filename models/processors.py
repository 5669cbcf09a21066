"""Image-only processors for the Qwen-VL families.

transformers 5.23's ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` refuse to construct without a
video processor, and the video processors need torchvision, which cannot be installed next to the
CPU torch wheel. These subclasses pass ``video_processor=None``, save and reload through themselves,
and use the PIL image processor with the released checkpoints' sizes (transformers' default
``longest_edge`` is not the checkpoints').
"""

from __future__ import annotations

from transformers import Qwen2_5_VLProcessor, Qwen3VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Values from the released checkpoints' preprocessor_config.json.
IMAGE_PROCESSOR_SETTINGS = {
    "qwen2.5-vl": dict(
        size={"shortest_edge": 3136, "longest_edge": 12_845_056},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),
    "qwen3-vl": dict(
        size={"shortest_edge": 65_536, "longest_edge": 16_777_216},
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ),
}
# Qwen3.5 keeps Qwen3-VL's image pipeline: transformers maps qwen3_5 / qwen3_5_moe to
# Qwen2VLImageProcessor and Qwen3VLProcessor, and its vision config has patch 16, merge 2,
# temporal patch 2. The sizes and mean/std are Qwen3-VL's (see models/README.md).
IMAGE_PROCESSOR_SETTINGS["qwen3.5"] = IMAGE_PROCESSOR_SETTINGS["qwen3-vl"]
IMAGE_PROCESSOR_SETTINGS["qwen3.5-moe"] = IMAGE_PROCESSOR_SETTINGS["qwen3-vl"]


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


PROCESSOR_CLASSES = {
    "qwen2.5-vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen3-vl": ImageOnlyQwen3VLProcessor,
    "qwen3.5": ImageOnlyQwen3VLProcessor,
    "qwen3.5-moe": ImageOnlyQwen3VLProcessor,
}


def build_image_processor(family: str) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR_SETTINGS[family])


def build_processor(family: str, tokenizer, chat_template: str):
    return PROCESSOR_CLASSES[family](build_image_processor(family), tokenizer, chat_template=chat_template)
