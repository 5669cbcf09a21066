"""The static-cache decode loop against the eager one, continuous batching, and its sampling draws.

The engine's general behaviour (finishing rules, stops, aborts, images, errors) is covered by
test_local_engine.py under both loops; these tests cover what only the static loop has: slots,
requests joining a running batch, syncing every few steps, and requests that do not fit a slot.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollout.engines import static_decode
from rollout.engines.local import LocalEngine
from rollout.engines.sampling import counter_uniforms
from tests.engine.conftest import chat_text, make_image, single_pad_ids


def _requests(policy, count: int = 6) -> list[tuple[list[int], list, dict]]:
    """Mixed requests: temperatures (greedy too), top-k/top-p, stop strings, stop ids, lengths."""
    with_image = single_pad_ids(policy, chat_text(policy, "Find x."))
    text_only = single_pad_ids(policy, chat_text(policy, "Say something.", images=0))
    requests = []
    for i in range(count):
        params: dict = {
            "max_new_tokens": 6 + 3 * i,
            "temperature": (1.0, 0.0, 0.7)[i % 3],
            "sampling_seed": i,
        }
        if i % 4 == 1:
            params["top_k"] = 5
        if i % 4 == 2:
            params["top_p"] = 0.8
        if i % 3 == 1:
            params["stop"] = ["a", "e"]
        if i % 3 == 2:
            params["ignore_eos"] = True
        if i == 3:
            params["stop_token_ids"] = [13, 11]
        ids, images = (with_image, [make_image(84 + 28 * (i % 2), i)]) if i % 2 == 0 else (text_only, [])
        requests.append((ids, images, params))
    return requests


async def _run(policy, requests, **engine_kwargs):
    async with LocalEngine(policy, seed=11, **engine_kwargs) as engine:
        results = await asyncio.gather(*(engine.generate(*r) for r in requests))
        return results, dict(engine.stats)


async def _decoded_steps(engine, steps: int) -> None:
    """Wait (observing, with a deadline) until the engine has run ``steps`` decode steps."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while engine.stats["decode_steps"] < steps and loop.time() < deadline:
        await asyncio.sleep(0.005)


def _assert_same(results, reference, tolerance: float = 1e-5) -> None:
    for got, want in zip(results, reference, strict=True):
        assert got.token_ids == want.token_ids
        assert (got.finish_reason, got.matched_stop, got.text) == (
            want.finish_reason,
            want.matched_stop,
            want.text,
        )
        assert got.meta_info["finish_reason"] == want.meta_info["finish_reason"]
        assert len(got.log_probs) == len(want.log_probs)
        assert (
            max((abs(a - b) for a, b in zip(got.log_probs, want.log_probs, strict=True)), default=0.0)
            <= tolerance
        )


@pytest.mark.parametrize("steps_per_sync", [1, 3, 8])
async def test_static_decoding_returns_what_the_eager_loop_returns(qwen25_small_policy, steps_per_sync):
    # A sync every 3 or 8 steps runs slots past a stop string; those tokens must be dropped.
    requests = _requests(qwen25_small_policy, 8)
    eager, _ = await _run(qwen25_small_policy, requests, decode="eager")
    static, stats = await _run(qwen25_small_policy, requests, decode="static", steps_per_sync=steps_per_sync)
    _assert_same(static, eager)
    assert any(r.finish_reason == "stop" and isinstance(r.matched_stop, str) for r in eager)
    assert stats["decode_steps"] % steps_per_sync == 0 and stats["eager_fallbacks"] == 0


async def test_static_decoding_matches_eager_for_qwen3_vl(qwen3_small_policy):
    requests = _requests(qwen3_small_policy)
    eager, _ = await _run(qwen3_small_policy, requests, decode="eager")
    static, _ = await _run(qwen3_small_policy, requests, decode="static")
    _assert_same(static, eager)


async def test_more_requests_than_slots_wait_for_a_free_slot(qwen25_small_policy):
    requests = _requests(qwen25_small_policy, 7)
    alone = [(await _run(qwen25_small_policy, [r], decode="eager"))[0][0] for r in requests]
    static, stats = await _run(qwen25_small_policy, requests, decode="static", max_batch_size=2)
    _assert_same(static, alone)
    assert stats["max_batch_rows"] == 2
    assert stats["requests"] == 7


