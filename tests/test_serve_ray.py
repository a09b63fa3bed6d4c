"""`dite serve --ray`: the app as Ray Serve replicas on a local Ray instance (2 CPUs)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="dite serve needs the serve extra (fastapi, uvicorn)")
ray = pytest.importorskip("ray", reason="Ray Serve replicas need the ray extra: pip install 'dite[ray]'")
httpx = pytest.importorskip("httpx", reason="the serve tests talk HTTP with httpx (test extra)")

from dite.engine.serve.app import ServeOptions  # noqa: E402
from dite.engine.serve.server import free_port  # noqa: E402
from tiny_serve import library_image, png_array, png_parameters  # noqa: E402


@pytest.mark.slow  # starting a Ray instance and two replicas: about 30 s on 2 busy cores
def test_two_replicas_serve_the_library_images():
    from ray import serve

    from dite.engine import load
    from dite.engine.serve.ray_app import application

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = application({"source": "demo-sd3", "device": "cpu"}, ServeOptions(max_batch=4, batch_wait_ms=10),
                          "demo-sd3", replicas=2)
        serve.run(app, name="dite", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        pids = set()
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline:  # the proxy spreads requests over replicas
            pids.add(httpx.get(url + "/health", timeout=30).json()["pid"])
        assert len(pids) == 2
        pipe = load("demo-sd3")
        for seed in (3, 4):
            response = httpx.post(url + "/v1/images/generations", timeout=120,
                                  json={"prompt": "a green circle", "steps": 3, "seed": seed})
            assert response.status_code == 200
            b64 = response.json()["data"][0]["b64_json"]
            assert png_parameters(b64)["seed"] == seed
            assert (png_array(b64) == library_image(pipe, prompt="a green circle", seed=seed,
                                                    num_inference_steps=3)).all()
        # an edit (multipart) through the proxy: the library's img2img call
        init = pipe(prompt="a blue square", num_inference_steps=3, seed=1, progress=False).images[0]
        buffer = io.BytesIO()
        init.save(buffer, format="PNG")
        response = httpx.post(url + "/v1/images/edits", timeout=120,
                              files={"image": ("init.png", buffer.getvalue(), "image/png")},
                              data={"prompt": "a green circle", "steps": "4", "seed": "6", "strength": "0.5"})
        assert response.status_code == 200, response.text
        expected = pipe(prompt="a green circle", image=init, strength=0.5, seed=6, num_inference_steps=4,
                        progress=False).images[0]
        assert (png_array(response.json()["data"][0]["b64_json"]) == np.asarray(expected.convert("RGB"))).all()
        bad = httpx.post(url + "/v1/images/generations", json={"prompt": "x", "steps": 0}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "steps"
    finally:
        serve.shutdown()
        ray.shutdown()
