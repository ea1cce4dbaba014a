"""The OpenAI images API, so the official `openai` client works unchanged:
`POST /v1/images/generations` and `GET /v1/models` (serve/openai_request.py has the bodies).

A request is the native generation of its model's endpoint, through the same resolve and
render (serve/routes/generation.py): image i of n is the native request at seed + i, byte for
byte. Errors keep loraplex's body, `{"error": {"code", "message"}}`, which the openai client
reads as it reads OpenAI's (`error.message`, `error.code`).
"""

import asyncio
import base64
import time

from fastapi import APIRouter, Request, Response

from deployments.errors import InvalidRequest
from serve.auth import CanGenerate
from serve.openai_request import (
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    find_model,
    native_body,
)
from serve.openapi import json_body
from serve.resolve import resolve_job
from serve.routes.bodies import read_json
from serve.routes.generation import render
from serve.routes.services import ServicesDep
from serve.validation import validated

# Summed over the n images, in the native headers' formats; the other headers are the first
# image's, but X-Seed, which lists every image's seed.
SUMMED_HEADERS = {"X-Inference-Ms": "{:.1f}", "X-GPU-Seconds": "{:.4f}", "X-Cost-USD": "{:.6f}"}
STARTED_S = int(time.time())

router = APIRouter(prefix="/v1")


@router.post(
    "/images/generations",
    openapi_extra=json_body(ImageGenerationRequest),
    response_model=ImagesResponse,
)
async def generate_images(
    request: Request, response: Response, services: ServicesDep, principal: CanGenerate
) -> ImagesResponse:
    """OpenAI's image generation: n images of `model` (optionally with LoRAs), as base64."""
    body = await read_json(request, services.config.max_body_bytes)
    openai_request = validated(ImageGenerationRequest, body)
    if openai_request.response_format == "url":
        raise InvalidRequest(
            "response_format: url is not supported (loraplex keeps no images); use b64_json"
        )
    model, lora_required, model_loras = find_model(services.config, openai_request.model)
    job = await asyncio.to_thread(  # reads the LoRA root: off the event loop
        resolve_job,
        native_body(openai_request, model_loras),
        model,
        lora_required=lora_required,
        store=services.store,
        config=services.config,
        tenant=principal.tenant,
    )
    jobs = [job.model_copy(update={"seed": job.seed + i}) for i in range(openai_request.n or 1)]
    # One after another: a model's replica renders one image at a time anyway, and the first
    # two calls of a fresh ingress replica's handle, made side by side, left the second
    # waiting for ever (Ray 2.60, tests/test_openai_api.py's first request before this).
    rendered = [await render(services, model, each) for each in jobs]
    response.headers.update(rendered[0].headers)
    response.headers["X-Seed"] = ",".join(str(each.seed) for each in jobs)
    for header, form in SUMMED_HEADERS.items():
        response.headers[header] = form.format(sum(float(r.headers[header]) for r in rendered))
    return ImagesResponse(
        created=int(time.time()),
        data=[
            ImageData(
                b64_json=base64.b64encode(image.content).decode("ascii"),
                revised_prompt=job.prompt,
                seed=seed_job.seed,
            )
            for image, seed_job in zip(rendered, jobs, strict=True)
        ],
        output_format=rendered[0].media_type.split("/")[-1],
        size=f"{job.width}x{job.height}",
    )


@router.get("/models", response_model=ModelList)
async def list_models(services: ServicesDep, principal: CanGenerate) -> ModelList:
    """Every deployment, in OpenAI's list shape; image models take /v1/images/generations."""
    return ModelList(
        data=[
            ModelCard(
                id=model.name,
                created=STARTED_S,
                family=model.family,
                endpoint=model.endpoint,
            )
            for model in services.config.models
        ]
    )