async def test_a_request_joins_a_running_batch_between_steps(qwen25_small_policy):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Write a story.", images=0))
    image_ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    long = {"max_new_tokens": 60, "ignore_eos": True}
    short = {"max_new_tokens": 5, "ignore_eos": True, "sampling_seed": 3}
    async with LocalEngine(policy, decode="static", steps_per_sync=1, batch_wait_ms=0) as engine:
        running = asyncio.create_task(engine.generate(ids, [], long))
        await _decoded_steps(engine, 3)
        joined = await engine.generate(image_ids, [make_image(84, 2)], short)
        assert not running.done()  # the short request finished while the long one ran
        first = await running
        assert engine.stats["max_batch_rows"] == 2
        assert engine.stats["prefills"] == 2
    async with LocalEngine(policy, decode="eager") as engine:
        alone_long = await engine.generate(ids, [], long)
        alone_short = await engine.generate(image_ids, [make_image(84, 2)], short)
    _assert_same([first, joined], [alone_long, alone_short])


async def test_a_request_larger_than_a_slot_runs_in_the_eager_loop(qwen25_small_policy, caplog):
    requests = _requests(qwen25_small_policy, 3)
    big = (requests[0][0], requests[0][1], {"max_new_tokens": 200, "ignore_eos": True})
    eager, _ = await _run(qwen25_small_policy, [*requests, big], decode="eager")
    static, stats = await _run(qwen25_small_policy, [*requests, big], decode="static", max_seq_len=160)
    _assert_same(static, eager)
    assert stats["eager_fallbacks"] == 1
    assert "raise max_seq_len" in caplog.text


async def test_an_abort_ends_a_slot_with_the_tokens_so_far(qwen25_small_policy):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Write a story.", images=0))
    async with LocalEngine(policy, decode="static", steps_per_sync=2) as engine:
        task = asyncio.create_task(
            engine.generate(ids, [], {"max_new_tokens": 5000, "ignore_eos": True}, rid="s")
        )
        await _decoded_steps(engine, 4)
        assert engine.abort("s") == 1
        result = await task
        follow_up = await engine.generate(ids, [], {"max_new_tokens": 3, "ignore_eos": True})
    assert result.finish_reason == "abort"
    assert 4 <= len(result.token_ids) < 5000
    assert len(result.log_probs) == len(result.token_ids)
    assert len(follow_up.token_ids) == 3


def test_models_with_linear_attention_keep_the_eager_loop(qwen35_small_policy):
    reason = static_decode.unsupported_reason(qwen35_small_policy.model)
    assert reason is not None and "linear_attention" in reason
    with pytest.raises(ValueError, match="linear_attention"):
        LocalEngine(qwen35_small_policy, decode="static")
    assert LocalEngine(qwen35_small_policy, decode="auto").decode == "eager"


def test_auto_uses_the_eager_loop_on_cpu_and_rejects_unknown_modes(qwen25_small_policy):
    assert static_decode.unsupported_reason(qwen25_small_policy.model) is None
    assert LocalEngine(qwen25_small_policy).decode == "eager"
    with pytest.raises(ValueError, match="decode must be"):
        LocalEngine(qwen25_small_policy, decode="fast")
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        LocalEngine(qwen25_small_policy, decode="static", cuda_graphs=True)


def test_buckets_cover_every_size_once():
    assert static_decode.batch_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert static_decode.batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    lengths = static_decode.length_buckets(4096)
    assert lengths[:6] == [128, 192, 256, 384, 512, 768]
    assert lengths[-1] == 4096 and lengths == sorted(set(lengths))
    assert static_decode.length_buckets(100) == [100]


