"""A whole rollout on the local engine: episodes of several turns through the plugin's rollout code,
generated tokens per second end to end.

``--episodes`` episodes (default 64) run concurrently the way the local trainer runs a step
(``trainer.rollouts.run_rollout``: ``rollout.generate`` per episode against a ``LocalEngine``
behind ``TurnSeededEngine``, then ``rollout.reward``), each prompt with its own 448x448 diagram,
temperature 1, at most ``--tokens-per-turn`` tokens a turn. The env is the test suite's feedback
env (tests/rollout/envs_for_tests.py): every turn answers with a line of text
(``--observation-image``: a small image and the text) and never ends the episode, so every episode
runs ``--turns`` turns whatever a random-weight model writes.

The vision placeholder tokens are masked out of the model's logits (``--keep-vision-tokens``
leaves them): a random-weight model samples one now and then, and the rollout fails an episode
that does, before its last turn.

The timer holds the whole rollout: building the prompts, image processing, every turn's prefill
and decode, the env steps and observation encoding, and the reward. Caches start cold every repeat:
new diagrams (a seed offset per repeat), a new observation image colour, a new rollout runtime (its
image cache); a warm-up rollout of the same size with 2 tokens a turn comes first.

    python bench/engine_rollout.py --model tiny-qwen2.5-vl --episodes 8 --tokens-per-turn 32
    python bench/engine_rollout.py --random-init-shape qwen2.5-vl-3b --device cuda --dtype bfloat16 \\
        --episodes 64 --turns 3 --tokens-per-turn 256 --decode static

Prints a markdown table and appends the run to bench/results/engine_rollout-<host>-<date>.json
(command, machine and card, versions, git commit).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# Runnable from a plain checkout (e.g. a GPU machine where the package is not installed).
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.engine_throughput import (  # noqa: E402
    add_policy_arguments,
    diagram,
    engine_options,
    git_commit,
    machine,
    policy_from_args,
    write_report,
)
from trainer.config import TrainConfig  # noqa: E402

FEEDBACK_ENV = HERE.parent / "tests" / "rollout" / "envs_for_tests.py"
PROBLEM = "<image>Find x in the figure. Reason step by step, then call calc_score with your answer."
VISION_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
# Room in the episode's budget for each turn's observation (text, or a small image and text).
OBSERVATION_TOKENS = 512


def forbid_vision_tokens(policy):
    """Mask out of the model's output logits the vision placeholder tokens and the embedding rows
    past the tokenizer (Qwen2.5-VL-3B has 267 rows with no token); returns the hook's handle. A
    random-weight model samples both now and then (a vision token in 1 to 6 episodes of 64 over 3
    turns of 24 tokens; an id without a token about once in 570 tokens), and the rollout rightly
    fails an episode that writes one (a trained model does not), ending it before its last turn."""
    head = policy.model.get_output_embeddings()
    ids = {policy.tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    ids = {
        i
        for i in ids
        if isinstance(i, int) and 0 <= i < head.out_features and i != policy.tokenizer.unk_token_id
    }
    ids.update(range(len(policy.tokenizer), head.out_features))
    index = torch.tensor(sorted(ids), dtype=torch.long, device=head.weight.device)

    def mask(module, inputs, logits):
        return logits.index_fill(-1, index, float("-inf"))

    return head.register_forward_hook(mask)


def plugin_yaml(directory: Path) -> Path:
    """The plugin settings of the benchmark: the feedback env; turns, per-turn cap and env kwargs
    come from the run's TrainConfig."""
    path = directory / "engine_rollout.yaml"
    path.write_text(f"rollout_interaction_env_path: {FEEDBACK_ENV}\n")
    return path


def env_kwargs(observation_image: bool, repeat: int) -> dict:
    """Text feedback, or an image (of a new colour every repeat, so no cache holds it) and text."""
    if not observation_image:
        return {"kind": "text"}
    return {"kind": "image", "colour": f"#{(repeat * 2_654_435_761 + 0x3C6EF3) & 0xFFFFFF:06x}"}


def rollout_config(args: argparse.Namespace, plugin: Path, tokens_per_turn: int, repeat: int) -> TrainConfig:
    return TrainConfig.from_dict(
        dict(
            custom_config_path=str(plugin),
            # Every episode is a prompt of its own (episode_samples); GRPO's grouping, which the
            # config validates, does not enter a rollout.
            rollout_batch_size=args.episodes,
            n_samples_per_prompt=2,
            rollout_temperature=1.0,
            max_turns=args.turns,
            max_tokens_per_turn=tokens_per_turn,
            # The episode's budget never ends an episode before its last turn.
            rollout_max_response_len=args.turns * (tokens_per_turn + OBSERVATION_TOKENS),
            env_kwargs=env_kwargs(args.observation_image, repeat),
            engine_max_batch_size=args.max_batch_size or args.episodes,
            seed=args.seed + repeat,
            progress=False,
        )
    )


def episode_samples(settings, tokenizer, images: list) -> list:
    """One fresh sample per image, its prompt built as the trainer builds prompts (the chat
    template, the env module's prompt hook and tools)."""
    from rollout.prompts import build_sample, prompt_context

    env_module, tools = prompt_context(settings)
    return [
        build_sample(
            PROBLEM, [image], "0", tokenizer, index=i, group_index=i, tools=tools, env_module=env_module
        )
        for i, image in enumerate(images)
    ]


