"""`qva-serve`: OpenAI-compatible serving with continuous batching.

`protocol.py` (requests, responses) with `media.py` (media within a per-request budget), `fetch.py`
(remote media) and `errors.py` → `app.py` (FastAPI routes, body limits, streaming, metrics, auth) over
`connections.py` (uvicorn's HTTP with a header deadline and a connection cap) → `scheduler.py` (the engine
thread: rows join and leave between decode steps) → `qva.engine.Engine` (the same engine `generate` runs
on). `cli.py` is the command. FastAPI and uvicorn are the `serve` extra.
"""
