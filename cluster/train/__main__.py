"""`python -m cluster.train --config job.yaml`: validate the job, train, publish; exit 0 only
when the adapter was published (1: the run failed, 2: the job was refused)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from cluster.train.checks import check_job
from cluster.train.config import TrainJob
from cluster.train.run import run
from deployments.errors import LoraplexError


def load_job(path: str) -> TrainJob:
    text = Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return TrainJob.model_validate(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.train", description=__doc__)
    parser.add_argument("--config", required=True, help="job.yaml or job.json (a TrainJob)")
    parser.add_argument("--check", action="store_true", help="validate only, do not train")
    args = parser.parse_args(argv)
    try:
        job = load_job(args.config)
        summary = check_job(job)
    except ValidationError as e:
        for error in e.errors():
            field = ".".join(str(part) for part in error["loc"]) or "job"
            print(f"error: {field}: {error['msg']}", file=sys.stderr)
        return 2
    except (LoraplexError, OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"dataset: {summary.images} images, {summary.total_steps} steps, buckets {summary.buckets}",
        flush=True,
    )
    if args.check:
        return 0
    status = run(job, summary)
    print(status.model_dump_json(indent=2), flush=True)
    return 0 if status.state == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
