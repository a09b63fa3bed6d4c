"""The web page at `/` in a real headless browser (Chromium through selenium): it loads, and
a prompt submitted shows the server's image with its settings."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("fastapi", reason="dite serve needs the serve extra (fastapi, uvicorn)")

from dite.engine.serve.app import ServeOptions, create_app  # noqa: E402
from dite.engine.serve.server import running  # noqa: E402
from tiny_serve import library_image, png_array  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _browser() -> tuple[str, str] | None:
    binary = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def pipe():
    from dite.engine import load

    return load("demo-sd3")


@pytest.fixture
def browser():
    found = _browser()
    if found is None:
        pytest.skip("no Chromium and chromedriver on this machine (Debian: apt-get install chromium "
                    "chromium-driver); the page test needs a real browser")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_submits_a_prompt_and_shows_the_image(browser, pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(create_app(pipe, "demo-sd3", ServeOptions())) as url:
        browser.get(url + "/")
        assert "dite serve" in browser.title
        assert browser.find_element(By.ID, "model").text == "demo-sd3"
        browser.find_element(By.ID, "prompt").send_keys("a blue square in the middle")
        browser.find_element(By.ID, "steps").send_keys("3")
        browser.find_element(By.ID, "seed").send_keys("12")
        browser.find_element(By.ID, "generate").click()
        images = WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.result"))
        assert browser.find_element(By.ID, "error").text == ""
        image = images[0]
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) == 64
        caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
        assert "3 steps" in caption and "seed 12" in caption and "64x64" in caption and "denoise" in caption
        shown = png_array(image.get_attribute("src").split(",", 1)[1])
        assert (shown == library_image(pipe, prompt="a blue square in the middle", seed=12,
                                       num_inference_steps=3)).all()


def test_page_shows_a_request_error(browser, pipe):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with running(create_app(pipe, "demo-sd3", ServeOptions())) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "prompt").send_keys("a red circle")
        browser.find_element(By.ID, "size").send_keys("30x30")
        browser.find_element(By.ID, "generate").click()
        error = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "error").text)
        assert "size 30x30" in error and "multiple of 16" in error


def test_page_edits_an_uploaded_image_with_a_mask(browser, pipe, tmp_path):
    """An init image and a mask chosen in the form go to /v1/images/edits: the page shows the
    library's inpainting result of the same settings."""
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    init = pipe(prompt="a blue square in the middle", num_inference_steps=3, seed=1, progress=False).images[0]
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :32] = 255  # repaint the left half
    init.save(tmp_path / "init.png")
    Image.fromarray(mask, mode="L").save(tmp_path / "mask.png")
    with running(create_app(pipe, "demo-sd3", ServeOptions())) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "prompt").send_keys("a red circle on the left")
        browser.find_element(By.ID, "steps").send_keys("4")
        browser.find_element(By.ID, "seed").send_keys("5")
        browser.find_element(By.ID, "strength").send_keys("0.75")
        browser.find_element(By.ID, "image").send_keys(str(tmp_path / "init.png"))
        browser.find_element(By.ID, "mask").send_keys(str(tmp_path / "mask.png"))
        browser.find_element(By.ID, "generate").click()
        images = WebDriverWait(browser, 120).until(lambda b: b.find_elements(By.CSS_SELECTOR, "img.result"))
        assert browser.find_element(By.ID, "error").text == ""
        caption = browser.find_element(By.CSS_SELECTOR, "#results figcaption").text
        assert "strength 0.75" in caption and "inpainted" in caption
        shown = png_array(images[0].get_attribute("src").split(",", 1)[1])
    expected = pipe(prompt="a red circle on the left", image=Image.open(tmp_path / "init.png"),
                    mask_image=Image.open(tmp_path / "mask.png"), strength=0.75, seed=5, num_inference_steps=4,
                    progress=False).images[0]
    assert (shown == np.asarray(expected.convert("RGB"))).all()
