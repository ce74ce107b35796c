"""Names of a package that load from a submodule on first use (PEP 562), so importing the
package stays short and optional dependencies stay unimported until they are needed."""

from __future__ import annotations

import importlib
import sys


def lazy_attributes(package: str, table: dict):
    """``(__getattr__, __dir__)`` for the module ``package``: a name in ``table`` (name ->
    relative module) is imported from that module when first asked for, then kept."""

    def __getattr__(name):
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
