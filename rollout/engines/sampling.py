"""Token sampling shared by the local engine's decode loops: processed log-probs and seeded draws.

Both loops (the eager one and the static-cache one that runs as a CUDA graph) sample through these
functions, so a request gets the same tokens from either, whatever else shares its batch.

Randomness is counter-based: the uniform a row draws for its n-th token is a hash of (row seed, n).
A row therefore needs no generator object of its own, a whole batch draws its uniforms with a few
elementwise integer operations (no per-row Python work, nothing that a CUDA graph cannot replay),
and the draw does not depend on the batch's other rows or on how many steps the batch ran.
"""

from __future__ import annotations

import math

import torch

_LOW32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for x in [0, 2**32), exact in int64 (no product reaches 2**63)."""
    low = (x & 0xFFFF) * constant
    high = ((x >> 16) * constant) & 0xFFFF
    return (low + (high << 16)) & _LOW32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: every input bit affects every output bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_uniforms(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row from (seed, counter); both int64, seeds in [0, 2**63)."""
    low, high = seeds & _LOW32, (seeds >> 32) & _LOW32
    first = _fmix32(low ^ _fmix32(high ^ _fmix32(counters & _LOW32)))
    second = _fmix32(first ^ 0x9E3779B9)
    # 27 + 26 bits: the usual 53-bit float64 mantissa built from two 32-bit words.
    return (
        (first >> 5).to(torch.float64) * 67108864.0 + (second >> 6).to(torch.float64)
    ) / 9007199254740992.0


def processed_log_probs(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    filtering: bool,
) -> torch.Tensor:
    """log_softmax of the scores after temperature, top-k and top-p, each row with its own values.

    ``temperatures`` must already have greedy rows (temperature 0) replaced by 1; ``filtering`` is
    False when no row uses top-k or top-p, which skips the sort.
    """
    scaled = logits / temperatures.unsqueeze(-1)
    if filtering:
        vocab = scaled.shape[-1]
        sorted_scores, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        remove = ranks >= k.unsqueeze(-1)
        probs = sorted_scores.masked_fill(remove, -math.inf).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # Rows with top_p == 1 keep everything: rounding can push the cumulative mass above 1.
        threshold = torch.where(top_p < 1, top_p, torch.full_like(top_p, math.inf))
        remove |= mass_before > threshold.unsqueeze(-1)
        remove[:, 0] = False
        scaled = scaled.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), -math.inf)
    return torch.log_softmax(scaled, dim=-1)


def sample_tokens(log_probs: torch.Tensor, uniforms: torch.Tensor, greedy: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with one uniform per row; ``greedy`` rows take the argmax instead.

    The CDF is accumulated in float64 so that rounding over a 150k vocabulary does not shift
    probability mass, and ``right=True`` picks the first entry whose CDF exceeds the target, so a
    zero-probability token is never drawn.
    """
    cdf = log_probs.exp().to(torch.float64).cumsum_(dim=-1)
    targets = uniforms * cdf[:, -1]
    sampled = torch.searchsorted(cdf, targets.unsqueeze(-1), right=True).squeeze(-1)
    sampled = sampled.clamp(max=log_probs.shape[-1] - 1)
    return torch.where(greedy, log_probs.argmax(dim=-1), sampled)
