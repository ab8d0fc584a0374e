"""`qva-serve`: OpenAI-compatible serving with continuous batching.

`protocol.py` (requests, media, responses, errors) → `app.py` (FastAPI routes, streaming, metrics) →
`scheduler.py` (the engine thread: rows join and leave between decode steps) → `qva.engine.Engine`
(the same engine `generate` runs on). `cli.py` is the command. FastAPI and uvicorn are the `serve` extra.
"""
