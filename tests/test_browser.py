"""The pages in a real browser (headless Chromium): /docs and /redoc render from the ingress's own
assets, the playground generates with a LoRA and shows the cost headers, and the training page
uploads a dataset, trains, and shows the loss plot and samples. Screenshots go to a temp dir."""

from __future__ import annotations

import time

import numpy as np
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from tests.browser import (
    chromium,
    decoded_size,
    element_pixels,
    foreign_requests,
    not_blank,
    screenshot,
    wait_for,
    wait_for_status,
)
from tests.http_helpers import pixels
from tests.keyed_app import keyed_app
from tests.train_jobs import write_dataset

PAGE_TIMEOUT_S = 90
GENERATE_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 300
SIDE_PX = 64


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def test_docs_and_redoc_render_offline(service, ray_cluster, browser, shots):
    for page in ("/docs", "/redoc", "/playground", "/playground/train"):
        response = service.get(page)
        assert response.status_code == 200, response.text
        assert "default-src 'self'" in response.headers["content-security-policy"]
    browser.get(f"{ray_cluster}/docs")
    operations = wait_for(
        browser,
        "document.querySelectorAll('.opblock').length",
        PAGE_TIMEOUT_S,
        "Swagger UI's operations",
    )
    assert operations >= 20
    assert "/flux" in browser.find_element(By.ID, "swagger-ui").text
    assert not_blank(screenshot(browser, shots / "docs.png"))
    assert foreign_requests(browser, ray_cluster) == []

    browser.get(f"{ray_cluster}/redoc")
    sections = wait_for(
        browser,
        "document.querySelectorAll('[data-section-id]').length",
        PAGE_TIMEOUT_S,
        "ReDoc's sections",
    )
    assert sections >= 20
    assert not_blank(screenshot(browser, shots / "redoc.png"))
    assert foreign_requests(browser, ray_cluster) == []


def _generate(browser) -> dict[str, str]:
    browser.find_element(By.ID, "generate").click()
    wait_for_status(browser, GENERATE_TIMEOUT_S)
    rows = browser.find_elements(By.CSS_SELECTOR, "#facts tr")
    return {
        row.get_attribute("data-header"): row.find_element(By.TAG_NAME, "td").text for row in rows
    }


