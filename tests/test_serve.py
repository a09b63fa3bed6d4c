"""`dite serve`: real servers on free loopback ports, spoken to over HTTP.

Each server runs in a thread of this process (engine/serve/server.running) over a demo
pipeline loaded once per module, and is stopped when its `with` ends.
"""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi", reason="dite serve needs the serve extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serve tests talk HTTP with httpx (test extra)")

from dite.engine.serve.app import ServeOptions, create_app  # noqa: E402
from dite.engine.serve.server import free_port, running  # noqa: E402
from tiny_serve import library_image, max_diff, metric, png_array, png_parameters  # noqa: E402

GEN = "/v1/images/generations"
STEPS = 3  # enough to tell seeds apart; keeps each request near 0.1 s on 2 cores
SMALL = "32x32"  # a quarter of the demo's tokens, where the size does not matter to the check


@pytest.fixture(scope="module")
def sd3_pipe():
    from dite.engine import load

    return load("demo-sd3")


def serve(pipe, name="demo-sd3", **options):
    return running(create_app(pipe, name, ServeOptions(**options)))


def post_all(url: str, bodies: list[dict], timeout: float = 120) -> list[httpx.Response]:
    """The bodies posted at once, from one thread each."""
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(httpx.post, url + GEN, json=body, timeout=timeout) for body in bodies]
        return [f.result() for f in futures]


def wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_openai_client_images_generate_matches_library(sd3_pipe):
    openai = pytest.importorskip("openai", reason="the official openai client is in the test extra")
    with serve(sd3_pipe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        result = client.images.generate(model="demo-sd3", prompt="a red circle on the left", n=2, size="64x64",
                                        response_format="b64_json", extra_body={"steps": STEPS, "seed": 7})
        assert result.created > 0 and len(result.data) == 2
        expected = sd3_pipe(prompt="a red circle on the left", num_images_per_prompt=2, num_inference_steps=STEPS,
                            seed=7, progress=False)
        for k, item in enumerate(result.data):
            # Alone, the request is the library call itself: the same pixels, bit for bit.
            assert (png_array(item.b64_json) == png_array_of(expected.images[k])).all()
            params = png_parameters(item.b64_json)
            assert params["seed"] == 7 + k and params["latents"] == "seeded"
            assert params["prompt"] == "a red circle on the left" and params["steps"] == STEPS
            assert params == {**expected.parameters[k], "dite_version": params["dite_version"]}
        by_url = client.images.generate(prompt="a red circle on the left", response_format="url",
                                        extra_body={"steps": STEPS, "seed": 7})
        png = httpx.get(by_url.data[0].url).content
        alone = library_image(sd3_pipe, prompt="a red circle on the left", seed=7, num_inference_steps=STEPS)
        assert (png_array(png) == alone).all()
        assert httpx.get(url + "/v1/images/files/nothing.png").status_code == 404
        models = client.models.list()
        assert [m.id for m in models.data] == ["demo-sd3"]
        assert httpx.get(url + "/health").json()["status"] == "ok"


def png_array_of(image):
    import numpy as np

    return np.asarray(image.convert("RGB"))


def test_compatible_requests_batch_and_each_image_is_its_own(sd3_pipe):
    bodies = [{"prompt": p, "seed": s, "steps": STEPS, "size": SMALL}
              for p, s in (("a red circle", 1), ("a blue square", 20), ("a green triangle", 300), ("a red circle", 2))]
    with serve(sd3_pipe, max_batch=4, batch_wait_ms=5000) as url:
        responses = post_all(url, bodies)
        text = httpx.get(url + "/metrics").text
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["dite"]["batch_images"] for r in responses] == [4] * 4
    assert metric(text, "dite_batches_total") == 1 and metric(text, "dite_images_total") == 4
    for body, response in zip(bodies, responses):
        item = response.json()["data"][0]
        assert item["seed"] == body["seed"]
        alone = library_image(sd3_pipe, prompt=body["prompt"], seed=body["seed"], num_inference_steps=STEPS,
                              height=32, width=32)
        assert max_diff(png_array(item["b64_json"]), alone) <= 1  # README: batches agree to 1/255


