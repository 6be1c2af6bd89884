"""The package's environment switches, read where they act, on every call: a variable set or
cleared at run time (``os.environ``, ``monkeypatch.setenv``) takes effect at the next call.

``os.environ.get`` of an unset variable raises and catches a KeyError inside the mapping: 0.5 us
on the 2-core CPU, a tenth of a small op's whole Python path (``lowrank_edit`` at 8 rows: 4.7 us
around a 3.4 us op). ``EnvSwitch`` reads CPython's own table behind ``os.environ`` (the encoded
name looked up in ``os.environ._data``, which ``os.environ``'s every write updates) and parses a
value only when it changes: 0.1 us. Where that table is missing (another Python), it falls back
to ``os.environ.get``.
"""
from __future__ import annotations

import os

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_FAST = isinstance(_DATA, dict) and callable(_ENCODE) and callable(_DECODE)


class EnvSwitch:
    """``switch()``: ``parse(value)`` of the variable ``name`` ("" when unset), re-parsed only
    when the value changes."""

    def __init__(self, name: str, parse):
        self.name, self.parse = name, parse
        self._key = _ENCODE(name) if _FAST else None
        self._raw, self._value = None, parse("")

    def __call__(self):
        raw = _DATA.get(self._key) if _FAST else os.environ.get(self.name)
        if raw != self._raw:
            self._value = self.parse("" if raw is None else (_DECODE(raw) if _FAST else raw))
            self._raw = raw
        return self._value
