"""The env contract: default observation rendering, the sync/async step helper, name suggestions."""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image

from envs.base import (
    BaseInteractionEnv,
    call_reset,
    call_step,
    did_you_mean,
    nearest_name,
    observation_to_message,
)


def test_text_observation_renders_as_a_plain_string() -> None:
    message = BaseInteractionEnv().format_observation({"obs_str": "calc_score: correct", "role": "tool"})
    assert message == {"role": "tool", "content": "calc_score: correct"}


def test_images_come_before_the_text() -> None:
    first, second = Image.new("RGB", (4, 4)), Image.new("RGB", (8, 8))
    obs = {"obs_str": "zoomed", "role": "user", "multi_modal_data": {"image": [first, second]}}
    message = BaseInteractionEnv().format_observation(obs)
    assert message == {
        "role": "user",
        "content": [
            {"type": "image", "image": first},
            {"type": "image", "image": second},
            {"type": "text", "text": "zoomed"},
        ],
    }


@pytest.mark.parametrize(
    ("obs", "expected"),
    [
        ({}, {"role": "tool", "content": ""}),
        (None, {"role": "tool", "content": ""}),
        ({"obs_str": "x"}, {"role": "tool", "content": "x"}),
        ({"obs_str": "x", "role": ""}, {"role": "tool", "content": "x"}),
        ({"obs_str": 3}, {"role": "tool", "content": "3"}),
        ({"obs_str": "x", "multi_modal_data": {"image": []}}, {"role": "tool", "content": "x"}),
        ({"obs_str": "x", "multi_modal_data": None}, {"role": "tool", "content": "x"}),
    ],
)
def test_observation_edge_cases(obs: dict | None, expected: dict) -> None:
    assert observation_to_message(obs) == expected


def test_single_image_and_images_key_are_accepted() -> None:
    image = Image.new("RGB", (4, 4))
    for media in ({"image": image}, {"images": [image]}):
        message = observation_to_message({"obs_str": "t", "multi_modal_data": media})
        assert message["content"] == [{"type": "image", "image": image}, {"type": "text", "text": "t"}]


def test_env_role_is_the_default_role() -> None:
    class UserEnv(BaseInteractionEnv):
        role = "user"

    assert UserEnv().format_observation({"obs_str": "hi"}) == {"role": "user", "content": "hi"}


def test_base_methods_say_what_to_implement() -> None:
    env = BaseInteractionEnv()
    with pytest.raises(
        NotImplementedError, match=r"BaseInteractionEnv must implement reset\(\) -> \(obs, info\)"
    ):
        env.reset()
    with pytest.raises(NotImplementedError, match=r"must implement step\(text\) -> \(obs, done, info\)"):
        env.step("x")
    assert env.close() is None


class SlimeStyleEnv:
    """Written like slime's example: no base class, sync step."""

    def __init__(self) -> None:
        self.step_thread: int | None = None

    def reset(self):
        return {}, {"reset_thread": threading.get_ident()}

    def step(self, response_text):
        self.step_thread = threading.get_ident()
        return {"obs_str": response_text.upper(), "role": "tool"}, False, {"n": len(response_text)}


class AsyncEnv(BaseInteractionEnv):
    def __init__(self) -> None:
        self.step_thread: int | None = None

    async def reset(self):
        return {}, {}

    async def step(self, response_text):
        self.step_thread = threading.get_ident()
        await asyncio.sleep(0)
        return {"obs_str": response_text[::-1]}, True, {}


async def test_sync_step_runs_off_the_event_loop_thread() -> None:
    env = SlimeStyleEnv()
    loop_thread = threading.get_ident()
    obs, info = await call_reset(env)
    assert (obs, info["reset_thread"] != loop_thread) == ({}, True)
    assert await call_step(env, "abc") == ({"obs_str": "ABC", "role": "tool"}, False, {"n": 3})
    assert env.step_thread is not None and env.step_thread != loop_thread


async def test_async_step_is_awaited_on_the_loop() -> None:
    env = AsyncEnv()
    assert await call_reset(env) == ({}, {})
    assert await call_step(env, "abc") == ({"obs_str": "cba"}, True, {})
    assert env.step_thread == threading.get_ident()


async def test_a_slow_sync_step_does_not_block_other_coroutines() -> None:
    started, release = threading.Event(), threading.Event()

    class BlockingEnv(SlimeStyleEnv):
        def step(self, response_text):
            started.set()
            # Only a coroutine on the loop releases it: True if the loop ran while the step was
            # blocked here, False if the step held the loop until this hang guard gave up.
            return {}, True, {"released": release.wait(60)}

    async def release_once_the_step_runs() -> str:
        while not started.is_set():
            await asyncio.sleep(0.001)
        release.set()
        return "loop ran"

    results = await asyncio.gather(call_step(BlockingEnv(), "x"), release_once_the_step_runs())
    assert results == [({}, True, {"released": True}), "loop ran"]


@pytest.mark.parametrize(
    ("name", "candidates", "expected"),
    [
        ("max_turn", ["max_turns", "end_on_correct"], "max_turns"),
        ("geo3kk", ["geo3k", "grading", "loader"], "geo3k"),
        ("zzz", ["max_turns", "end_on_correct"], None),
    ],
)
def test_nearest_name(name: str, candidates: list[str], expected: str | None) -> None:
    assert nearest_name(name, candidates) == expected


def test_did_you_mean() -> None:
    assert did_you_mean("max_turn", ["max_turns"]) == " Did you mean 'max_turns'?"
    assert did_you_mean("zzz", ["max_turns"]) == ""
