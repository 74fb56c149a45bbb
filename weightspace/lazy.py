"""PEP 562 lazy attribute loading shared by the top-level packages.

Each package maps a public name to the private module that defines it; the module is imported the
first time the name is used, so ``import weightspace`` (or ``merging``, ``analysis``) stays fast and
an optional dependency of one feature is never imported by another.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, List


def lazy_getattr(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """Return a module ``__getattr__`` that resolves ``exports[name]`` (a module path) on first use."""

    def __getattr__(name: str) -> Any:
        try:
            module_name = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module = importlib.import_module(module_name)
        return module if module_name == f"{package}.{name}" else getattr(module, name)

    return __getattr__


def lazy_dir(exports: Dict[str, str]) -> Callable[[], List[str]]:
    def __dir__() -> List[str]:
        return sorted(exports)

    return __dir__
