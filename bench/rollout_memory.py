"""Rollout memory: resident memory per in-flight episode, and how often each image is encoded.

Each measurement runs in a fresh child process (so that memory freed by an earlier measurement
cannot be reused and hide growth): N geo3k episodes (one 448x448 diagram per prompt, 8 samples
per prompt, every episode scripted to take all three turns) go through ``rollout.generate``
against the scripted SGLang-compatible server of ``bench/rollout_concurrency.py``, which holds
every request of one turn until told to release them. With all N episodes held in flight, the
child reads its resident set size (VmRSS from /proc/self/status) and the allocations traced by
tracemalloc (Python objects and numpy buffers; the processor's ``pixel_values`` tensor shares its
numpy buffer, so it is traced too, and the rest is reported separately), against a baseline taken
after a warm-up with the samples already built (their PIL images are not counted). It then
releases the episodes, lets them finish, and reads the RSS again while the finished samples are
still held (each keeps its ``multimodal_train_inputs``). The per-episode figure to trust is the
marginal one between two values of N: at small N, memory freed by the warm-up is reused.

Image encoding: the SGLang client's PNG encoding (``rollout.engines.sglang_client._data_uri``,
which calls ``envs.images.to_data_uri``) is wrapped with a counter and the server logs the data
URI bytes of every request, so the report shows encodings per episode (it should be one per
image, not one per turn) against requests and bytes sent per episode.

    python bench/rollout_memory.py [--quick] [--episodes 32,128] [--hold-turns 1,2]

Prints a markdown table and writes bench/results/rollout_memory-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rollout_concurrency import (  # noqa: E402  (bench/ is not a package)
    CHECKPOINT,
    ServerProcess,
    Settings,
    build_workload,
    load_average,
    machine_info,
    rollout_args,
    run_batch,
    vm_rss_mb,
    write_result,
)

PIXEL_BYTES_448 = 1024 * 1176 * 4  # pixel_values of one 448x448 image: 1024 patches x 1176 floats


async def _measure(n: int, hold_turn: int) -> dict:
    import tracemalloc

    import rollout.engines.sglang_client as client
    from rollout.runtime import default_runtime

    settings = Settings(prompts=max(1, n // 8), samples=8, min_tokens=100, max_tokens=300, ms_per_token=1.0,
                        turn_weights=(0.0, 0.0, 1.0))  # fmt: skip
    processing = default_runtime().processing.get(CHECKPOINT)
    workload = build_workload(processing, settings, warm_prompts=1)
    server = ServerProcess(workload)
    encoded = {"calls": 0, "chars": 0}
    real_data_uri = client._data_uri

    def counting_data_uri(image, *args, **kwargs):
        uri = real_data_uri(image, *args, **kwargs)
        encoded["calls"] += 1
        encoded["chars"] += len(uri)
        return uri

    try:
        args = rollout_args(server.port, settings, grading_timeout_s=5.0)
        warm, _ = await run_batch(workload.samples(range(1)), args, 8)  # another prompt and image
        del warm
        await server.call("POST", "/reset")
        samples = workload.samples()
        gc.collect()
        await asyncio.sleep(0.2)
        rss_base = vm_rss_mb()
        client._data_uri = counting_data_uri
        await server.call("POST", "/hold", {"turn": hold_turn})
        tracemalloc.start()
        traced_base = tracemalloc.get_traced_memory()[0]
        batch = asyncio.ensure_future(run_batch(samples, args, 8))
        deadline = time.monotonic() + 120
        while (await server.call("GET", "/stats"))["held"] < len(samples):
            if batch.done() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {(await server.call('GET', '/stats'))['held']} of {len(samples)} episodes held"
                )
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.2)
        rss_held = vm_rss_mb()
        traced_held = tracemalloc.get_traced_memory()[0] - traced_base
        tracemalloc.stop()
        await server.call("POST", "/release")
        outs, _ = await batch
        gc.collect()
        rss_done = vm_rss_mb()
        stats = await server.call("GET", "/stats")
        statuses = sorted({o.status.name for o in outs})
        turns = sum(o.metadata["num_turns"] for o in outs)
        pixel_bytes = sum(o.multimodal_train_inputs["pixel_values"].nbytes for o in outs)
        # A group's samples share one tensor (rollout/image_cache.py): count each tensor once.
        distinct = {id(t): t.nbytes for t in (o.multimodal_train_inputs["pixel_values"] for o in outs)}
        distinct_pixel_bytes = sum(distinct.values())
        del outs, samples, batch
        gc.collect()
        rss_freed = vm_rss_mb()
    finally:
        client._data_uri = real_data_uri
        server.close()
        await default_runtime().aclose()
    records = stats["records"]
    return {
        "episodes": n,
        "held_at_turn": hold_turn,
        "statuses": statuses,
        "rss_mb": {
            "baseline": rss_base,
            "held": rss_held,
            "finished_samples_kept": rss_done,
            "after_dropping_samples": rss_freed,
        },  # fmt: skip
        "rss_mb_per_held_episode": (rss_held - rss_base) / n,
        "traced_kb_per_held_episode": traced_held / n / 1024,
        "traced_kb_per_held_episode_besides_pixel_values": (traced_held - distinct_pixel_bytes) / n / 1024,
        "distinct_pixel_values_tensors": len(distinct),
        "rss_mb_per_finished_sample": (rss_done - rss_base) / n,
        "pixel_values_mb_per_finished_sample": pixel_bytes / n / 2**20,
        "data_uri_encodings": encoded["calls"],
        "data_uri_chars_encoded": encoded["chars"],
        "requests": len(records),
        "model_turns": turns,
        "data_uri_chars_sent": sum(r[7] for r in records),
        "images_sent": sum(r[6] for r in records),
    }


def child_main(n: int, hold_turn: int) -> None:
    from envs.grading import Grader, set_default_grader

    grader = Grader(workers=2)
    set_default_grader(grader)
    grader.wait_ready()
    result = asyncio.run(_measure(n, hold_turn))
    print("RESULT " + json.dumps(result))


def run_child(n: int, hold_turn: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), str(hold_turn)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(
        f"measurement child failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 episodes, held at turn 1")
    parser.add_argument("--episodes", default=None, help="comma-separated episode counts (multiples of 8)")
    parser.add_argument(
        "--hold-turns", default=None, help="comma-separated turns at which to hold the episodes"
    )
    parser.add_argument("--child", nargs=2, type=int, metavar=("EPISODES", "TURN"), help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child_main(*opts.child)
        return
    counts = [int(x) for x in (opts.episodes or ("16,64" if opts.quick else "32,128")).split(",")]
    turns = [int(x) for x in (opts.hold_turns or ("1" if opts.quick else "1,2")).split(",")]
    load_before = load_average()
    runs = []
    for turn in turns:
        for n in counts:
            runs.append(run_child(n, turn))
            print(f"measured {n} episodes held at turn {turn}", file=sys.stderr)

    print("\n| episodes held | at turn | RSS baseline MiB | RSS held MiB | RSS per held episode MiB | "
          "traced per held episode KiB (besides pixel_values) | RSS per finished sample MiB | pixel_values per sample MiB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        rss = r["rss_mb"]
        print(
            f"| {r['episodes']} | {r['held_at_turn']} | {rss['baseline']:.0f} | {rss['held']:.0f} | "
            f"{r['rss_mb_per_held_episode']:.2f} | {r['traced_kb_per_held_episode']:.0f} "
            f"({r['traced_kb_per_held_episode_besides_pixel_values']:.0f}) | "
            f"{r['rss_mb_per_finished_sample']:.2f} | {r['pixel_values_mb_per_finished_sample']:.2f} |"
        )
    slopes = {}
    for turn in turns:
        same = sorted((r for r in runs if r["held_at_turn"] == turn), key=lambda r: r["episodes"])
        if len(same) >= 2 and same[-1]["episodes"] > same[0]["episodes"]:
            lo, hi = same[0], same[-1]
            slopes[turn] = (hi["rss_mb"]["held"] - lo["rss_mb"]["held"]) / (hi["episodes"] - lo["episodes"])
            print(f"\nMarginal RSS per held episode at turn {turn} ({lo['episodes']} -> {hi['episodes']} episodes): "
                  f"{slopes[turn]:.2f} MiB (pixel_values of one 448x448 image: {PIXEL_BYTES_448 / 2**20:.2f} MiB)")  # fmt: skip

    print("\n| episodes | model turns | requests | PNG data URI encodings | encodings per episode | "
          "data URI KiB per request | data URI KiB encoded per episode | sent per episode |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        n, requests = r["episodes"], r["requests"]
        print(
            f"| {n} | {r['model_turns']} | {requests} | {r['data_uri_encodings']} | {r['data_uri_encodings'] / n:.2f} | "
            f"{r['data_uri_chars_sent'] / requests / 1024:.1f} | {r['data_uri_chars_encoded'] / n / 1024:.1f} | "
            f"{r['data_uri_chars_sent'] / n / 1024:.1f} |"
        )
    record = {
        "machine": machine_info(),
        "load_average_before": load_before,
        "command": "python bench/rollout_memory.py " + " ".join(sys.argv[1:]),
        "runs": runs,
        "marginal_rss_mb_per_held_episode": slopes,
    }
    print(f"\nwrote {write_result('rollout_memory' + ('-quick' if opts.quick else ''), record)}")


if __name__ == "__main__":
    main()
