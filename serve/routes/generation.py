"""`POST /{endpoint}`: generate with an endpoint's model; `<endpoint>-lora` requires a LoRA.

Included last: `/{endpoint}` would match every other POST route of the ingress.
"""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response
from ray.serve.exceptions import BackPressureError

from deployments.errors import NotFound, Overloaded
from deployments.schemas import GenerationRequest
from serve.resolve import resolve_job
from serve.routes.bodies import read_json
from serve.routes.services import ServicesDep

# The body is read by hand (its model depends on the endpoint's family), so OpenAPI is told.
GENERATION_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": GenerationRequest.model_json_schema()}},
    },
    "responses": {"200": {"description": "The generated media, with cost headers."}},
}

router = APIRouter()


@router.post("/{endpoint}", openapi_extra=GENERATION_BODY, response_class=Response)
async def generate(endpoint: str, request: Request, services: ServicesDep) -> Response:
    """Generate with the endpoint's model. `<model>-lora` endpoints require a LoRA."""
    found = services.config.model_for_endpoint(endpoint)
    if found is None:
        raise NotFound(f"no endpoint /{endpoint}")
    model, lora_required = found
    body = await read_json(request, services.config.max_body_bytes)
    # Off the event loop: resolving names reads the LoRA root (on an object store, a request
    # per file; "auto" trigger words read file headers), which would hold up every other
    # request this ingress replica is serving meanwhile.
    job = await asyncio.to_thread(
        resolve_job,
        body,
        model,
        lora_required=lora_required,
        store=services.store,
        config=services.config,
    )
    handle = services.handles[model.name]
    if job.adapters:
        handle = handle.options(multiplexed_model_id=job.adapters[0].key)
    try:
        result = await handle.generate.remote(job)
    except BackPressureError as e:
        raise Overloaded(f"{model.name} is at capacity; retry shortly") from e
    headers = {
        "X-Seed": str(job.seed),
        "X-Model": model.name,
        "X-Inference-Ms": f"{result.inference_ms:.1f}",
        "X-GPU-Seconds": f"{result.gpu_seconds:.4f}",
        "X-Cost-USD": f"{result.cost_usd:.6f}",
    }
    if result.lora_cache:
        headers["X-LoRA-Cache"] = ",".join(result.lora_cache)
    return Response(result.content, media_type=result.media_type, headers=headers)
