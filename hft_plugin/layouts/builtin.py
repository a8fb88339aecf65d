"""The built-in layout readers, registered as plugins (after every third-party reader)."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .generic import read_generic
from .named import read_named


class NamedLayouts:
    @hookimpl(trylast=True)
    def hft_read_layout(self, model):
        return read_named(model)


class GenericLayout:
    @hookimpl(trylast=True)
    def hft_read_layout(self, model):
        return read_generic(model)
