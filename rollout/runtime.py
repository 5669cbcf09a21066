"""The objects behind the rollout's episodes, held in one explicit place.

What is built once per run lives in a :class:`RolloutRuntime`: observation encoders, loaded env
modules, SGLang clients per server URL, the threads that run env calls and finish samples, and the
image cache. The threads are sized by the plugin settings of the runtime's first episode
(``env_step_threads``), and ``gc_freeze_after_load`` acts at that episode; a later call with other
such settings raises ConfigError instead of running under the first call's. Tokenizers and
processors depend on the checkpoint alone, so every runtime of a process shares one
:class:`ProcessingCache` unless it is given its own.

The local trainer, evaluation and tests build their own runtime and pass it
(``rollout.entrypoints.generate(..., runtime=...)``). slime calls ``generate(args, sample,
sampling_params)`` with no other context, so its processes use :func:`default_runtime`, built at
the first call.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rollout.config import ConfigError, RolloutConfig
from rollout.engines.base import Engine
from rollout.engines.sglang_client import SGLangClient
from rollout.episode import EpisodeContext
from rollout.image_cache import ProcessedImageCache
from rollout.observation import ObservationEncoder
from rollout.processing import ProcessingCache
from rollout.prompts import chat_template_kwargs

#: Plugin settings a runtime is built with (at its first episode): fixed for its lifetime.
RUNTIME_SETTINGS = ("env_step_threads", "gc_freeze_after_load")
_shared_processing = ProcessingCache()


class RolloutRuntime:
    def __init__(self, processing: ProcessingCache | None = None) -> None:
        self.processing = _shared_processing if processing is None else processing
        self._encoders: dict[int, ObservationEncoder] = {}
        self._env_modules: dict[str, Any] = {}
        self._clients: dict[str, SGLangClient] = {}
        self._executor: ThreadPoolExecutor | None = None
        # Finished samples' training tensors. Two threads: a second keeps one sample with large
        # images to concatenate from delaying every other episode's finish.
        self._prep_executor = ThreadPoolExecutor(2, thread_name_prefix="rollout-prep")
        self.image_cache = ProcessedImageCache()
        self._gc_frozen = False
        self._settings: dict[str, Any] | None = None  # RUNTIME_SETTINGS of the first episode
        self._lock = threading.Lock()

    def context(self, args: Any) -> EpisodeContext:
        config = RolloutConfig.from_args(args)
        checkpoint = getattr(args, "hf_checkpoint", None)
        if not checkpoint:
            raise ValueError("args.hf_checkpoint must name the checkpoint (or preset) whose tokenizer to use")
        processing = self.processing.get(checkpoint)
        with self._lock:
            self._bind(config)
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

    def _bind(self, config: RolloutConfig) -> None:
        settings = {name: getattr(config, name) for name in RUNTIME_SETTINGS}
        if self._settings is None:
            self._settings = settings
            return
        changed = {name: value for name, value in settings.items() if self._settings[name] != value}
        if changed:
            built = ", ".join(f"{name}={self._settings[name]!r}" for name in changed)
            asked = ", ".join(f"{name}={value!r}" for name, value in changed.items())
            raise ConfigError(
                f"this rollout runtime was built with {built} (its first episode's plugin settings) and "
                f"a later call asks for {asked}; it would run under the first ones. One runtime serves one "
                "plugin configuration: give every slime process one YAML, or build a RolloutRuntime per "
                "configuration and pass it (rollout.entrypoints.generate(..., runtime=...))"
            )

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
        self._prep_executor.shutdown(wait=False, cancel_futures=True)
        self.image_cache.shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_default: RolloutRuntime | None = None
_default_lock = threading.Lock()


def default_runtime() -> RolloutRuntime:
    """The runtime of slime's entry points (one per process), built at the first call."""
    global _default
    with _default_lock:
        if _default is None:
            _default = RolloutRuntime()
        return _default
