"""Derived seeds and the per-turn seeding wrapper shared by the trainer and evaluation."""

from __future__ import annotations

import subprocess
import sys

from rollout.seeds import TurnSeededEngine, derive_seed


def test_derived_seeds_are_63_bit_and_the_same_in_another_process():
    seeds = {derive_seed("engine", 0, n) for n in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 1 << 63 for s in seeds)
    # No hash(): a fresh interpreter (another PYTHONHASHSEED) derives the same value.
    code = "from rollout.seeds import derive_seed; print(derive_seed('engine', 0, 5))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(other.stdout) == derive_seed("engine", 0, 5)


class _RecordingEngine:
    weight_version = 3

    def __init__(self):
        self.params: list[dict] = []

    async def generate(self, input_ids, images, sampling_params):
        self.params.append(sampling_params)
        return len(input_ids)


async def test_each_turn_gets_its_own_seed_and_the_rest_is_the_engines():
    inner = _RecordingEngine()
    engine = TurnSeededEngine(inner)
    await engine.generate([1, 2, 3], [], {"sampling_seed": 9, "temperature": 1.0})
    await engine.generate([1, 2, 3, 4, 5], [], {"sampling_seed": 9, "temperature": 1.0})
    await engine.generate([1, 2, 3], [], {"sampling_seed": 9, "temperature": 1.0})
    await engine.generate([1, 2, 3], [], {"temperature": 1.0})
    seeds = [p.get("sampling_seed") for p in inner.params]
    assert seeds[0] == derive_seed(9, 3) and seeds[1] == derive_seed(9, 5)
    assert seeds[0] != seeds[1] and seeds[2] == seeds[0]  # a turn's seed: (episode seed, prompt length)
    assert seeds[3] is None  # no episode seed: nothing derived
    assert all(p["temperature"] == 1.0 for p in inner.params)
    assert engine.weight_version == 3
