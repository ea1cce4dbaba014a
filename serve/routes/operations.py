"""`/healthz` and `/models`: is the ingress up, and what it serves."""

from fastapi import APIRouter

from serve.routes.services import ServicesDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/models")
async def models(services: ServicesDep) -> dict:
    """Each deployment: family, model URI, endpoints, replicas and their hot adapters."""
    replicas = await services.registry.snapshot.remote()
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
