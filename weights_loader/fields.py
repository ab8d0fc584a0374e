"""Typed reads of a JSON config, checked at load: a wrong type or an impossible value is a
`CheckpointError` naming the file and the field, not a `TypeError` or `ZeroDivisionError` at the first
forward, nor a silent load.

    f = Fields(cfg, "ckpt/config.json")
    layers = f.int("num_hidden_layers")                 # an int ≥ 1 (2.0, "2", true and 0 are refused)
    eps = f.float("rms_norm_eps")                       # a finite float > 0
    vision = f.sub("vision_config")                     # a nested object, its fields named "vision_config.x"
"""

from __future__ import annotations

import math

from .checkpoint import CheckpointError

MISSING = object()


class Fields:
    def __init__(self, data, source: str, where: str = ""):
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: {where.rstrip('.') or 'the config'} must be a JSON object, got {_show(data)}")
        self.data, self.source, self.where = data, source, where

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: field '{self.where}{key}' {what}")

    def _get(self, key: str, default):
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is MISSING:
            raise self.error(key, "is missing" if key not in self.data else "is null")
        return default

    def int(self, key: str, default=MISSING, minimum: int = 1) -> int:
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"must be an integer, got {_show(v)}")
        if v < minimum:
            raise self.error(key, f"must be ≥ {minimum}, got {v}")
        return v

    def number(self, key: str, default=MISSING, positive: bool = True) -> int | float:
        """A finite number, returned as written (an int stays an int)."""
        v = self._get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.error(key, f"must be a finite number, got {_show(v)}")
        if positive and v <= 0:
            raise self.error(key, f"must be > 0, got {v}")
        return v

    def float(self, key: str, default=MISSING, positive: bool = True) -> float:
        return float(self.number(key, default, positive))

    def str(self, key: str, default=MISSING, choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self.error(key, f"must be a string, got {_show(v)}")
        if choices is not None and v not in choices:
            raise self.error(key, f"must be one of {list(choices)}, got {v!r}")
        return v

    def bool(self, key: str, default=MISSING) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {_show(v)}")
        return v

    def ints(self, key: str, default=MISSING, length: int | None = None, minimum: int = 0) -> list[int]:
        v = self._get(key, default)
        ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in v)
        if not ok or (length is not None and len(v) != length):
            n = f"{length} " if length is not None else ""
            raise self.error(key, f"must be a list of {n}integers ≥ {minimum}, got {_show(v)}")
        return list(v)

    def floats(self, key: str, default=MISSING, length: int | None = None, positive: bool = False) -> list[float]:
        v = self._get(key, default)
        ok = isinstance(v, (list, tuple)) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive) for x in v
        )
        if not ok or (length is not None and len(v) != length):
            n = f"{length} " if length is not None else ""
            kind = "numbers > 0" if positive else "finite numbers"
            raise self.error(key, f"must be a list of {n}{kind}, got {_show(v)}")
        return [float(x) for x in v]

    def sub(self, key: str, default=MISSING) -> "Fields":
        """The nested object `key` (its fields are named `key.field` in errors)."""
        return Fields(self._get(key, default), self.source, f"{self.where}{key}.")


def _show(v) -> str:
    text = repr(v)
    return f"{text[:60] + '…' if len(text) > 60 else text} ({type(v).__name__})"
