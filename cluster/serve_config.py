"""`python -m cluster.serve_config` (`make kuberay`): copy cluster/production.yaml into the
RayService's `serveConfigV2` (cluster/kuberay/rayservice.yaml), so KubeRay deploys the Serve
config that `serve deploy cluster/production.yaml` deploys. The rest of the manifest is left as
it is. `--check` writes nothing and exits 1 when the manifest is out of date."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

CLUSTER_DIR = Path(__file__).resolve().parent
SERVE_CONFIG = CLUSTER_DIR / "production.yaml"
RAYSERVICE = CLUSTER_DIR / "kuberay" / "rayservice.yaml"
BLOCK_START = re.compile(r"^(?P<indent> *)serveConfigV2: \|\n$")


class ManifestError(ValueError):
    """The manifest has no single `serveConfigV2: |` block to write into."""


def _block_start(lines: list[str]) -> tuple[int, int]:
    """(line index, indentation) of the one `serveConfigV2: |` line."""
    found = [(i, m) for i, line in enumerate(lines) if (m := BLOCK_START.match(line))]
    if len(found) != 1:
        raise ManifestError(
            f"expected one 'serveConfigV2: |' line in the manifest, found {len(found)}"
        )
    index, match = found[0]
    return index, len(match.group("indent"))


def with_serve_config(manifest: str, serve_config: str) -> str:
    """The manifest with its serveConfigV2 block replaced by `serve_config`, verbatim."""
    lines = manifest.splitlines(keepends=True)
    start, indent = _block_start(lines)
    # The block runs while lines are blank or indented deeper than its key; blank lines at its
    # end separate it from what follows and stay where they are.
    end = start + 1
    while end < len(lines) and (
        not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent
    ):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    pad = " " * (indent + 2)
    block = [pad + line if line.strip() else "\n" for line in serve_config.splitlines(True)]
    written = "".join(lines[: start + 1] + block + lines[end:])
    # A literal block gives back its text exactly, comments included; check it did.
    if yaml.safe_load(written)["spec"]["serveConfigV2"] != serve_config:
        raise ManifestError("serveConfigV2 does not read back as the Serve config")
    return written


def generated() -> str:
    """What cluster/kuberay/rayservice.yaml should hold."""
    return with_serve_config(RAYSERVICE.read_text(), SERVE_CONFIG.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.serve_config", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the manifest is stale")
    args = parser.parse_args(argv)
    text = generated()
    current = RAYSERVICE.read_text()
    if args.check:
        if text != current:
            print(f"{RAYSERVICE}: serveConfigV2 differs from {SERVE_CONFIG}; run make kuberay")
            return 1
        return 0
    if text != current:
        RAYSERVICE.write_text(text)
        print(f"{RAYSERVICE}: serveConfigV2 written from {SERVE_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
