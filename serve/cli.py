"""The `loraplex` command."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def demo_lora(args: argparse.Namespace) -> None:
    """Write a random-weight LoRA for a family's tiny:// model into the LoRA root."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from deployments import load_pipeline
    from deployments.family import get_family
    from deployments.loras.synthetic import lora_tensors, write_lora

    family = get_family(args.family)
    pipe = load_pipeline(args.family, f"tiny://{args.family}")
    denoiser = getattr(pipe, family.denoiser_component)
    tensors = lora_tensors(
        denoiser,
        family.denoiser_component,
        seed=args.seed,
        rank=args.rank,
        targets=family.lora_targets,
    )
    path = write_lora(
        Path(args.lora_root) / f"{args.name}.safetensors",
        tensors,
        metadata={"loraplex.family": args.family, "loraplex.kind": "random demo"},
    )
    print(path)


def train(args: argparse.Namespace) -> None:
    """Validate a job file here, submit it as a Ray job, print the job id; --wait follows it."""
    import sys
    import tempfile
    import time

    from pydantic import ValidationError

    from cluster.train.config import JOB_FILE, TrainJob
    from deployments.errors import LoraplexError
    from serve.training import (
        TERMINAL_STATES,
        job_metadata,
        job_runtime_env,
        new_job_id,
        read_job_file,
    )

    job_id = new_job_id()
    try:
        fields = read_job_file(args.config)
        fields.setdefault("run_name", job_id)
        job = TrainJob.model_validate(fields)
    except ValidationError as e:
        for item in e.errors():
            field = ".".join(str(p) for p in item["loc"]) or "job"
            print(f"{args.config}: {field}: {item['msg']}", file=sys.stderr)
        raise SystemExit(2) from e
    except (LoraplexError, OSError, ValueError) as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    job = _with_absolute_paths(job)
    if not args.skip_dataset_check:
        from cluster.train.checks import check_job

        try:  # the job's own checks: family, options, dataset (every image decoded)
            check_job(job)
        except (LoraplexError, ValueError, OSError) as e:
            print(f"{args.config}: {e}", file=sys.stderr)
            raise SystemExit(2) from e

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(args.address)
    python = _job_python(client.get_address(), args.python)
    with tempfile.TemporaryDirectory() as folder:
        # The job file travels as the job's working_dir, so the cluster needs no shared disk.
        Path(folder, JOB_FILE).write_text(job.model_dump_json(indent=2))
        gcs_address = args.address if args.address and "://" not in args.address else None
        runtime_env = {**job_runtime_env(gcs_address), "working_dir": folder}
        client.submit_job(
            entrypoint=f"{python} -m cluster.train --config {JOB_FILE}",
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata=job_metadata(job),
        )
    print(job_id, flush=True)
    if not args.wait:
        return
    printed = 0
    while True:
        status = str(client.get_job_status(job_id))
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in TERMINAL_STATES:
            break
        time.sleep(args.poll_s)
    print(f"{job_id}: {status}", flush=True)
    if status != "SUCCEEDED":
        raise SystemExit(1)


def _job_python(job_server_url: str, python: str | None) -> str:
    """`--python`, else this interpreter when the job server is on this machine (the cluster
    was started from this environment), else the cluster's own `python`."""
    import shlex
    import socket
    import sys
    from urllib.parse import urlsplit

    if python:
        return shlex.quote(python)
    host = urlsplit(job_server_url).hostname
    local = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        local.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return shlex.quote(sys.executable) if host in local else "python"


def _with_absolute_paths(job):
    """Local relative paths pinned to this directory: the job runs in its own working_dir."""
    update = {}
    for field in ("lora_root", "dataset_root", "storage_path"):
        value = getattr(job, field)
        if "://" not in value:
            update[field] = os.path.abspath(value)
    dataset = job.dataset
    if dataset and "://" not in dataset and (dataset.startswith(".") or os.path.isdir(dataset)):
        update["dataset"] = os.path.abspath(dataset)
    return job.model_copy(update=update)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo-lora", help=demo_lora.__doc__)
    demo.add_argument("--family", default="flux")
    demo.add_argument("--name", default="character-demo", help="file name without .safetensors")
    demo.add_argument("--lora-root", default="./models/loras")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--rank", type=int, default=4)
    demo.set_defaults(run=demo_lora)
    trainer = commands.add_parser("train", help=train.__doc__)
    trainer.add_argument("--config", required=True, help="job.yaml or job.json (TrainJob fields)")
    trainer.add_argument(
        "--address",
        default=None,
        help="Ray job server, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS or the local "
        "cluster)",
    )
    trainer.add_argument(
        "--python",
        default=None,
        help="the job's interpreter (default: this one when the job server runs on this machine, "
        "else python)",
    )
    trainer.add_argument("--wait", action="store_true", help="follow the logs until it ends")
    trainer.add_argument("--poll-s", type=float, default=2.0, help="seconds between polls")
    trainer.add_argument(
        "--skip-dataset-check",
        action="store_true",
        help="skip the job's checks here (its dataset lies on the cluster's disks only)",
    )
    trainer.set_defaults(run=train)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
