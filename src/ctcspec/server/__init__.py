"""`ctcspec serve`: an OpenAI-compatible server over one speculative engine (app.py: HTTP; service.py: the queue
and the engine's worker thread; schemas.py: request validation; metrics.py: Prometheus; static/: the chat page)."""
