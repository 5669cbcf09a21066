"""Rollout concurrency: many multi-turn episodes through ``rollout.generate`` against a timed server.

Runs 512 geo3k episodes (64 prompts x 8 samples, max_turns 3) concurrently through
``rollout.generate``, the way slime submits a rollout batch, with ``args`` pointing at an
SGLang-compatible server on localhost (``sglang_router_ip`` / ``sglang_router_port``). The server is
an aiohttp app defined here and run in its own process, so its work never shares our event loop. It
serves every request concurrently, sleeps a fixed time per generated token, and answers with
scripted turns in SGLang's response shape (``meta_info.output_token_logprobs`` included): wrong
``calc_score`` calls first, then a correct call or a final ``Answer: \\boxed{}``, so episodes take one
to three turns. Each turn has 100-300 tokens (default) and the tokens are real token ids of the
``tiny-qwen2.5-vl`` tokenizer; each prompt is a rendered Geometry3K-style problem with one 448x448
diagram (``envs.geo3k.sample_data``) and a known label.

Measured, per scenario:
- wall time of the whole batch against the engine-bound ideal: the server runs every request at
  once, so the ideal is the longest episode's summed per-token sleep, computed from the script;
- event-loop stalls: a ticker task awaits ``asyncio.sleep(0.005)`` in a loop and records how late
  it wakes up (p50 / p99 / max), over the whole run and after the last episode's first request;
- where the time goes, from the server's request log: when each episode's first request arrived
  (start delay), the client-side gap between a reply and the next request (env step, grading,
  observation encoding, queueing on the loop), and the decomposition of the last episode to finish;
  timers around the rollout's heavier steps say how much of the loop thread's time each took, and
  timers around ``Grader.grade`` give the grading latency (measurement only, removed afterwards).

Before each scenario an untimed batch runs against the scenario's server, so that the process heap
has grown to a batch's size and the connection pool holds a batch's connections, as in a training
run that rolls out batch after batch from one event loop. Its prompts and images are other ones
than the timed batch's (``--warm-prompts`` of them), and each scenario has its own: a training step
brings new prompts and images, so every cache the rollout keeps (images processed and encoded,
prompt token ids) starts cold for the timed batch, except that the 8 copies of a prompt share it as
in GRPO (slime deep-copies the images; so does this script). The report gives the image cache's
hits and misses in the timed batch (expected: one miss per prompt).

Scenarios: ``clean`` (all answers gradable) and ``hostile`` (every 16th multi-turn episode first
answers ``\\boxed{9!!!!!}``, which sympy grinds on until the worker stops it at the timeout;
``--hostile-answer`` picks another). Grading uses 4 worker processes, up to 8 while some are stuck
on slow answers, and a 1 s timeout (``--grader-workers``,
``--grader-max-workers``, ``--grading-timeout``). ``--quick``: 8 prompts, 50-120 tokens per turn at 5 ms per token.

    python bench/rollout_concurrency.py [--quick] [--prompts 64] [--samples 8] [--ms-per-token 10]

Prints markdown tables and writes bench/results/rollout_concurrency-<host>-<date>.json. Targets
(checked here, not in tests): wall time within 5% of the ideal; worst loop stall under 20 ms in the
hostile scenario. Heavy imports stay inside functions: grading workers are spawned and re-import
this file, and the server process imports only aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import json
import multiprocessing
import os
import platform
import random
import resource
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHECKPOINT = "tiny-qwen2.5-vl"
# Grinds in sympy until the grading timeout. (Numeric power towers such as 10^{10^{10^{10}}}, the
# classic hostile answer, are refused by the grader before any worker sees them since 2026-11-22;
# pass one with --hostile-answer to measure that path.)
HOSTILE_ANSWER = "\\boxed{9!!!!!}"
# Share of episodes that solve at turn 1, at turn 2, or use all three turns.
TURN_WEIGHTS = (0.35, 0.30, 0.35)
FILLER = (
    "Let me look at the diagram again. The triangle has a right angle at the marked vertex, so the "
    "two legs and the hypotenuse satisfy the Pythagorean theorem. The side opposite the given angle "
    "is labelled in the figure, and the adjacent side follows from the sine and cosine ratios. "
    "Parallel lines cut by a transversal give equal alternate interior angles, and the angles of a "
    "triangle add up to one hundred eighty degrees. I should check each step before I commit. "
)


# ---------------------------------------------------------------------------------------------
# Machine and result records (shared with the other rollout benchmarks)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str:
    """The checkout's commit (with "+dirty" when tracked files under rollout/ or envs/ differ)."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "rollout", "envs"],
                               cwd=HERE.parent, capture_output=True, text=True)  # fmt: skip
    except OSError:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    return {
        "commit": git_commit(),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }


def vm_rss_mb(pid: str = "self") -> float:
    """Resident set size in MiB from /proc (Linux), else the peak from getrusage."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(name: str, record: dict[str, Any]) -> Path:
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}-{socket.gethostname()}-{date.today()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"n": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": ordered[-1]}


# ---------------------------------------------------------------------------------------------
# The workload: prompts, samples and the server's script


@dataclass
class Settings:
    prompts: int = 64
    samples: int = 8
    max_turns: int = 3
    min_tokens: int = 100
    max_tokens: int = 300
    ms_per_token: float = 10.0
    seed: int = 0
    turn_weights: tuple[float, ...] = TURN_WEIGHTS

    @property
    def episodes(self) -> int:
        return self.prompts * self.samples


@dataclass
class EpisodePlan:
    prompt: int
    slot: int
    kinds: list[str]  # per turn: wrong | hostile | correct | final-correct | final-wrong
    tokens: list[int]  # generated tokens per turn
    replies: list[tuple[list[int], str]] = field(default_factory=list, repr=False)

    @property
    def turns(self) -> int:
        return len(self.kinds)

    @property
    def hostile(self) -> bool:
        return "hostile" in self.kinds

    @property
    def solved(self) -> bool:
        return self.kinds[-1] in ("correct", "final-correct")


@dataclass
class Workload:
    """``warm_prompts`` prompts for the untimed warm-up, then ``settings.prompts`` timed ones: the
    timed batch shares no prompt text and no image with the warm-up, as a training step shares none
    with the step before it (every cache the rollout keeps starts cold for it)."""

    settings: Settings
    warm_prompts: int
    prompts: list[str]
    labels: list[str]
    images: list[Any]
    prompt_ids: list[list[int]]  # what the first request of each prompt carries
    image_uris: list[str]  # its image as the client sends it
    pad_counts: list[int]  # its image's pad count, which SGLang expands the one pad to
    plans: list[list[EpisodePlan]]  # [prompt][slot]
    assistant_header: list[int]
    im_start_id: int
    eos_id: int

    def timed_prompts(self) -> range:
        return range(self.warm_prompts, len(self.prompts))

    def all_plans(self) -> list[EpisodePlan]:
        """The timed batch's plans."""
        return [plan for p in self.timed_prompts() for plan in self.plans[p]]

    def ideal_s(self, extra_per_hostile_s: float = 0.0) -> float:
        per_token = self.settings.ms_per_token / 1e3
        return max(
            sum(p.tokens) * per_token + (extra_per_hostile_s if p.hostile else 0.0) for p in self.all_plans()
        )

    def server_script(self) -> dict[str, Any]:
        return {
            "prompt_ids": self.prompt_ids,
            "image_uris": self.image_uris,
            "pad_counts": self.pad_counts,
            "replies": [[plan.replies for plan in group] for group in self.plans],
            "assistant_header": self.assistant_header,
            "im_start_id": self.im_start_id,
            "eos_id": self.eos_id,
            "per_token_s": self.settings.ms_per_token / 1e3,
        }

    def samples(self, prompts: range | None = None) -> list[Any]:
        """Fresh samples of ``prompts`` (default: the timed ones), each with its own deep copy of its
        image, as slime deep-copies each prompt n times. ``group_index`` is the prompt's index."""
        from rollout.sample import Sample

        out = []
        for p in self.timed_prompts() if prompts is None else prompts:
            for s in range(self.settings.samples):
                out.append(
                    Sample(
                        group_index=p,
                        index=p * self.settings.samples + s,
                        prompt=self.prompts[p],
                        multimodal_inputs={"images": [copy.deepcopy(self.images[p])]},
                        label=self.labels[p],
                    )
                )
        return out


def _wrong_answer(label: str, rng: random.Random) -> str:
    while True:
        answer = str(rng.randint(2, 99))
        if answer != label:
            return answer


def _plan_kinds(turns: int, max_turns: int, rng: random.Random) -> list[str]:
    kinds = ["wrong"] * (turns - 1)
    if turns < max_turns:
        kinds.append("correct")
    else:
        kinds.append("final-correct" if rng.random() < 0.5 else "final-wrong")
    return kinds


def build_workload(
    processing,
    settings: Settings,
    hostile_every: int = 0,
    hostile_answer: str = HOSTILE_ANSWER,
    warm_prompts: int | None = None,
) -> Workload:
    """Problems, prompts and a script of replies for every (prompt, sample) slot: ``warm_prompts``
    (default ``settings.prompts``) for the warm-up, then ``settings.prompts`` for the timed batch.

    Every problem is distinct (its own diagram), and its text is marked with the seed and its index,
    so no two prompts of a process share a text or an image as long as scenarios use distinct seeds.
    With ``hostile_every`` = k > 0, every k-th timed episode that takes two or more turns answers
    ``hostile_answer`` in its first tool call instead of a plain wrong answer.
    """
    from envs.geo3k.sample_data import generate_problems
    from rollout.engines.sglang_client import SGLangClient
    from rollout.image_cache import predicted_pad_count
    from rollout.prompts import build_sample

    warm = settings.prompts if warm_prompts is None else warm_prompts
    rng = random.Random(settings.seed)
    tok = processing.tokenizer
    problems = generate_problems(warm + settings.prompts, seed=settings.seed)
    client = SGLangClient("http://127.0.0.1:1")  # never connects: only its image encoding is used
    prompts, labels, images, prompt_ids, image_uris, pad_counts = [], [], [], [], [], []
    for index, problem in enumerate(problems):
        text = f"(Problem {settings.seed}-{index}) {problem.problem}"
        prompt = build_sample(text, [problem.image], problem.answer, tok).prompt
        prompts.append(prompt)
        labels.append(problem.answer)
        images.append(problem.image)
        prompt_ids.append(processing.compress_image_pads(processing.encode_trusted(prompt)))
        image_uris.append(client.prepare_image(problem.image))  # exactly what the client will send
        pad_counts.append(predicted_pad_count(processing, problem.image))

    filler = processing.encode_plain(FILLER * 8)
    eos = processing.eos_token_id
    plans: list[list[EpisodePlan]] = []
    multi_turn = 0
    for p in range(len(problems)):
        group = []
        for s in range(settings.samples):
            turns = rng.choices(
                range(1, settings.max_turns + 1), weights=settings.turn_weights[: settings.max_turns]
            )[0]
            kinds = _plan_kinds(turns, settings.max_turns, rng)
            if turns >= 2 and p >= warm:
                multi_turn += 1
                if hostile_every and multi_turn % hostile_every == 0:
                    kinds[0] = "hostile"
            tokens = [rng.randint(settings.min_tokens, settings.max_tokens) for _ in kinds]
            plan = EpisodePlan(p, s, kinds, tokens)
            for t, (kind, n) in enumerate(zip(kinds, tokens, strict=True)):
                plan.replies.append(
                    _reply(processing, filler, eos, f"{p}.{s}.{t + 1}", kind, n, labels[p], rng, hostile_answer)
                )
            group.append(plan)
        plans.append(group)
    return Workload(
        settings=settings,
        warm_prompts=warm,
        prompts=prompts,
        labels=labels,
        images=images,
        prompt_ids=prompt_ids,
        image_uris=image_uris,
        pad_counts=pad_counts,
        plans=plans,
        assistant_header=processing.encode_trusted("<|im_start|>assistant\n"),
        im_start_id=tok.convert_tokens_to_ids("<|im_start|>"),
        eos_id=eos,
    )


