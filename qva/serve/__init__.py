"""`qva-serve`: OpenAI-compatible serving with continuous batching.

`protocol.py` (chat requests, responses) with `media.py` (media within a per-request budget), `fetch.py`
(remote media) and `errors.py`; `transcribe.py` (the audio endpoints: a form upload from `multipart.py`,
its audio split into ≤ 30 s windows run as jobs) → `app.py` (FastAPI routes, body limits, streaming, auth,
the playground page `static/playground.html`) over `connections.py` (uvicorn's HTTP with a header deadline
and a connection cap) → `scheduler.py` (the engine thread: rows join and leave between decode steps) →
`qva.engine.Engine` (the same engine `generate` runs on). `metrics.py` holds what is counted (/metrics)
and liveness (/health). `cli.py` is the command. FastAPI and uvicorn are the `serve` extra.
"""
