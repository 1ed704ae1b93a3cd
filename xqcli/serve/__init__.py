"""`xq serve`: an OpenAI-compatible HTTP server over one model, with continuous batching.

`server` (start, stop), `app` (the Starlette routes and the engine thread), `protocol` (request checks and
response objects), `errors` (OpenAI error objects), `metrics` (Prometheus text). The scheduler itself is
`xqcli.engine.batcher`. Needs the `serve` extra (Starlette and Uvicorn); importing this package alone does not.
"""