def _reply(processing, filler, eos, marker, kind, n_tokens, label, rng, hostile_answer) -> tuple[list[int], str]:
    """``n_tokens`` token ids: thinking (unique per episode and turn), then the turn's action, then EOS."""
    if kind in ("wrong", "hostile", "correct"):
        answer = {"wrong": _wrong_answer(label, rng), "hostile": hostile_answer, "correct": label}[kind]
        action = (
            "<tool_call>"
            + json.dumps({"name": "calc_score", "arguments": {"answer": answer}})
            + "</tool_call>"
        )
    else:
        answer = label if kind == "final-correct" else _wrong_answer(label, rng)
        action = f"Answer: \\boxed{{{answer}}}"
    head = processing.encode_plain(f"<think>\nAttempt {marker}. ")
    tail = processing.encode_plain(f"\n</think>\n\n{action}") + [eos]
    room = n_tokens - len(head) - len(tail)
    if room < 0:
        raise ValueError(
            f"{n_tokens} tokens per turn is too few for a scripted turn; use at least {len(head) + len(tail)}"
        )
    ids = head + (filler * (room // len(filler) + 1))[:room] + tail
    return ids, processing.tokenizer.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# The server: SGLang's /generate shape, a fixed sleep per generated token, every request at once


class ScriptedServer:
    """Finds the episode and turn of each request from its token ids and answers from the script.

    The first request of an episode carries exactly its prompt's ids and image; the n-th sample of a prompt
    to arrive gets slot n (mod samples). A later request carries the previous reply verbatim after
    the last-but-one ``<|im_start|>assistant\\n``; replies are unique, so they name the episode.
    After ``POST /hold {"turn": k}`` every request of turn k waits until ``POST /release``.
    """

    def __init__(self, script: dict[str, Any]) -> None:
        keys = zip(script["prompt_ids"], script["image_uris"], strict=True)
        self.prompts = {(tuple(ids), uri): p for p, (ids, uri) in enumerate(keys)}
        # SGLang reports prompt_tokens after expanding each image's single pad to its pad count.
        self.extra_pads = {uri: n - 1 for uri, n in zip(script["image_uris"], script["pad_counts"], strict=True)}
        self.replies = script["replies"]
        self.index: dict[tuple[int, ...], tuple[int, int, int]] = {}
        for p, group in enumerate(self.replies):
            for s, turns in enumerate(group):
                for t, (ids, _) in enumerate(turns):
                    self.index[tuple(ids)] = (p, s, t)
        self.header = list(script["assistant_header"])
        self.im_start = script["im_start_id"]
        self.eos = script["eos_id"]
        self.per_token_s = script["per_token_s"]
        self.next_slot = [0] * len(self.replies)
        self.records: list[list[Any]] = []
        self.errors: list[str] = []
        self.hold_turn = 0
        self.released = asyncio.Event()
        self.held = 0

    def locate(self, ids: list[int], images: list[str]) -> tuple[int, int, int]:
        prompt = self.prompts.get((tuple(ids), images[0] if len(images) == 1 else None))
        if prompt is not None:
            slot = self.next_slot[prompt] % len(self.replies[prompt])
            self.next_slot[prompt] += 1
            return prompt, slot, 0
        starts = [i for i, token in enumerate(ids) if token == self.im_start]
        if len(starts) < 3:
            raise LookupError("neither a known prompt nor a continuation")
        begin = starts[-3] + len(self.header)
        if ids[starts[-3] : begin] != self.header:
            raise LookupError("the previous turn is not an assistant turn")
        end = ids.index(self.eos, begin) + 1
        p, s, t = self.index[tuple(ids[begin:end])]
        return p, s, t + 1

    async def generate(self, request):
        from aiohttp import web

        arrived = time.monotonic()
        body = await request.json()
        ids = body.get("input_ids") or []
        images = body.get("image_data") or []
        images = [images] if isinstance(images, str) else images
        try:
            p, s, t = self.locate(ids, images)
            reply_ids, text = self.replies[p][s][t]
        except (LookupError, ValueError, IndexError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            return web.json_response({"error": {"message": f"unscripted request: {exc}"}}, status=500)
        if self.hold_turn == t + 1 and not self.released.is_set():
            self.held += 1
            await self.released.wait()
            self.held -= 1
        await asyncio.sleep(len(reply_ids) * self.per_token_s)
        meta = {
            "id": f"{p}.{s}.{t}",
            "finish_reason": {"type": "stop", "matched": self.eos},
            "prompt_tokens": len(ids) + sum(self.extra_pads.get(uri, 0) for uri in images),
            "completion_tokens": len(reply_ids),
            "cached_tokens": 0,
            "weight_version": "bench",
            "output_token_logprobs": [[-0.05, token, None] for token in reply_ids],
        }
        response = web.json_response({"text": text, "output_ids": reply_ids, "meta_info": meta})
        self.records.append(
            [
                arrived,
                time.monotonic(),
                p,
                s,
                t + 1,
                len(reply_ids),
                len(images),
                sum(len(i) for i in images),
                len(ids),
            ]
        )
        return response

    async def stats(self, request):
        from aiohttp import web

        return web.json_response({"records": self.records, "errors": self.errors, "held": self.held})

    async def reset(self, request):
        from aiohttp import web

        self.records, self.errors = [], []
        return web.json_response({"ok": True})

    async def hold(self, request):
        from aiohttp import web

        self.hold_turn = int((await request.json())["turn"])
        self.released = asyncio.Event()
        return web.json_response({"ok": True})

    async def release(self, request):
        from aiohttp import web

        self.released.set()
        return web.json_response({"ok": True})


def _serve(script: dict[str, Any], conn) -> None:
    """Server process: run the scripted app on a free port, report the port, serve until killed."""
    from aiohttp import web

    async def main() -> None:
        server = ScriptedServer(script)
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/generate", server.generate)
        app.router.add_get("/stats", server.stats)
        app.router.add_post("/reset", server.reset)
        app.router.add_post("/hold", server.hold)
        app.router.add_post("/release", server.release)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        # A batch opens hundreds of connections at once; the default backlog (128) would drop some.
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])
        conn.close()
        await asyncio.Event().wait()

    asyncio.run(main())


class ServerProcess:
    """The scripted server in a spawned process (its CPU work never runs on our event loop)."""

    def __init__(self, workload: Workload) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(workload.server_script(), child), daemon=True)
        self.process.start()
        child.close()
        if not parent.poll(60):
            self.process.kill()
            raise RuntimeError("the scripted server did not start within 60 s")
        self.port = parent.recv()
        self.url = f"http://127.0.0.1:{self.port}"

    async def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import aiohttp

        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, json=body) as response,
        ):
            return await response.json()

    def close(self) -> None:
        self.process.kill()
        self.process.join(5)