def run_once(
    policy, engine, args: argparse.Namespace, plugin: Path, tokens_per_turn: int, repeat: int
) -> dict:
    """One rollout of ``args.episodes`` episodes, timed end to end, on a fresh rollout runtime."""
    from rollout.runtime import RolloutRuntime
    from rollout.seeds import TurnSeededEngine
    from trainer.rollouts import rollout_args, run_rollout

    cfg = rollout_config(args, plugin, tokens_per_turn, repeat)
    settings = rollout_args(cfg, TurnSeededEngine(engine), str(policy.path))
    runtime = RolloutRuntime()  # its image cache starts empty
    first_image = (repeat + 1) * 1_000_000  # new diagrams every repeat
    before = dict(engine.stats)
    try:
        started = time.perf_counter()
        images = [diagram(first_image + i) for i in range(args.episodes)]
        samples = episode_samples(settings, policy.tokenizer, images)
        asyncio.run(run_rollout(settings, samples, cfg, repeat, runtime))
        seconds = time.perf_counter() - started
    finally:
        runtime.shutdown()
    turns = [len(s.metadata.get("turns", [])) for s in samples]
    model_tokens = [sum(t["model_tokens"] for t in s.metadata.get("turns", [])) for s in samples]
    statuses: dict[str, int] = {}
    reasons: dict[str, int] = {}  # why episodes ended otherwise than COMPLETED
    for sample in samples:
        name = getattr(sample.status, "name", str(sample.status))
        statuses[name] = statuses.get(name, 0) + 1
        if name != "COMPLETED":
            reason = f"{name}: {sample.metadata.get('status_reason')}"
            reasons[reason] = reasons.get(reason, 0) + 1
    generated = sum(model_tokens)
    return {
        "repeat": repeat,
        "episodes": len(samples),
        "tokens_per_turn_cap": tokens_per_turn,
        "seconds": round(seconds, 3),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 1),
        "turns_per_episode": turns,
        "turns_mean": round(statistics.mean(turns), 2),
        "generated_tokens_per_episode_mean": round(statistics.mean(model_tokens), 1),
        "statuses": statuses,
        "status_reasons": reasons,
        "engine_stats": stats_delta(before, engine.stats),
    }


def stats_delta(before: dict, after: dict) -> dict:
    """The engine's stats over one rollout: counters as differences, maxima (``max_*``) and
    anything that is not a number as they stand after it."""
    delta = {}
    for key, value in after.items():
        counter = (
            isinstance(value, (int, float)) and not isinstance(value, bool) and not key.startswith("max_")
        )
        delta[key] = value - before.get(key, 0) if counter else value
    return delta


def markdown(rows: list[dict]) -> str:
    lines = [
        "| repeat | episodes | turns / episode | generated tokens | wall s | tok/s end to end | engine batches | max rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        stats = r["engine_stats"]
        lines.append(
            f"| {r['repeat']} | {r['episodes']} | {r['turns_mean']:.2f} | {r['generated_tokens']:,} | "
            f"{r['seconds']:.2f} | {r['tokens_per_s']:,.1f} | {stats.get('batches', '-')} | "
            f"{stats.get('max_batch_rows', '-')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_policy_arguments(parser)
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="engine batch rows (default: --episodes)"
    )
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens-per-turn", type=int, default=256)
    parser.add_argument(
        "--observation-image",
        action="store_true",
        help="each observation carries a small image besides its text",
    )
    parser.add_argument(
        "--keep-vision-tokens",
        action="store_true",
        help="let the model sample vision placeholder tokens (masked by default: an episode that writes one fails)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    for name in ("episodes", "turns", "tokens_per_turn", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    return args


def main(argv: list[str] | None = None) -> dict:
    from rollout.engines.local import LocalEngine

    args = parse_args(argv)
    policy, model_name, device, dtype = policy_from_args(args)
    max_batch_size = args.max_batch_size or args.episodes
    masked = None if args.keep_vision_tokens else forbid_vision_tokens(policy)
    engine = LocalEngine(policy, max_batch_size=max_batch_size, seed=args.seed, **engine_options(args.decode))
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        plugin = plugin_yaml(Path(directory))
        try:
            # Warm-up, with seeds and images of its own (those of the repeat after the last).
            run_once(policy, engine, args, plugin, tokens_per_turn=2, repeat=args.repeats)
            for repeat in range(args.repeats):
                rows.append(run_once(policy, engine, args, plugin, args.tokens_per_turn, repeat))
                print(
                    f"repeat {repeat}: {rows[-1]['generated_tokens']} tokens in {rows[-1]['seconds']:.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            asyncio.run(engine.aclose())
            if masked is not None:
                masked.remove()
    report = {
        "benchmark": "engine_rollout",
        "date": date.today().isoformat(),
        "command": " ".join(
            ["python", "bench/engine_rollout.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "git_commit": git_commit(),
        "model": model_name,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "decode": args.decode,
        "max_batch_size": max_batch_size,
        "episodes": args.episodes,
        "turns": args.turns,
        "tokens_per_turn": args.tokens_per_turn,
        "observation": "image and text" if args.observation_image else "text",
        "vision_tokens_masked": not args.keep_vision_tokens,
        "machine": machine(device),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows),
        "results": rows,
    }
    decode = f", decode {args.decode}" if args.decode else ""
    print(
        f"\n{model_name} ({report['dtype']}{decode}) on {device}: {args.episodes} episodes x {args.turns} turns, "
        f"<= {args.tokens_per_turn} tokens a turn, {report['observation']} observations\n"
    )
    print(markdown(rows))
    out = write_report(args.output_dir, "engine_rollout", report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
