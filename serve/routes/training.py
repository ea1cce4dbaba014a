"""`/datasets` and `/train`: training data in, training jobs (Ray jobs) out.

Included before the generation route: `/train` would match `/{endpoint}`.
"""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from cluster.train.config import TrainJob
from deployments.errors import Conflict, InvalidRequest, NotFound
from serve import tenants
from serve.auth import CanReadLoras, CanTrain, CanWriteLoras
from serve.config import AppConfig
from serve.datasets import MAX_DATASET_IMAGES, DatasetUpload, check_dataset_name
from serve.openapi import json_body
from serve.routes.bodies import form_parts, parse_json, read_body, read_json
from serve.routes.services import Services, ServicesDep
from serve.train_request import SERVER_FIELDS, train_job
from serve.training import new_job_id
from serve.validation import validated

router = APIRouter()

# JSON, or multipart image files with `<stem>.txt` captions (files or fields).
DATASET_BODY = json_body(DatasetUpload)
DATASET_BODY["requestBody"]["content"]["multipart/form-data"] = {
    "schema": {"type": "object", "additionalProperties": {"type": "string", "format": "binary"}}
}
# A TrainJob without the paths the server fills in.
TRAIN_BODY = json_body(TrainJob, name="TrainRequest", drop=SERVER_FIELDS)
IMAGE = {200: {"description": "A PNG image.", "content": {"image/png": {}}}}


@router.put("/datasets/{name:path}", status_code=201, openapi_extra=DATASET_BODY)
async def put_dataset(
    name: str, request: Request, services: ServicesDep, principal: CanWriteLoras
) -> dict:
    """A whole dataset, replacing any of that name (409 when that one holds other datasets):
    JSON `{images: [{filename, content (base64), caption}]}`, or multipart image files with
    `<stem>.txt` captions (files or fields). Stored as `<stem>.png` + `<stem>.txt`; every
    image is decoded first. A tenant key writes into its own folder."""
    tenants.owned(principal.tenant, check_dataset_name(name))  # before reading the body
    datasets = services.datasets
    body = await read_body(request, services.config.max_body_bytes)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        # An image and a caption file per item at most.
        parts = await form_parts(request, body, max_parts=2 * MAX_DATASET_IMAGES)
        pairs = await asyncio.to_thread(datasets.pairs_from_form, parts)
    else:
        upload = validated(DatasetUpload, parse_json(body))
        pairs = await asyncio.to_thread(datasets.pairs_from_json, upload)
    return await asyncio.to_thread(datasets.write, name, pairs, principal.tenant)


@router.get("/datasets/{name:path}")
async def get_dataset(name: str, services: ServicesDep, principal: CanReadLoras) -> dict:
    """The dataset's images with their sizes and captions."""
    return await asyncio.to_thread(services.datasets.describe, name, principal.tenant)


@router.delete("/datasets/{name:path}")
async def delete_dataset(name: str, services: ServicesDep, principal: CanWriteLoras) -> dict:
    """Remove a dataset (404 when absent; 403 for a shared one and a tenant key). 409 while a
    training job that has not ended uses it, or while it holds other datasets (`name/...`)."""
    stored = await asyncio.to_thread(services.datasets.owned, name, principal.tenant)
    users = await asyncio.to_thread(services.training.using_dataset, stored)
    if users:
        raise Conflict(
            f"dataset {name} is used by training job {users[0]}, which has not ended; stop it "
            f"(DELETE /train/{users[0]}) or wait for it to end"
        )
    return await asyncio.to_thread(services.datasets.delete, stored, name)


@router.post("/train", status_code=202, openapi_extra=TRAIN_BODY)
async def start_training(request: Request, services: ServicesDep, principal: CanTrain) -> dict:
    """Validate a TrainJob (refusals name the field; the dataset is checked too) and
    submit it as a Ray job: 202 `{job_id, status_url}`. A tenant key's job reads its own (or
    a shared) dataset and publishes into its own folder of the LoRA root."""
    job_id = new_job_id()
    body = await read_json(request, services.config.max_body_bytes)
    config = services.config
    if principal.tenant is not None:
        body, config = await asyncio.to_thread(_for_tenant, body, principal.tenant, services)
    job = await asyncio.to_thread(train_job, body, job_id, config)
    return await asyncio.to_thread(services.training.submit, job_id, job, principal.tenant)


def _for_tenant(body: object, tenant: str, services: Services) -> tuple[object, AppConfig]:
    """The body with its dataset named as stored, and the config whose LoRA root is the
    tenant's folder: the job publishes there, and checks its output name there."""
    if isinstance(body, dict) and isinstance(body.get("dataset"), str):
        name = check_dataset_name(body["dataset"], "dataset")
        try:
            body = {**body, "dataset": services.datasets.locate(name, tenant)}
        except NotFound as e:
            raise InvalidRequest(f"dataset: no such dataset: {name}") from e
    lora_root = tenants.tenant_root(services.config.lora_root, tenant)
    return body, services.config.model_copy(update={"lora_root": lora_root})


@router.get("/train")
async def list_training(services: ServicesDep, principal: CanTrain) -> dict:
    """Every training job the cluster knows, newest first (a tenant key's own only)."""
    return {"jobs": await asyncio.to_thread(services.training.list, principal.tenant)}


@router.get("/train/{job_id}")
async def training_status(job_id: str, services: ServicesDep, principal: CanTrain) -> dict:
    """State (Ray's), step, total steps, loss, lr, ETA, checkpoints, sample URLs, LoRA."""
    return await asyncio.to_thread(services.training.status, job_id, principal.tenant)


@router.get("/train/{job_id}/logs", response_class=PlainTextResponse)
async def training_logs(
    job_id: str, services: ServicesDep, principal: CanTrain, lines: int = 200
) -> PlainTextResponse:
    """The last `lines` lines of the job's log (Ray's job log)."""
    if not 1 <= lines <= 100_000:
        raise InvalidRequest("lines: between 1 and 100000")
    logs = await asyncio.to_thread(services.training.logs, job_id, lines, principal.tenant)
    return PlainTextResponse(logs)


@router.get("/train/{job_id}/loss.png", response_class=Response, responses=IMAGE)
async def training_loss(job_id: str, services: ServicesDep, principal: CanTrain) -> Response:
    run_file = services.training.run_file
    data = await asyncio.to_thread(run_file, job_id, "loss.png", tenant=principal.tenant)
    return Response(data, media_type="image/png")


@router.get("/train/{job_id}/samples/{filename}", response_class=Response, responses=IMAGE)
async def training_sample(
    job_id: str, filename: str, services: ServicesDep, principal: CanTrain
) -> Response:
    data = await asyncio.to_thread(services.training.sample, job_id, filename, principal.tenant)
    return Response(data, media_type="image/png")


@router.delete("/train/{job_id}")
async def stop_training(job_id: str, services: ServicesDep, principal: CanTrain) -> dict:
    """Stop a running job (it publishes nothing) and wait for Ray to confirm; for a job
    that already ended, forget it and its run folder (never its published LoRA)."""
    return await asyncio.to_thread(services.training.stop, job_id, principal.tenant)
