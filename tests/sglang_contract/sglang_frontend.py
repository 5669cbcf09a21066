"""SGLang 0.5.23's own request front half, run in-process on CPU: what its HTTP server and tokenizer
manager do to a ``/generate`` body before the model sees it.

    body -> api_contract.generate_contract_error (the route's schema check)
         -> GenerateReqInput (parsed as FastAPI parses the route's dataclass body), normalized
         -> SamplingParams(**sampling_params).normalize(tokenizer).verify(vocab_size)
         -> QwenVLImageProcessor.process_mm_data_async: each image's single pad expanded with
            SGLang's resize, its pixel tensors and image_grid_thw

Importing SGLang's modules on a CPU machine needs one stub: ``torchvision`` (PyPI's build is a CUDA
one that breaks next to the CPU torch wheel, see docs/pitfalls.md#torchvision-next-to-the-cpu-torch-wheel); SGLang's Qwen-VL processor uses it only
for videos (``InterpolationMode`` and a resize), never on the image path exercised here. transformers
is asked whether torchvision exists before the stub is installed, so its image processors stay on
PIL, and the stub is removed from ``sys.modules`` once SGLang's modules hold it. Environment variables
SGLang sets at import (its cache directories) are restored.

SGLang loads the checkpoint's processor with AutoProcessor; the tiny presets name a project class
(the image-only Qwen processors), so the trainer's very processor object is handed to SGLang's
``QwenVLImageProcessor`` instead. Everything else (ServerArgs, the runtime context, the request and
sampling-param classes, the multimodal processor) is SGLang's own.
"""

from __future__ import annotations

import enum
import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from typing import Any

import torch

REQUIRE_ENV = "VLM_MULTITURN_REQUIRE_SGLANG"
SGLANG_VERSION = "0.5.23"


def sglang_missing_reason() -> str | None:
    """Why SGLang's check cannot run here, or None when it can."""
    if importlib.util.find_spec("sglang") is None:
        return (
            f"sglang is not installed: pip install --no-deps sglang=={SGLANG_VERSION} plus the "
            "'sglang-check' extra (see pyproject.toml)"
        )
    from importlib.metadata import version

    installed = version("sglang")
    if installed != SGLANG_VERSION:
        return f"sglang {installed} is installed; these checks are pinned to {SGLANG_VERSION}"
    return None


class _Anything:
    """Any attribute of a stubbed module: callable, subclassable, indexable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Anything:
        return _Anything()

    def __getattr__(self, name: str) -> _Anything:
        return _Anything()

    def __getitem__(self, key: Any) -> _Anything:
        return _Anything()

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_TORCHVISION_STUBS = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.transforms.v2",
    "torchvision.transforms.v2.functional",
    "torchvision.io",
    "torchvision.ops",
)


def _install_torchvision_stub() -> list[str]:
    from transformers.utils import import_utils

    if import_utils.is_torchvision_available():  # a working torchvision: nothing to stand in for
        return []
    installed = []
    for name in _TORCHVISION_STUBS:
        if name in sys.modules:
            continue
        module = _StubModule(name)
        module.__spec__ = ModuleSpec(name, loader=None)
        module.__path__ = []
        module.InterpolationMode = _InterpolationMode
        sys.modules[name] = module
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            setattr(sys.modules[parent], child, module)
        installed.append(name)
    return installed


_IMPORTED: dict[str, Any] = {}


def sglang_modules() -> dict[str, Any]:
    """SGLang's classes used here, imported once (with the torchvision stub in place meanwhile)."""
    if _IMPORTED:
        return _IMPORTED
    environ = dict(os.environ)
    stubs = _install_torchvision_stub()
    try:
        from pydantic import TypeAdapter
        from sglang.srt.entrypoints.api_contract import generate_contract_error
        from sglang.srt.managers.io_struct import GenerateReqInput
        from sglang.srt.multimodal.processors.qwen_vl import QwenVLImageProcessor
        from sglang.srt.runtime_context import publish
        from sglang.srt.sampling.sampling_params import SamplingParams
        from sglang.srt.server_args import ServerArgs
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update(environ)
    _IMPORTED.update(
        GenerateReqInput=GenerateReqInput,
        request_adapter=TypeAdapter(GenerateReqInput),
        generate_contract_error=generate_contract_error,
        QwenVLImageProcessor=QwenVLImageProcessor,
        SamplingParams=SamplingParams,
        ServerArgs=ServerArgs,
        publish=publish,
    )
    return _IMPORTED


@dataclass
class SGLangView:
    """What SGLang made of one /generate body."""

    request: Any  # GenerateReqInput after normalize_batch_and_arguments
    sampling_params: Any  # SamplingParams after normalize and verify
    input_ids: list[int]  # each image's pad expanded
    pixel_values: torch.Tensor | None  # all images, in order
    image_grid_thw: torch.Tensor | None


class SGLangFrontEnd:
    """SGLang's request handling for one tiny preset (``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``)."""

    def __init__(self, preset: str, processing: Any, processor: Any = None) -> None:
        from transformers import AutoConfig

        from models.loader import preset_dir

        modules = sglang_modules()
        path = str(preset_dir(preset))
        self.server_args = modules["ServerArgs"](model_path=path, device="cpu")
        self.hf_config = AutoConfig.from_pretrained(path)
        text_config = getattr(self.hf_config, "text_config", self.hf_config)
        self.vocab_size = text_config.vocab_size
        self.processing = processing
        self.processor = processor if processor is not None else processing.processor
        self.modules = modules
        self._mm = None

    def _mm_processor(self) -> Any:
        # SGLang reads its settings from the process's published runtime context (last one wins),
        # so every front end publishes its own before use.
        self.modules["publish"](self.server_args, role="tokenizer")
        if self._mm is None:
            self._mm = self.modules["QwenVLImageProcessor"](self.hf_config, self.server_args, self.processor, "default")
        return self._mm

    async def handle(self, body: dict[str, Any]) -> SGLangView:
        """Raises ValueError with SGLang's message where SGLang answers 400."""
        error = self.modules["generate_contract_error"](body)
        if error is not None:
            raise ValueError(f"SGLang's /generate contract: {error}")
        request = self.modules["request_adapter"].validate_python(body)
        request.normalize_batch_and_arguments()
        params = self.modules["SamplingParams"](**dict(request.sampling_params or {}))
        params.normalize(self.processing.tokenizer)
        params.verify(self.vocab_size)
        mm = self._mm_processor()
        input_ids = list(request.input_ids) if request.input_ids is not None else None
        if not request.image_data:
            return SGLangView(request, params, input_ids, None, None)
        images = request.image_data if isinstance(request.image_data, list) else [request.image_data]
        out = await mm.process_mm_data_async(
            image_data=images, input_text=request.text or input_ids, request_obj=request
        )
        items = [item for item in out.mm_items if item.is_image()]
        pixel_values = torch.cat([item.feature for item in items])
        grid = torch.cat([torch.as_tensor(item.model_specific_data["image_grid_thw"]).reshape(-1, 3) for item in items])
        return SGLangView(request, params, list(out.input_ids), pixel_values, grid)
