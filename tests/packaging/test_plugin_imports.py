"""What slime's processes import must run in slime's image: no pyarrow, no matplotlib.

slime's image pins numpy 1.26.4, which recent pyarrow releases refuse to import with, and the
plugin's package requirements (pyproject.toml) leave pyarrow and matplotlib to the `local` extra.
These tests import the plugin's entry points in a fresh interpreter where both are unimportable.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_BLOCK = """
import importlib.abc, sys

class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyarrow", "matplotlib"):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, _Blocked())
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks():
    result = _run("import pyarrow")
    assert result.returncode != 0 and "blocked in this test" in result.stderr


def test_slime_entry_points_import_without_pyarrow_or_matplotlib():
    result = _run(
        """
        import rollout, rollout.entrypoints, rollout.episode, rollout.engines.sglang_client
        import envs.geo3k, envs.grading, envs.tool_calls, envs.loader
        assert callable(rollout.generate) and callable(rollout.reward)
        print("imported")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout


def test_image_digest_without_pyarrow_tells_images_apart():
    result = _run(
        """
        from PIL import Image
        from rollout.image_cache import image_digest
        red, blue = Image.new("RGB", (32, 16), "red"), Image.new("RGB", (32, 16), "blue")
        assert image_digest(red) == image_digest(red.copy())
        assert image_digest(red) != image_digest(blue)
        assert image_digest(red) != image_digest(red.resize((16, 32)))
        print("digests ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "digests ok" in result.stdout
