"""Makes ``lm_eval --model moeforge`` work from lm-eval's own command line.

lm-evaluation-harness has no plugin entry point for models: its registry knows the models its own
``lm_eval.models`` package lists. This module is imported at interpreter start by the
``moeforge-lm-eval.pth`` file that installing moeforge puts in site-packages; it costs one tiny import and
installs an import hook that does nothing until ``lm_eval.models`` is imported. Then it adds ``moeforge``
to lm-eval's model registry as a lazy placeholder (``moeforge.harness.lm:MoeforgeLM``), so nothing of
moeforge or torch is imported unless that model is asked for. Any failure here is silent: a broken hook
must never break an unrelated Python program.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_TARGET = "lm_eval.models"
_ENTRY = ("moeforge", "moeforge.harness.lm:MoeforgeLM")


def register(module: ModuleType | None = None) -> None:
    """Add the ``moeforge`` model to lm-eval's registry (a lazy placeholder) unless it is there."""
    try:
        from lm_eval.api.registry import model_registry

        if _ENTRY[0] not in model_registry:
            model_registry.register(_ENTRY[0], target=_ENTRY[1])
    except Exception:  # see the module docstring: never break an unrelated program
        pass


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Any, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    """Install the hook once (the .pth file calls this at start-up)."""
    try:
        if _TARGET in sys.modules:
            register()
        elif not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # see the module docstring: never break an unrelated program
        pass
