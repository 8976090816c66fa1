"""``dfcompress.export`` and ``dfcompress.evaluate`` are both submodules and public API functions.

Importing a submodule makes it the package attribute of that name, which would hide the API function;
so those two modules are made callable, forwarding to the function in ``dfcompress.api``."""
from __future__ import annotations

import sys
import types
from typing import Any


def make_callable(module_name: str, api_name: str) -> None:
    """Let ``dfcompress.<api_name>(...)`` call ``dfcompress.api.<api_name>`` even once the module is imported."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            from . import api

            return getattr(api, api_name)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
