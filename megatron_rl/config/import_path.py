"""Load a user's function from ``package.module:function``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def load_callable(path: str, *, what: str) -> Callable[..., Any]:
    """Import ``package.module:attribute`` (dots after the colon walk attributes).

    ``what`` names the extension point in error messages ("objective", ...)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} {path!r} is not of the form 'package.module:function'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ValueError(
                f"{what} {path!r}: {module_name!r} has no attribute {attribute!r}"
            ) from exc
    if not callable(target):
        raise ValueError(f"{what} {path!r} is a {type(target).__name__}, not a callable")
    return target