def test_incompatible_requests_run_apart(sd3_pipe):
    bodies = [{"prompt": "a red circle", "seed": 1, "steps": STEPS},
              {"prompt": "a red circle", "seed": 1, "steps": STEPS + 1},
              {"prompt": "a red circle", "seed": 1, "steps": STEPS, "size": SMALL}]
    with serve(sd3_pipe, max_batch=8, batch_wait_ms=300) as url:
        responses = post_all(url, bodies)
    assert [r.json()["dite"]["batch_images"] for r in responses] == [1, 1, 1]


@pytest.fixture(scope="module")
def dit_ddpm():
    from dite.engine import load

    return load("demo-dit", scheduler="ddpm")


def test_stochastic_scheduler_batches_exactly(dit_ddpm):
    """DDPM adds noise at every step: a batched image must draw it from its own seed."""
    pipe = dit_ddpm
    bodies = [{"class_label": label, "seed": seed, "steps": 4, "size": SMALL}
              for label, seed in ((3, 11), ("red square", 500), (16, 12))]
    with serve(pipe, name="demo-dit", max_batch=3, batch_wait_ms=5000) as url:
        responses = post_all(url, bodies)
    assert [r.json()["dite"]["batch_images"] for r in responses] == [3, 3, 3]
    for body, response in zip(bodies, responses):
        alone = library_image(pipe, class_labels=[body["class_label"]], seed=body["seed"], num_inference_steps=4,
                              height=32, width=32)
        assert max_diff(png_array(response.json()["data"][0]["b64_json"]), alone) <= 1


BAD_BODIES = [
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": "many"}, "steps"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "guidance": 0.5}, "guidance"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "size": "30x30"}, "size"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "accel": "warp"}, "accel"),
    ({"prompt": "x", "accel": "tuned(file=/etc/passwd)"}, "accel"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "quality": "hd"}, "quality"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "class_label": 3}, "class_label"),
    ({"prompt": "  "}, "prompt"),
    ({}, "prompt"),
]


def test_dit_bodies_and_a_size_beyond_ram_are_400(dit_ddpm):
    with serve(dit_ddpm, name="demo-dit") as url:
        for body, field, words in (({"class_label": 3, "size": "16384x16384"}, "size", "GiB"),
                                   ({"class_label": 100000}, "class_label", "out of range"),
                                   ({"class_label": True}, "class_label", "valid integer"),
                                   ({"class_label": 3, "guidance": "4"}, "guidance", "valid number"),
                                   ({"prompt": "golden retriever"}, "prompt", "unknown class name"),
                                   ({"class_label": 3, "negative_prompt": "x"}, "negative_prompt", "class"),
                                   ({}, "class_label", "required")):
            response = httpx.post(url + GEN, json=body, timeout=30)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == field and words in error["message"], (body, error)
        by_name = httpx.post(url + GEN, json={"prompt": "cyan circle", "steps": 2, "size": SMALL}, timeout=60)
        assert png_parameters(by_name.json()["data"][0]["b64_json"])["class_label"] == 3


