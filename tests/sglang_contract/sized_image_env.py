"""An env for the SGLang contract tests: step k answers with an image of ``sizes[k]`` (width, height)."""

from __future__ import annotations

from PIL import Image, ImageDraw


class SizedImageEnv:
    def __init__(self, sizes):
        self.sizes = [tuple(size) for size in sizes]
        self.steps = 0
        self.outcome = {"score": 0.0}

    def reset(self):
        return {}, {}

    def step(self, text):
        width, height = self.sizes[self.steps % len(self.sizes)]
        self.steps += 1
        image = Image.new("RGB", (width, height), (250, 250, 250))
        ImageDraw.Draw(image).line([(0, 0), (width - 1, height - 1)], fill=(30 * self.steps, 0, 90), width=2)
        observation = {"role": "tool", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Look."}]}
        return observation, False, {"score": 0.0}

    def format_observation(self, observation):
        return observation

    def close(self):
        pass


def build_env(sample=None, args=None, sizes=((56, 84),), **kwargs):
    return SizedImageEnv(sizes)
