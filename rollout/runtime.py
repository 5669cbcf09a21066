"""The process-wide objects behind slime's entry points, held in one explicit place.

slime calls ``generate(args, sample, sampling_params)`` once per sample with no other context, so
what should be built once per run lives here: tokenizer/processor per checkpoint, observation
encoders, loaded env modules, SGLang clients per server URL, and the threads that run sync env
steps. ``default_runtime()`` is created lazily; tests and the local trainer may build their own.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rollout.config import RolloutConfig
from rollout.engines.base import Engine
from rollout.engines.sglang_client import SGLangClient
from rollout.episode import EpisodeContext
from rollout.gc_pacing import GcPacer
from rollout.image_cache import ProcessedImageCache
from rollout.observation import ObservationEncoder
from rollout.processing import ProcessingCache
from rollout.prompts import chat_template_kwargs


class RolloutRuntime:
    def __init__(self) -> None:
        self.processing = ProcessingCache()
        self._encoders: dict[int, ObservationEncoder] = {}
        self._env_modules: dict[str, Any] = {}
        self._clients: dict[str, SGLangClient] = {}
        self._executor: ThreadPoolExecutor | None = None
        # Finished samples' training tensors. Two threads: a second keeps one sample with large
        # images to concatenate from delaying every other episode's finish.
        self._prep_executor = ThreadPoolExecutor(2, thread_name_prefix="rollout-prep")
        self.image_cache = ProcessedImageCache()
        self._gc_frozen = False
        self.gc_pacer = GcPacer()
        self._lock = threading.Lock()

    def context(self, args: Any) -> EpisodeContext:
        config = RolloutConfig.from_args(args)
        checkpoint = getattr(args, "hf_checkpoint", None)
        if not checkpoint:
            raise ValueError("args.hf_checkpoint must name the checkpoint (or preset) whose tokenizer to use")
        processing = self.processing.get(checkpoint)
        with self._lock:
            encoder = self._encoders.get(id(processing))
            if encoder is None:
                encoder = self._encoders[id(processing)] = ObservationEncoder(processing)
            env_module = self._env_module(config.rollout_interaction_env_path)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(config.env_step_threads, thread_name_prefix="env-step")
            engine = self._engine(args, config)
        return EpisodeContext(
            config=config,
            engine=engine,
            processing=processing,
            encoder=encoder,
            env_module=env_module,
            env_executor=self._executor,
            prep_executor=self._prep_executor,
            image_cache=self.image_cache,
            chat_template_kwargs=chat_template_kwargs(args),
        )

    async def context_async(self, args: Any) -> EpisodeContext:
        """:meth:`context`, with a first-time tokenizer/processor load (seconds) off the event loop."""
        checkpoint = getattr(args, "hf_checkpoint", None)
        if checkpoint and not self.processing.loaded(checkpoint):
            await asyncio.to_thread(self.processing.get, checkpoint)
        ctx = self.context(args)
        if ctx.config.gc_freeze_after_load and not self._gc_frozen:
            # By the first episode the process holds what lives for the whole run (tokenizers,
            # processors, models, the libraries behind them): hundreds of thousands of objects that
            # every full collection walks. With hundreds of episodes in flight that stalled the
            # event loop for 200-300 ms (bench/RESULTS.md); freezing them, as SGLang does after
            # start-up, takes them out of the collector's sight.
            gc.freeze()
            self._gc_frozen = True
        return ctx

    def _env_module(self, path: str) -> Any:
        if path not in self._env_modules:
            from envs.loader import load_env_module

            self._env_modules[path] = load_env_module(path)
        return self._env_modules[path]

    def _engine(self, args: Any, config: RolloutConfig) -> Engine:
        engine = getattr(args, "rollout_engine", None)
        if engine is not None:
            return engine
        client = SGLangClient.from_args(args, config)
        return self._clients.setdefault(client.url, client)

    async def aclose(self) -> None:
        """Close SGLang client connection pools (they belong to the running event loop)."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    def shutdown(self) -> None:
        self.gc_pacer.close()
        self._prep_executor.shutdown(wait=False, cancel_futures=True)
        self.image_cache.shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_default: RolloutRuntime | None = None
_default_lock = threading.Lock()


def default_runtime() -> RolloutRuntime:
    global _default
    with _default_lock:
        if _default is None:
            _default = RolloutRuntime()
        return _default