# ---------------------------------------------------------------------------------------------
# Attribution: timers around the rollout's heavier steps (measurement only, restored afterwards)

# Steps that run on the event loop's thread, by (module, function).
LOOP_STEPS = {
    "prompt encoding (tokenize, image processing, PNG data URI)": ("rollout.episode", "_encode_prompt"),
    "observation encoding": ("rollout.episode", "_encode_observation"),
    "finishing samples (tensor concat, metadata)": ("rollout.episode", "_finish"),
    "response parsing": ("rollout.engines.sglang_client", "parse_generate_response"),
}


class Probes:
    """Wraps the steps in LOOP_STEPS and ``Grader.grade`` with timers; ``close`` restores them.

    A step that a future version of the rollout renames is skipped, not an error."""

    def __init__(self) -> None:
        import importlib

        from envs.grading import Grader

        self.loop_s = {name: 0.0 for name in LOOP_STEPS}
        self.calls = {name: 0 for name in LOOP_STEPS}
        self.grades: list[tuple[float, str]] = []
        self._restore: list[tuple[Any, str, Any]] = []
        for name, (module_name, attr) in LOOP_STEPS.items():
            module = importlib.import_module(module_name)
            if hasattr(module, attr):
                self._wrap(module, attr, self._timed(name, getattr(module, attr)))
        real_grade = Grader.grade
        grades = self.grades

        def grade(grader, answer, label, **kwargs):
            result = real_grade(grader, answer, label, **kwargs)
            grades.append((result.elapsed_s, result.status.value))
            return result

        self._wrap(Grader, "grade", grade)

    def _wrap(self, owner: Any, attr: str, replacement: Any) -> None:
        self._restore.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, replacement)

    def _timed(self, name: str, function: Any) -> Any:
        main = threading.main_thread()

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if threading.current_thread() is main:
                    self.loop_s[name] += time.perf_counter() - started
                    self.calls[name] += 1

        return timed

    def close(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)

    def report(self) -> dict[str, Any]:
        timeouts = sum(1 for _, status in self.grades if status == "not graded: timeout")
        return {
            "loop_thread_s_by_step": {k: round(v, 3) for k, v in self.loop_s.items()},
            "loop_thread_calls_by_step": self.calls,
            "grading_ms": _ms(percentiles([elapsed for elapsed, _ in self.grades])),
            "grading_calls": len(self.grades),
            "grading_timeouts": timeouts,
        }


def _thread_usage() -> Any:
    return resource.getrusage(getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF))


def thread_cpu_s() -> float:
    """CPU time of the calling thread (the event loop's, when called from it)."""
    usage = _thread_usage()
    return usage.ru_utime + usage.ru_stime


def _ms(stats: dict[str, float]) -> dict[str, float]:
    return {k: (v if k == "n" else v * 1e3) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# Running a batch


def rollout_args(port: int, settings: Settings, grading_timeout_s: float) -> argparse.Namespace:
    return argparse.Namespace(
        hf_checkpoint=CHECKPOINT,
        sglang_router_ip="127.0.0.1",
        sglang_router_port=port,
        rollout_max_context_len=None,
        rollout_max_response_len=4096,
        max_turns=settings.max_turns,
        rollout_interaction_env_path="envs.geo3k",
        env_kwargs={"grading_timeout_s": grading_timeout_s},
    )


SAMPLING_PARAMS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 4096,
    "stop": None,
    "stop_token_ids": None,
    "skip_special_tokens": False,
    "no_stop_trim": True,
    "spaces_between_special_tokens": False,
}


