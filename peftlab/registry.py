"""Specs by name (methods, inits): every module of the package registers its own when imported, and the first lookup
or listing imports them all, so a new method or init is one new file (no list to edit)."""
from __future__ import annotations

import importlib
import pkgutil


class Registry(dict):
    def __init__(self, kind: str, package: str, skip: tuple[str, ...] = ()):
        super().__init__()
        self.kind, self.package, self.skip, self._loaded = kind, package, skip, False

    def register(self, spec):
        self[spec.name] = spec
        return spec

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        path = importlib.import_module(self.package).__path__
        for mod in pkgutil.iter_modules(path):
            if not mod.name.startswith("_") and mod.name not in self.skip:
                importlib.import_module(f"{self.package}.{mod.name}")

    def lookup(self, name: str):
        self._load()
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {sorted(self)}")
        return self[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self)
