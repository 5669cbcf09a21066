"""Answer grading with math-verify, in worker processes with a hard per-answer timeout.

Why worker processes: math-verify can take unbounded time on hostile answers (``\\boxed{9!!!!!}``
makes sympy multiply numbers with millions of digits), and its own timeout uses ``SIGALRM``, which
only works in the main thread. Here every answer is graded in the main thread of a worker process
with math-verify's timeouts disabled. The worker stops an answer itself after ``timeout_s`` (an
alarm raises through math-verify, which catches ordinary exceptions) and stays in the pool, so a
hostile answer costs its timeout and nothing more; the parent waits ``KILL_GRACE_S`` longer, then
kills and replaces a worker that did not stop (stuck in native code) or died. Numeric power towers
(``10^{10^{10^{10}}}``) are refused before they reach a worker (:func:`power_digits`). Workers start with the ``spawn`` method (the parent may
hold torch threads, which ``fork`` would copy in a broken state). With ``spawn``, a worker re-imports
the parent's main script, so scripts that grade must keep their top-level work under
``if __name__ == "__main__":`` (as every multiprocessing program must).

Usage::

    grader = get_default_grader()                      # process-wide, started lazily
    result = grader.grade("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}")
    result = await grader.grade_async(answer, label)    # from asyncio, without blocking the loop
    result.score, result.status, result.parsed_answer, result.elapsed_s
    set_default_grader(Grader(workers=8))              # a bigger pool for a big rollout

:meth:`Grader.grade` never raises because of the answer; a :class:`GradeResult` always comes back.
Its ``status`` says whether the answer was graded; every status other than CORRECT scores 0.
The time a call spends waiting for a free worker does not count against the answer's timeout (a
busy pool must not turn a correct answer into a timeout); it is bounded by ``wait_timeout_s``.
Each worker's address space is capped at its size after start-up plus ``memory_limit_mb``, so a
hostile answer cannot take the machine's memory within its timeout.

Answers may be bare (``7/2``, ``60^\\circ``, ``x = 5``) or contain ``\\boxed{...}``, whose content
(nested braces included) is what gets graded; see :func:`extract_boxed` and :func:`prepare_answer`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum
from multiprocessing.connection import Connection
from typing import Any

__all__ = [
    "GradeResult",
    "GradeStatus",
    "Grader",
    "close_default_grader",
    "extract_boxed",
    "get_default_grader",
    "prepare_answer",
    "set_default_grader",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_WORKERS = 2
#: How long past ``timeout_s`` the parent waits for a worker to stop an answer itself before it
#: kills the worker.
KILL_GRACE_S = 0.5
#: A worker that has stopped this many answers at their timeout is retired and replaced: an alarm
#: can interrupt library code anywhere, and this bounds what such interruptions could leave behind.
MAX_INTERRUPTIONS_PER_WORKER = 32
#: Longest \boxed{} content looked at; a longer one is not an answer, and the cap keeps
#: extraction linear on hostile text.
MAX_BOXED_CHARS = 4096
_BOX_COMMANDS = ("\\boxed", "\\fbox")
#: How many \boxed occurrences, from the last one backwards, are tried before giving up.
_MAX_BOX_TRIES = 16


class GradeStatus(str, Enum):
    CORRECT = "correct"
    INCORRECT = "incorrect"
    TIMEOUT = "not graded: timeout"
    PARSE_ERROR = "not graded: parse error"
    WORKER_CRASHED = "not graded: worker crashed"
    #: The grader could not take the answer: closed, or no worker became free in wait_timeout_s.
    UNAVAILABLE = "not graded: grader unavailable"
    #: A numeric power tower whose value has more digits than MAX_RESULT_DIGITS (sympy would try
    #: to build the number); refused before it reaches a worker.
    TOO_LARGE = "not graded: too large to evaluate"

    @property
    def graded(self) -> bool:
        return self in (GradeStatus.CORRECT, GradeStatus.INCORRECT)


@dataclass(frozen=True)
class GradeResult:
    score: float
    status: GradeStatus
    #: The answer as math-verify read it ("" when it could not be read).
    parsed_answer: str
    #: Wall time of the whole grade call, waiting for a worker included.
    elapsed_s: float
    #: Why an answer was not graded, in words; None when it was graded.
    detail: str | None = None

    @property
    def correct(self) -> bool:
        return self.status is GradeStatus.CORRECT


# ---------------------------------------------------------------------------------------------
# Answer extraction (runs in the caller's process; linear time)


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, else None.

    Nested braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); escaped braces
    ``\\{`` and ``\\}`` do not count. ``\\boxed 5`` (no braces) gives ``5``. If the last occurrence is
    unterminated (a truncated response), earlier ones are tried, up to 16 occurrences back.
    """
    end = len(text)
    for _ in range(_MAX_BOX_TRIES):
        start, command = -1, ""
        for candidate in _BOX_COMMANDS:
            found = text.rfind(candidate, 0, end)
            if found > start:
                start, command = found, candidate
        if start < 0:
            return None
        content = _command_argument(text, start + len(command))
        if content is not None:
            return content
        end = start
    return None