class StallTicker:
    """Awaits asyncio.sleep(interval) in a loop; each lateness is how long the loop was blocked."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (monotonic time of wake-up, overshoot s)
        # CPU time the loop thread used between the previous wake-up and this one: near the
        # stall's length when the loop was busy, near zero when it was descheduled or waiting.
        self.cpu_s: list[float] = []
        # Times the OS took the CPU from the loop thread in that interval (involuntary context
        # switches): other processes (grading workers) or threads holding the cores.
        self.preempted: list[int] = []
        # Time the loop thread was runnable but waited for a core (the scheduler's run-queue wait,
        # Linux only): what is left of a stall after this and its CPU time is the wait for the GIL.
        self.runqueue_wait_s: list[float] = []
        self.last_wake: float | None = None
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            started = self.last_wake = time.monotonic()
            cpu, switches, queued = time.thread_time(), _involuntary_switches(), _runqueue_wait_s()
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self.samples.append((now, now - started - self.interval_s))
            self.cpu_s.append(time.thread_time() - cpu)
            self.preempted.append(_involuntary_switches() - switches)
            self.runqueue_wait_s.append(_runqueue_wait_s() - queued)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stalls_ms(self, after: float = float("-inf")) -> list[float]:
        return [over * 1e3 for at, over in self.samples if at - over - self.interval_s >= after]


def _involuntary_switches() -> int:
    return _thread_usage().ru_nivcsw


def _runqueue_wait_s() -> float:
    """Seconds the calling thread has spent runnable but not running (0.0 where the kernel does
    not report it): the second field of ``/proc/thread-self/schedstat``."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class StallSampler:
    """A thread that looks at the event loop's thread while the loop is late: when the ticker has not
    woken for ``threshold_s``, it records the loop thread's stack every ``interval_s`` (what the
    loop was running, or where it waited for the GIL). Reported per stall in ``GcWatch.report``."""

    def __init__(self, ticker: StallTicker, threshold_s: float = 0.012, interval_s: float = 0.002) -> None:
        self.ticker = ticker
        self.threshold_s = threshold_s
        self.interval_s = interval_s
        self.samples: list[tuple[float, str]] = []  # (monotonic time, innermost frames, outermost first)
        # The other threads of the process at the same moments, minus those parked on a lock, a
        # queue or a selector: the ones that may hold the GIL the loop thread is waiting for.
        self.others: list[tuple[float, str]] = []
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            last = self.ticker.last_wake
            now = time.monotonic()
            if last is None or now - last < self.threshold_s + self.ticker.interval_s:
                continue
            frames = sys._current_frames()
            frame = frames.pop(self._loop_thread, None)
            if frame is not None:
                self.samples.append((now, _stack_summary(frame)))
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, other in frames.items():
                if ident != threading.get_ident() and other.f_code.co_name not in _PARKED:
                    self.others.append((now, f"{names.get(ident, ident)}: {_stack_summary(other, depth=3)}"))

    def during(self, start: float, end: float, others: bool = False) -> list[str]:
        """The most frequent stacks sampled in [start, end] (the loop thread's, or with ``others``
        the busy other threads'), with their counts."""
        counts: dict[str, int] = {}
        for at, stack in self.others if others else self.samples:
            if start <= at <= end:
                counts[stack] = counts.get(stack, 0) + 1
        return [f"{n}x {stack}" for stack, n in sorted(counts.items(), key=lambda item: -item[1])[:3]]


# Innermost functions of a thread that waits without running Python code ("_worker": an idle
# executor thread, inside its queue's C-level get).
_PARKED = frozenset(
    {"wait", "get", "select", "_wait_for_tstate_lock", "accept", "recv_bytes", "poll", "_recv", "_worker"}
)


def _stack_summary(frame: Any, depth: int = 4) -> str:
    """The innermost ``depth`` frames as ``file:function``, skipping asyncio's own machinery."""
    names = []
    while frame is not None and len(names) < depth:
        code = frame.f_code
        where = Path(code.co_filename)
        if "asyncio" not in where.parts:
            names.append(f"{where.stem}:{code.co_name}")
        frame = frame.f_back
    return " < ".join(names)


class GcWatch:
    """Times every garbage collection (``gc.callbacks``), so stalls can be matched to collections."""

    def __init__(self) -> None:
        import gc

        self._gc = gc
        # (start, seconds, generation, collected, CPU seconds of the collecting thread, its name):
        # a collection holds the GIL, and one whose thread was off the CPU for part of it (the OS
        # ran another process) keeps every thread of ours waiting all the same.
        self.pauses: list[tuple[float, float, int, int, float, str]] = []
        self._started = (0.0, 0.0)
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (time.monotonic(), time.thread_time())
        else:
            (wall, cpu), now = self._started, time.monotonic()
            self.pauses.append((wall, now - wall, info["generation"], info["collected"], time.thread_time() - cpu,
                                threading.current_thread().name))  # fmt: skip

    def close(self) -> None:
        if self._callback in self._gc.callbacks:
            self._gc.callbacks.remove(self._callback)

    def report(
        self, ticker: StallTicker, started: float, sampler: StallSampler | None = None, threshold_ms: float = 20.0
    ) -> dict[str, Any]:
        stall_samples = ticker.samples
        by_gen: dict[str, dict[str, float]] = {}
        for gen in (0, 1, 2):
            times = [p[1] for p in self.pauses if p[2] == gen]
            by_gen[str(gen)] = {"count": len(times), "max_ms": max(times, default=0.0) * 1e3,
                                "total_ms": sum(times) * 1e3}  # fmt: skip
        # A stall "contains" a collection that started inside the window the ticker was blocked.
        long_stalls = [(at - over, at) for at, over in stall_samples if over * 1e3 > threshold_ms]
        explained = sum(1 for lo, hi in long_stalls if any(lo <= p[0] <= hi and p[1] * 1e3 > threshold_ms / 2
                                                             for p in self.pauses))  # fmt: skip
        worst = sorted(range(len(stall_samples)), key=lambda i: -stall_samples[i][1])[:5]
        worst_stalls = [
            {
                "at_s": round(at - over - started, 3),
                "ms": round(over * 1e3, 1),
                "loop_thread_cpu_ms": round(ticker.cpu_s[i] * 1e3, 1),
                "loop_thread_preempted": ticker.preempted[i],
                "loop_thread_runqueue_wait_ms": round(ticker.runqueue_wait_s[i] * 1e3, 1),
                "collections": [
                    f"gen{p[2]} {p[1] * 1e3:.1f} ms"
                    + (f" (CPU {p[4] * 1e3:.1f} ms, {p[5]}, {p[3]} freed)" if p[1] > 0.002 else "")
                    for p in self.pauses
                    if at - over - 0.005 <= p[0] <= at
                ],
                "loop_thread_stacks": sampler.during(at - over - 0.005, at) if sampler else [],
                "other_thread_stacks": sampler.during(at - over - 0.005, at, others=True) if sampler else [],
            }
            for i in worst
            for at, over in [stall_samples[i]]
        ]
        return {"gc_by_generation": by_gen, "stalls_over_threshold": len(long_stalls),
                "stalls_with_a_long_collection": explained, "worst_stalls": worst_stalls}  # fmt: skip


