"""Loading environment modules by dotted name or ``.py`` path, with errors that say what to fix.

An env module is any module with a callable ``build_env(sample=None, args=None, **kwargs)`` that
returns an object with ``reset``, ``step`` and ``format_observation`` (see ``envs.base``). This is
what slime's ``rollout_interaction_env_path`` names::

    module = load_env_module("envs.geo3k")                  # or "path/to/my_env.py"
    env = build_and_check_env(module, sample, args)

Every failure raises :class:`EnvLoadError` (an ``ImportError``) naming the module and the fix: a
missing module suggests the closest sibling name, an import failure carries the original traceback
text and chains the original exception, a module without ``build_env`` says how to write one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

from envs.base import did_you_mean, nearest_name

__all__ = ["REQUIRED_METHODS", "EnvLoadError", "build_and_check_env", "load_env_module"]

REQUIRED_METHODS = ("reset", "step", "format_observation")
_BUILD_ENV_HINT = (
    "define `def build_env(sample=None, args=None, **kwargs)` returning an env with "
    "reset(), step(text) and format_observation(obs) (subclass envs.base.BaseInteractionEnv)"
)


class EnvLoadError(ImportError):
    """An env module could not be found, imported or used; the message says which and how to fix it."""


def load_env_module(path: str | ModuleType) -> ModuleType:
    """Import an env module from a dotted name (``envs.geo3k``) or a file path (``my_env.py``).

    A file is loaded under a private module name derived from its absolute path, so loading it
    twice returns the same module and two files with the same stem do not collide.
    """
    if isinstance(path, ModuleType):
        module = path
    elif not isinstance(path, str) or not path.strip():
        raise EnvLoadError(f"env module path must be a dotted module name or a .py file path, got {path!r}")
    elif path.endswith(".py") or "/" in path or "\\" in path:
        module = _load_file(Path(path.strip()).expanduser())
    else:
        module = _import_dotted(path.strip())
    build_env = getattr(module, "build_env", None)
    if not callable(build_env):
        public = [name for name in vars(module) if not name.startswith("_")]
        found = "is not callable" if build_env is not None else "is missing"
        raise EnvLoadError(
            f"env module '{_display_name(module)}' has no callable build_env (build_env {found})."
            f"{did_you_mean('build_env', public)} Fix: {_BUILD_ENV_HINT}"
        )
    return module


def _load_file(file: Path) -> ModuleType:
    if (file / "__init__.py").is_file():
        raise EnvLoadError(
            f"'{file}' is a package directory; pass its dotted module name "
            f"(e.g. {'.'.join(file.parts[-2:]) if len(file.parts) > 1 else file.name}) or the path of a .py file"
        )
    if not file.is_file():
        siblings = [p.name for p in file.parent.glob("*.py")] if file.parent.is_dir() else []
        where = (
            f"in {file.parent}"
            if file.parent.is_dir()
            else f"(directory {file.parent} does not exist either)"
        )
        raise EnvLoadError(f"env file '{file}' does not exist {where}.{did_you_mean(file.name, siblings)}")
    resolved = file.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = f"_envfile_{_identifier(resolved.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise EnvLoadError(f"cannot load env file '{file}' as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing so that dataclasses and pickling inside the file can find it.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if not isinstance(exc, Exception):
            raise
        raise _import_failure(f"env file '{file}'", exc) from exc
    return module


def _import_dotted(name: str) -> ModuleType:
    parts = name.split(".")
    if not all(part.isidentifier() for part in parts):
        raise EnvLoadError(f"'{name}' is neither a dotted module name (like envs.geo3k) nor a .py file path")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        # The env module itself (or one of its parent packages) is missing, rather than
        # something the env module imports.
        if missing and (name == missing or name.startswith(missing + ".")):
            raise _not_found(name, missing) from exc
        raise _import_failure(f"env module '{name}'", exc) from exc
    except Exception as exc:
        raise _import_failure(f"env module '{name}'", exc) from exc


def _not_found(name: str, missing: str) -> EnvLoadError:
    parent, _, leaf = missing.rpartition(".")
    if parent:
        try:
            package = importlib.import_module(parent)
        except Exception:
            package = None
        search = getattr(package, "__path__", None)
        candidates = [m.name for m in pkgutil.iter_modules(search)] if search is not None else []
        where = f"package '{parent}' has no module '{leaf}'"
    else:
        candidates = [m.name for m in pkgutil.iter_modules()]
        where = f"no top-level module '{leaf}' on sys.path"
    nearest = nearest_name(leaf, candidates)
    suggestion = f" Did you mean '{parent + '.' if parent else ''}{nearest}'?" if nearest else ""
    return EnvLoadError(
        f"env module '{name}' not found: {where}.{suggestion} Pass a dotted module name importable "
        "from the working directory, or a path to a .py file",
        name=name,
    )


def _import_failure(what: str, exc: Exception) -> EnvLoadError:
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return EnvLoadError(
        f"importing {what} failed with {type(exc).__name__}: {exc}\n"
        f"Fix the error in the module (or install what it imports). Original traceback:\n{trace}"
    )


def _display_name(module: ModuleType) -> str:
    """The dotted name, or for a module loaded from a file, the file's path."""
    if module.__name__.startswith("_envfile_") and getattr(module, "__file__", None):
        return str(module.__file__)
    return module.__name__


def _identifier(stem: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in stem)


def build_and_check_env(module: ModuleType | str, sample: Any = None, args: Any = None, **kwargs: Any) -> Any:
    """Call the module's ``build_env(sample=..., args=..., **kwargs)`` and check what it returned.

    Raises :class:`EnvLoadError` if the result lacks a callable ``reset``, ``step`` or
    ``format_observation``. Exceptions raised by ``build_env`` itself propagate unchanged: they are
    the env's own configuration errors (an unknown setting, a sample without a label).
    """
    if isinstance(module, str):
        module = load_env_module(module)
    env = module.build_env(sample=sample, args=args, **kwargs)
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(env, name, None))]
    if missing:
        hint = ""
        if "format_observation" in missing and callable(getattr(module, "format_observation", None)):
            hint = " The module defines format_observation as a function; make it a method of the env."
        raise EnvLoadError(
            f"build_env of '{_display_name(module)}' returned {type(env).__name__}, which has no callable "
            f"{', '.join(missing)}.{hint} Fix: {_BUILD_ENV_HINT}"
        )
    return env
