"""Back-pressure: a burst beyond what the service may hold is answered 503 `overloaded` with
Retry-After at once, in loraplex's error shape, the rest 200; the service is fine after.

Against tests/small_app.py's app: its ingress works on 8 requests at once (refusing the next
at once), and its Flux replica takes 5 and queues 2 per ingress replica (the next is refused
by the ingress's handle). Before back_pressure, a 400-request burst queued in Serve's proxy
without bound and the last waited 57 s.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.small_app import BACK_PRESSURE, small_app

BURST = 48
BODY = {"prompt": "a red fox", "seed": 3, "steps": 2, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def small(ray_cluster, tmp_path_factory):
    with small_app(ray_cluster, tmp_path_factory.mktemp("small")) as url:
        yield url


async def _burst(url: str, count: int) -> list[tuple[httpx.Response, float]]:
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one():
            started = time.monotonic()
            response = await client.post("/flux", json=BODY)
            return response, time.monotonic() - started

        return await asyncio.gather(*(one() for _ in range(count)))


@pytest.mark.slow
def test_a_burst_gets_quick_503s_and_200s_for_the_rest(small):
    with httpx.Client(base_url=small, timeout=120) as client:
        before = client.post("/flux", json=BODY)
        assert before.status_code == 200, before.text
        results = asyncio.run(_burst(small, BURST))
        statuses = [response.status_code for response, _ in results]
        refused = [(r, s) for r, s in results if r.status_code == 503]
        served = [r for r, _ in results if r.status_code == 200]
        assert set(statuses) <= {200, 503}, statuses
        # The ingress admits 8 at a time and Flux holds 7, but Serve's handle may refuse more
        # than its queue bound while simultaneous requests are being routed (3 to 7 renders
        # seen): some are served, most refused.
        assert served, statuses
        assert len(refused) >= BURST // 4, statuses
        for response, seconds in refused:
            assert response.headers["content-type"] == "application/json"
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert seconds < 10, f"a refusal took {seconds:.1f} s"
        messages = {response.json()["error"]["message"].split(": ")[-1] for response, _ in refused}
        print(
            f"burst of {BURST}: {len(served)} x 200, {len(refused)} x 503 ({messages}); "
            f"slowest refusal {max(s for _, s in refused):.2f} s, "
            f"slowest 200 {max(s for r, s in results if r.status_code == 200):.2f} s"
        )
        assert all(response.content == before.content for response in served)
        # Fine afterwards: the same bytes, and every queue drained.
        assert client.post("/flux", json=BODY).content == before.content
        assert client.get("/healthz").status_code == 200


def test_back_pressure_settings_are_bounded():
    from pydantic import ValidationError

    from serve.config import BackPressureConfig

    assert BackPressureConfig.model_validate(BACK_PRESSURE).model_max_queued_requests == 2
    for field, value in (("ingress_max_ongoing_requests", 0), ("model_max_queued_requests", -1)):
        with pytest.raises(ValidationError, match=field):
            BackPressureConfig.model_validate({field: value})
    with pytest.raises(ValidationError, match="extra"):
        BackPressureConfig.model_validate({"max_queue": 3})
