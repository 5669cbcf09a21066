"""Short, frequent garbage collections while episodes are in flight, full ones once they are done.

CPython starts a young collection after 700 net allocations of container objects, but every freed
object counts against that figure, old ones included. With hundreds of episodes in flight, each
freeing what it made a turn earlier while making more, the young generations grow to tens of
thousands of objects (coroutines, futures, HTTP bookkeeping) before the count lets a collection
start, and a collection walks them all holding the GIL: 10-40 ms in which no thread of the process
runs, the event loop included (bench/RESULTS.md).

While any episode runs, the pacer collects the youngest generation every ``interval_s`` and the
middle one every ``middle_every`` intervals from a timer on the event loop, so each pass walks only
what the last few milliseconds made. The automatic collector keeps its young and middle
collections, which bound the generations while the loop is too busy for the timer (hundreds of
episodes starting at once leave their state behind in one burst: left for the first timed middle
collection, it took 16-22 ms in one pass). It no longer starts full collections: the pacer raises
that threshold and puts it back once no episode is in flight, then runs the deferred full collection
``quiet_s`` later if nothing has started meanwhile and the collector's own rule calls for one. A
run that never goes quiet still gets a full collection every ``full_every_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator

# Far above any count the collector reaches in a rollout: "never on its own".
_NEVER = 1 << 30


class GcPacer:
    def __init__(
        self,
        interval_s: float = 0.01,
        middle_every: int = 10,
        quiet_s: float = 1.0,
        full_every_s: float = 120.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds) measures ``full_every_s``; pass the event loop's own clock where the
        loop's timers run on another one (a simulated loop)."""
        if interval_s <= 0 or middle_every < 1 or quiet_s < 0 or full_every_s <= 0:
            raise ValueError("GcPacer needs interval_s > 0, middle_every >= 1, quiet_s >= 0, full_every_s > 0")
        if not callable(clock):
            raise ValueError(f"GcPacer clock must be a callable returning seconds, got {clock!r}")
        self._clock = clock
        self.interval_s = interval_s
        self.middle_every = middle_every
        self.quiet_s = quiet_s
        self.full_every_s = full_every_s
        self._lock = threading.Lock()
        self._in_flight = 0
        self._saved_thresholds: tuple[int, int, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None
        self._quiet: asyncio.TimerHandle | None = None  # the deferred full collection, when pending
        self._ticks = 0
        self._last_full = clock()
        self.collections = {"young": 0, "middle": 0, "full": 0}  # what the pacer itself ran

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def active(self) -> bool:
        return self._saved_thresholds is not None

    @contextlib.contextmanager
    def episode(self) -> Iterator[None]:
        """Wrap one episode; call on the event loop that runs it."""
        self._enter(asyncio.get_running_loop())
        try:
            yield
        finally:
            self._exit(asyncio.get_running_loop())

    def _enter(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._in_flight += 1
            self._cancel_quiet_locked()
            if self._saved_thresholds is None:
                self._saved_thresholds = gc.get_threshold()
                young, middle, _ = self._saved_thresholds
                gc.set_threshold(young, middle, _NEVER)
            # A loop closed with episodes still counted (abandoned tasks) no longer runs the timer.
            if self._timer is None or self._timer_loop is None or self._timer_loop.is_closed():
                self._ticks = 0
                self._timer, self._timer_loop = loop.call_later(self.interval_s, self._tick, loop), loop

    def _exit(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight:
                return
            self._stop_locked()
            # Deferred, so that a batch whose next episodes start at once (slime's groups) is not
            # held up by a full collection between two of them.
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._quiet = loop.call_later(self.quiet_s, self._collect_if_quiet)

    def _cancel_quiet_locked(self) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None

    def _stop_locked(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None
        if self._saved_thresholds is not None:
            gc.set_threshold(*self._saved_thresholds)
            self._saved_thresholds = None

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            if self._timer is None or not self._in_flight:
                return
            self._ticks += 1
            self._timer = loop.call_later(self.interval_s, self._tick, loop)
        if self._clock() - self._last_full >= self.full_every_s:
            self._collect(2)
        elif self._ticks % self.middle_every == 0:
            self._collect(1)
        else:
            self._collect(0)

    def _collect_if_quiet(self) -> None:
        with self._lock:
            self._quiet = None
            if self._in_flight:
                return
        # Only the full collection the collector would have started itself: more middle
        # collections since the last full one than its threshold (a short burst of episodes is
        # not worth a pass over the whole heap).
        if gc.get_count()[2] > gc.get_threshold()[2]:
            self._collect(2)

    def _collect(self, generation: int) -> None:
        gc.collect(generation)
        self.collections[("young", "middle", "full")[generation]] += 1
        if generation == 2:
            self._last_full = self._clock()

    def close(self) -> None:
        """Put the collector's thresholds back, whatever is still in flight, and drop a pending
        deferred full collection."""
        with self._lock:
            self._stop_locked()
            self._cancel_quiet_locked()
