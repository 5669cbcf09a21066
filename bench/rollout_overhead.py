"""Per-turn overhead of the rollout: everything except the engine's generation.

Runs whole episodes one at a time against a zero-latency engine (it returns pre-tokenized replies
at once), with the real Qwen2.5-VL / Qwen3-VL tokenizers and processors, so the measured time is
observation encoding, processor calls, tool-call parsing, grading and bookkeeping. Three cases:

- geo3k text turn: ``envs.geo3k`` (parse the tool call, grade it in a worker process, feedback text);
- text turn, no grading: the test suite's TextFeedbackEnv (a fixed text observation), i.e. the
  rollout's own per-turn cost;
- image-observation turn: ``bench/bench_envs.py``'s NewImageEnv (a new 448x448 diagram every turn).

As in training, nothing is served from a warm cache: every episode has its own prompt text and its
own new 448x448 prompt image (the warm-up episodes too), and every image observation is a new image.
The engine encodes images with the SGLang client's own ``prepare_image`` (what a request to SGLang
carries), once per image as the episode asks. The first row times the real prompt encoding
(``rollout.episode._encode_prompt``: template ids, image lookup, engine payload) plus the prompt
image's background processing, in CPU time of the whole process.

Per-turn overhead = (time inside the episode's turn loop - engine time) / turns. Per-episode fixed
costs (prompt encoding with a 448x448 image, env build/reset/close, finishing the sample) are
reported on their own rows and are not spread over turns. For the geo3k case the turn is split by
timers around the episode's steps: grading (``Grader.grade``: pipe round trip + math-verify in the
worker; the bare pipe round trip is measured separately against an echo process), the rest of
``env.step`` (parsing, feedback) with its trip to an env thread, the observation's encoding in an
env thread (chat template and tokenizer; the rest: image lookups and payloads),
``format_observation`` with the observation's trip, and bookkeeping (the rest of the turn loop).
``--profile`` prints a cProfile of the geo3k text turns (the loop thread and the observation's
env-thread work, merged; prompt encoding and finishing excluded), from a separate pass, so the
timings above carry no profiler overhead.

Every geo3k reply calls the tool with an answer no earlier reply had (all wrong, so episodes take
three turns), so math-verify's own caches never serve one; a fresh answer graded alone (no episode
around it) is measured and printed separately.

    python bench/rollout_overhead.py [--episodes 200] [--profile] [--quick]

Prints markdown tables and writes bench/results/rollout_overhead-<host>-<date>.json. Heavy imports
stay inside functions: grading workers are spawned and re-import this file.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEST_ENVS = HERE.parent / "tests" / "rollout" / "envs_for_tests.py"
PRESETS = {"Qwen2.5-VL": "tiny-qwen2.5-vl", "Qwen3-VL": "tiny-qwen3-vl"}
CASES = {
    "geo3k text turn": ("envs.geo3k", {}),
    "text turn, no grading": (str(TEST_ENVS), {"kind": "text"}),
    "new image every turn": (str(HERE / "bench_envs.py"), {}),
}


class ZeroLatencyEngine:
    """Answers instantly with pre-tokenized replies (cycled); counts its own time."""

    def __init__(self, tokenizer, replies):
        from rollout.engines.sglang_client import SGLangClient

        self.replies = [(text, tokenizer.encode(text, add_special_tokens=False)) for text in replies]
        self.calls = 0
        self.time_s = 0.0
        # What a request to SGLang carries for each image (the client never connects here).
        self.prepare_image = SGLangClient("http://127.0.0.1:1").prepare_image

    async def generate(self, input_ids, images, sampling_params):
        from rollout.engines.base import GenerateResult

        started = time.perf_counter()
        text, ids = self.replies[self.calls % len(self.replies)]
        self.calls += 1
        meta = {"finish_reason": {"type": "stop"}}
        result = GenerateResult(ids, [-0.1] * len(ids), text, "stop", 151645, meta)
        self.time_s += time.perf_counter() - started
        return result


def diagram(size=448):
    """A new diagram at every call: no two episodes share a prompt image."""
    from bench_envs import new_diagram

    return new_diagram(size)


_PROMPTS = iter(range(1 << 62))


def new_prompt(tokenizer) -> str:
    """A prompt text no earlier episode had (the prompt-ids cache starts cold, as for a new step)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Find x in figure {next(_PROMPTS)}."}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip


