"""Seeds derived from named parts (the same in every process, run and Python: no ``hash()``), and
the engine wrapper that gives every turn of an episode its own seed."""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts with a stable ``repr``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class TurnSeededEngine:
    """Gives each turn its own ``sampling_seed``, derived from the episode's and the prompt length
    (which grows every turn), so that the turns of one episode do not replay the same randomness.
    Everything else is the wrapped engine's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (a copy in progress): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)  # prepare_image, weight_version, ...

    async def generate(self, input_ids: list[int], images: list[Any], sampling_params: dict[str, Any]):
        params = dict(sampling_params)
        if params.get("sampling_seed") is not None:
            params["sampling_seed"] = derive_seed(params["sampling_seed"], len(input_ids))
        return await self.engine.generate(input_ids, images, params)
