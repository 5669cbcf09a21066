"""GcPacer: which collections it runs when, and the collector thresholds it sets.

Most tests drive the pacer on a simulated event loop whose timers fire only when the test says so,
with the pacer's clock on the loop's time, and record the pacer's ``gc.collect`` calls instead of
running them: what is asserted is the pacer's own decisions, never the collector's automatic
behaviour or how many timer turns a real loop managed in some real time.
"""

import asyncio
import contextlib
import gc
import heapq
import itertools

import pytest

from rollout.gc_pacing import GcPacer
from rollout.runtime import default_runtime

_NEVER = 1 << 30


class FakeHandle:
    def __init__(self, when: float, callback, args: tuple) -> None:
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The part of an event loop the pacer uses; ``call_later`` timers run only from ``fire_next``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.closed = False
        self._timers: list[tuple[float, int, FakeHandle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def is_closed(self) -> bool:
        return self.closed

    def call_later(self, delay: float, callback, *args) -> FakeHandle:
        if self.closed:
            raise RuntimeError("Event loop is closed")
        handle = FakeHandle(self.now + delay, callback, args)
        heapq.heappush(self._timers, (handle.when, next(self._order), handle))
        return handle

    def pending(self) -> list[FakeHandle]:
        """Timers not yet fired nor cancelled, earliest first."""
        return [h for _, _, h in sorted(self._timers) if not h.cancelled]

    def fire_next(self) -> FakeHandle:
        """Advance the clock to the earliest pending timer and run it."""
        while self._timers:
            _, _, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self.now = handle.when
                handle.callback(*handle.args)
                return handle
        raise AssertionError("no timer pending")


@pytest.fixture
def loop() -> FakeLoop:
    return FakeLoop()


@pytest.fixture
def collected(monkeypatch) -> list[int]:
    """The generation of every ``gc.collect`` call while the test runs (none is carried out)."""
    calls: list[int] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    return calls


@pytest.fixture
def full_due(monkeypatch):
    """Sets whether the collector's own rule calls for a full collection (its oldest-generation
    count above its threshold), which decides whether the deferred full collection runs."""

    def set_due(due: bool) -> None:
        count = gc.get_threshold()[2] + (1 if due else 0)
        monkeypatch.setattr(gc, "get_count", lambda: (0, 0, count))

    return set_due


@pytest.fixture(autouse=True)
def thresholds_restored():
    # Earlier tests' episodes may have left the rollout runtime's deferred full collection pending
    # on the shared event loop; it would run inside these tests' windows.
    default_runtime().gc_pacer.close()
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


@contextlib.contextmanager
def episode(pacer: GcPacer, loop: FakeLoop):
    """What ``GcPacer.episode`` does on a running loop, on the simulated one."""
    pacer._enter(loop)
    try:
        yield
    finally:
        pacer._exit(loop)


def _pacer(loop: FakeLoop, **settings) -> GcPacer:
    return GcPacer(clock=loop.time, **settings)


def _after_an_episode(loop: FakeLoop, ticks: int, **settings) -> GcPacer:
    """A pacer whose one episode lasted ``ticks`` timer turns; its deferred full collection is the
    one timer left pending."""
    pacer = _pacer(loop, **settings)
    with episode(pacer, loop):
        for _ in range(ticks):
            loop.fire_next()
    (quiet,) = loop.pending()
    assert quiet.when == pytest.approx(loop.now + pacer.quiet_s)
    return pacer


def test_in_flight_episodes_get_short_collections_and_no_full_one(loop, collected):
    before = gc.get_threshold()
    pacer = _pacer(loop, interval_s=0.005, middle_every=4, quiet_s=10.0)
    with episode(pacer, loop):
        # The collector keeps its young and middle collections; full ones are left to the pacer.
        assert gc.get_threshold() == (before[0], before[1], _NEVER)
        assert pacer.active and pacer.in_flight == 1
        fired = [loop.fire_next() for _ in range(40)]
        assert [h.when for h in fired] == pytest.approx([0.005 * (k + 1) for k in range(40)])
    assert gc.get_threshold() == before
    assert not pacer.active
    assert collected == [0, 0, 0, 1] * 10
    assert pacer.collections == {"young": 30, "middle": 10, "full": 0}
    # Only the deferred full collection is left; no tick follows the episode.
    assert [h.callback for h in loop.pending()] == [pacer._collect_if_quiet]


def test_the_deferred_full_collection_runs_once_nothing_is_in_flight(loop, collected, full_due):
    pacer = _after_an_episode(loop, 3, interval_s=0.005, middle_every=1, quiet_s=0.05)
    assert collected == [1, 1, 1]
    full_due(True)
    loop.fire_next()
    assert collected == [1, 1, 1, 2]
    assert pacer.collections["full"] == 1
    assert loop.pending() == []


def test_a_short_burst_leaves_no_full_collection_behind(loop, collected, full_due):
    pacer = _after_an_episode(loop, 3, interval_s=0.005, middle_every=1000, quiet_s=0.01)
    full_due(False)  # too few middle collections since the last full one
    loop.fire_next()
    assert collected == [0, 0, 0]
    assert pacer.collections["full"] == 0


def test_an_episode_starting_within_the_quiet_time_cancels_the_full_collection(loop, collected, full_due):
    pacer = _after_an_episode(loop, 3, interval_s=0.005, middle_every=1, quiet_s=0.05)
    full_due(True)
    (quiet,) = loop.pending()
    with episode(pacer, loop):
        assert quiet.cancelled
        # The first episode's quiet time passes while this one runs: ticks only.
        while loop.now <= quiet.when:
            assert loop.fire_next().callback == pacer._tick
        assert pacer.collections["full"] == 0
    loop.fire_next()  # this episode's own deferred full collection
    assert pacer.collections["full"] == 1
    assert collected.count(2) == 1


def test_close_drops_a_pending_full_collection(loop, collected, full_due):
    pacer = _after_an_episode(loop, 3, interval_s=0.005, middle_every=1, quiet_s=0.05)
    full_due(True)
    pacer.close()
    assert loop.pending() == []
    assert 2 not in collected


def test_close_puts_the_thresholds_back_with_episodes_in_flight(loop, collected):
    before = gc.get_threshold()
    pacer = _pacer(loop)
    pacer._enter(loop)
    pacer.close()
    assert gc.get_threshold() == before
    assert not pacer.active
    assert loop.pending() == []


def test_thresholds_come_back_only_after_the_last_of_concurrent_episodes(loop, collected):
    before = gc.get_threshold()
    pacer = _pacer(loop, interval_s=0.005)
    pacer._enter(loop)
    with episode(pacer, loop):
        assert pacer.in_flight == 2
        loop.fire_next()
    assert pacer.in_flight == 1 and pacer.active
    assert gc.get_threshold() == (before[0], before[1], _NEVER)
    loop.fire_next()  # the timer keeps going for the episode still in flight
    assert collected == [0, 0]
    pacer._exit(loop)
    assert pacer.in_flight == 0 and not pacer.active
    assert gc.get_threshold() == before


async def test_a_failing_episode_still_leaves_the_pacer():
    before = gc.get_threshold()
    pacer = GcPacer()
    with pytest.raises(RuntimeError, match="boom"), pacer.episode():
        raise RuntimeError("boom")
    assert pacer.in_flight == 0
    assert gc.get_threshold() == before


def test_a_run_that_never_goes_quiet_still_gets_full_collections(loop, collected):
    # Round numbers keep the simulated times exact.
    pacer = _pacer(loop, interval_s=1.0, middle_every=4, full_every_s=10.0, quiet_s=100.0)
    with episode(pacer, loop):
        for _ in range(20):
            loop.fire_next()
        assert pacer.in_flight == 1
    # A full collection at 10 s and at 20 s (10 s after the last one); middle ones every 4th tick.
    assert collected == [0, 0, 0, 1, 0, 0, 0, 1, 0, 2, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert pacer.collections == {"young": 14, "middle": 4, "full": 2}


def test_a_loop_closed_with_episodes_counted_does_not_stop_pacing_on_the_next_one(collected):
    first, second = FakeLoop(), FakeLoop()
    pacer = GcPacer(interval_s=0.005, clock=second.time)
    pacer._enter(first)  # a task dropped without its finally running
    first.closed = True
    with episode(pacer, second):
        assert [h.callback for h in second.pending()] == [pacer._tick]
        for _ in range(3):
            second.fire_next()
    assert collected == [0, 0, 0]
    pacer.close()


def test_the_pacer_collects_from_a_real_event_loop():
    """On asyncio's own loop, across a loop closed with an episode still counted (a task dropped
    without its finally running): the next loop's episode gets the timer's collections, and the
    thresholds are the pacer's while it runs and the collector's own after."""
    before = gc.get_threshold()
    pacer = GcPacer(interval_s=0.001, middle_every=2, full_every_s=3600.0)

    async def abandoned():
        pacer._enter(asyncio.get_running_loop())

    async def next_run():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # a hang guard: a few milliseconds when the timer runs
        with pacer.episode():
            assert gc.get_threshold() == (before[0], before[1], _NEVER)
            while pacer.collections["middle"] < 2 and loop.time() < deadline:
                await asyncio.sleep(0.001)

    asyncio.run(abandoned())
    asyncio.run(next_run())
    assert pacer.collections["middle"] >= 2 and pacer.collections["young"] >= 2
    assert pacer.collections["full"] == 0
    pacer.close()
    assert gc.get_threshold() == before


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="interval_s > 0"):
        GcPacer(interval_s=0)
    with pytest.raises(ValueError, match="middle_every >= 1"):
        GcPacer(middle_every=0)
    with pytest.raises(ValueError, match="GcPacer clock must be a callable returning seconds, got 1.0"):
        GcPacer(clock=1.0)  # type: ignore[arg-type]


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