def _command_argument(text: str, pos: int) -> str | None:
    n = len(text)
    arg = pos
    while arg < n and text[arg] in " \t\r\n":
        arg += 1
    if arg >= n:
        return None
    if text[arg] != "{":
        # "\boxed 5" takes one token; "\boxedfoo" is a different command.
        if arg == pos:
            return None
        stop = arg
        while stop < n and stop - arg < MAX_BOXED_CHARS and not text[stop].isspace() and text[stop] != "$":
            stop += 1
        return text[arg:stop]
    close = _group_end(text, arg)
    return None if close is None else text[arg + 1 : close]


_CLOSING = {"{": "}", "(": ")"}


def _group_end(text: str, start: int) -> int | None:
    """Index of the bracket closing the ``{`` or ``(`` at ``start`` (escaped brackets do not count),
    or None when it does not close within MAX_BOXED_CHARS."""
    opening = text[start]
    closing = _CLOSING[opening]
    depth = 0
    limit = min(len(text), start + MAX_BOXED_CHARS + 2)
    i = start
    while i < limit:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == opening:
            depth += 1
        elif char == closing:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))

#: Largest number of decimal digits a numeric power in an answer may have; sympy evaluates integer
#: powers exactly, so ``10^{10^{10}}`` would hold a worker (and a core) until the timeout.
MAX_RESULT_DIGITS = 100_000
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_BASE = re.compile(r"(\d+(?:\.\d+)?)[\s)}]*$")


def power_digits(answer: str) -> float:
    """The most decimal digits any numeric power ``a^b`` in ``answer`` evaluates to (towers such as
    ``10^{10^{10}}`` included; ``inf`` when the estimate overflows), 0 when there is none. Powers
    with a non-numeric base or exponent are not estimated: sympy keeps them symbolic. Linear in
    the length of the answer for all practical purposes (each ``^`` is looked at once per level)."""
    worst = 0.0
    for match in re.finditer(r"\^", answer):
        # The base: a number, possibly wrapped ("{10}^", "(10)^"); math-verify reads both as 10.
        number = _BASE.search(answer, max(0, match.start() - 64), match.start())
        if number is None:
            continue
        digits = _tower_log10(number.group(1), answer[match.end() :])
        if digits is not None:
            worst = max(worst, digits)
    return worst


def _tower_log10(base: str, rest: str, depth: int = 0) -> float | None:
    """log10 of ``base ^ <first argument of rest>`` when both are numeric (nested towers too)."""
    exponent, _ = _power_argument(rest)
    if exponent is None or depth > 32:
        return None
    exponent_log10 = _numeric_log10(exponent, depth + 1)
    base_log10 = _numeric_log10(base, depth + 1)
    if exponent_log10 is None or base_log10 is None:
        return None
    if base_log10 <= 0:
        return 0.0  # 0 or 1 to any power, or a fraction: small
    if exponent_log10 > 300:
        return math.inf
    return 10**exponent_log10 * base_log10


