"""Registries filled by modules: the package's own, listed here by name, and any installed
package's, through an entry-point group (the way pytest and timm take plugins).

A plugin is a class that names itself (`name`). The registries import their modules on first
use, not when this module is imported: reading a config asks for the names, and `cocord-fast
--help` asks for nothing.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from .errors import UserError


class Registry:
    """Name -> class, for one kind of plugin (`what`, e.g. "method"): the `builtin` classes
    ("module:Class") and those the installed packages declare under the entry-point `group`.
    An entry point's name must be its class's `name`; two plugins of one name are refused."""

    def __init__(self, what: str, group: str, builtin: tuple[str, ...]):
        self.what, self.group, self.builtin = what, group, builtin
        self._classes: dict[str, type] | None = None

    def all(self) -> dict[str, type]:
        if self._classes is None:
            found: dict[str, type] = {}
            for target in self.builtin:
                self._add(found, _load(target), target)
            for point in entry_points(group=self.group):
                try:
                    plugin = point.load()
                except Exception as err:  # a broken plugin: name it, whatever it raised
                    raise UserError(f"the {self.what} plugin {point.name!r} ({point.value}, entry "
                                    f"point group {self.group}) cannot be loaded: {err!r}") from err
                if getattr(plugin, "name", None) != point.name:
                    raise UserError(f"entry point {point.name!r} of group {self.group} names "
                                    f"{point.value}, whose name is "
                                    f"{getattr(plugin, 'name', None)!r}: the two must agree")
                self._add(found, plugin, f"{point.value} (entry point group {self.group})")
            self._classes = found
        return self._classes

    def _add(self, found: dict[str, type], plugin: Any, where: str) -> None:
        name = getattr(plugin, "name", "")
        if not name:
            raise UserError(f"the {self.what} plugin {where} has no name")
        if name in found:
            raise UserError(f"two {self.what}s are named {name!r}: {found[name].__module__}."
                            f"{found[name].__qualname__} and {where}")
        found[name] = plugin

    def names(self) -> list[str]:
        return list(self.all())

    def get(self, name: str, field: str) -> Any:
        """The class registered as `name`; else a UserError naming the config `field`."""
        classes = self.all()
        if name not in classes:
            raise UserError(f"{field}: unknown {self.what} {name!r}; known: "
                            f"{', '.join(classes)} (a package adds one through the entry-point "
                            f"group {self.group})")
        return classes[name]

    def add(self, plugin: Any) -> None:
        """Registers `plugin` for this process (a test, a script): an installed package uses
        the entry-point group instead, which every process of a launcher reads."""
        self._add(self.all(), plugin, f"{plugin.__module__}.{plugin.__qualname__}")

    def remove(self, name: str) -> None:
        self.all().pop(name)


def _load(target: str) -> Any:
    module, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module), attribute)


# A new method or data source of this package is a module and a line here.
METHODS = Registry("method", "cocord_fast.methods", (
    "cocord_fast.methods.vanilla:Vanilla",
    "cocord_fast.methods.kd:KD",
    "cocord_fast.methods.dkd:DKD",
    "cocord_fast.methods.dist:DIST",
    "cocord_fast.methods.crd:CRD",
    "cocord_fast.methods.cocord:CoCoRD",
))
SOURCES = Registry("data source", "cocord_fast.sources", (
    "cocord_fast.data.demo:Demo",
    "cocord_fast.data.cifar100:CIFAR100",
    "cocord_fast.data.imagefolder:ImageFolder",
    "cocord_fast.data.tar_shards:TarShards",
))
