"""Webhook deliveries (serve/queue/webhooks.py) against a receiver on 127.0.0.1 that fails on
purpose: retried with backoff until it answers 2xx, given up after the configured time, and
signed the same way every time."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time

import pytest

from deployments.outbound import UrlRules
from serve.queue.webhooks import FIRST_RETRY_S, SIGNATURE_HEADER, deliver
from tests.queue_app import Webhooks

SECRET = "webhook-secret"
LOOPBACK = UrlRules(
    allowed_schemes=["http"], allowed_networks=["127.0.0.1/32"], allowed_ports="any"
)
STATUS = {"request_id": "q-1", "status": "completed"}


@pytest.fixture
def receiver(request):
    made = Webhooks(failures=request.param)
    yield made
    made.close()


@pytest.mark.parametrize("receiver", [2], indirect=True)
def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(receiver):
    assert asyncio.run(deliver(receiver.url, STATUS, SECRET, LOOPBACK, 30, 5))
    times = receiver.times
    assert len(times) == 3
    # 1 s, then 2 s: each wait doubles.
    assert times[1] - times[0] >= FIRST_RETRY_S * 0.9
    assert times[2] - times[1] >= 2 * FIRST_RETRY_S * 0.9
    bodies = {body for _, body in receiver.received}
    assert len(bodies) == 1  # the same bytes every time, so the same signature
    for headers, body in receiver.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers[SIGNATURE_HEADER] == expected


@pytest.mark.parametrize("receiver", [1000], indirect=True)
def test_a_receiver_that_never_answers_2xx_is_given_up_in_bounded_time(receiver):
    started = time.monotonic()
    assert not asyncio.run(deliver(receiver.url, STATUS, SECRET, LOOPBACK, 2.5, 5))
    assert time.monotonic() - started < 5
    assert 2 <= len(receiver.received) <= 3


def test_an_address_the_rules_refuse_is_not_retried():
    started = time.monotonic()
    assert not asyncio.run(deliver("http://127.0.0.1:9/hook", STATUS, SECRET, UrlRules(), 30, 5))
    assert time.monotonic() - started < 1