async def run_batch(
    samples: list[Any], args: argparse.Namespace, group_size: int
) -> tuple[list[Any], dict[int, float]]:
    """slime's shape: one task per group, each gathering its samples' generate calls."""
    import rollout

    done_at: dict[int, float] = {}

    async def one(sample):
        out = await rollout.generate(args, sample, dict(SAMPLING_PARAMS))
        done_at[id(out)] = time.monotonic()
        return out

    async def group(members):
        return await asyncio.gather(*(one(s) for s in members))

    groups = [samples[i : i + group_size] for i in range(0, len(samples), group_size)]
    outs = await asyncio.gather(*(group(g) for g in groups))
    return [s for g in outs for s in g], done_at


def check_against_plan(workload: Workload, outs: list[Any]) -> dict[str, Any]:
    """Every sample must be COMPLETED with the turns, token counts and score of a plan of its prompt."""
    by_prompt: dict[int, list[tuple]] = {}
    statuses: dict[str, int] = {}
    for out in outs:
        statuses[out.status.name] = statuses.get(out.status.name, 0) + 1
        turns = [t for t in out.metadata["turns"] if t["model_tokens"]]
        by_prompt.setdefault(out.group_index, []).append(
            (len(turns), tuple(t["model_tokens"] for t in turns), float(out.metadata["outcome"]["score"]))
        )
    matched = 0
    for p in workload.timed_prompts():
        group = workload.plans[p]
        want = sorted((plan.turns, tuple(plan.tokens), 1.0 if plan.solved else 0.0) for plan in group)
        got = sorted(by_prompt.get(p, []))
        matched += sum(1 for a, b in zip(want, got, strict=False) if a == b)
    return {"statuses": statuses, "episodes_matching_plan": matched}


def analyse(workload: Workload, records: list[list[Any]], outs, done_at, started: float) -> dict[str, Any]:
    """Start delays, client gaps between turns, and the decomposition of the last episode to finish."""
    per_token = workload.settings.ms_per_token / 1e3
    episodes: dict[tuple[int, int], list[list[Any]]] = {}
    for rec in records:
        episodes.setdefault((rec[2], rec[3]), []).append(rec)
    reply_index = {tuple(plan.replies[0][0]): (plan.prompt, plan.slot) for plan in workload.all_plans()}
    finish: dict[tuple[int, int], float] = {}
    for out in outs:
        prompt_len = len(out.tokens) - out.response_length
        first = out.metadata["turns"][0]["model_tokens"]
        key = reply_index.get(tuple(out.tokens[prompt_len : prompt_len + first]))
        if key is not None:
            finish[key] = done_at[id(out)]
    start_delays, gaps, lateness, tails = [], [], [], []
    breakdown = None
    last_done = max(finish.values()) if finish else started
    for key, recs in episodes.items():
        recs.sort(key=lambda r: r[4])
        start_delays.append(recs[0][0] - started)
        for rec in recs:
            lateness.append(rec[1] - rec[0] - rec[5] * per_token)
        for prev, nxt in zip(recs, recs[1:], strict=False):
            gaps.append(nxt[0] - prev[1])
        if key in finish:
            tails.append(finish[key] - recs[-1][1])
            if finish[key] == last_done:
                breakdown = {
                    "episode": f"prompt {key[0]} sample {key[1]}",
                    "turns": len(recs),
                    "start_delay_s": recs[0][0] - started,
                    "engine_sleep_s": sum(r[5] for r in recs) * per_token,
                    "server_lateness_s": sum(r[1] - r[0] - r[5] * per_token for r in recs),
                    "client_gaps_s": sum(n[0] - p[1] for p, n in zip(recs, recs[1:], strict=False)),
                    "after_last_reply_s": finish[key] - recs[-1][1],
                    "total_s": finish[key] - started,
                }
    return {
        "start_delay_ms": _ms(percentiles(start_delays)),
        "last_first_request_s": max(start_delays) if start_delays else 0.0,
        "client_gap_between_turns_ms": _ms(percentiles(gaps)),
        "server_lateness_ms": _ms(percentiles(lateness)),
        "after_last_reply_ms": _ms(percentiles(tails)),
        "last_episode": breakdown,
    }


