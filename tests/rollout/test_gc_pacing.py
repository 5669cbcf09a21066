import asyncio
import gc

import pytest

from rollout.gc_pacing import GcPacer
from rollout.runtime import default_runtime


@pytest.fixture
def collections_seen():
    """The generation of every collection that starts while the test runs, in order."""
    seen: list[int] = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    yield seen
    gc.callbacks.remove(record)


@pytest.fixture(autouse=True)
def thresholds_restored():
    # Earlier tests' episodes may have left the rollout runtime's deferred full collection pending
    # on the shared event loop; it would run inside these tests' windows.
    default_runtime().gc_pacer.close()
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


async def _pacer_after_a_long_episode() -> GcPacer:
    """A pacer whose one episode ran about 30 middle collections (past the collector's threshold of
    10 for a full one), with its deferred full collection due 0.05 s after the episode."""
    pacer = GcPacer(interval_s=0.005, middle_every=1, quiet_s=0.05)
    with pacer.episode():
        await asyncio.sleep(0.15)
    return pacer


async def test_in_flight_episodes_get_short_collections_and_no_full_one(collections_seen):
    before = gc.get_threshold()
    pacer = GcPacer(interval_s=0.005, middle_every=4, quiet_s=10.0)
    with pacer.episode():
        assert gc.get_threshold() == (before[0], before[1], 1 << 30)
        await asyncio.sleep(0.2)
    assert gc.get_threshold() == before
    assert pacer.collections["young"] >= 10
    assert pacer.collections["middle"] >= 3
    assert pacer.collections["full"] == 0
    assert 2 not in collections_seen
    assert collections_seen.count(1) >= 3


async def test_a_burst_between_ticks_gets_automatic_middle_collections_but_no_full_one(collections_seen):
    pacer = GcPacer(interval_s=10.0, quiet_s=10.0)  # no tick within the test
    gc.collect()
    before = len(collections_seen)
    with pacer.episode():
        young, middle, _ = gc.get_threshold()
        # Survivors of many automatic young collections, made without yielding to the loop (held
        # by this local until the test ends).
        _kept = [[] for _ in range(young * (middle + 2) * 3)]
    during = collections_seen[before:]
    assert pacer.collections == {"young": 0, "middle": 0, "full": 0}
    assert during.count(1) >= 1
    assert 2 not in during


async def test_the_deferred_full_collection_runs_once_nothing_is_in_flight(collections_seen):
    pacer = await _pacer_after_a_long_episode()
    assert pacer.collections["full"] == 0
    await asyncio.sleep(0.15)
    assert pacer.collections["full"] == 1
    assert collections_seen.count(2) >= 1


async def test_a_short_burst_leaves_no_full_collection_behind():
    pacer = GcPacer(interval_s=0.005, middle_every=1000, quiet_s=0.01)
    gc.collect()
    with pacer.episode():
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.1)
    assert pacer.collections["full"] == 0


async def test_an_episode_starting_within_the_quiet_time_cancels_the_full_collection():
    pacer = await _pacer_after_a_long_episode()
    with pacer.episode():
        await asyncio.sleep(0.1)  # the first one's quiet time passes while this one runs
        assert pacer.collections["full"] == 0
    await asyncio.sleep(0.1)
    assert pacer.collections["full"] == 1


async def test_close_drops_a_pending_full_collection():
    pacer = await _pacer_after_a_long_episode()
    pacer.close()
    await asyncio.sleep(0.15)
    assert pacer.collections["full"] == 0


async def test_thresholds_come_back_only_after_the_last_of_concurrent_episodes():
    before = gc.get_threshold()
    pacer = GcPacer(interval_s=0.005)
    finished = asyncio.Event()

    async def episode(seconds):
        with pacer.episode():
            await asyncio.sleep(seconds)
        finished.set()

    long = asyncio.create_task(episode(0.1))
    await episode(0.02)
    assert pacer.in_flight == 1 and pacer.active
    assert gc.get_threshold() != before
    await long
    assert pacer.in_flight == 0 and not pacer.active
    assert gc.get_threshold() == before


async def test_a_failing_episode_still_leaves_the_pacer():
    before = gc.get_threshold()
    pacer = GcPacer()
    with pytest.raises(RuntimeError, match="boom"), pacer.episode():
        raise RuntimeError("boom")
    assert pacer.in_flight == 0
    assert gc.get_threshold() == before


async def test_a_run_that_never_goes_quiet_still_gets_full_collections():
    pacer = GcPacer(interval_s=0.005, full_every_s=0.05, quiet_s=10.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10  # a full collection of a large test process takes a while
    with pacer.episode():
        while pacer.collections["full"] < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert pacer.collections["full"] >= 2
        assert pacer.in_flight == 1


def test_a_loop_closed_with_episodes_counted_does_not_stop_pacing_on_the_next_one():
    pacer = GcPacer(interval_s=0.005)

    async def abandoned():
        pacer._enter(asyncio.get_running_loop())  # a task dropped without its finally running

    asyncio.run(abandoned())

    async def next_run():
        with pacer.episode():
            await asyncio.sleep(0.05)

    young_before = pacer.collections["young"]
    asyncio.run(next_run())
    assert pacer.collections["young"] - young_before >= 3
    pacer.close()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="interval_s > 0"):
        GcPacer(interval_s=0)
    with pytest.raises(ValueError, match="middle_every >= 1"):
        GcPacer(middle_every=0)


async def test_generate_paces_episodes_unless_turned_off(qwen25_processing, monkeypatch):
    import rollout
    from rollout import runtime as runtime_module
    from rollout.runtime import RolloutRuntime

    from .conftest import ScriptedEngine, call, make_args, make_sample

    tokenizer = qwen25_processing.tokenizer
    seen: list[bool] = []

    class Watching(ScriptedEngine):
        async def generate(self, input_ids, images, sampling_params):
            seen.append(runtime.gc_pacer.active)
            return await super().generate(input_ids, images, sampling_params)

    runtime = RolloutRuntime()
    monkeypatch.setattr(runtime_module, "_default", runtime)
    try:
        for pacing in (True, False):
            args = make_args(Watching(tokenizer, [call("5")]), gc_pacing=pacing, gc_freeze_after_load=False)
            sample = await rollout.generate(args, make_sample(tokenizer), {"max_new_tokens": 64})
            assert sample.status.name == "COMPLETED"
        assert seen == [True, False]
        assert not runtime.gc_pacer.active
    finally:
        runtime.shutdown()
