"""Import aiogram with its Telegram types validated by schemas built on first use, not at import.

aiogram declares every Telegram type with pydantic's `defer_build=True`, then undoes that at the
end of `aiogram/types/__init__.py`: it calls `model_rebuild()` on all ~450 types, passing a
namespace that resolves the forward references each type module imports only under
TYPE_CHECKING. The types form one large cycle (Message -> Chat -> Message ...), so every one of
them gets its own validator holding most of the API: seconds and a hundred megabytes at every
start (bench/README.md, "Speed tricks"), for a bot that validates a dozen of them.

`import_aiogram()` imports aiogram with those rebuild calls skipped, and gives each type module
the names of that same namespace (names the module does not bind itself; if one bound any of
them to something else, it falls back to aiogram's own eager rebuild - none does in 3.31), so a
type's schema resolves exactly as aiogram's rebuild resolves it whenever pydantic builds it: on
the first validation, instantiation or schema request, or as part of a model that refers to it
(pydantic's standard `defer_build` path). Nothing else changes: the same classes, fields and
validation. The first use of a type or method not prebuilt below costs a few milliseconds,
once. tests/test_aiogram_lazy.py checks it against the installed aiogram and pydantic.

Call it before anything imports aiogram; when aiogram is already imported (the tests, which
import the handlers directly) it does nothing and aiogram stays as it is. Not thread-safe
against a concurrent first import of aiogram from another thread (the bot imports it from the
main thread only).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

_TYPES_PACKAGE = "aiogram.types"
# Built at import all the same: every update and every answer goes through these, so the first
# message does not pay for them.
PREBUILD_TYPES = ("Message", "Update")
PREBUILD_METHODS = ("SendMessage", "SendMessageDraft", "EditMessageText")
_lock = threading.Lock()


def import_aiogram() -> bool:
    """Import aiogram with lazily built types. False (and nothing done) when already imported."""
    with _lock:
        if "aiogram" in sys.modules:
            return False
        from pydantic import BaseModel

        original = BaseModel.__dict__["model_rebuild"]
        captured: dict[str, Mapping[str, Any]] = {}

        def model_rebuild(cls: type[BaseModel], *, force: bool = False, raise_errors: bool = True,
                          _parent_namespace_depth: int = 2,
                          _types_namespace: Mapping[str, Any] | None = None) -> bool | None:
            # Only aiogram's own import-time loop: a type of aiogram.types rebuilt with its
            # namespace of all types. Every other call goes through unchanged.
            if (_types_namespace is not None and not force
                    and cls.__module__.startswith(_TYPES_PACKAGE + ".")):
                captured.setdefault("namespace", _types_namespace)
                return None
            return original.__func__(cls, force=force, raise_errors=raise_errors,
                                     _parent_namespace_depth=_parent_namespace_depth + 1,
                                     _types_namespace=_types_namespace)

        BaseModel.model_rebuild = classmethod(model_rebuild)  # type: ignore[assignment]
        try:
            import aiogram  # noqa: F401 - the import is the point
        finally:
            BaseModel.model_rebuild = original  # type: ignore[method-assign]
        namespace = captured.get("namespace")
        if namespace is None:
            # A future aiogram without the rebuild loop: nothing was skipped.
            return True
        if not _share_namespace(namespace):
            # A type module means something else by one of the names: resolve as aiogram does.
            for value in namespace.values():
                if isinstance(value, type) and issubclass(value, BaseModel):
                    value.model_rebuild(_types_namespace=namespace)
            return True
        types, methods = sys.modules[_TYPES_PACKAGE], sys.modules["aiogram.methods"]
        for name in PREBUILD_TYPES:
            getattr(types, name).model_rebuild(_types_namespace=namespace)
        for name in PREBUILD_METHODS:
            # An empty namespace: resolved in its module only, as at its class definition. Not
            # raising: a method that cannot be built here is built on first use, as before.
            getattr(methods, name).model_rebuild(_types_namespace={}, raise_errors=False)
    return True


def _share_namespace(namespace: Mapping[str, Any]) -> bool:
    """Give every aiogram.types module the names aiogram's rebuild resolves in it.

    Only names a module does not define itself are added. False, with nothing added, when a
    module binds one of the names to something else: pydantic would then resolve that name
    differently from aiogram's rebuild (none does in aiogram 3.x).
    """
    prefix = _TYPES_PACKAGE + "."
    modules = [module for name, module in list(sys.modules.items())
               if name.startswith(prefix) and module is not None]
    for module in modules:
        names = vars(module)
        for name, value in namespace.items():
            if name in names and names[name] is not value:
                return False
    for module in modules:
        names = vars(module)
        for name, value in namespace.items():
            names.setdefault(name, value)
    return True
