"""Explicit name -> object registries, filled by decorators and by Python entry points.

A plugin living outside this repository declares, in its own package metadata::

    [project.entry-points."ssl_repro.methods"]
    my_method = "my_pkg.my_module"

Loading the entry point imports the module, whose ``@register_method`` decorator registers it.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterator
from importlib import import_module
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str, builtin_package: str) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._builtin_package = builtin_package
        self._items: dict[str, T] = {}
        self._loaded = False
        self._failed: dict[str, str] = {}  # plugin module -> why it did not import

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
            self._items[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        # Every module of the built-in package registers its plugins when imported. A module that fails to
        # import loses only its own plugins: the others stay reachable, and a lookup of a missing name says why.
        package = import_module(self._builtin_package)
        for info in pkgutil.iter_modules(package.__path__):
            self._import(f"{self._builtin_package}.{info.name}", import_module)
        for ep in entry_points(group=self.entry_point_group):
            self._import(ep.value, lambda _, ep=ep: ep.load())

    def _import(self, module: str, load: Callable[[str], object]) -> None:
        try:
            load(module)
        except Exception as e:  # any plugin error: reported on lookup
            self._failed[module] = f"{type(e).__name__}: {e}".splitlines()[0]

    def get(self, name: str, field: str | None = None) -> T:
        self._load()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            fix = f"choose one of: {known}"
            if self._failed:
                fix += " (plugins that failed to import: " + "; ".join(f"{m}: {e}" for m, e in self._failed.items())
                fix += ")"
            raise UserError(field or self.kind, f"unknown {self.kind} {name!r}", fix)
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