def test_playground_generates_with_a_lora(service, ray_cluster, browser, shots):
    browser.get(f"{ray_cluster}/playground")
    wait_for(browser, "document.getElementById('model').options.length", PAGE_TIMEOUT_S, "models")
    Select(browser.find_element(By.ID, "model")).select_by_value("flux")
    for field, value in (("width", SIDE_PX), ("height", SIDE_PX), ("steps", 2), ("seed", 7)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.find_element(By.ID, "add-lora").click()
    wait_for(
        browser,
        "document.querySelector('.lora-name').options.length",
        PAGE_TIMEOUT_S,
        "the LoRA list",
    )
    Select(browser.find_element(By.CSS_SELECTOR, ".lora-name")).select_by_value(
        "character-a.safetensors"
    )
    slider = browser.find_element(By.CSS_SELECTOR, ".lora-strength")
    slider.send_keys(*[Keys.ARROW_LEFT] * 4)  # 1.00 -> 0.80 in steps of 0.05
    assert browser.find_element(By.CSS_SELECTOR, ".lora-value").text == "0.80"

    first = _generate(browser)
    assert first["X-Seed"] == "7" and first["X-Model"] == "flux"
    assert float(first["X-Cost-USD"]) > 0 and float(first["X-GPU-Seconds"]) > 0
    assert first["LoRA character-a.safetensors"] in ("hot (hit)", "miss")
    again = _generate(browser)  # now the replica holds it
    assert again["LoRA character-a.safetensors"] == "hot (hit)"

    assert decoded_size(browser, "result") == (SIDE_PX, SIDE_PX)
    shot = screenshot(browser, shots / "playground.png")
    assert not_blank(shot)
    assert not_blank(element_pixels(browser, shot, "result"))

    # The same request over plain HTTP gives the same seed's image the page showed.
    body = {"prompt": "a watercolor fox in a forest", "width": SIDE_PX, "height": SIDE_PX}
    body |= {"steps": 2, "seed": 7, "loras": [{"name": "character-a.safetensors", "strength": 0.8}]}
    direct = service.post("/flux", json=body)
    assert direct.status_code == 200, direct.text
    shown = np.array(
        browser.execute_script(
            "const img = document.getElementById('result');"
            "const canvas = Object.assign(document.createElement('canvas'),"
            "  {width: img.naturalWidth, height: img.naturalHeight});"
            "const context = canvas.getContext('2d');"
            "context.drawImage(img, 0, 0);"
            "const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;"
            "return Array.from(rgba);"
        ),
        dtype=np.int16,
    ).reshape(SIDE_PX, SIDE_PX, 4)[..., :3]
    assert np.abs(shown - pixels(direct)).max() <= 1  # as the browser decoded it


@pytest.mark.slow  # a training run, about a minute on two cores
def test_training_page_trains_and_shows_loss_and_samples(
    service, ray_cluster, browser, shots, tmp_path
):
    images = write_dataset(tmp_path / "shapes", count=4, size=SIDE_PX, captions=True)
    browser.get(f"{ray_cluster}/playground/train")
    wait_for(
        browser, "document.getElementById('base-model').options.length", PAGE_TIMEOUT_S, "models"
    )
    fields = {
        "dataset-name": "browser-shapes",
        "trigger-word": "ohwx",
        "character-id": "browser-test",
        "max-steps": "4",
        "rank": "4",
        "resolution": str(SIDE_PX),
        "sample-prompt": "ohwx, a circle on grey",
        "extra-config": '{"alpha": 4, "learning_rate": 0.01, "num_workers": 1, "save_every": 2}',
    }
    for field, value in fields.items():
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    files = sorted(str(path) for path in images.iterdir())
    browser.find_element(By.ID, "dataset-files").send_keys("\n".join(files))
    browser.find_element(By.ID, "upload").click()
    assert "4 images" in wait_for_status(browser, PAGE_TIMEOUT_S, states=("uploaded",))
    captions = {
        item["caption"] for item in service.get("/datasets/browser-shapes").json()["images"]
    }
    assert captions == {"a circle on grey", "a square on grey"}  # from the .txt files

    Select(browser.find_element(By.ID, "base-model")).select_by_value("flux")
    started = time.monotonic()
    browser.find_element(By.ID, "start").click()
    status = wait_for_status(browser, TRAIN_TIMEOUT_S)
    print(f"\ntraining page: start -> SUCCEEDED in {time.monotonic() - started:.1f} s")
    assert "SUCCEEDED" in status
    wait_for(browser, "document.querySelectorAll('#samples img').length", PAGE_TIMEOUT_S, "samples")
    wait_for(browser, "document.getElementById('loss').naturalWidth", PAGE_TIMEOUT_S, "loss plot")
    progress = {
        row.get_attribute("data-field"): row.find_element(By.TAG_NAME, "td").text
        for row in browser.find_elements(By.CSS_SELECTOR, "#progress tr")
    }
    assert progress["step"] == progress["total_steps"] == "4"
    assert progress["output_lora"] == "character-browser-test.safetensors"
    sample_width = browser.execute_script(
        "return document.querySelector('#samples img').naturalWidth"
    )
    assert sample_width > 0
    shot = screenshot(browser, shots / "train.png")
    assert not_blank(shot)
    assert not_blank(element_pixels(browser, shot, "loss"))


@pytest.mark.slow  # an app of its own, with API keys, under a route prefix
def test_playground_sends_the_typed_key(ray_cluster, lora_root, browser, tmp_path):
    keys = [{"key": "gen-only-key", "scopes": ["generate"]}]
    with keyed_app(ray_cluster, lora_root, tmp_path, "browserkeys", keys) as client:
        assert client.get("/playground/models").status_code == 401
        browser.get(f"{ray_cluster}/browserkeys/playground")  # public: the page itself
        assert "401 unauthorized" in wait_for_status(browser, PAGE_TIMEOUT_S, states=("error",))

        browser.find_element(By.ID, "api-key").send_keys("gen-only-key")
        browser.refresh()  # the key outlives a reload: sessionStorage
        assert browser.find_element(By.ID, "api-key").get_attribute("value") == "gen-only-key"
        wait_for(
            browser, "document.getElementById('model').options.length", PAGE_TIMEOUT_S, "models"
        )
        note = browser.find_element(By.ID, "loras-note")
        wait_for(
            browser, "document.getElementById('loras-note').textContent", PAGE_TIMEOUT_S, "note"
        )
        assert "403 forbidden" in note.text and "loras:read" in note.text
        for field, value in (("width", SIDE_PX), ("height", SIDE_PX), ("steps", 2)):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(str(value))
        assert _generate(browser)["X-Model"] == "flux"
        assert decoded_size(browser, "result") == (SIDE_PX, SIDE_PX)
