"""An env for the rollout benchmarks whose every observation is a new image, as an env that renders
its state (a board, a page, a plot) makes one: a 448x448 RGB diagram, different at every step of
every episode, so no image cache can serve it. Loaded through rollout_interaction_env_path."""

from __future__ import annotations

import itertools
import random

from PIL import Image, ImageDraw

_COUNTER = itertools.count()


def new_diagram(size: int = 448, seed: int | None = None) -> Image.Image:
    """A white canvas with a few random polygons and lines (a geometry figure's statistics)."""
    rng = random.Random(next(_COUNTER) if seed is None else seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        points = [(rng.randrange(size), rng.randrange(size)) for _ in range(3)]
        draw.polygon(points, outline=(rng.randrange(80), rng.randrange(80), rng.randrange(80)), width=3)
    for _ in range(4):
        draw.line([(rng.randrange(size), rng.randrange(size)) for _ in range(2)], fill=(200, 30, 30), width=2)
    draw.text((rng.randrange(size - 40), rng.randrange(size - 20)), f"x = {rng.randrange(100)}", fill="black")
    return image


class NewImageEnv:
    """Every step answers with a new image and a line of text; never done."""

    def __init__(self) -> None:
        self.outcome = {"score": 0.0}

    def reset(self):
        return {}, {}

    def step(self, text):
        return {"image": new_diagram(), "text": "Here is the figure after your step."}, False, {"score": 0.0}

    def format_observation(self, observation):
        return {
            "role": "tool",
            "content": [
                {"type": "image", "image": observation["image"]},
                {"type": "text", "text": observation["text"]},
            ],
        }

    def close(self):
        pass


def build_env(sample=None, args=None, **kwargs):
    return NewImageEnv()
