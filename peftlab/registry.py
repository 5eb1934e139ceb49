"""Specs by name (methods, inits): the package's own modules register theirs when imported, and the first lookup or
listing imports them, so every spec is known before one is named."""
from __future__ import annotations

import importlib


class Registry(dict):
    def __init__(self, kind: str, package: str, modules: tuple[str, ...]):
        super().__init__()
        self.kind, self.package, self.modules, self._loaded = kind, package, modules, False

    def register(self, spec):
        self[spec.name] = spec
        return spec

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for mod in self.modules:
            importlib.import_module(f"{self.package}.{mod}")

    def lookup(self, name: str):
        self._load()
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {sorted(self)}")
        return self[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self)