def test_bad_bodies_are_400_naming_the_field(sd3_pipe):
    with serve(sd3_pipe) as url:
        for body, field in BAD_BODIES:
            response = httpx.post(url + GEN, json=body, timeout=30)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == field and error["type"] == "invalid_request_error", (body, error)
            assert field in error["message"] or field == "model" or field == "accel", error
        not_json = httpx.post(url + GEN, content=b"{not json", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
        text = httpx.get(url + "/metrics").text
    assert metric(text, "dite_requests_total", status="400") == len(BAD_BODIES) + 1
    assert metric(text, "dite_batches_total") == 0  # nothing bad reached the pipeline


def test_full_queue_429_and_timeout_504_cancels_the_work(sd3_pipe):
    long = {"prompt": "a red circle", "steps": 1000, "seed": 0}  # minutes, unless cancelled
    with serve(sd3_pipe, max_batch=1, max_queue=1, timeout_s=5) as url:
        with cf.ThreadPoolExecutor(2) as pool:
            running_one = pool.submit(httpx.post, url + GEN, json=long, timeout=120)
            wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_queue_seconds_count") == 1)
            queued_one = pool.submit(httpx.post, url + GEN, json=long, timeout=120)
            wait_for(lambda: httpx.get(url + "/health").json()["queue"] == 1)
            refused = httpx.post(url + GEN, json=long, timeout=30)
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
            assert int(refused.headers["Retry-After"]) >= 1
            for future in (running_one, queued_one):
                response = future.result()
                assert response.status_code == 504 and "timeout" in response.json()["error"]["message"]
        # The running call stopped between steps (the queued one, started after it, stops
        # the same way, unless its time ran out while it was still queued).
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_batches_aborted_total") >= 1)
        small = httpx.post(url + GEN, json={"prompt": "a red circle", "steps": STEPS}, timeout=120)
        assert small.status_code == 200
        text = httpx.get(url + "/metrics").text
    assert metric(text, "dite_cancelled_total", reason="timeout") == 2
    assert metric(text, "dite_batches_total") == metric(text, "dite_batches_aborted_total") + 1
    assert metric(text, "dite_images_total") == 1
    assert metric(text, "dite_requests_total", status="504") == 2
    assert metric(text, "dite_requests_total", status="429") == 1


def test_disconnected_clients_work_is_dropped(sd3_pipe):
    long = {"prompt": "a red circle", "steps": 1000, "seed": 0}
    with serve(sd3_pipe, max_batch=1, timeout_s=300) as url:
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, url + GEN, json=long, timeout=3.0)
            wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_queue_seconds_count") == 1)
            second = pool.submit(httpx.post, url + GEN, json={**long, "steps": 999}, timeout=1.0)
            for future in (first, second):  # both clients give up and close their connections
                with pytest.raises(httpx.TimeoutException):
                    future.result()
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_cancelled_total", reason="disconnect") == 2)
        wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_batches_aborted_total") == 1)
        assert httpx.get(url + "/health").json()["queue"] == 0
        text = httpx.get(url + "/metrics").text
    assert metric(text, "dite_batches_total") == 1  # the queued request never ran
    assert metric(text, "dite_images_total") == 0


class FailsOnBoom:
    """The demo pipeline, but a call with a prompt containing "boom" fails (as a NaN or an
    out-of-memory would), to show a failure stays with its own request."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        if any("boom" in p for p in kwargs.get("prompt", [])):
            raise RuntimeError("boom")
        return self.pipe(**kwargs)


def test_an_error_reaches_only_its_own_request(sd3_pipe):
    bodies = [{"prompt": "a red circle", "seed": 4, "steps": STEPS, "size": SMALL},
              {"prompt": "boom", "seed": 5, "steps": STEPS, "size": SMALL},
              {"prompt": "a blue square", "seed": 6, "steps": STEPS, "size": SMALL}]
    with serve(FailsOnBoom(sd3_pipe), max_batch=3, batch_wait_ms=5000) as url:
        responses = post_all(url, bodies)
        text = httpx.get(url + "/metrics").text
    assert [r.status_code for r in responses] == [200, 500, 200]
    assert responses[1].json()["error"]["type"] == "server_error"
    for k in (0, 2):
        alone = library_image(sd3_pipe, prompt=bodies[k]["prompt"], seed=bodies[k]["seed"], num_inference_steps=STEPS,
                              height=32, width=32)
        assert max_diff(png_array(responses[k].json()["data"][0]["b64_json"]), alone) == 0  # re-run alone
    assert metric(text, "dite_errors_total", kind="RuntimeError") == 1


def test_metrics_are_prometheus_text(sd3_pipe):
    with serve(sd3_pipe) as url:
        assert httpx.post(url + GEN, json={"prompt": "a red circle", "steps": STEPS, "n": 2}).status_code == 200
        response = httpx.get(url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("dite_requests_total", "dite_queue_depth", "dite_batch_images", "dite_images_total",
                 "dite_errors_total", "dite_request_seconds", "dite_denoise_seconds"):
        assert f"# TYPE {name} " in text
    assert metric(text, "dite_images_total") == 2 and metric(text, "dite_batch_images_sum") == 2
    assert metric(text, "dite_request_seconds_count") == 1 and metric(text, "dite_denoise_seconds_sum") > 0
    assert metric(text, "dite_batch_images_bucket", le="2") == 1 and metric(text, "dite_batch_images_bucket",
                                                                             le="1") == 0


def test_cli_serve_end_to_end():
    """`dite serve` as a user starts it: a process, on a free loopback port, stopped at the end."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dite.engine.cli", "serve", "--model", "demo-sd3",
                                "--port", str(port), "--max-batch", "2", "--served-model-name", "shapes"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert process.poll() is None, process.stderr.read()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 120)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["shapes"]
        response = httpx.post(url + GEN, json={"model": "shapes", "prompt": "a red circle", "steps": STEPS,
                                               "seed": 3}, timeout=120)
        assert response.status_code == 200
        assert png_parameters(response.json()["data"][0]["b64_json"])["seed"] == 3
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("argv, words", [
    (["--replicas", "2"], "--replicas needs --ray"),
    (["--accel", "warp"], "unknown accel method"),
    (["--max-batch", "0"], "out of range"),
])
def test_cli_serve_bad_arguments_are_one_line(argv, words, capsys):
    from dite.engine.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_cli_serve_refuses_a_busy_port(capsys):
    import socket

    from dite.engine.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot listen on 127.0.0.1" in err and len(err.splitlines()) == 1