def _numeric_log10(text: str, depth: int) -> float | None:
    """log10 of ``text`` if it is a number or a numeric power tower (any part possibly wrapped in
    braces or parentheses), else None; 0.0 for numbers of at most 1."""
    text = text.strip()
    if depth > 32:
        return None
    if text[:1] in _CLOSING:
        inner, rest = _power_argument(text)
        if inner is None:
            return None
        if not rest.strip():
            return _numeric_log10(inner, depth + 1)
        base = inner
    else:
        number = _NUMBER.match(text)
        if number is None:
            return None
        base, rest = number.group(), text[number.end() :]
    rest = rest.lstrip()
    if not rest:  # a plain number (a lone group returned above)
        value = float(base)
        return math.log10(value) if value > 1 else 0.0
    if not rest.startswith("^"):
        return None
    argument, tail = _power_argument(rest[1:])
    if argument is None or tail.strip():
        return None
    return _tower_log10(base, rest[1:], depth + 1)


def _power_argument(text: str) -> tuple[str | None, str]:
    """The argument of ``^`` at the start of ``text`` (a brace group or one token) and what follows."""
    text = text.lstrip()
    if not text:
        return None, ""
    if text[0] not in _CLOSING:
        number = _NUMBER.match(text)
        end = number.end() if number else 1
        return text[:end], text[end:]
    close = _group_end(text, 0)
    return (None, "") if close is None else (text[1:close], text[close + 1 :])


def prepare_answer(text: str) -> str:
    """The string actually graded: the last ``\\boxed{}`` content if any, else the text itself,
    stripped of math delimiters and a trailing period, with ``°`` written as ``^\\circ``."""
    answer = text.strip()
    boxed = extract_boxed(answer)
    if boxed is not None:
        answer = boxed.strip()
    for left, right in _MATH_DELIMITERS:
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
            break
    answer = answer.rstrip(".").strip()
    # math-verify reads "60^\circ" inside \boxed{} but not "60°".
    return answer.replace("°", "^\\circ")


# ---------------------------------------------------------------------------------------------
# Worker process side


def _worker_main(conn: Connection, memory_limit_mb: int | None, niceness: int = 0) -> None:
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    if niceness:
        # A hostile answer burns a core until its timeout; at a lower priority it takes that core
        # from the rollout's event loop only when the loop has nothing to do.
        with contextlib.suppress(OSError, AttributeError):
            os.nice(niceness)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    def parse_math(answer: str) -> list[Any]:
        # \boxed{} wrapping reads most forms; "$...$" reads a few that \boxed{} reads as plain text.
        fallback: list[Any] = []
        for wrapped in (f"\\boxed{{{answer}}}", f"${answer}$"):
            parsed = parse(wrapped, parsing_timeout=None)
            if _has_math(parsed):
                return parsed
            fallback = fallback or parsed
        return fallback

    def grade(answer: str, label: str) -> tuple[str, str, str | None]:
        gold = parse_math(label)
        if not gold:
            return (
                GradeStatus.PARSE_ERROR.value,
                "",
                f"the reference answer {label[:80]!r} could not be parsed",
            )
        pred = parse_math(answer)
        # A math label against an answer math-verify could only read as text would be a string
        # comparison that cannot succeed; saying so is the more useful feedback.
        if not pred or (_has_math(gold) and not _has_math(pred)):
            return (
                GradeStatus.PARSE_ERROR.value,
                "",
                f"{answer[:80]!r} could not be read as a math expression",
            )
        shown = str(pred[-1]) if isinstance(pred[-1], str) else str(pred[0])
        ok = verify(gold, pred, timeout_seconds=None)
        return (GradeStatus.CORRECT if ok else GradeStatus.INCORRECT).value, shown, None

    def healthy() -> bool:
        # After an interruption: does grading still give the right answers?
        try:
            with _alarm(DEFAULT_TIMEOUT_S):
                correct, incorrect = grade("2", "2")[0], grade("3", "2")[0]
        except BaseException:
            return False
        return (correct, incorrect) == (GradeStatus.CORRECT.value, GradeStatus.INCORRECT.value)

    grade("1", "1")  # import sympy and fill math-verify's caches before reporting ready
    _limit_memory(memory_limit_mb)
    signal.signal(signal.SIGALRM, _raise_interrupted)
    conn.send(("ready", os.getpid()))
    interruptions = 0
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        conn.send(_RECEIVED)  # lets the parent tell "died before the job" from "crashed on it"
        answer, label, timeout_s = request
        try:
            with _alarm(timeout_s):
                reply: tuple[str, str, str | None] = grade(answer, label)
        except _Interrupted:
            interruptions += 1
            reply = (GradeStatus.TIMEOUT.value, "", _timeout_detail(timeout_s))
            if interruptions >= MAX_INTERRUPTIONS_PER_WORKER or not healthy():
                conn.send(reply)
                return  # the parent finds the worker gone and starts a fresh one
        except MemoryError:
            reply = (
                GradeStatus.WORKER_CRASHED.value,
                "",
                f"grading ran out of memory ({memory_limit_mb} MiB)",
            )
        except Exception as exc:  # math-verify swallows most errors; anything else is a parse failure
            reply = (GradeStatus.PARSE_ERROR.value, "", f"{type(exc).__name__}: {str(exc)[:200]}")
        conn.send(reply)