def call(answer):
    return (
        "<think>\nThe sides are 3 and 4.\n</think>\n\n"
        f'<tool_call>{{"name": "calc_score", "arguments": {{"answer": "{answer}"}}}}</tool_call><|im_end|>'
    )


def replies(case: str, episodes: int) -> list[str]:
    """The engine's replies, one per turn of every episode (warm-up and profile passes included)."""
    if case == "geo3k text turn":
        return [call(str(100 + k)) for k in range(3 * (2 * episodes + 3))]
    return ["look again<|im_end|>"]


def make_args(engine, checkpoint, env_path, env_kwargs):
    return argparse.Namespace(
        hf_checkpoint=checkpoint, rollout_engine=engine, rollout_max_context_len=None,
        rollout_max_response_len=8192, max_turns=3, rollout_interaction_env_path=env_path, env_kwargs=env_kwargs,
    )  # fmt: skip


class Timers:
    """Wall-clock time around the episode's steps; episodes run one at a time, so nothing overlaps.

    Installs wrappers on ``rollout.episode``'s helpers and ``Grader.grade`` (measurement only;
    ``restore`` puts the originals back). While ``profiling`` is set, the turn loop (loop thread)
    and each turn's env work (env thread) run under cProfile; timing and profiling are separate passes.
    """

    def __init__(self, profile: bool = False) -> None:
        import cProfile

        import rollout.episode as episode
        from envs.grading import Grader

        self.s: dict[str, float] = defaultdict(float)
        self.n: dict[str, int] = defaultdict(int)
        self.active = False
        self.profiling = False
        self.loop_profile = cProfile.Profile() if profile else None
        self.env_profile = cProfile.Profile() if profile else None
        self._restore = []
        timers = self

        def timed(key, function):
            def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    timers.add(key, time.perf_counter() - started)

            return wrapper

        def timed_async(key, function):
            async def wrapper(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return await function(*args, **kwargs)
                finally:
                    timers.add(key, time.perf_counter() - started)

            return wrapper

        real_turn_loop = episode._turn_loop

        async def turn_loop(*args, **kwargs):
            started = time.perf_counter()
            if self.profiling:
                self.loop_profile.enable()
            try:
                return await real_turn_loop(*args, **kwargs)
            finally:
                if self.profiling:
                    self.loop_profile.disable()
                timers.add("turn loop", time.perf_counter() - started)

        real_call_env = episode._call_env

        async def call_env(ctx, method, *args):
            # The env's own calls (step, format_observation), timed from the loop: the thread hand-off included.
            started = time.perf_counter()
            try:
                return await real_call_env(ctx, method, *args)
            finally:
                if getattr(method, "__name__", "") == "step":
                    timers.add("env.step seen from the loop", time.perf_counter() - started)

        real_encode_and_insert = episode._encode_and_insert

        def encode_and_insert(*args):
            started = time.perf_counter()
            try:
                if self.profiling:
                    return self.env_profile.runcall(real_encode_and_insert, *args)
                return real_encode_and_insert(*args)
            finally:
                timers.add("observation in its thread (encode, images)", time.perf_counter() - started)

        self._swap(episode, "_turn_loop", turn_loop)
        self._swap(episode, "_env_turn", timed_async("env work seen from the loop", episode._env_turn))
        self._swap(episode, "_call_env", call_env)
        self._swap(episode, "_encode_and_insert", encode_and_insert)
        self._swap(episode, "_encode_observation", timed("observation encoding", episode._encode_observation))
        self._swap(episode, "_encode_prompt", timed("prompt encoding", episode._encode_prompt))
        self._swap(episode, "_finish", timed("finishing the sample", episode._finish))
        self._swap(Grader, "grade", timed("grading", Grader.grade))

    def _swap(self, owner, name, replacement) -> None:
        self._restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def add(self, key: str, seconds: float) -> None:
        if self.active:
            self.s[key] += seconds
            self.n[key] += 1

    def restore(self) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)


