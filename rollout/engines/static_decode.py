"""A slot-based decoder for the local engine: static KV cache, one fused step, CUDA graphs.

The eager loop runs ``model(...)`` once per token: on a GPU, a 3B model's decode step is then
~1,500 kernel launches dispatched from Python, and the GPU idles most of the step. This decoder
keeps every running request in a **slot** of preallocated buffers (KV cache, logits, sampling
parameters, counters, outputs) and advances all slots with one step function that

1. samples each slot's next token from its logits (``rollout.engines.sampling``: the same
   processed log-probs and counter-based draws as the eager loop),
2. records it, and decides on device whether the slot finished (length, stop ids, EOS,
   non-finite log-prob),
3. runs the model's own decoder layers on the sampled tokens, writing their keys and values into
   the static cache at each slot's own position, and stores the next logits.

The step touches only preallocated memory and has no host synchronisation or data-dependent
Python branching, so on CUDA it is captured once per (batch bucket, cache-length bucket,
filtering) and replayed as a graph. Buckets: the first ``b`` slots (a power of two, or all slots)
and the first ``lb`` cache positions (a short geometric ladder), so a step reads only the part of
the cache that holds tokens.

Continuous batching happens around the step (``LocalEngine``): a request is prefilled with the
model's ordinary forward, its keys and values are copied into a free slot, and it joins the next
step; a finished slot is read back and freed between steps.

Supported: decoder layers with standard softmax attention (Qwen2.5-VL, Qwen3-VL). Qwen3.5's
linear-attention layers keep a recurrent state this cache does not hold; ``unsupported_reason``
says so and the engine keeps the eager loop for them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from rollout.engines.sampling import counter_uniforms, processed_log_probs, sample_tokens

logger = logging.getLogger(__name__)

#: Per-slot finish codes written by the step (0: still running or an empty slot).
RUNNING, FINISHED_LENGTH, FINISHED_STOP_ID, FINISHED_NONFINITE = 0, 1, 2, 3

_MIN_LENGTH_BUCKET = 128


# The elementwise parts of a decoder layer, written as transformers' Qwen modules compute them.
# Run as they are, each is several kernels; on CUDA the decoder compiles each into one.


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _add_rms_norm(residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float):
    hidden = residual + delta
    return hidden, _rms_norm(hidden, weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def text_model(model):
    """The decoder stack (embeddings, layers, norm, rotary) of a Qwen-VL model."""
    return model.model.language_model


def unsupported_reason(model) -> str | None:
    """Why this model cannot use the static decoder, or None when it can."""
    try:
        stack = text_model(model)
        layers = stack.layers
    except AttributeError:
        return f"{type(model).__name__} has no model.language_model.layers"
    config = stack.config
    layer_types = set(getattr(config, "layer_types", None) or [])
    if layer_types - {"full_attention"}:
        return (
            f"{type(model).__name__} has {', '.join(sorted(layer_types - {'full_attention'}))} layers, "
            "whose recurrent or windowed state the static cache does not hold"
        )
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention is not supported by the static cache"
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (static decoding supports 'sdpa' and 'eager')"
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is None or not all(
            hasattr(attention, name) for name in ("k_proj", "v_proj", "layer_idx")
        ):
            return f"decoder layer {type(layer).__name__} has no standard self-attention"
    return None


def length_buckets(slot_len: int) -> list[int]:
    """Cache lengths a step may read: 128, 192, 256, 384, 512, ... (x1.5 / x1.33), ending at slot_len."""
    buckets, size = [], _MIN_LENGTH_BUCKET
    while size < slot_len:
        buckets.append(size)
        size = size * 3 // 2 if (size & (size - 1)) == 0 else (size // 3) * 4
    buckets.append(slot_len)
    return buckets


def batch_buckets(slots: int) -> list[int]:
    buckets, size = [], 1
    while size < slots:
        buckets.append(size)
        size *= 2
    buckets.append(slots)
    return buckets


def _attention_function(attention, implementation: str):
    """The attention kernel transformers would call for this layer (its eager one by default)."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attention).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


