"""Serving kelix_fast: an asyncio front of the engine core (:mod:`kelix_fast.serving.async_engine`) and
the OpenAI-compatible HTTP server built on it (``kelix-fast serve``; FastAPI, uvicorn and
prometheus-client are imported by the server's modules only, so this package imports without them).

    async_engine    AsyncEngine: the engine's step loop on a thread, requests as async iterators
    openai_api      build_app(pipeline, ...): the FastAPI app and its routes
    server          build_pipeline(...) and run_server(app, ...): the models; uvicorn with a drain
    ray             the same app scaled out on Ray Serve
    protocol        the request and response models, and the documented limits
    chat            POST /v1/chat/completions (plain and streamed)
    text_to_image   POST /v1/images/generations
    render_worker   RenderWorker: the DiT + VAE stage on its own thread, batched
    detokenizer     TextStream: an answer's text block by block
    images          data-URI decoding with limits, PNG encoding
    lifecycle       ServingState (start, in-flight requests, drain) and AdmissionGate
    errors          APIError, OpenAI's error shape, the engine's errors as statuses
    auth, body_limit, disconnect, metrics    the API key, the body size limit, client disconnects,
                    the Prometheus metrics
"""