async def run_scenario(name: str, workload: Workload, grading_timeout_s: float) -> dict[str, Any]:
    from envs.grading import get_default_grader
    from rollout.runtime import default_runtime

    settings = workload.settings
    server = ServerProcess(workload)
    try:
        args = rollout_args(server.port, settings, grading_timeout_s)
        # Warm-up on other prompts and images: imports, env threads, connections, the heap grown
        # to a batch's size (a training run rolls out batch after batch in one process), but no
        # cache entry the timed batch could hit: each training step brings new prompts and images.
        warm = workload.samples(range(workload.warm_prompts))
        await run_batch(warm, args, settings.samples)
        del warm
        await server.call("POST", "/reset")
        samples = workload.samples()
        cache = default_runtime().image_cache
        hits_before, misses_before = cache.hits, cache.misses
        load_before = load_average()
        ticker = StallTicker()
        ticker.start()
        await asyncio.sleep(0.05)
        sampler = StallSampler(ticker)
        sampler.start()
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        loop_cpu_before = thread_cpu_s()
        rss_before = vm_rss_mb()
        probes = Probes()
        gc_watch = GcWatch()
        workers_before = len(get_default_grader().worker_pids())
        started = time.monotonic()
        try:
            outs, done_at = await run_batch(samples, args, settings.samples)
        finally:
            wall = time.monotonic() - started
            probes.close()
            gc_watch.close()
        loop_cpu = thread_cpu_s() - loop_cpu_before
        image_cache = {"hits": cache.hits - hits_before, "misses": cache.misses - misses_before}
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        rss_after = vm_rss_mb()
        sampler.stop()
        await ticker.stop()
        stats = await server.call("GET", "/stats")
    finally:
        server.close()
        await default_runtime().aclose()
    analysis = analyse(workload, stats["records"], outs, done_at, started)
    steady_after = started + analysis["last_first_request_s"]
    ideal = workload.ideal_s()
    hostile = sum(1 for plan in workload.all_plans() if plan.hostile)
    result = {
        "scenario": name,
        "episodes": len(outs),
        "hostile_episodes": hostile,
        "requests": len(stats["records"]),
        "server_errors": stats["errors"][:5],
        "wall_s": wall,
        "ideal_s": ideal,
        "wall_over_ideal": wall / ideal,
        "image_cache_in_timed_batch": image_cache,
        "ideal_with_grading_timeouts_s": workload.ideal_s(grading_timeout_s) if hostile else ideal,
        "grading_workers_before_after": [workers_before, len(get_default_grader().worker_pids())],
        "cpu_s": (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime),
        "loop_thread_cpu_s": loop_cpu,
        **probes.report(),
        "rss_mb_before_after": [round(rss_before, 1), round(rss_after, 1)],
        "loop_stall_ms": percentiles(ticker.stalls_ms()),
        "loop_stall_ms_after_all_started": percentiles(ticker.stalls_ms(after=steady_after)),
        "stalls_over_20ms": sum(1 for s in ticker.stalls_ms() if s > 20),
        **gc_watch.report(ticker, started, sampler),
        "load_average_before_after": [load_before, load_average()],
        **check_against_plan(workload, outs),
        **analysis,
    }
    return result


# ---------------------------------------------------------------------------------------------
# Report


