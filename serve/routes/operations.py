"""`/healthz` and `/models`: is the ingress up, and what it serves."""

from fastapi import APIRouter

from serve.auth import IsAdmin
from serve.routes.services import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/models")
async def models(services: ServicesDep, principal: IsAdmin) -> dict:
    """Each deployment: family, model URI, endpoints, replicas and their hot adapters (every
    tenant's LoRA names among them, hence the admin scope)."""
    replicas = await services.registry.snapshot()
    return {
        "models": [
            {
                "name": model.name,
                "family": model.family,
                "model_uri": model.model_uri,
                "endpoints": [f"/{model.endpoint}", f"/{model.endpoint}-lora"],
                "max_adapters_per_replica": model.max_adapters_per_replica,
                "replicas": [r for r in replicas if r["deployment"] == model.name],
            }
            for model in services.config.models
        ]
    }