class _SlotCache:
    """The duck-typed ``Cache`` the decoder layers call: writes one token per slot, returns the bucket."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.rows = 0
        self.length = 0
        self.index: torch.Tensor | None = None  # (rows, kv_heads, 1, head_dim) write positions

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx][: self.rows], self.values[layer_idx][: self.rows]
        keys.scatter_(2, self.index, key_states.to(keys.dtype))
        values.scatter_(2, self.index, value_states.to(values.dtype))
        return keys[:, :, : self.length], values[:, :, : self.length]


@dataclass
class SlotRequest:
    """What a slot needs from a request besides its prefilled keys and values."""

    next_position: int  # RoPE position of the first generated token
    temperature: float  # 0 = greedy
    top_k: int
    top_p: float
    seed: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]  # stop token ids and the EOS ids; none when ignore_eos


class SlotDecoder:
    """Static buffers for ``slots`` requests of up to ``slot_len`` tokens each, and the step over them."""

    def __init__(
        self,
        model,
        *,
        slots: int,
        slot_len: int,
        use_graphs: bool,
        fuse: bool | None = None,
        max_stop_ids: int = 32,
    ) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"static decoding is not available: {reason}")
        self.model = model
        self.stack = text_model(model)
        self.lm_head = model.get_output_embeddings()
        self.slots, self.slot_len = slots, slot_len
        self.use_graphs = use_graphs
        self.fused = False
        self.capture_seconds = 0.0  # spent capturing CUDA graphs (inside the decode time)
        self.max_stop_ids = max_stop_ids
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        self.device = device
        config = self.stack.config
        layers = self.stack.layers
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (slots, kv_heads, slot_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.cache = _SlotCache(self.keys, self.values)
        vocab = self.lm_head.out_features
        self.max_new = slot_len  # output columns; one more is the scratch column for idle slots
        self.logits = torch.zeros((slots, vocab), dtype=torch.float32, device=device)
        self.temperature = torch.ones(slots, device=device)
        self.greedy = torch.zeros(slots, dtype=torch.bool, device=device)
        self.top_k = torch.full((slots,), -1, dtype=torch.long, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.seed = torch.zeros(slots, dtype=torch.long, device=device)
        self.count = torch.zeros(slots, dtype=torch.long, device=device)
        self.budget = torch.zeros(slots, dtype=torch.long, device=device)
        self.position = torch.zeros(slots, dtype=torch.long, device=device)
        self.write_at = torch.zeros(slots, dtype=torch.long, device=device)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)  # empty slots count as done
        self.finish = torch.zeros(slots, dtype=torch.long, device=device)
        self.last_token = torch.zeros(slots, dtype=torch.long, device=device)
        self.stop_ids = torch.full((slots, max_stop_ids), -1, dtype=torch.long, device=device)
        self.out_tokens = torch.zeros((slots, self.max_new + 1), dtype=torch.long, device=device)
        self.out_log_probs = torch.zeros((slots, self.max_new + 1), dtype=torch.float32, device=device)
        self._positions = torch.arange(slot_len, device=device)
        self.length_buckets = length_buckets(slot_len)
        self.batch_buckets = batch_buckets(slots)
        self.head_dim = head_dim
        self._attend = _attention_function(layers[0].self_attn, config._attn_implementation)
        self._rms_norm, self._add_rms_norm, self._rope, self._silu_mul = (
            _rms_norm,
            _add_rms_norm,
            _rope,
            _silu_mul,
        )
        if fuse if fuse is not None else use_graphs:
            self._fuse()
        self._graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._weights = self._weight_pointers()

    def _fuse(self) -> None:
        """Compile the elementwise parts: one kernel each instead of several (the step is bound by
        kernel launches at small batch). They are compiled here, by running real steps over the
        empty slots (one row, then two: the slot count becomes a dynamic size), so that no step a
        request waits for compiles, and a machine without a compiler keeps the plain versions."""
        plain = self._rms_norm, self._add_rms_norm, self._rope, self._silu_mul
        try:
            self._rms_norm, self._add_rms_norm, self._rope, self._silu_mul = (
                torch.compile(fn, dynamic=True, fullgraph=True) for fn in plain
            )
            # Under no_grad, as every step runs: a compile with gradients on would not serve them.
            with torch.no_grad():
                for rows in sorted({1, min(2, self.slots)}):
                    self._step(rows, self.length_buckets[0], False)
        except Exception as exc:  # e.g. no compiler for this device: the plain versions compute the same
            logger.warning(
                "static decoder: torch.compile failed (%s: %s); running unfused", type(exc).__name__, exc
            )
            self._rms_norm, self._add_rms_norm, self._rope, self._silu_mul = plain
            return
        self.fused = True

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # ----------------------------------------------------------------------------------------
    # Slots

    def fits(self, prompt_len: int, max_new_tokens: int, stop_ids: int) -> bool:
        return prompt_len + max_new_tokens + 1 <= self.slot_len and stop_ids <= self.max_stop_ids

    def load(
        self,
        slots: list[int],
        requests: list[SlotRequest],
        logits: torch.Tensor,
        cache,
        lengths: list[int],
    ) -> None:
        """Put a prefilled left-padded batch into ``slots`` (host side, between steps).

        ``logits`` are the prompts' last logits (rows, vocab); ``cache`` the prefill's transformers
        cache, whose row j holds its ``lengths[j]`` tokens right-aligned.
        """
        for request, length in zip(requests, lengths, strict=True):
            if not self.fits(length, request.max_new_tokens, len(request.stop_ids)):
                raise ValueError(
                    f"a request of {length} + {request.max_new_tokens} tokens does not fit a slot"
                )
        width = max(lengths)
        for layer, cached in enumerate(cache.layers):
            for j, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
                self.keys[layer][slot, :, :length].copy_(cached.keys[j, :, width - length :])
                self.values[layer][slot, :, :length].copy_(cached.values[j, :, width - length :])
        index = torch.tensor(slots, device=self.device)

        def put(target: torch.Tensor, values: list) -> None:
            target[index] = torch.tensor(values, dtype=target.dtype).to(self.device)

        self.logits[index] = logits.float()
        put(self.temperature, [1.0 if r.temperature == 0 else r.temperature for r in requests])
        put(self.greedy, [r.temperature == 0 for r in requests])
        put(self.top_k, [r.top_k for r in requests])
        put(self.top_p, [r.top_p for r in requests])
        put(self.seed, [r.seed for r in requests])
        put(self.count, [0] * len(requests))
        put(self.budget, [r.max_new_tokens for r in requests])
        put(self.position, [r.next_position for r in requests])
        put(self.write_at, lengths)
        put(self.finish, [RUNNING] * len(requests))
        put(
            self.stop_ids, [list(r.stop_ids) + [-1] * (self.max_stop_ids - len(r.stop_ids)) for r in requests]
        )
        put(self.done, [False] * len(requests))

    def state(self, rows: int, recent: int) -> torch.Tensor:
        """(rows, 3 + recent) int64 on the host: done, token count, finish code, then the last
        ``recent`` tokens of each slot (oldest first). One transfer, the step's only sync."""
        offsets = torch.arange(-recent, 0, device=self.device)
        columns = (self.count[:rows].unsqueeze(-1) + offsets).clamp(min=0)
        return torch.cat(
            [
                self.done[:rows].long().unsqueeze(-1),
                self.count[:rows].unsqueeze(-1),
                self.finish[:rows].unsqueeze(-1),
                self.out_tokens[:rows].gather(1, columns),
            ],
            dim=1,
        ).cpu()

    def mark_done(self, slot: int) -> None:
        """End a slot from the host (a stop string matched, or an abort)."""
        self.done[slot] = True

    def outputs(self, slots: list[int], counts: list[int]) -> list[tuple[list[int], list[float]]]:
        """The tokens and log-probs of finished slots, in one transfer."""
        index = torch.tensor(slots, device=self.device)
        width = max(counts)
        tokens = self.out_tokens[index, :width].tolist()
        log_probs = self.out_log_probs[index, :width].tolist()
        return [(t[:n], lp[:n]) for t, lp, n in zip(tokens, log_probs, counts, strict=True)]

    # ----------------------------------------------------------------------------------------
    # The step

    def step(self, rows: int, length: int, filtering: bool) -> None:
        """Advance slots [0, rows): ``rows`` and ``length`` must be buckets, ``length`` must cover
        every running slot's cache position (``write_at < length``)."""
        if self.use_graphs:
            key = (rows, length, filtering)
            graph = self._graphs.get(key)
            if graph is None:
                started = time.perf_counter()
                graph = self._capture(rows, length, filtering)
                self._graphs[key] = graph
                self.capture_seconds += time.perf_counter() - started
            graph.replay()
        else:
            self._step(rows, length, filtering)

    def _step(self, rows: int, length: int, filtering: bool) -> None:
        b = rows
        running = ~self.done[:b]
        log_probs = processed_log_probs(
            self.logits[:b], self.temperature[:b], self.top_k[:b], self.top_p[:b], filtering
        )
        tokens = sample_tokens(log_probs, counter_uniforms(self.seed[:b], self.count[:b]), self.greedy[:b])
        chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        finite = torch.isfinite(chosen)
        keep = running & finite
        column = torch.where(keep, self.count[:b], self.max_new).unsqueeze(-1)
        self.out_tokens[:b].scatter_(1, column, tokens.unsqueeze(-1))
        self.out_log_probs[:b].scatter_(1, column, chosen.unsqueeze(-1))
        self.count[:b] += keep
        # SGLang's order: the length budget first, then stop ids / EOS.
        by_length = keep & (self.count[:b] >= self.budget[:b])
        by_stop = keep & ~by_length & (self.stop_ids[:b] == tokens.unsqueeze(-1)).any(-1)
        nonfinite = running & ~finite
        finish = self.finish[:b]
        finish.copy_(
            torch.where(
                by_length,
                FINISHED_LENGTH,
                torch.where(by_stop, FINISHED_STOP_ID, torch.where(nonfinite, FINISHED_NONFINITE, finish)),
            )
        )
        self.done[:b] |= by_length | by_stop | nonfinite
        self.last_token[:b] = torch.where(keep, tokens, self.last_token[:b])

        # The model on the sampled tokens; finished and empty slots compute too (into their own
        # slot, at a position nothing reads), which keeps the step free of data-dependent shapes.
        hidden = self.stack.embed_tokens(tokens.unsqueeze(-1))
        positions = self.position[:b].view(1, b, 1).expand(3, b, 1)
        position_embeddings = self.stack.rotary_emb(hidden, positions)
        write_at = self.write_at[:b]
        mask = (self._positions[:length].unsqueeze(0) <= write_at.unsqueeze(-1)).view(b, 1, 1, length)
        if self.stack.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(
                ~mask, torch.finfo(hidden.dtype).min
            )
        cache = self.cache
        cache.rows, cache.length = b, length
        kv_shape = self.keys[0].shape
        cache.index = (
            write_at.clamp(max=self.slot_len - 1).view(b, 1, 1, 1).expand(b, kv_shape[1], 1, kv_shape[3])
        )
        layers = self.stack.layers
        norm = layers[0].input_layernorm
        x = self._rms_norm(hidden, norm.weight, norm.variance_epsilon)
        for index, layer in enumerate(layers):
            attention = self._attention_block(layer.self_attn, x, position_embeddings, mask)
            norm = layer.post_attention_layernorm
            hidden, x = self._add_rms_norm(hidden, attention, norm.weight, norm.variance_epsilon)
            mlp = layer.mlp
            mlp_out = mlp.down_proj(self._silu_mul(mlp.gate_proj(x), mlp.up_proj(x)))
            # The residual add is fused with the next norm: the next layer's input norm, or the final one.
            norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.stack.norm
            hidden, x = self._add_rms_norm(hidden, mlp_out, norm.weight, norm.variance_epsilon)
        self.logits[:b] = self.lm_head(x[:, -1]).float()
        self.position[:b] += keep
        self.write_at[:b] += keep

    def _attention_block(self, attention, x, position_embeddings, mask) -> torch.Tensor:
        """transformers' Qwen attention for one new token per slot, against the slot cache."""
        rows, head_dim = x.shape[0], self.head_dim
        q = attention.q_proj(x).view(rows, 1, -1, head_dim)
        k = attention.k_proj(x).view(rows, 1, -1, head_dim)
        v = attention.v_proj(x).view(rows, 1, -1, head_dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # Qwen3-VL normalises each head before RoPE
            q = self._rms_norm(q, attention.q_norm.weight, attention.q_norm.variance_epsilon)
            k = self._rms_norm(k, attention.k_norm.weight, attention.k_norm.variance_epsilon)
        q, k = self._rope(q.transpose(1, 2), k.transpose(1, 2), *position_embeddings)
        keys, values = self.cache.update(k, v, attention.layer_idx)
        out, _ = self._attend(attention, q, keys, values, mask, dropout=0.0, scaling=attention.scaling)
        return attention.o_proj(out.reshape(rows, 1, -1))

    # ----------------------------------------------------------------------------------------
    # CUDA graphs

    def _capture(self, rows: int, length: int, filtering: bool):
        # The capture must not change any slot: run it on a snapshot and restore the state after.
        state = [t.clone() for t in self._state_tensors()]
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step(rows, length, filtering)  # warm-up: lazy initialisations happen outside capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for tensor, saved in zip(self._state_tensors(), state, strict=True):
            tensor.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(rows, length, filtering)
        self._pool = graph.pool()
        for tensor, saved in zip(self._state_tensors(), state, strict=True):
            tensor.copy_(saved)
        return graph

    def _state_tensors(self) -> list[torch.Tensor]:
        # What a step writes besides the KV cache (its writes land at positions nothing reads yet).
        return [
            self.logits,
            self.count,
            self.position,
            self.write_at,
            self.done,
            self.finish,
            self.last_token,
            self.out_tokens,
            self.out_log_probs,
        ]

    def _weight_pointers(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def refresh_if_weights_moved(self) -> None:
        # Graphs read parameters at the addresses they were captured with. In-place updates
        # (the trainer's) keep them; anything that replaced a tensor invalidates every graph.
        pointers = self._weight_pointers()
        if pointers != self._weights:
            logger.info("static decoder: the model's parameters moved; recapturing CUDA graphs")
            self._graphs.clear()
            self._pool = None
            self._weights = pointers

    def graph_count(self) -> int:
        return len(self._graphs)
