"""Grading: geo3k's answer forms, hostile answers, threads, asyncio, dead workers, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from envs.grading import (
    KILL_GRACE_S,
    Grader,
    GradeStatus,
    close_default_grader,
    extract_boxed,
    get_default_grader,
    power_digits,
    prepare_answer,
    set_default_grader,
)

HOSTILE = "\\boxed{10^{10^{10^{10}}}}"
#: Hostile in a way no static check catches: sympy grinds on it until the timeout.
SLOW = "\\boxed{9!!!!!}"
#: Timeout for answers that must be graded, not timed out: far above what they take even on a
#: loaded machine, where workers at their low priority may get a small share of a core.
AMPLE_S = 60.0
#: Bound on waiting for a state the test expects (a hang guard, not a measurement).
HANG_GUARD_S = 120.0


def _pool(**settings) -> Grader:
    """A grader for one test: workers at normal priority (at the production niceness, on a machine
    loaded by other processes, a worker can take minutes to import sympy) and an ample timeout,
    unless the test sets them."""
    return Grader(**{"timeout_s": AMPLE_S, "niceness": 0, **settings})


def _wait_for(condition, what: str, timeout_s: float = HANG_GUARD_S) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it does not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout_s:g} s")
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{5}", "5"),
        ("so \\boxed{\\frac{1}{2}} ok", "\\frac{1}{2}"),
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}"),
        ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{1} then \\boxed{2", "1"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 cm", "5"),
        ("\\boxed {x = 5}", "x = 5"),
        ("Answer: \\boxed{60^\\circ}.", "60^\\circ"),
        ("no box here", None),
        ("\\boxedfoo{5}", None),
        ("\\boxed{", None),
        ("\\boxed{" + "1" * 5000 + "}", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


# Linear on this text (milliseconds); without the caps on tries and on content length, the scan
# is quadratic (hours). The timeout is a hang guard, not a measurement.
@pytest.mark.timeout(60)
def test_extract_boxed_is_fast_on_hostile_text() -> None:
    text = "\\boxed{" * 200_000 + "{" * 1_000_000
    assert extract_boxed(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  7/2 ", "7/2"),
        ("$60°$", "60^\\circ"),
        ("\\boxed{60°}", "60^\\circ"),
        ("Answer: \\boxed{\\frac{17}{2}}.", "\\frac{17}{2}"),
        ("\\(x = 5\\)", "x = 5"),
        ("12.", "12"),
        ("", ""),
    ],
)
def test_prepare_answer(text: str, expected: str) -> None:
    assert prepare_answer(text) == expected


@pytest.mark.parametrize(
    ("answer", "label", "status", "parsed"),
    [
        ("\\boxed{2\\sqrt{3}}", "2\\sqrt{3}", GradeStatus.CORRECT, "2\\sqrt{3}"),
        ("2\\sqrt{3}", "2\\sqrt{3}", GradeStatus.CORRECT, "2\\sqrt{3}"),
        ("\\sqrt{12}", "2\\sqrt{3}", GradeStatus.CORRECT, "\\sqrt{12}"),
        ("7/2", "3.5", GradeStatus.CORRECT, "\\frac{7}{2}"),
        ("3.5", "\\frac{7}{2}", GradeStatus.CORRECT, "3.5"),
        ("60^\\circ", "60", GradeStatus.CORRECT, "60^\\circ"),
        ("60°", "60", GradeStatus.CORRECT, "60^\\circ"),
        ("\\boxed{60°}", "60", GradeStatus.CORRECT, "60^\\circ"),
        ("x = 5", "5", GradeStatus.CORRECT, "x = 5"),
        ("\\frac{1}{2}", "\\frac{1}{2}", GradeStatus.CORRECT, "\\frac{1}{2}"),
        ("0.5", "\\frac{1}{2}", GradeStatus.CORRECT, "\\frac{1}{2}"),
        ("4\\pi", "4\\pi", GradeStatus.CORRECT, "4\\pi"),
        ("16", "16", GradeStatus.CORRECT, "16"),
        (
            "Answer: \\boxed{\\frac{\\sqrt{3}}{2}}",
            "\\frac{\\sqrt{3}}{2}",
            GradeStatus.CORRECT,
            "\\frac{\\sqrt{3}}{2}",
        ),
        ("3\\sqrt{3}", "2\\sqrt{3}", GradeStatus.INCORRECT, "3\\sqrt{3}"),
        ("7/3", "3.5", GradeStatus.INCORRECT, "\\frac{7}{3}"),
        ("61", "60", GradeStatus.INCORRECT, "61"),
        ("x = 6", "5", GradeStatus.INCORRECT, "x = 6"),
        ("\\frac{1}{3}", "\\frac{1}{2}", GradeStatus.INCORRECT, "\\frac{1}{3}"),
        ("12.566", "4\\pi", GradeStatus.INCORRECT, "12.566"),
    ],
)
def test_geo3k_answer_forms(
    grader: Grader, answer: str, label: str, status: GradeStatus, parsed: str
) -> None:
    result = grader.grade(answer, label)
    assert (result.status, result.score, result.parsed_answer, result.detail) == (
        status,
        1.0 if status is GradeStatus.CORRECT else 0.0,
        parsed,
        None,
    )
    assert result.correct is (status is GradeStatus.CORRECT)
    # Graded, so the worker answered within its timeout (60 s); the pool's workers are idle, so
    # the call does not wait for one.
    assert 0 < result.elapsed_s < grader.timeout_s


@pytest.mark.parametrize(
    ("answer", "label", "detail"),
    [
        ("", "3", "the answer is empty"),
        ("\\boxed{}", "3", "the answer is empty"),
        ("1" * 1001, "3", "the answer is 1001 characters long (at most 1000)"),
        ("3", "  ", "the reference answer is empty"),
    ],
)
def test_answers_that_cannot_be_graded(grader: Grader, answer: str, label: str, detail: str) -> None:
    result = grader.grade(answer, label)
    assert (result.status, result.score, result.parsed_answer, result.detail) == (
        GradeStatus.PARSE_ERROR,
        0.0,
        "",
        detail,
    )
    assert not result.status.graded


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        ("@@", "'@@' could not be read as a math expression"),
        ("???", "'???' could not be read as a math expression"),
        ("\\", "'\\\\' could not be read as a math expression"),
    ],
)
def test_text_answers_to_a_math_label_are_parse_errors(grader: Grader, answer: str, detail: str) -> None:
    result = grader.grade(answer, "5")
    assert (result.status, result.score, result.detail) == (GradeStatus.PARSE_ERROR, 0.0, detail)


@pytest.mark.parametrize(("answer", "status"), [("A", GradeStatus.CORRECT), ("B", GradeStatus.INCORRECT)])
def test_text_labels_compare_as_text(grader: Grader, answer: str, status: GradeStatus) -> None:
    assert grader.grade(answer, "A").status is status


def test_hostile_answer_times_out(grader: Grader, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker stops the answer at its timeout, then checks its own health before replying;
    # on a loaded machine that can take longer than the parent's usual grace, after which the
    # parent would kill the worker. This test is about the worker stopping the answer itself.
    monkeypatch.setattr("envs.grading.KILL_GRACE_S", HANG_GUARD_S)
    grader.wait_ready(HANG_GUARD_S)
    pids = grader.worker_pids()
    start = time.monotonic()
    result = grader.grade(SLOW, "3", timeout_s=1.0)
    wall = time.monotonic() - start
    assert (result.status, result.score, result.detail) == (
        GradeStatus.TIMEOUT,
        0.0,
        "grading took longer than 1 s",
    )
    assert result.status.value == "not graded: timeout"
    # The worker's alarm starts after the call did and fires after 1 s; the call ends after that.
    assert 1.0 <= result.elapsed_s <= wall
    # The worker stopped the answer itself and stays in the pool: no process was replaced.
    assert sorted(grader.worker_pids()) == sorted(pids)
    assert grader.grade("3", "3", timeout_s=AMPLE_S).status is GradeStatus.CORRECT
    assert grader.grade("4", "3", timeout_s=AMPLE_S).status is GradeStatus.INCORRECT


@pytest.mark.parametrize(
    "hostile",
    [HOSTILE, "\\boxed{{10}^{{10}^{10}}}", "(10)^{(10)^{10}}", "x^{10^{10^{10}}}", "10^{200000}", "2^{2^{2^{2^{2^{2}}}}}"],
)
def test_numeric_power_towers_are_refused_without_a_worker(grader: Grader, hostile: str) -> None:
    grader.wait_ready(HANG_GUARD_S)
    pids = grader.worker_pids()
    result = grader.grade(hostile, "3")
    assert (result.status, result.score) == (GradeStatus.TOO_LARGE, 0.0)
    assert result.status.value == "not graded: too large to evaluate"
    assert result.detail.startswith("the answer is a number with ")
    assert result.detail.endswith("digits (at most 100,000 are evaluated)")
    assert grader.worker_pids() == pids  # no worker was tied up, let alone replaced


@pytest.mark.parametrize(
    ("answer", "digits"),
    [
        ("5", 0.0),
        ("2\\sqrt{3}", 0.0),
        ("e^{x^2}", 0.0),
        ("2^{x}", 0.0),
        ("2^{100}", 100 * math.log10(2)),
        ("3^2+4^2", 2 * math.log10(4)),
        ("10^{100000}", 100_000.0),
        ("2^{2^{2}}", 4 * math.log10(2)),
        ("{10}^{{10}^{10}}", 1e10),
        ("(10)^{(10)^{10}}", 1e10),
        ("10^{10^{10^{10}}}", math.inf),
        ("0.5^{10^{10}}", 10.0),  # the tower's own value is small; its exponent 10^{10} has 10 digits
        ("1^{10^{100}}", 100.0),
    ],
)
def test_power_digits(answer: str, digits: float) -> None:
    assert power_digits(answer) == pytest.approx(digits)


# Milliseconds; a scan exponential in the nesting depth would not finish (a hang guard, not a
# measurement).
@pytest.mark.timeout(60)
@pytest.mark.parametrize("text", ["10^{" * 250, "^" * 1000, "{" * 500 + "}" * 500, "(10)^{" * 166, "2^{3}+" * 166])
def test_power_digits_is_fast_on_hostile_text(text: str) -> None:
    assert power_digits(text[:1000]) >= 0.0


@pytest.mark.parametrize("answer", ["2^{2^{2}}", "10^{3}", "\\frac{2^{10}}{2^{8}}"])
def test_small_powers_are_still_graded(grader: Grader, answer: str) -> None:
    assert grader.grade(answer, "16" if "2^{2" in answer else "1000" if "10^" in answer else "4").correct


def test_grading_from_eight_threads_at_once(grader: Grader) -> None:
    answers = ["1", "2", "3", "3.0", "6/2", "\\sqrt{9}", "4", "x = 3"]
    results: dict[str, GradeStatus] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(answers))

    def grade(answer: str) -> None:
        try:
            barrier.wait()
            results[answer] = grader.grade(answer, "3").status
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=grade, args=(a,)) for a in answers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD_S)
    assert errors == []
    correct = {a for a, s in results.items() if s is GradeStatus.CORRECT}
    incorrect = {a for a, s in results.items() if s is GradeStatus.INCORRECT}
    assert (correct, incorrect) == ({"3", "3.0", "6/2", "\\sqrt{9}", "x = 3"}, {"1", "2", "4"})


async def test_grade_async_does_not_block_the_event_loop(grader: Grader) -> None:
    ticks = 0
    grading = asyncio.create_task(grader.grade_async(SLOW, "3", timeout_s=1.0))

    async def ticker() -> None:
        # Counts only while the grading task is unfinished. The grading task runs first: if it
        # blocked the loop, it would be done before the ticker's first turn (at most one or two
        # ticks, had it awaited something before blocking). If it does not block, the loop keeps
        # turning for the whole of the grading, which lasts at least its 1 s timeout: room for a
        # hundred turns of 10 ms, of which the assertion needs three.
        nonlocal ticks
        while not grading.done():
            ticks += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(grading, ticker())
    assert grading.result().status is GradeStatus.TIMEOUT
    assert ticks >= 3
    correct = await asyncio.gather(*(grader.grade_async(a, "2") for a in ("2", "4/2", "3")))
    assert [r.status for r in correct] == [GradeStatus.CORRECT, GradeStatus.CORRECT, GradeStatus.INCORRECT]


def _wait_gone(pid: int, timeout: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().split(")")[-1].split()[0] == "Z":
                    return  # a zombie: dead, waiting for its parent to reap it
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still alive after {timeout} s")


def test_a_worker_killed_while_idle_is_replaced(grader: Grader) -> None:
    grader.wait_ready(HANG_GUARD_S)
    before = grader.worker_pids()
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    for pid in before:
        _wait_gone(pid)
    # Dead idle workers are not the answer's fault: the call is served by a replacement.
    assert grader.grade("\\frac{6}{2}", "3").status is GradeStatus.CORRECT
    after = grader.worker_pids()
    assert len(after) == 2
    assert set(after).isdisjoint(before)


def test_a_worker_that_dies_while_grading_is_reported_and_replaced() -> None:
    # The timeout is far out of reach: the worker dies of the kill while grading, not of its alarm.
    with _pool(workers=1) as grader:
        grader.wait_ready(HANG_GUARD_S)
        (pid,) = grader.worker_pids()
        results: list = []
        thread = threading.Thread(target=lambda: results.append(grader.grade(SLOW, "3")), daemon=True)
        thread.start()
        # Killed once it has acknowledged the answer: a death before that would not be the
        # answer's fault, and the answer would go to a fresh worker instead.
        _wait_for(lambda: grader.grading_pids() == [pid] or not thread.is_alive(), "the worker grading the answer")
        os.kill(pid, signal.SIGKILL)
        thread.join(HANG_GUARD_S)
        (result,) = results
        assert result.status is GradeStatus.WORKER_CRASHED
        assert result.detail == "the grading worker died (exit code -9)"
        assert grader.grade("3", "3").status is GradeStatus.CORRECT
        assert grader.worker_pids() != [pid]


def test_close_kills_workers_and_later_calls_are_unavailable() -> None:
    grader = _pool(workers=1)
    assert grader.worker_pids() == []  # nothing starts before first use
    assert grader.grade("1", "1").status is GradeStatus.CORRECT
    (pid,) = grader.worker_pids()
    grader.close()
    _wait_gone(pid)
    result = grader.grade("1", "1")
    assert (result.status, result.detail) == (GradeStatus.UNAVAILABLE, "the grader is closed")
    grader.close()  # idempotent
    with pytest.raises(RuntimeError, match="this Grader is closed; create a new one"):
        grader.start()


def test_no_worker_outlives_the_interpreter(tmp_path: Path) -> None:
    script = tmp_path / "grade_and_exit.py"
    script.write_text(
        textwrap.dedent(
            """
            from envs.grading import Grader, get_default_grader, set_default_grader

            if __name__ == "__main__":
                set_default_grader(Grader(niceness=0))  # see _pool
                grader = get_default_grader()
                print(grader.grade("\\\\boxed{7/2}", "3.5").status.value)
                print(*grader.worker_pids())
            """
        )
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env
    )
    assert done.returncode == 0, done.stderr
    status, pids = done.stdout.splitlines()
    assert status == "correct"
    for pid in map(int, pids.split()):
        _wait_gone(pid)


def test_default_grader_is_lazy_and_replaced_after_close() -> None:
    close_default_grader()
    first = get_default_grader()
    assert get_default_grader() is first
    assert (first.workers, first.timeout_s, first.worker_pids()) == (2, 5.0, [])
    close_default_grader()
    assert first.closed
    second = get_default_grader()
    assert second is not first
    bigger = Grader(workers=8)
    set_default_grader(bigger)
    assert (get_default_grader() is bigger, second.closed) == (True, True)
    close_default_grader()
    assert bigger.closed
    with pytest.raises(TypeError, match="set_default_grader takes a Grader, got str"):
        set_default_grader("grader")  # type: ignore[arg-type]


def test_waiting_for_readiness_while_grading_does_not_steal_replies() -> None:
    # Both wait on the same starting worker; only one may read its "ready" message.
    with _pool(workers=1) as grader:
        results = []
        waiter = threading.Thread(target=lambda: grader.wait_ready(HANG_GUARD_S))
        grading = threading.Thread(target=lambda: results.append(grader.grade("2", "2").status))
        waiter.start()
        grading.start()
        waiter.join(HANG_GUARD_S)
        grading.join(HANG_GUARD_S)
        assert (waiter.is_alive(), grading.is_alive(), results) == (False, False, [GradeStatus.CORRECT])


def test_a_stuck_worker_is_killed_and_replaced_by_the_started_spare() -> None:
    """A worker that cannot stop an answer itself (simulated with SIGSTOP: stuck in native code) is
    killed once the grace period after the timeout has passed; the spare takes its place."""
    with _pool(workers=1, spare_workers=1) as grader:
        grader.wait_ready(HANG_GUARD_S)
        (worker,), (spare,) = grader.worker_pids(), grader.spare_pids()
        os.kill(worker, signal.SIGSTOP)
        result = grader.grade("3", "3", timeout_s=0.5)
        assert (result.status, result.detail) == (GradeStatus.TIMEOUT, "grading took longer than 0.5 s")
        # The parent gives up on the stopped worker only after the timeout and the grace.
        assert result.elapsed_s >= 0.5 + KILL_GRACE_S
        _wait_gone(worker)
        # The spare (already past its sympy import) serves the next answer; a new spare starts.
        assert grader.worker_pids() == [spare]
        (new_spare,) = grader.spare_pids()
        assert new_spare not in (worker, spare)
        assert grader.grade("3", "3").status is GradeStatus.CORRECT


def test_no_spares_when_asked_for_none() -> None:
    with _pool(workers=1, spare_workers=0) as grader:
        grader.wait_ready(HANG_GUARD_S)
        assert grader.spare_pids() == []
        (worker,) = grader.worker_pids()
        os.kill(worker, signal.SIGSTOP)
        assert grader.grade("3", "3", timeout_s=0.5).status is GradeStatus.TIMEOUT
        assert grader.grade("3", "3").status is GradeStatus.CORRECT  # served by a freshly started worker
        assert grader.worker_pids() != [worker]



@contextlib.contextmanager
def _stuck_on_first_answer(max_workers: int, results: list):
    """A one-worker pool whose worker is stopped (SIGSTOP: it neither grades nor times out) while
    a thread grades "3" against "3" on it; yields (grader, stuck pid, that thread) once the grader
    counts the worker as slow. The timeout is out of reach: the stopped worker resumes with the
    answer still its own, however long the test takes to send SIGCONT."""
    with _pool(workers=1, spare_workers=1, slow_answer_s=0.2, max_workers=max_workers) as grader:
        grader.wait_ready(HANG_GUARD_S)
        (stuck,) = grader.worker_pids()
        os.kill(stuck, signal.SIGSTOP)
        thread = threading.Thread(target=lambda: results.append(grader.grade("3", "3").status), daemon=True)
        thread.start()
        _wait_for(lambda: grader.slow_pids() == [stuck], "the stopped worker counted as slow")
        yield grader, stuck, thread


def test_answers_do_not_queue_behind_a_slow_one() -> None:
    """The pool grows by its started spare for the next answer, and keeps both workers afterwards."""
    slow: list[GradeStatus] = []
    with _stuck_on_first_answer(2, slow) as (grader, stuck, slow_thread):
        assert grader.grade("4", "4").status is GradeStatus.CORRECT
        assert slow_thread.is_alive(), "the second answer should not have waited for the first"
        assert len(grader.worker_pids()) == 2
        os.kill(stuck, signal.SIGCONT)
        slow_thread.join(HANG_GUARD_S)
        assert slow == [GradeStatus.CORRECT]
        # A new spare started when the old one joined; both workers stay (max_workers 2).
        assert stuck in grader.worker_pids() and len(grader.worker_pids()) == 2
        assert len(grader.spare_pids()) == 1
        assert [grader.grade(str(n), str(n)).status for n in range(4)] == [GradeStatus.CORRECT] * 4


def test_the_pool_grows_to_twice_its_size_by_default() -> None:
    assert (Grader(workers=3).max_workers, Grader(workers=3, max_workers=4).max_workers) == (6, 4)


def test_a_pool_at_max_workers_does_not_grow() -> None:
    first: list[GradeStatus] = []
    second: list[GradeStatus] = []
    with _stuck_on_first_answer(1, first) as (grader, stuck, slow_thread):
        (spare,) = grader.spare_pids()
        waiter = threading.Thread(target=lambda: second.append(grader.grade("4", "5").status), daemon=True)
        waiter.start()
        # The second call found no idle worker and, the pool being at max_workers, did not grow
        # it: it waits for the stuck one.
        _wait_for(lambda: grader.waiting == 1 or not waiter.is_alive(), "the second call waiting for a worker")
        assert (waiter.is_alive(), grader.worker_pids(), grader.spare_pids()) == (True, [stuck], [spare])
        os.kill(stuck, signal.SIGCONT)
        slow_thread.join(HANG_GUARD_S)
        waiter.join(HANG_GUARD_S)
        assert (first, second) == ([GradeStatus.CORRECT], [GradeStatus.INCORRECT])
        # Both answers went to the one worker; the spare never joined the pool.
        assert (grader.worker_pids(), grader.spare_pids(), grader.waiting) == ([stuck], [spare], 0)


def test_workers_and_spares_run_at_the_lower_priority() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with Grader(workers=1, spare_workers=1, niceness=7) as grader:
        grader.wait_ready(HANG_GUARD_S)
        for pid in grader.worker_pids() + grader.spare_pids():
            assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, base + 7)
    with Grader(workers=1, spare_workers=0, niceness=0) as grader:
        grader.wait_ready(HANG_GUARD_S)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in grader.worker_pids()] == [base]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "Grader workers must be an integer >= 1, got 0"),
        ({"spare_workers": -1}, "Grader spare_workers must be an integer >= 0, got -1"),
        ({"niceness": 20}, "Grader niceness must be an integer in [0, 19], got 20"),
        ({"workers": 3, "max_workers": 2}, "Grader max_workers must be an integer >= workers (3), got 2"),
        ({"slow_answer_s": -1}, "slow_answer_s must be a positive number of seconds, got -1"),
        ({"timeout_s": 0}, "timeout_s must be a positive number of seconds, got 0"),
        ({"wait_timeout_s": float("inf")}, "wait_timeout_s must be a positive number of seconds, got inf"),
        (
            {"start_method": "fork"},
            "Grader start_method must be 'spawn' or 'forkserver', got 'fork' "
            "('fork' would copy the parent's threads into the worker)",
        ),
    ],
)
def test_invalid_grader_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        Grader(**kwargs)
    assert str(info.value) == message


def test_wrong_argument_types_are_programming_errors(grader: Grader) -> None:
    with pytest.raises(TypeError, match="grade\\(answer, label\\) takes two str, got int and str"):
        grader.grade(3, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds, got -1"):
        grader.grade("3", "3", timeout_s=-1)


def test_workers_that_cannot_start_are_reported_as_such(tmp_path: Path) -> None:
    """A script read from stdin cannot be re-imported by spawned workers, so every worker dies
    while starting: the answer is UNAVAILABLE at once, and the detail says why, not "busy"."""
    script = textwrap.dedent(
        """
        from envs.grading import Grader
        # A wait for a free worker longer than the subprocess timeout below: a grader that
        # waited for one instead of giving up would be caught by that timeout.
        with Grader(workers=1, spare_workers=0, niceness=0, wait_timeout_s=3600) as grader:
            result = grader.grade("3", "3")
            print(result.status.name, "|", result.detail)
        """
    )
    out = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    status, detail = (part.strip() for part in out.stdout.strip().splitlines()[-1].split("|"))
    assert (status, detail) == ("UNAVAILABLE", "grading workers exit while starting (their error is on stderr)")
