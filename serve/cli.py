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
    from serve.loras.synthetic import lora_tensors, write_lora

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
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
