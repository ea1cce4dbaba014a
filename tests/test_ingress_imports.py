"""What an ingress replica imports as it starts: every replica of the ingress imports
`serve.ingress` before it can take a request, so heavy libraries it does not use there cost
each start (and each autoscaled one) seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_ingress_does_not_import_peft_transformers_or_diffusers():
    # peft (and transformers behind it) came in with the merge endpoint's request schema: about
    # 4.5 s of a 10 s import on the development machine.
    code = (
        "import sys, serve.ingress; "
        "print([m for m in ('peft', 'transformers', 'diffusers') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
