"""Time from `POST /train` to the first image served with the new adapter, over HTTP.

    make serve            # in another shell (cluster/local.yaml: tiny models, CPU)
    python -m loadtest.train_to_image --url http://127.0.0.1:8000 --family flux

Uploads a dataset of generated images (`PUT /datasets/{name}`), starts a job (`POST /train`),
polls `GET /train/{job_id}` until it ends, then asks the family's `-lora` endpoint for an image
with `lora_id`. Prints the time to each milestone, counted from the POST.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import time
import uuid

ENDPOINTS = {"flux": "flux-lora", "z_image": "z-image-lora", "qwen_image": "qwen-image-2512-lora"}


def dataset(count: int, size: int) -> dict:
    from PIL import Image

    images = []
    for index in range(count):
        image = Image.new("RGB", (size, size), ((index * 67) % 256, (index * 131) % 256, 90))
        image.paste((250, 200, 10), (size // 4, size // 4, size // 2, size // 2 + index))
        out = io.BytesIO()
        image.save(out, format="PNG")
        images.append(
            {
                "filename": f"img{index}.png",
                "content": base64.b64encode(out.getvalue()).decode(),
                "caption": f"a photo of zxq, pose {index}",
            }
        )
    return {"images": images}


def main(argv: list[str] | None = None) -> None:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--family", default="flux", choices=sorted(ENDPOINTS))
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image and training resolution")
    parser.add_argument("--steps", type=int, default=4, help="max_train_steps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    character_id = f"timing-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=args.url, timeout=600, headers=headers) as client:
        name = f"timing-{args.family}"
        client.put(f"/datasets/{name}", json=dataset(args.images, args.size)).raise_for_status()
        body = {
            "base_model": args.family,
            "dataset": name,
            "trigger_word": "zxq",
            "character_id": character_id,
            "config": {
                "rank": 4,
                "resolution": args.size,
                "max_train_steps": args.steps,
                "num_workers": args.workers,
            },
        }
        started = time.monotonic()
        response = client.post("/train", json=body)
        response.raise_for_status()
        job_id = response.json()["job_id"]
        seen = {}
        while True:
            status = client.get(f"/train/{job_id}").json()
            state = status["state"]
            seen.setdefault(state, time.monotonic() - started)
            if status["step"] and "first step" not in seen:
                seen["first step"] = time.monotonic() - started
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.25)
        if state != "SUCCEEDED":
            print(f"{job_id} ended {state}: {status.get('error')}", file=sys.stderr)
            raise SystemExit(1)
        request = {"prompt": "zxq portrait", "width": args.size, "height": args.size, "steps": 2}
        image = client.post(f"/{ENDPOINTS[args.family]}", json={**request, "lora_id": character_id})
        image.raise_for_status()
        seen["first image"] = time.monotonic() - started
    print(
        f"job {job_id} ({args.family}, {args.images} images, {args.steps} steps, "
        f"{args.workers} workers)"
    )
    for milestone, seconds in seen.items():
        print(f"  {milestone:<12} {seconds:7.1f} s after POST /train")


if __name__ == "__main__":
    main()