def test_cli_serve_without_the_extra_says_how_to_install(monkeypatch, capsys):
    import importlib.util

    from dite.engine.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dite: error: dite serve needs uvicorn: pip install 'dite[serve]'"


@pytest.mark.slow  # building the tiny PixArt (a T5 tokenizer trained first) takes most of it
def test_pixart_requests_batch_with_masks_and_their_own_images(tmp_path):
    """PixArt: T5 with a padding mask, so prompts of different lengths share a batch."""
    from dite.engine import load
    from tiny_pixart import tiny_pixart_pipeline

    _, folder = tiny_pixart_pipeline(tmp_path)
    pipe = load(folder)
    bodies = [{"prompt": "a cat", "seed": 1, "steps": 3, "size": "64x64"},
              {"prompt": "a very small red dog sitting on a chair", "seed": 2, "steps": 3, "size": "64x64",
               "negative_prompt": "blurry"}]
    with serve(pipe, name="tiny-pixart", max_batch=2, batch_wait_ms=5000) as url:
        responses = post_all(url, bodies)
    assert [r.json()["dite"]["batch_images"] for r in responses] == [2, 2]
    for body, response in zip(bodies, responses):
        alone = library_image(pipe, prompt=body["prompt"], negative_prompt=body.get("negative_prompt"),
                              seed=body["seed"], num_inference_steps=3, height=64, width=64)
        assert max_diff(png_array(response.json()["data"][0]["b64_json"]), alone) <= 1


def test_stopping_the_server_stops_a_running_batch(sd3_pipe):
    """A server stopped mid-generation stops the call before its next step, not at its end."""
    app = create_app(sd3_pipe, "demo-sd3", ServeOptions(timeout_s=600))
    pool = cf.ThreadPoolExecutor(1)
    try:
        with running(app) as url:
            pending = pool.submit(httpx.post, url + GEN, json={"prompt": "a red circle", "steps": 1000},
                                  timeout=300)
            wait_for(lambda: metric(httpx.get(url + "/metrics").text, "dite_queue_seconds_count") == 1)
        try:  # uvicorn answers 500 for a request it had to cancel, or closes the connection
            assert pending.result().status_code == 500
        except httpx.HTTPError:
            pass
    finally:
        pool.shutdown(wait=True)
    assert app.state.metrics.aborted.get() == 1 and app.state.metrics.images.get() == 0
    assert app.state.metrics.cancelled.get(reason="cancelled") == 1


def test_batched_acceleration_keeps_each_request_its_own(sd3_pipe):
    """Per-call caches and adaptive decisions are per row: a request's accelerated image does
    not depend on the requests it was batched with (runner level: no HTTP needed here).
    `adaptive` decides per sample at run time, the case most open to a neighbour's influence."""
    accel = "adaptive"
    import io

    import numpy as np
    from PIL import Image

    from dite.engine.serve.runner import run_together
    from dite.engine.serve.validation import Spec

    prompts = ("a red circle on the left", "a blue square in the middle")
    specs = [Spec(n=1, seed=10 + k, height=32, width=32, steps=6, guidance=5.0, accel=accel,
                  response_format="b64_json", prompt=prompt) for k, prompt in enumerate(prompts)]
    for spec, result in zip(specs, run_together(sd3_pipe, specs, lambda: False)):
        batched = np.asarray(Image.open(io.BytesIO(result.pngs[0])).convert("RGB"))
        alone = library_image(sd3_pipe, prompt=spec.prompt, seed=spec.seed, num_inference_steps=6,
                              guidance_scale=5.0, accel=accel, height=32, width=32)
        assert max_diff(batched, alone) <= 1
        assert result.parameters[0]["accel"] != "none"
