"""Serving: ``yoco serve``'s continuous-batching scheduler and OpenAI-compatible HTTP API, and the load
benchmark ``yoco bench-serve`` (the ``serve`` extra: FastAPI, uvicorn, the openai client)."""