_RECEIVED = "received"


class _Interrupted(BaseException):
    """Raised by the alarm; a BaseException, so math-verify's ``except Exception`` lets it through."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted


@contextlib.contextmanager
def _alarm(seconds: float):
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _timeout_detail(timeout_s: float) -> str:
    return f"grading took longer than {timeout_s:g} s"


def _has_math(parsed: list[Any]) -> bool:
    """True if math-verify read a sympy object, not just a string."""
    return any(not isinstance(item, str) for item in parsed)


def _exit_with_parent() -> None:
    """Exit when the parent dies, even mid-computation (daemon workers only die with a live parent)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _limit_memory(memory_limit_mb: int | None) -> None:
    """Cap the worker's address space at its current size plus ``memory_limit_mb`` (Linux)."""
    if not memory_limit_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as statm:
            current = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = current + memory_limit_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, OSError, ValueError):
        pass  # not Linux, or not permitted: grading still works, without the cap


# ---------------------------------------------------------------------------------------------
# Parent side


class _WorkerGone(Exception):
    pass


class _NoWorker(Exception):
    """No worker can be had for a reason other than a busy pool; the message says which."""


class _Worker:
    def __init__(self, ctx: Any, memory_limit_mb: int | None, niceness: int = 0) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, memory_limit_mb, niceness),
            name="envs-grading-worker",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        self.ready = False
        # When the answer it is grading was handed over (None while idle): a worker that has
        # spent the grader's slow_answer_s on one answer no longer counts toward the pool.
        self.busy_since: float | None = None
        # True from the worker's acknowledgement of its current answer until the reply is read:
        # the worker holds the answer and is grading it.
        self.grading = False
        # Grader.wait_ready and a grading call may wait for the same starting worker; only one
        # of them may read its "ready" message, or the other would read a grading reply.
        self._ready_lock = threading.Lock()

    def wait_ready(self, timeout: float) -> bool:
        """True once the worker has imported math-verify; False if not within ``timeout``."""
        if self.ready:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._ready_lock.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            if self.ready:
                return True
            if not self.conn.poll(max(0.0, deadline - time.monotonic())):
                return False
            self.conn.recv()
        except (EOFError, OSError) as exc:
            raise _WorkerGone(f"worker pid {self.process.pid} exited while starting") from exc
        finally:
            self._ready_lock.release()
        self.ready = True
        return True

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.join(timeout=5)
        except (OSError, ValueError, AttributeError):
            pass
        self.conn.close()


