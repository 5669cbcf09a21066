"""Geo3kEnv plus ``zoom``: a crop of the problem's diagram, enlarged, returned as an image.

``zoom(left, top, right, bottom)`` takes the region as fractions of the diagram's width and height
(0 is the left or top edge, 1 the right or bottom one). The crop is resized so that its longer side
is ``zoom_size`` pixels: what the model sees, and what the observation costs in tokens, does not
depend on the size of the original image (224 px is 64 image pads for Qwen2.5-VL, 49 for
Qwen3-VL; they count against the episode's response budget, see docs/environments.md). A box that
is empty, smaller than ``MIN_CROP_PX`` or thinner than 1:``MAX_ASPECT`` is not run: the feedback
says why (the Qwen-VL processors refuse images more than 200 times longer than wide).

Grading, feedback and the outcome are Geo3kEnv's: a zoom is a valid tool call that scores nothing.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from envs.base import EnvConfigError
from envs.geo3k.env import TOOL_SCHEMA, Geo3kEnv, Geo3kSettings, _label_of, _reject_unknown
from envs.grading import Grader
from envs.images import load_image
from envs.tool_env import ToolInputError, ToolResult

__all__ = ["MAX_ASPECT", "MIN_CROP_PX", "TOOLS", "ZOOM_SCHEMA", "Geo3kZoomEnv", "build_env"]

MIN_CROP_PX = 8
MAX_ASPECT = 20.0


def _fraction(description: str, example: float) -> dict[str, Any]:
    return {"type": "number", "minimum": 0, "maximum": 1, "description": description, "examples": [example]}


ZOOM_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "zoom",
        "description": (
            "Look closer at a region of the diagram: returns that region enlarged, as an image. "
            "Coordinates are fractions of the diagram's width and height, from 0 to 1."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "left": _fraction("Left edge of the region (0 = the diagram's left edge).", 0.25),
                "top": _fraction("Top edge of the region (0 = the diagram's top edge).", 0.25),
                "right": _fraction("Right edge of the region (1 = the diagram's right edge).", 0.75),
                "bottom": _fraction("Bottom edge of the region (1 = the diagram's bottom edge).", 0.75),
            },
            "required": ["left", "top", "right", "bottom"],
            "additionalProperties": False,
        },
    },
}
TOOLS: list[dict[str, Any]] = [ZOOM_SCHEMA, TOOL_SCHEMA]


class Geo3kZoomEnv(Geo3kEnv):
    TOOLS = TOOLS

    def __init__(
        self,
        label: str,
        image: Image.Image,
        settings: Geo3kSettings | None = None,
        *,
        zoom_size: int = 224,
        grader: Grader | None = None,
    ) -> None:
        super().__init__(label, settings, grader=grader)
        self.image = image
        self.zoom_size = zoom_size

    def tool_zoom(self, left: float, top: float, right: float, bottom: float) -> ToolResult:
        if right <= left or bottom <= top:
            raise ToolInputError(
                "the region is empty: right must be greater than left, and bottom greater than top"
            )
        width, height = self.image.size
        box = (round(left * width), round(top * height), round(right * width), round(bottom * height))
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        if min(crop_w, crop_h) < MIN_CROP_PX:
            raise ToolInputError(
                f"the region is {crop_w}x{crop_h} pixels of a {width}x{height} diagram; zoom into a region of "
                f"at least {MIN_CROP_PX}x{MIN_CROP_PX} pixels"
            )
        if max(crop_w, crop_h) > MAX_ASPECT * min(crop_w, crop_h):
            raise ToolInputError(
                f"the region is {crop_w}x{crop_h} pixels; make it at most {MAX_ASPECT:g} times longer than wide"
            )
        scale = self.zoom_size / max(crop_w, crop_h)
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        crop = self.image.crop(box).resize(size, Image.Resampling.BICUBIC)
        return ToolResult(
            f"zoom: the region from ({left:g}, {top:g}) to ({right:g}, {bottom:g}) of the diagram, enlarged.",
            images=[crop],
        )


def build_env(sample: Any = None, args: Any = None, **kwargs: Any) -> Geo3kZoomEnv:
    """Geo3k's ``build_env`` plus ``zoom_size`` (the crop's longer side in pixels, 28 to 1024);
    the diagram is the sample's first image."""
    grader = kwargs.pop("grader", None)
    zoom_size = kwargs.pop("zoom_size", 224)
    _reject_unknown(kwargs, [*Geo3kSettings.names(), "grader", "zoom_size"])
    if isinstance(zoom_size, bool) or not isinstance(zoom_size, int) or not 28 <= zoom_size <= 1024:
        raise EnvConfigError(
            f"Geo3kZoomEnv setting 'zoom_size' must be an integer from 28 to 1024, got {zoom_size!r}"
        )
    label = _label_of(sample)
    images = list((getattr(sample, "multimodal_inputs", None) or {}).get("images") or [])
    if not images:
        raise EnvConfigError("Geo3kZoomEnv zooms into the sample's first image, but the sample has no images")
    settings = Geo3kSettings.from_args(args, **kwargs)
    return Geo3kZoomEnv(label, load_image(images[0]), settings, zoom_size=zoom_size, grader=grader)
