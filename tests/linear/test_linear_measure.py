"""Kernels chosen by measurement (`qva/linear/measure.py`): measured once per machine and cached."""


from __future__ import annotations

import torch

from qva import linear as L
from qva.linear import measure


def test_kernel_choice_is_measured_once_and_cached(kernel_cache, monkeypatch):
    calls = {"a": 0, "b": 0}

    def slow():
        calls["a"] += 1
        torch.ones(300, 300) @ torch.ones(300, 300)

    def quick():
        calls["b"] += 1

    assert L.fastest("k", {"a": slow, "b": quick}) == "b" and calls == {"a": 4, "b": 4}  # warm-up + 3 timed
    assert L.fastest("k", {"a": slow, "b": quick}) == "b" and calls == {"a": 4, "b": 4}  # remembered
    import json

    assert json.loads(L.kernel_cache_file().read_text()) == {"k": "b"}
    assert str(L.kernel_cache_file()).startswith(str(kernel_cache))
    measure._choices = None  # a new process reads the machine's file
    assert L.fastest("k", {"a": slow, "b": quick}) == "b" and calls["a"] == 4
    monkeypatch.setenv(L.KERNEL_OVERRIDE, "a")
    assert L.fastest("k", {"a": slow, "b": quick}) == "a"
