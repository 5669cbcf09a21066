"""Where offline builds (tokenizers, processors, tiny models, downloaded wheels) are cached.

``VLM_MULTITURN_CACHE`` overrides the location. Otherwise a source checkout caches under its own
ignored ``.cache/`` (so a fresh clone rebuilds everything and CI never sees stale builds), and an
installed package uses ``~/.cache/vlm-multiturn``.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    override = os.environ.get("VLM_MULTITURN_CACHE")
    if override:
        path = Path(override).expanduser()
    elif (_REPO_ROOT / "pyproject.toml").is_file():
        path = _REPO_ROOT / ".cache" / "vlm-multiturn"
    else:
        path = Path.home() / ".cache" / "vlm-multiturn"
    path.mkdir(parents=True, exist_ok=True)
    return path
