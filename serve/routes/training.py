"""`/datasets` and `/train`: training data in, training jobs (Ray jobs) out.

Included before the generation route: `/train` would match `/{endpoint}`.
"""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from deployments.errors import Conflict, InvalidRequest
from serve.datasets import MAX_DATASET_IMAGES, DatasetUpload, check_dataset_name
from serve.routes.bodies import form_parts, parse_json, read_body, read_json
from serve.routes.services import ServicesDep
from serve.train_request import train_job
from serve.training import new_job_id
from serve.validation import validated

router = APIRouter()


@router.put("/datasets/{name:path}", status_code=201)
async def put_dataset(name: str, request: Request, services: ServicesDep) -> dict:
    """A whole dataset, replacing any of that name: JSON `{images: [{filename, content
    (base64), caption}]}`, or multipart image files with `<stem>.txt` captions (files or
    fields). Stored as `<stem>.png` + `<stem>.txt`; every image is decoded first."""
    check_dataset_name(name)
    datasets = services.datasets
    body = await read_body(request, services.config.max_body_bytes)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        # An image and a caption file per item at most.
        parts = await form_parts(request, body, max_parts=2 * MAX_DATASET_IMAGES)
        pairs = await asyncio.to_thread(datasets.pairs_from_form, parts)
    else:
        upload = validated(DatasetUpload, parse_json(body))
        pairs = await asyncio.to_thread(datasets.pairs_from_json, upload)
    return await asyncio.to_thread(datasets.write, name, pairs)


@router.get("/datasets/{name:path}")
async def get_dataset(name: str, services: ServicesDep) -> dict:
    """The dataset's images with their sizes and captions."""
    return await asyncio.to_thread(services.datasets.describe, name)


@router.delete("/datasets/{name:path}")
async def delete_dataset(name: str, services: ServicesDep) -> dict:
    """Remove a dataset (404 when absent). 409 while a training job that has not ended uses
    it, or while it holds other datasets (`name/...`)."""
    check_dataset_name(name)
    users = await asyncio.to_thread(services.training.using_dataset, name)
    if users:
        raise Conflict(
            f"dataset {name} is used by training job {users[0]}, which has not ended; stop it "
            f"(DELETE /train/{users[0]}) or wait for it to end"
        )
    return await asyncio.to_thread(services.datasets.delete, name)


@router.post("/train", status_code=202)
async def start_training(request: Request, services: ServicesDep) -> dict:
    """Validate a TrainJob (refusals name the field; the dataset is checked too) and
    submit it as a Ray job: 202 `{job_id, status_url}`."""
    job_id = new_job_id()
    body = await read_json(request, services.config.max_body_bytes)
    job = await asyncio.to_thread(train_job, body, job_id, services.config)
    return await asyncio.to_thread(services.training.submit, job_id, job)


@router.get("/train")
async def list_training(services: ServicesDep) -> dict:
    """Every training job the cluster knows, newest first."""
    return {"jobs": await asyncio.to_thread(services.training.list)}


@router.get("/train/{job_id}")
async def training_status(job_id: str, services: ServicesDep) -> dict:
    """State (Ray's), step, total steps, loss, lr, ETA, checkpoints, sample URLs, LoRA."""
    return await asyncio.to_thread(services.training.status, job_id)


@router.get("/train/{job_id}/logs", response_class=PlainTextResponse)
async def training_logs(job_id: str, services: ServicesDep, lines: int = 200) -> PlainTextResponse:
    """The last `lines` lines of the job's log (Ray's job log)."""
    if not 1 <= lines <= 100_000:
        raise InvalidRequest("lines: between 1 and 100000")
    return PlainTextResponse(await asyncio.to_thread(services.training.logs, job_id, lines))


@router.get("/train/{job_id}/loss.png", response_class=Response)
async def training_loss(job_id: str, services: ServicesDep) -> Response:
    data = await asyncio.to_thread(services.training.run_file, job_id, "loss.png")
    return Response(data, media_type="image/png")


@router.get("/train/{job_id}/samples/{filename}", response_class=Response)
async def training_sample(job_id: str, filename: str, services: ServicesDep) -> Response:
    data = await asyncio.to_thread(services.training.sample, job_id, filename)
    return Response(data, media_type="image/png")


@router.delete("/train/{job_id}")
async def stop_training(job_id: str, services: ServicesDep) -> dict:
    """Stop a running job (it publishes nothing) and wait for Ray to confirm; for a job
    that already ended, forget it and its run folder (never its published LoRA)."""
    return await asyncio.to_thread(services.training.stop, job_id)