class Grader:
    """A pool of math-verify worker processes; thread-safe, usable from asyncio.

    Workers start on first use (or :meth:`start`); :meth:`close` (also run at interpreter exit)
    kills them. ``timeout_s`` is the limit on one answer's grading (a worker that cannot stop in
    time is killed ``KILL_GRACE_S`` later); ``wait_timeout_s`` bounds the wait for a free worker;
    ``memory_limit_mb`` caps each worker's extra address space.

    ``spare_workers`` more processes are kept started and idle: a worker killed or retired is
    replaced by a spare at once, instead of by a new process that spends the better part of a
    second importing sympy while answers queue. ``niceness`` lowers the workers' CPU priority
    (``os.nice``), so that answers that burn a core until their timeout slow the caller's threads
    as little as possible.

    A worker that has spent ``slow_answer_s`` on one answer stops counting toward ``workers``:
    when callers wait for a worker while some are stuck like that, the pool grows (a started spare
    first), up to ``max_workers`` in all (twice ``workers`` by default), so that ordinary answers
    (milliseconds) do not queue for seconds behind answers that run into their timeout. The pool keeps what it grew to (an idle
    worker costs memory, not CPU; one started for every burst of slow answers would cost a sympy
    import each time).
    """

    def __init__(
        self,
        workers: int = DEFAULT_WORKERS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        wait_timeout_s: float = 120.0,
        start_method: str = "spawn",
        memory_limit_mb: int | None = 2048,
        max_answer_chars: int = 1000,
        spare_workers: int = 1,
        niceness: int = 10,
        max_workers: int | None = None,
        slow_answer_s: float = 0.25,
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"Grader workers must be an integer >= 1, got {workers!r}")
        if not isinstance(spare_workers, int) or isinstance(spare_workers, bool) or spare_workers < 0:
            raise ValueError(f"Grader spare_workers must be an integer >= 0, got {spare_workers!r}")
        if not isinstance(niceness, int) or isinstance(niceness, bool) or not 0 <= niceness <= 19:
            raise ValueError(f"Grader niceness must be an integer in [0, 19], got {niceness!r}")
        max_workers = 2 * workers if max_workers is None else max_workers
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or max_workers < workers:
            raise ValueError(f"Grader max_workers must be an integer >= workers ({workers}), got {max_workers!r}")
        _check_timeout("timeout_s", timeout_s)
        _check_timeout("wait_timeout_s", wait_timeout_s)
        _check_timeout("slow_answer_s", slow_answer_s)
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"Grader start_method must be 'spawn' or 'forkserver', got {start_method!r} "
                "('fork' would copy the parent's threads into the worker)"
            )
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.wait_timeout_s = float(wait_timeout_s)
        self.start_method = start_method
        self.memory_limit_mb = memory_limit_mb
        self.max_answer_chars = max_answer_chars
        self.spare_workers = spare_workers
        self.niceness = niceness
        self.max_workers = max_workers
        self.slow_answer_s = float(slow_answer_s)
        self._ctx = multiprocessing.get_context(start_method)
        self._lock = threading.Lock()
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: set[_Worker] = set()
        self._spares: list[_Worker] = []
        self._waiting = 0  # callers blocked in _acquire for a free worker
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Grader:
        """Start the worker processes (without waiting for them). Idempotent."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this Grader is closed; create a new one")
            if self._started:
                return self
            self._started = True
            atexit.register(self.close)
            self._top_up_locked()
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Start the workers and block until each has imported math-verify (for warm-ups/tests)."""
        self.start()
        deadline = time.monotonic() + timeout_s
        with self._lock:
            workers = list(self._all) + self._spares
        for worker in workers:
            try:
                ready = worker.wait_ready(deadline - time.monotonic())
            except _WorkerGone:
                continue  # a replacement is spawned when a caller picks the dead one up
            if not ready:
                raise TimeoutError(f"grading workers did not start within {timeout_s} s")

    def close(self) -> None:
        """Kill all workers. Grading calls in flight return UNAVAILABLE. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            workers = list(self._all) + self._spares
            self._all.clear()
            self._spares = []
        atexit.unregister(self.close)
        for worker in workers:
            worker.kill()

    def __enter__(self) -> Grader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int]:
        """Process ids of the current workers, slow ones included (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in self._all if w.process.pid is not None]

    def spare_pids(self) -> list[int]:
        """Process ids of the started spare workers, next to take over first."""
        with self._lock:
            return [w.process.pid for w in self._spares if w.process.pid is not None]

    def grading_pids(self) -> list[int]:
        """Process ids of the workers that have acknowledged an answer and are grading it."""
        with self._lock:
            return [w.process.pid for w in self._all if w.grading and w.process.pid is not None]

    def slow_pids(self) -> list[int]:
        """Process ids of the workers that have held their current answer for ``slow_answer_s`` or
        more: those no longer counted toward ``workers`` (see the class docstring)."""
        with self._lock:
            now = time.monotonic()
            return [w.process.pid for w in self._slow_workers_locked(now) if w.process.pid is not None]

    @property
    def waiting(self) -> int:
        """How many grading calls are blocked waiting for a free worker now (a queue that stays
        long means the pool is too small)."""
        return self._waiting

    # -- grading --------------------------------------------------------------------------------

    def grade(self, answer: str, label: str, *, timeout_s: float | None = None) -> GradeResult:
        """Grade ``answer`` against ``label``; blocks for at most the wait plus ``timeout_s``."""
        started = time.monotonic()
        if not isinstance(answer, str) or not isinstance(label, str):
            raise TypeError(
                f"grade(answer, label) takes two str, got {type(answer).__name__} and {type(label).__name__}"
            )
        timeout = self.timeout_s if timeout_s is None else _check_timeout("timeout_s", timeout_s)

        def result(status: GradeStatus, parsed: str = "", detail: str | None = None) -> GradeResult:
            score = 1.0 if status is GradeStatus.CORRECT else 0.0
            return GradeResult(score, status, parsed, time.monotonic() - started, detail)

        prepared, gold = prepare_answer(answer), prepare_answer(label)
        if not prepared:
            return result(GradeStatus.PARSE_ERROR, detail="the answer is empty")
        if len(prepared) > self.max_answer_chars:
            return result(
                GradeStatus.PARSE_ERROR,
                detail=f"the answer is {len(prepared)} characters long (at most {self.max_answer_chars})",
            )
        if not gold:
            return result(GradeStatus.PARSE_ERROR, detail="the reference answer is empty")
        digits = power_digits(prepared)
        if digits > MAX_RESULT_DIGITS:
            shown = "more than 10^300" if math.isinf(digits) else f"about {digits:.3g}"
            return result(
                GradeStatus.TOO_LARGE,
                detail=f"the answer is a number with {shown} digits (at most {MAX_RESULT_DIGITS:,} are evaluated)",
            )
        try:
            self.start()
        except RuntimeError:
            return result(GradeStatus.UNAVAILABLE, detail="the grader is closed")

        # A worker can die between the idle check and the send (killed from outside, OOM). Workers
        # acknowledge each job before grading it, so a death before the acknowledgement is not the
        # answer's fault: the answer goes to a fresh worker (once). A death after it is a crash.
        for attempt in range(2):
            try:
                worker = self._acquire(started + self.wait_timeout_s)
            except _NoWorker as exc:
                return result(GradeStatus.UNAVAILABLE, detail=str(exc))
            if worker is None:
                return result(
                    GradeStatus.UNAVAILABLE,
                    detail="the grader is closed"
                    if self._closed
                    else f"no grading worker free within {self.wait_timeout_s:g} s",
                )
            received = False
            worker.busy_since = time.monotonic()
            deadline = worker.busy_since + timeout + KILL_GRACE_S
            try:
                worker.conn.send((prepared, gold, timeout))
                if worker.conn.poll(timeout + KILL_GRACE_S):
                    received = worker.conn.recv() == _RECEIVED
                    worker.grading = received
                if not received or not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                    self._replace(worker)
                    return result(GradeStatus.TIMEOUT, detail=_timeout_detail(timeout))
                status, parsed, detail = worker.conn.recv()
            except (EOFError, OSError):
                self._replace(worker)
                if self._closed:
                    return result(GradeStatus.UNAVAILABLE, detail="the grader was closed while grading")
                if not received and attempt == 0:
                    continue
                code = worker.process.exitcode
                return result(GradeStatus.WORKER_CRASHED, detail=f"the grading worker died (exit code {code})")
            self._release(worker)
            return result(GradeStatus(status), parsed, detail)
        raise AssertionError("unreachable")

    async def grade_async(self, answer: str, label: str, *, timeout_s: float | None = None) -> GradeResult:
        """:meth:`grade` in a thread, so the event loop keeps running while the worker grades."""
        return await asyncio.to_thread(self.grade, answer, label, timeout_s=timeout_s)

    # -- pool internals -------------------------------------------------------------------------

    def _new_worker(self) -> _Worker:
        return _Worker(self._ctx, self.memory_limit_mb, self.niceness)

    def _spawn_locked(self) -> None:
        worker = self._spares.pop(0) if self._spares else self._new_worker()
        self._all.add(worker)
        self._idle.put(worker)
        while len(self._spares) < self.spare_workers:
            self._spares.append(self._new_worker())

    def _slow_workers_locked(self, now: float) -> list[_Worker]:
        """Workers that have spent ``slow_answer_s`` or more on their current answer."""
        return [w for w in self._all if w.busy_since is not None and now - w.busy_since >= self.slow_answer_s]

    def _slow_locked(self, now: float) -> int:
        return len(self._slow_workers_locked(now))

    def _top_up_locked(self) -> None:
        """Spawn until ``workers`` are not slow (or ``max_workers`` are running)."""
        now = time.monotonic()
        while len(self._all) - self._slow_locked(now) < self.workers and len(self._all) < self.max_workers:
            self._spawn_locked()

    def _grow(self) -> float:
        """Top the pool up for a caller that found no idle worker; returns how long that caller
        may wait before a busy worker turns slow and the pool could grow again."""
        with self._lock:
            if self._closed:
                return 0.0
            self._top_up_locked()
            if len(self._all) >= self.max_workers:
                return math.inf
            now = time.monotonic()
            starts = [w.busy_since for w in self._all if w.busy_since is not None]
            slow_at = [start + self.slow_answer_s for start in starts if now - start < self.slow_answer_s]
            return max(0.001, min(slow_at) - now) if slow_at else math.inf

    def _acquire(self, deadline: float) -> _Worker | None:
        # Consecutive workers found dead while starting; a few in a row means they cannot start.
        dead_on_start = 0
        while not self._closed:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                regrow_in = self._grow()
                with self._lock:
                    self._waiting += 1
                try:
                    worker = self._idle.get(timeout=max(0.0, min(deadline - time.monotonic(), regrow_in)))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        return None
                    continue
                finally:
                    with self._lock:
                        self._waiting -= 1
            try:
                if worker.wait_ready(deadline - time.monotonic()):
                    if not worker.process.is_alive():
                        # Died while idle (killed from outside, OOM): not this answer's fault.
                        raise _WorkerGone(f"worker pid {worker.process.pid} died while idle")
                    return worker
                self._idle.put(worker)  # still starting; the next caller waits on it
                return None
            except _WorkerGone:
                self._replace(worker)
                dead_on_start += 1
                if dead_on_start >= 3:
                    logger.error("grading workers exit while starting; see their stderr above")
                    raise _NoWorker("grading workers exit while starting (their error is on stderr)") from None
        return None

    def _release(self, worker: _Worker) -> None:
        worker.busy_since = None
        worker.grading = False
        with self._lock:
            if worker in self._all:
                self._idle.put(worker)
                return
        worker.kill()

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._all.discard(worker)
            if not self._closed:
                self._top_up_locked()


def _check_timeout(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


_default_grader: Grader | None = None
_default_lock = threading.Lock()


def get_default_grader() -> Grader:
    """The process-wide grader (2 workers, 5 s timeout), created on first call; workers start on
    first grade. A closed default grader is replaced by a fresh one."""
    global _default_grader
    with _default_lock:
        if _default_grader is None or _default_grader.closed:
            _default_grader = Grader()
        return _default_grader


def set_default_grader(grader: Grader) -> None:
    """Make ``grader`` the process-wide grader (e.g. one with more workers for a large rollout);
    the previous default grader, if any, is closed."""
    global _default_grader
    if not isinstance(grader, Grader):
        raise TypeError(f"set_default_grader takes a Grader, got {type(grader).__name__}")
    with _default_lock:
        previous, _default_grader = _default_grader, grader
    if previous is not None and previous is not grader:
        previous.close()


def close_default_grader() -> None:
    """Close the process-wide grader, if one was created (it is also closed at exit)."""
    global _default_grader
    with _default_lock:
        grader, _default_grader = _default_grader, None
    if grader is not None:
        grader.close()
