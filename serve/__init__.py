"""``vlm_serve``: an OpenAI-compatible HTTP server for vlm models.

``vlm serve --model DIR`` (or ``python -m vlm_serve``) answers ``POST /v1/chat/completions``
(text and images, streamed or not), ``GET /v1/models`` and ``GET /health`` on uvicorn and
Starlette. Concurrent requests share the model's decode steps through the continuous
batching engine in :mod:`vlm.engine`; this package holds the web part only. See
``docs/serving.md``. The source folder is ``serve/``, installed as ``vlm_serve``.
"""
