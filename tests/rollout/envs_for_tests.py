"""Small env classes for episode tests, loaded through rollout_interaction_env_path (a .py file).

``build_env(kind=...)`` picks one; none subclasses the project's base class, like envs written for
slime's example.
"""

from __future__ import annotations

import asyncio
import threading

from PIL import Image

EVENTS: list[str] = []


def _image(colour):
    return Image.new("RGB", (56, 84), colour)


class ImageFeedbackEnv:
    """Every step answers with an image and text; never done."""

    def __init__(self, colour=(10, 200, 30)):
        self.colour = colour
        self.outcome = {"score": 0.0}

    def reset(self):
        return {}, {}

    def step(self, text):
        return {"obs_str": "Look at this.", "multi_modal_data": {"image": [_image(self.colour)]}}, False, {"score": 0.0}

    def format_observation(self, obs):
        return {"role": "tool", "content": [{"type": "image", "image": obs["multi_modal_data"]["image"][0]},
                                            {"type": "text", "text": obs["obs_str"]}]}  # fmt: skip

    def close(self):
        pass


class TextFeedbackEnv:
    def __init__(self, feedback="Try again.", role="tool"):
        self.feedback = feedback
        self.role = role

    def reset(self):
        return {}, {}

    def step(self, text):
        return {"obs_str": self.feedback}, False, {"score": 0.0}

    def format_observation(self, obs):
        return {"role": self.role, "content": obs["obs_str"]}

    def close(self):
        pass


class RaisingEnv(TextFeedbackEnv):
    def step(self, text):
        raise RuntimeError("the tool backend is down")


# Released by the test once every episode's step has started: a step run on the event loop would
# block it, the test could never release it, and the step would give up.
RELEASE = threading.Event()
RELEASE_TIMEOUT_S = 60.0


class GatedSyncEnv(TextFeedbackEnv):
    """A synchronous step that blocks until the test releases it."""

    def step(self, text):
        EVENTS.append(f"step on {threading.current_thread().name}")
        if not RELEASE.wait(RELEASE_TIMEOUT_S):
            raise RuntimeError("never released: the step blocked the event loop")
        return {"obs_str": "ok"}, True, {"score": 1.0}


class AsyncStepEnv(TextFeedbackEnv):
    """``async def step``: awaited on the event loop."""

    async def step(self, text):
        EVENTS.append(f"step on {threading.current_thread().name}")
        await asyncio.sleep(0)
        return {"obs_str": f"async feedback on {text!r}"}, False, {"score": 0.0}


class AsyncObservationEnv(TextFeedbackEnv):
    """A sync step, an ``async def format_observation``."""

    async def format_observation(self, obs):
        await asyncio.sleep(0)
        return {"role": self.role, "content": "formatted: " + obs["obs_str"]}


class CoroutineReturningEnv(TextFeedbackEnv):
    """Sync methods that hand back coroutines, as decorated async methods do."""

    def step(self, text):
        return self._step(text)

    async def _step(self, text):
        return {"obs_str": "from a coroutine"}, False, {"score": 0.0}


class UnformattableEnv(TextFeedbackEnv):
    def format_observation(self, obs):
        raise ValueError("no template for this observation")


def build_env(sample=None, args=None, kind="image", **kwargs):
    return {
        "image": ImageFeedbackEnv,
        "text": TextFeedbackEnv,
        "raising": RaisingEnv,
        "gated": GatedSyncEnv,
        "async_step": AsyncStepEnv,
        "async_observation": AsyncObservationEnv,
        "coroutine_returning": CoroutineReturningEnv,
        "unformattable": UnformattableEnv,
    }[kind](**kwargs)