async def run_episodes(runtime, args, tokenizer, n):
    from rollout.episode import run_episode
    from rollout.sample import Sample

    made = [(new_prompt(tokenizer), diagram()) for _ in range(n)]  # made before the clock starts
    turns = 0
    started = time.perf_counter()
    for i, (prompt, image) in enumerate(made):
        sample = Sample(prompt=prompt, multimodal_inputs={"images": [image]}, label="5", index=i)
        ctx = runtime.context(args)
        await run_episode(ctx, args, sample, {"temperature": 1.0})
        turns += sample.metadata["num_turns"]
    return time.perf_counter() - started, turns


def _echo(conn) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        conn.send(("incorrect", message[0], None))


def pipe_round_trip_ms(n: int = 2000) -> float:
    """Median round trip of a grading-shaped message through a multiprocessing Pipe (no grading)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=True)
    process = ctx.Process(target=_echo, args=(child,), daemon=True)
    process.start()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        parent.send(("4", "5"))
        parent.poll(5)
        parent.recv()
        samples.append(time.perf_counter() - started)
    parent.send(None)
    process.join(5)
    return statistics.median(samples[n // 10 :]) * 1e3


def fresh_grading_ms(n: int = 40) -> float:
    """Median ``Grader.grade`` time for answers the worker has not seen (integers against "5")."""
    from envs.grading import get_default_grader

    grader = get_default_grader()
    grader.wait_ready()
    samples = []
    for k in range(n):
        started = time.perf_counter()
        grader.grade(str(1000 + k), "5")
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


async def measure(family, checkpoint, episodes, profile):
    from rollout.episode import _encode_prompt
    from rollout.runtime import RolloutRuntime
    from rollout.sample import Sample

    runtime = RolloutRuntime()
    processing = runtime.processing.get(checkpoint)
    tok = processing.tokenizer
    rows: dict[str, float] = {}
    splits: dict[str, dict[str, float]] = {}

    # The real prompt encoding of a new prompt with a new 448x448 image, and that image's
    # processing on the background thread: CPU time of the whole process, per prompt.
    ctx = runtime.context(make_args(ZeroLatencyEngine(tok, ["x"]), checkpoint, "envs.geo3k", {}))
    for n, key in ((3, None), (40, "prompt with a new 448x448 image (CPU)")):
        made = [Sample(prompt=new_prompt(tok), multimodal_inputs={"images": [diagram()]}) for _ in range(n)]
        started = time.process_time()
        for sample in made:
            for entry in _encode_prompt(ctx, sample).entries:
                entry.tensors.result()
        if key is not None:
            rows[key] = (time.process_time() - started) / n * 1e3

    profile_text = None
    for name, (env_path, env_kwargs) in CASES.items():
        engine = ZeroLatencyEngine(tok, replies(name, episodes))
        args = make_args(engine, checkpoint, env_path, env_kwargs)
        timers = Timers(profile=profile and name == "geo3k text turn")
        try:
            await run_episodes(runtime, args, tok, 3)  # imports, threads, grading workers (other prompts)
            engine.time_s = 0.0
            timers.active = True
            wall, turns = await run_episodes(runtime, args, tok, episodes)
            timers.active = False
            if timers.loop_profile is not None:
                timers.profiling = True
                await run_episodes(runtime, args, tok, episodes)
                timers.profiling = False
        finally:
            timers.restore()
        s = timers.s
        per_turn = (s["turn loop"] - engine.time_s) / turns
        rows[name] = per_turn * 1e3
        split = {
            "turns per episode": turns / episodes,
            "per turn, ms": per_turn * 1e3,
            "grading": s["grading"] / turns * 1e3,
            "env.step without grading, with its thread hand-off": (
                s["env.step seen from the loop"] - s["grading"]
            ) / turns * 1e3,
            "observation encoding (chat template, tokenizer)": s["observation encoding"] / turns * 1e3,
            "observation, the rest (image lookups and payloads)": (
                s["observation in its thread (encode, images)"] - s["observation encoding"]
            ) / turns * 1e3,
            "format_observation and the observation's thread hand-off": (
                s["env work seen from the loop"] - s["env.step seen from the loop"]
                - s["observation in its thread (encode, images)"]
            ) / turns * 1e3,
            "bookkeeping (rest of the turn loop)": (
                s["turn loop"] - engine.time_s - s["env work seen from the loop"]
            ) / turns * 1e3,
            "per episode: prompt encoding, ms": s["prompt encoding"] / episodes * 1e3,
            "per episode: the rest (context, env build, reset, close), ms": (
                wall - s["turn loop"] - s["prompt encoding"] - s["finishing the sample"]
            ) / episodes * 1e3,
            "per episode: finishing the sample, ms": s["finishing the sample"] / episodes * 1e3,
            "grading calls per turn": timers.n["grading"] / turns,
        }  # fmt: skip
        splits[name] = split
        if timers.loop_profile is not None:
            import pstats

            out = io.StringIO()
            stats = pstats.Stats(timers.loop_profile, stream=out)
            stats.add(timers.env_profile)
            stats.sort_stats("tottime").print_stats(20)
            profile_text = out.getvalue()
    runtime.shutdown()
    return rows, splits, profile_text


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the geo3k text-turn path")
    parser.add_argument("--quick", action="store_true", help="30 episodes per case")
    args = parser.parse_args()
    episodes = 30 if args.quick else args.episodes

    sys.path.insert(0, str(HERE))
    from rollout_concurrency import load_average, machine_info, write_result

    load_before = load_average()
    results, splits = {}, {}
    for family, checkpoint in PRESETS.items():
        rows, split, profile_text = asyncio.run(measure(family, checkpoint, episodes, args.profile))
        results[family], splits[family] = rows, split
        if profile_text:
            print(f"\n## Profile, {family} geo3k text turns (loop thread + env thread, by own time)\n```")
            print(profile_text.strip() + "\n```")
    ipc_ms = pipe_round_trip_ms()
    fresh_ms = fresh_grading_ms()

    names = list(next(iter(results.values())))
    print("\n| ms | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{results[f][name]:.2f}" for f in results) + " |")
    for case in CASES:
        print(f"\n{case}, split (ms per turn unless noted):\n")
        print("| | " + " | ".join(splits) + " |")
        print("|---|" + "---:|" * len(splits))
        for key in next(iter(splits.values()))[case]:
            print(f"| {key} | " + " | ".join(f"{splits[f][case][key]:.3f}" for f in splits) + " |")
    print(f"\nPipe round trip to an echo process (grading IPC without math-verify): {ipc_ms:.3f} ms")
    print(f"Grading a fresh integer answer (not in math-verify's caches): {fresh_ms:.2f} ms (median)")

    record = {
        "machine": machine_info(),
        "load_average_before": load_before,
        "command": "python bench/rollout_overhead.py " + " ".join(sys.argv[1:]),
        "episodes": episodes,
        "ms": results,
        "split_ms": splits,
        "pipe_round_trip_ms": ipc_ms,
        "fresh_answer_grading_ms": fresh_ms,
    }
    print(f"\nwrote {write_result('rollout_overhead' + ('-quick' if args.quick else ''), record)}")


if __name__ == "__main__":
    main()