def test_counter_uniforms_are_deterministic_uniform_and_row_independent():
    seeds = torch.arange(4000, dtype=torch.long) * 7919 + (1 << 40)
    counters = torch.arange(4000, dtype=torch.long) % 97
    draws = counter_uniforms(seeds, counters)
    assert draws.dtype == torch.float64
    assert torch.equal(draws, counter_uniforms(seeds, counters))
    assert bool(((draws >= 0) & (draws < 1)).all())
    # Kolmogorov-Smirnov distance to U(0, 1); 0.03 is far above the 1e-3 significance level's 0.026.
    ordered = draws.sort().values
    grid = torch.arange(1, 4001, dtype=torch.float64) / 4000
    assert float((ordered - grid).abs().max()) < 0.03
    # A row's draw depends only on its own (seed, counter): not on its neighbours or batch size.
    assert torch.equal(counter_uniforms(seeds[5:6], counters[5:6]), draws[5:6])
    # Neighbouring counters and neighbouring seeds give unrelated draws.
    stream = counter_uniforms(torch.full((4000,), 12345), torch.arange(4000))
    assert abs(float(torch.corrcoef(torch.stack([stream[:-1], stream[1:]]))[0, 1])) < 0.05


async def test_release_memory_frees_the_slots_and_the_next_request_rebuilds_them(qwen25_small_policy):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Say something.", images=0))
    params = {"max_new_tokens": 4, "ignore_eos": True, "sampling_seed": 1}
    async with LocalEngine(policy, decode="static") as engine:
        first = await engine.generate(ids, [], params)
        assert engine._decoder is not None
        engine.release_memory()
        assert engine._decoder is None
        again = await engine.generate(ids, [], params)
        assert engine._decoder is not None
        task = asyncio.create_task(engine.generate(ids, [], {**params, "max_new_tokens": 2000}))
        while not engine._pending:
            await asyncio.sleep(0.001)
        with pytest.raises(RuntimeError, match="in flight"):
            engine.release_memory()
        engine.abort()
        await task
    assert again.token_ids == first.token_ids


async def test_fused_parts_are_built_and_served_with_gradients_off(qwen25_small_policy, monkeypatch):
    """torch.compile guards on the grad mode: parts compiled with gradients on (the trainer's
    parameters require grad) would compile again at their first real step, inside a request."""
    calls: list[tuple[str, bool]] = []

    def recording_compile(fn, **_):
        def run(*args):
            calls.append((fn.__name__, torch.is_grad_enabled()))
            return fn(*args)

        return run

    monkeypatch.setattr(static_decode.torch, "compile", recording_compile)
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Say something.", images=0))
    original = static_decode.SlotDecoder.__init__
    monkeypatch.setattr(
        static_decode.SlotDecoder, "__init__", lambda self, *a, **k: original(self, *a, **{**k, "fuse": True})
    )
    async with LocalEngine(policy, decode="static") as engine:
        await engine.generate(ids, [], {"max_new_tokens": 3, "ignore_eos": True})
        assert engine._decoder.fused
    assert {name for name, _ in calls} == {"_rms_norm", "_add_rms_norm", "_rope", "_silu_mul"}
    assert not any(grad for _, grad in calls)


async def test_a_failed_prefill_fails_its_requests_and_the_running_ones_go_on(
    qwen25_small_policy, monkeypatch
):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Write a story.", images=0))
    long = {"max_new_tokens": 40, "ignore_eos": True, "sampling_seed": 4}
    async with LocalEngine(policy, decode="static", steps_per_sync=1, batch_wait_ms=0) as engine:
        running = asyncio.create_task(engine.generate(ids, [], long))
        await _decoded_steps(engine, 2)
        real_prefill = engine._prefill

        def failing_prefill(requests):
            raise RuntimeError("out of memory in the vision tower")

        monkeypatch.setattr(engine, "_prefill", failing_prefill)
        failed = await engine.generate(ids, [], {"max_new_tokens": 3})
        monkeypatch.setattr(engine, "_prefill", real_prefill)
        first = await running
        after = await engine.generate(ids, [], {"max_new_tokens": 3, "ignore_eos": True})
    assert failed.finish_reason == "abort" and failed.token_ids == []
    assert "out of memory in the vision tower" in failed.meta_info["finish_reason"]["message"]
    assert first.finish_reason == "length" and len(first.token_ids) == 40
    assert len(after.token_ids) == 3
    async with LocalEngine(policy, decode="eager") as engine:
        alone = await engine.generate(ids, [], long)
    _assert_same([first], [alone])
