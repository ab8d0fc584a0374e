"""The engine under continuous batching: sequences joining and leaving rows between decode steps get the
tokens a batch-of-one `generate` gives them (fp32, greedy), eager and compiled; and the serving side's
health states."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import pixels, prompt, vision_block

import qva
from qva.engine import Decoder, Engine


@pytest.fixture(scope="module")
def model(demo_dirs):
    return qva.load(demo_dirs[0], dtype=torch.float32)


PROMPTS = [
    prompt(9707, 11, 1879),
    prompt(358, 1079, 264, 2632, 1467, 13),
    prompt(*vision_block(151655, [1, 4, 6]), 3838, 374, 419, 30),
    prompt(40, 1079),
    prompt(*range(100, 140)),
    prompt(3, 1, 4, 1, 5),
]


def inputs(i: int) -> dict:
    out = {"input_ids": torch.tensor([PROMPTS[i]])}
    if i == 2:
        out["pixel_values"], out["image_grid_thw"] = pixels([[1, 4, 6]], seed=2)
    return out


def alone(model, i: int, n: int) -> list[int]:
    x = inputs(i)
    return model.generate(**x, max_new_tokens=n, eos_token_id=[])[0, x["input_ids"].shape[1]:].tolist()


def staggered(model, engine: Engine, plan: dict[int, tuple[int, int]]) -> dict[int, list[int]]:
    """Run prompts through the engine: prompt i joins at step `plan[i][0]` in the lowest free row and leaves
    after `plan[i][1]` tokens. Returns each prompt's greedy tokens."""
    out: dict[int, list[int]] = {}
    rows: dict[int, int] = {}  # row → prompt
    last = {}
    step = 0
    while len(out) < len(plan) or rows:
        for row, i in list(rows.items()):
            if len(out[i]) == plan[i][1]:
                engine.release(row)
                del rows[row], last[row]
        for i, (start, _) in plan.items():
            if start == step and i not in out:
                row = min(set(range(engine.rows)) - set(rows))
                last[row] = int(engine.prefill(row, inputs(i))[0].argmax())
                rows[row], out[i] = i, [last[row]]
        if rows:
            n = max(rows) + 1
            ids = torch.tensor([last.get(r, 0) for r in range(n)])
            logits = engine.decode(ids)
            for row, i in rows.items():
                last[row] = int(logits[row].argmax())
                out[i].append(last[row])
        step += 1
    return out


PLAN = {0: (0, 12), 1: (0, 5), 2: (2, 9), 3: (4, 7), 4: (10, 6), 5: (16, 4)}  # joins at steps 0–16, leaves at different steps


def test_rows_joining_and_leaving_get_the_batch_of_one_tokens(model):
    got = staggered(model, Engine(model, rows=3, max_len=64), PLAN)
    for i, (_, n) in PLAN.items():
        assert got[i] == alone(model, i, n), i


def test_a_row_that_reads_another_rows_slot_fails(model, monkeypatch):
    """The test above is not vacuous: decoding every row at row 0's cache slot changes the tokens."""
    call = Decoder.__call__
    monkeypatch.setattr(Decoder, "__call__", lambda self, ids, pos, slots, valid: call(self, ids, pos, slots[:1].expand_as(slots), valid))
    got = staggered(model, Engine(model, rows=3, max_len=64), PLAN)
    monkeypatch.undo()
    assert any(got[i] != alone(model, i, n) for i, (_, n) in PLAN.items())


def test_compiled_engine_buckets_and_matches_eager(model):
    torch._dynamo.reset()
    engine = Engine(model, rows=4, max_len=64, compile=True)
    assert [engine.bucket(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    got = staggered(model, engine, PLAN)
    for i, (_, n) in PLAN.items():
        assert got[i] == alone(model, i, n), i
    assert sorted(engine.decoders) == [1, 2, 4]  # one compiled step per bucket (alone at the end: 1), reused across requests
    torch._dynamo.reset()


def test_prefill_refuses_a_prompt_it_cannot_hold(model):
    engine = Engine(model, rows=2, max_len=8)
    with pytest.raises(ValueError, match="no room in the engine's 8 cache slots"):
        engine.prefill(0, {"input_ids": torch.zeros(1, 8, dtype=torch.long)})
    with pytest.raises(ValueError, match="the engine has 2"):
        engine.prefill(2, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(model, rows=1, max_len=10**6)


def test_health_loading_ready_and_stuck(model):
    pytest.importorskip("fastapi")
    from qva.serve.app import Server, Settings

    server = Server(Settings(max_batch=2, max_model_len=64))
    assert server.health() == (503, {"status": "loading"})
    server.attach(model)
    try:
        assert server.health() == (200, {"status": "ok"})
        server.scheduler.active[0] = object()  # work in hand …
        server.scheduler.heartbeat = time.monotonic() - 10**4  # … and no progress for hours
        assert server.health()[0] == 503 and server.health()[1]["status"] == "stuck"
        server.scheduler.active.clear()
        server.scheduler.error = RuntimeError("device lost")  # the engine thread died
        assert server.health() == (503, {"status": "stuck", "error": "RuntimeError('device lost')"})
        server.scheduler.error = None
    finally:
        server.scheduler.close()
    failed = Server(Settings())
    failed.load_in_background(lambda: (_ for _ in ()).throw(FileNotFoundError("no weights"))).join()
    assert failed.health() == (503, {"status": "failed", "error": "FileNotFoundError: no weights"})
