"""``POST /v1/images/generations``: text to image, as ``KelixPipeline.generate_image``, with its stages
shared between requests.

The AR part (greedy image blocks with their hidden states) runs in the engine, batched with every other
request; it is the same for every image of a request, so it runs once and the request's ``n`` images
differ by their noise seeds only (``seed + i``). The condition is extracted as the pipeline does, and
the DiT + VAE run on the :class:`~kelix_fast.serving.render_worker.RenderWorker`, batched with the
images of other requests of the same shape.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import aclosing

import torch
from fastapi import Request

from kelix_fast.runtime.conditioning import Condition, extract_condition, text_to_image_prompt
from kelix_fast.serving.disconnect import cancel_on_disconnect
from kelix_fast.serving.errors import APIError, bad_request, engine_errors, shutting_down
from kelix_fast.serving.images import encode_png
from kelix_fast.serving.lifecycle import ServingState
from kelix_fast.serving.metrics import ServerMetrics
from kelix_fast.serving.protocol import (
    SEED_LIMIT,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
)
from kelix_fast.text_tokenizer import IM_START_TOKEN


async def create_images(
    state: ServingState, metrics: ServerMetrics, body: ImageGenerationRequest, request: Request
) -> ImagesResponse:
    """Generate ``body.n`` PNGs of ``body.prompt``."""
    assert state.engine is not None  # started with the app
    if state.renderer is None:
        raise APIError(
            400,
            "this server has no DiT and VAE loaded (start it with --dit and --vae)",
            code="images_unavailable",
        )
    try:
        size = body.side(state.image_sizes)
    except ValueError as error:
        raise bad_request(error, param="size") from None
    prompt_ids = _prompt_ids(state, body.prompt)
    seed = random.randrange(SEED_LIMIT) if body.seed is None else body.seed
    async with cancel_on_disconnect(request):
        condition = await _condition(state, metrics, prompt_ids)
        renders = [
            state.renderer.render(
                condition.hidden,
                condition.mask,
                size=size,
                steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
                seed=seed + i,
            )
            for i in range(body.n)
        ]
        with engine_errors():
            pixels = await asyncio.gather(*renders)
    start = time.perf_counter()
    images = await asyncio.to_thread(lambda: [encode_png(p) for p in pixels])
    metrics.observe("png", time.perf_counter() - start)
    return ImagesResponse(data=[ImageData(b64_json=image) for image in images])


def _prompt_ids(state: ServingState, prompt: str) -> list[int]:
    """The user's text templated as one chat turn, cut after the assistant prefix, plus
    ``<|vision_start|>`` (what ``KelixPipeline.generate_image`` feeds the AR model)."""
    tokenizer, llm = state.pipeline.processor.tokenizer, state.pipeline.ar.config.llm
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return text_to_image_prompt(
        tokenizer.encode(text),
        assistant_prefix=tokenizer.encode(f"{IM_START_TOKEN}assistant\n"),
        vision_start=llm.vision_start_token_id,
    )


async def _condition(
    state: ServingState, metrics: ServerMetrics, prompt_ids: list[int]
) -> Condition:
    """The AR part through the engine: ``2 * Lc + 11`` greedy blocks (the official decode budget)
    with their hidden states -> the DiT condition (hidden [1, Lc, D], mask [1, Lc])."""
    assert state.engine is not None and state.pipeline.dit is not None
    ar, length = state.pipeline.ar, state.pipeline.dit.config.model_max_length
    start = time.perf_counter()
    groups, hidden = [], []
    with engine_errors():
        outputs = state.engine.generate(
            prompt_ids, max_new_blocks=2 * length + 11, return_hidden_states=True
        )
        async with aclosing(outputs):
            async for output in outputs:
                if output.finish_reason == "aborted":
                    raise shutting_down()
                if not groups:
                    metrics.observe("first_block", time.perf_counter() - start)
                    start = time.perf_counter()
                groups.append(output.new_groups)
                hidden.append(output.hidden_states)
    metrics.observe("decode", time.perf_counter() - start)
    llm = ar.config.llm
    prompt_groups = ar.expand_prompt(torch.tensor([prompt_ids]), None)[0].cpu()
    return extract_condition(
        torch.cat([prompt_groups, *groups]),
        torch.cat(hidden),
        vision_start=llm.vision_start_token_id,
        vision_end=llm.vision_end_token_id,
        max_length=length,
    )
