"""Serving kelix_fast: an asyncio front of the engine core (:mod:`kelix_fast.serving.async_engine`) and the
OpenAI-compatible HTTP server built on it."""