def print_report(settings: Settings, results: list[dict[str, Any]], config: dict[str, Any]) -> None:
    print("\n## Settings\n")
    for key, value in config.items():
        print(f"- {key}: {value}")
    print("\n| scenario | episodes (hostile) | requests | wall s | ideal s | wall / ideal | CPU s | "
          "loop stall p50 / p99 / max ms | max stall after all started ms | plan matches |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        st, steady = r["loop_stall_ms"], r["loop_stall_ms_after_all_started"]
        print(
            f"| {r['scenario']} | {r['episodes']} ({r['hostile_episodes']}) | {r['requests']} | {r['wall_s']:.2f} | "
            f"{r['ideal_s']:.2f} | {r['wall_over_ideal']:.3f} | {r['cpu_s']:.1f} | "
            f"{st['p50']:.2f} / {st['p99']:.1f} / {st['max']:.0f} | {steady['max']:.1f} | "
            f"{r['episodes_matching_plan']}/{r['episodes']} |"
        )
    print("\n| scenario | last first request s | start delay p50 / max ms | client gap between turns "
          "p50 / p99 / max ms | server lateness p99 ms |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    for r in results:
        sd, gap, late = r["start_delay_ms"], r["client_gap_between_turns_ms"], r["server_lateness_ms"]
        print(
            f"| {r['scenario']} | {r['last_first_request_s']:.2f} | {sd['p50']:.0f} / {sd['max']:.0f} | "
            f"{gap['p50']:.1f} / {gap['p99']:.1f} / {gap['max']:.0f} | {late['p99']:.1f} |"
        )
    print("\n| scenario | loop-thread CPU s | " + " | ".join(LOOP_STEPS) + " | grading calls (timeouts) | "
          "grading p50 / p99 / max ms |")  # fmt: skip
    print("|---|---:|" + "---:|" * len(LOOP_STEPS) + "---:|---:|")
    for r in results:
        steps = " | ".join(
            f"{r['loop_thread_s_by_step'][k]:.2f} s ({r['loop_thread_calls_by_step'][k]})" for k in LOOP_STEPS
        )
        g = r["grading_ms"]
        print(
            f"| {r['scenario']} | {r['loop_thread_cpu_s']:.1f} | {steps} | {r['grading_calls']} ({r['grading_timeouts']}) | "
            f"{g['p50']:.1f} / {g['p99']:.0f} / {g['max']:.0f} |"
        )
    for r in results:
        b = r["last_episode"]
        if b:
            print(
                f"\nLast episode to finish ({r['scenario']}: {b['episode']}, {b['turns']} turns, {b['total_s']:.2f} s): "
                f"start delay {b['start_delay_s']:.2f} s + engine sleep {b['engine_sleep_s']:.2f} s + server lateness "
                f"{b['server_lateness_s']:.2f} s + client gaps {b['client_gaps_s']:.2f} s + after last reply "
                f"{b['after_last_reply_s']:.3f} s"
            )
    for r in results:
        ratio, worst = r["wall_over_ideal"], r["loop_stall_ms"]["max"]
        steady = r["loop_stall_ms_after_all_started"]["max"]
        print(
            f"\n{r['scenario']}: wall / ideal {ratio:.3f} (target 1.05: {'met' if ratio <= 1.05 else 'missed'}); "
            f"worst loop stall {worst:.0f} ms over the whole batch (target 20 ms: {'met' if worst < 20 else 'missed'}), "
            f"{steady:.1f} ms once every episode had started, while answers are graded "
            f"(target 20 ms: {'met' if steady < 20 else 'missed'})"
        )
        if r["hostile_episodes"]:
            print(
                f"ideal including one grading timeout per hostile episode: {r['ideal_with_grading_timeouts_s']:.2f} s"
            )
        before, after = r["grading_workers_before_after"]
        print(f"grading workers at the start / end of the timed batch: {before} / {after}")
    for r in results:
        gcs = r["gc_by_generation"]
        print(
            f"\n{r['scenario']}: collections (count, max ms) gen0 {gcs['0']['count']}, {gcs['0']['max_ms']:.1f}; "
            f"gen1 {gcs['1']['count']}, {gcs['1']['max_ms']:.1f}; gen2 {gcs['2']['count']}, {gcs['2']['max_ms']:.1f}; "
            f"{r['stalls_with_a_long_collection']} of {r['stalls_over_threshold']} stalls over 20 ms contain one"
        )
        print(f"{r['scenario']}: worst stalls (s after the start, length, collections inside):", "; ".join(
            f"{w['at_s']:.2f} s {w['ms']:.0f} ms (loop thread on CPU {w['loop_thread_cpu_ms']:.0f} ms, "
            f"preempted {w['loop_thread_preempted']}x, waited for a core {w['loop_thread_runqueue_wait_ms']:.0f} ms) "
            f"[{_collections(w['collections'])}]" for w in r["worst_stalls"]))  # fmt: skip
        for w in r["worst_stalls"]:
            if w["loop_thread_stacks"]:
                print(f"  {w['at_s']:.2f} s, the loop thread was in: " + " | ".join(w["loop_thread_stacks"]))
            if w["other_thread_stacks"]:
                print(f"  {w['at_s']:.2f} s, other threads were in: " + " | ".join(w["other_thread_stacks"]))
    for r in results:
        print(f"\n{r['scenario']}: statuses {r['statuses']}; server errors {r['server_errors'] or 'none'}; "
              f"image cache in the timed batch: {r['image_cache_in_timed_batch']}")  # fmt: skip
        if r["episodes_matching_plan"] != r["episodes"] or r["server_errors"]:
            print("WARNING: episodes did not follow the script; the timings above are not comparable")


def _collections(names: list[str]) -> str:
    """Collections inside a stall; short gen0 ones (well under a millisecond each) only counted."""
    young = sum(1 for name in names if name.startswith("gen0") and "CPU" not in name)
    others = [name for name in names if not name.startswith("gen0") or "CPU" in name]
    return ", ".join(others + ([f"{young} gen0"] if young else [])) or "none"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, 50-120 tokens per turn at 5 ms")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--ms-per-token", type=float, default=None)
    parser.add_argument("--hostile-every", type=int, default=16,
                        help="in the hostile scenario, every k-th multi-turn episode answers the hostile expression first")  # fmt: skip
    parser.add_argument("--grading-timeout", type=float, default=1.0, help="env grading_timeout_s (seconds)")
    parser.add_argument("--grader-workers", type=int, default=4)
    parser.add_argument("--grader-spares", type=int, default=1, help="Grader spare_workers")
    parser.add_argument("--grader-max-workers", type=int, default=None,
                        help="Grader max_workers (default: twice --grader-workers)")  # fmt: skip
    parser.add_argument("--grader-niceness", type=int, default=10, help="Grader niceness")
    parser.add_argument("--scenarios", default="clean,hostile")
    parser.add_argument("--hostile-answer", default=HOSTILE_ANSWER, help="what hostile episodes answer first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm-prompts", type=int, default=None,
                        help="prompts of the untimed warm-up batch (default: as many as timed; none is reused)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    quick = opts.quick
    settings = Settings(
        prompts=opts.prompts or (8 if quick else 64),
        samples=opts.samples,
        min_tokens=opts.min_tokens or (50 if quick else 100),
        max_tokens=opts.max_tokens or (120 if quick else 300),
        ms_per_token=opts.ms_per_token or (5.0 if quick else 10.0),
        seed=opts.seed,
    )
    from envs.grading import Grader, set_default_grader
    from rollout.runtime import default_runtime

    grader = Grader(
        workers=opts.grader_workers,
        timeout_s=opts.grading_timeout,
        spare_workers=opts.grader_spares,
        niceness=opts.grader_niceness,
        max_workers=opts.grader_max_workers,
    )
    set_default_grader(grader)
    grader.wait_ready()
    processing = default_runtime().processing.get(CHECKPOINT)
    scenarios = [s.strip() for s in opts.scenarios.split(",") if s.strip()]
    results = []
    for k, name in enumerate(scenarios):
        # A seed per scenario: the scenarios run in one process and must not share prompts or images.
        workload = build_workload(
            processing,
            dataclasses.replace(settings, seed=settings.seed + 1000 * k),
            hostile_every=opts.hostile_every if name == "hostile" else 0,
            hostile_answer=opts.hostile_answer,
            warm_prompts=opts.warm_prompts,
        )
        results.append(asyncio.run(run_scenario(name, workload, opts.grading_timeout)))
    default_runtime().shutdown()
    config = {
        "episodes": f"{settings.prompts} prompts x {settings.samples} samples, max_turns {settings.max_turns}",
        "tokens per turn": f"{settings.min_tokens}-{settings.max_tokens} (uniform)",
        "engine": f"{settings.ms_per_token:g} ms per generated token, every request served concurrently",
        "turns": "solved at turn 1 / 2 / all three turns: " + " / ".join(f"{w:.0%}" for w in TURN_WEIGHTS),
        "prompts": "rendered geo3k problems, one 448x448 diagram each, tokenizer tiny-qwen2.5-vl",
        "grading": f"{opts.grader_workers} worker processes (at most {grader.max_workers} while some are "
        f"slow) + {opts.grader_spares} spare, niceness {opts.grader_niceness}, timeout {opts.grading_timeout:g} s",
        "hostile": f"every {opts.hostile_every}th multi-turn episode answers {opts.hostile_answer} at turn 1",
    }
    print_report(settings, results, config)
    record = {
        "machine": machine_info(),
        "command": "python bench/rollout_concurrency.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": str(date.today()),
        "settings": asdict(settings),
        "config": config,
        "results": results,
    }
    print(f"\nwrote {write_result('rollout_concurrency' + ('-quick' if quick else ''), record)}")


if __name__ == "__main__":
    main()
