"""Webhook deliveries: the status object POSTed, signed, retried with backoff for a bounded time.

The signature is `X-Loraplex-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact body bytes
with the configured secret (docs/api.md, Queue, shows how to check it). A delivery that fails
is logged and given up after `webhook_retry_s`; it never changes the request's result.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time

import httpx

from deployments.errors import InvalidRequest
from deployments.outbound import UrlRules, open_http

SIGNATURE_HEADER = "X-Loraplex-Signature"
FIRST_RETRY_S = 1.0
MAX_RETRY_WAIT_S = 60.0

logger = logging.getLogger("ray.serve")


def signature(body: bytes, secret: str) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _post(url: str, body: bytes, headers: dict[str, str], rules: UrlRules, timeout_s: float):
    """The response's status; every hop checked by deployments/outbound.py, no redirects
    (a redirect would send the signed status elsewhere)."""
    with open_http(
        url,
        rules,
        "webhook_url",
        timeout_s,
        method="POST",
        content=body,
        headers=headers,
        max_redirects=0,
    ) as response:
        return response.status_code


async def deliver(
    url: str, status: dict, secret: str, rules: UrlRules, retry_s: float, timeout_s: float
) -> bool:
    """POST `status` to `url` until it answers 2xx or `retry_s` has passed; whether it did."""
    body = json.dumps(status, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(body, secret),
        "X-Loraplex-Request-Id": status["request_id"],
    }
    deadline = time.monotonic() + retry_s
    wait_s = FIRST_RETRY_S
    while True:
        try:
            code = await asyncio.to_thread(_post, url, body, headers, rules, timeout_s)
            if 200 <= code < 300:
                return True
            why = f"HTTP {code}"
        except InvalidRequest as e:  # the URL now resolves to an address it may not reach
            logger.warning("webhook for %s refused: %s", status["request_id"], e.message)
            return False
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {e}"
        if time.monotonic() + wait_s > deadline:
            logger.warning("webhook for %s given up: %s", status["request_id"], why)
            return False
        await asyncio.sleep(wait_s)
        wait_s = min(wait_s * 2, MAX_RETRY_WAIT_S)
