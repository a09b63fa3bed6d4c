"""`dite serve`: image edits (POST /v1/images/edits: img2img, inpainting), skip-layer guidance
on generations, LoRAs as server state. Real servers on free loopback ports (as
tests/test_serve.py), stopped when each `with` ends."""

from __future__ import annotations

import concurrent.futures as cf
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="dite serve needs the serve extra (fastapi, uvicorn)")
pytest.importorskip("python_multipart", reason="/v1/images/edits needs python-multipart (serve extra)")
httpx = pytest.importorskip("httpx", reason="the serve tests talk HTTP with httpx (test extra)")

from PIL import Image  # noqa: E402

from dite.engine.serve.app import ServeOptions, create_app  # noqa: E402
from dite.engine.serve.server import free_port, running  # noqa: E402
from tiny_serve import metric, png_array, png_parameters  # noqa: E402

GEN, EDIT = "/v1/images/generations", "/v1/images/edits"
STEPS = 4
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def sd3_pipe():
    from dite.engine import load

    return load("demo-sd3")


@pytest.fixture(scope="module")
def init_png(sd3_pipe) -> bytes:
    """A 64x64 demo image to edit (PNG bytes)."""
    image = sd3_pipe(prompt="a blue square in the middle", num_inference_steps=STEPS, seed=1, progress=False).images[0]
    return png(image)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_l() -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:, :32] = 255
    return Image.fromarray(pixels, mode="L")


def mask_openai() -> Image.Image:
    """The same region as OpenAI marks it: fully transparent where to edit."""
    rgba = np.full((64, 64, 4), 255, dtype=np.uint8)
    rgba[:, :32, 3] = 0
    return Image.fromarray(rgba, mode="RGBA")


def serve(pipe, name="demo-sd3", **options):
    return running(create_app(pipe, name, ServeOptions(**options)))


def edit(url, image: bytes, mask: bytes | None = None, timeout=120, **fields):
    files = {"image": ("init.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return httpx.post(url + EDIT, files=files, data={k: str(v) for k, v in fields.items()}, timeout=timeout)


def library(pipe, **kwargs) -> list[np.ndarray]:
    out = pipe(progress=False, **kwargs)
    return [np.asarray(image.convert("RGB")) for image in out.images], out.parameters


def test_openai_client_edit_is_the_library_img2img_call(sd3_pipe, init_png):
    openai = pytest.importorskip("openai", reason="the official openai client is in the test extra")
    with serve(sd3_pipe) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
        result = client.images.edit(image=("init.png", init_png, "image/png"), prompt=PROMPT, n=2,
                                    response_format="b64_json",
                                    extra_body={"strength": 0.5, "seed": 3, "steps": STEPS})
    expected, parameters = library(sd3_pipe, prompt=PROMPT, image=Image.open(io.BytesIO(init_png)), strength=0.5,
                                   seed=3, num_inference_steps=STEPS, num_images_per_prompt=2)
    assert len(result.data) == 2
    for k, item in enumerate(result.data):
        assert (png_array(item.b64_json) == expected[k]).all()  # alone: the library call itself, bit for bit
        params = png_parameters(item.b64_json)
        assert params["seed"] == 3 + k and params["strength"] == 0.5 and params["denoise_steps"] == 2
        assert params == {**parameters[k], "dite_version": params["dite_version"]}
    assert (png_array(result.data[0].b64_json) != png_array(init_png)).any()


@pytest.mark.parametrize("mask", [mask_l, mask_openai], ids=["white-repaints", "openai-transparent"])
def test_edit_with_a_mask_is_inpainting(sd3_pipe, init_png, mask):
    with serve(sd3_pipe) as url:
        response = edit(url, init_png, png(mask()), prompt=PROMPT, seed=5, steps=STEPS, strength=1.0, size="auto")
    assert response.status_code == 200, response.text
    expected, _ = library(sd3_pipe, prompt=PROMPT, image=Image.open(io.BytesIO(init_png)), mask_image=mask_l(),
                          strength=1.0, seed=5, num_inference_steps=STEPS)
    got = png_array(response.json()["data"][0]["b64_json"])
    assert (got == expected[0]).all()
    assert "mask" in png_parameters(response.json()["data"][0]["b64_json"])


def test_pixart_inpainting_through_the_server_is_the_library_call():
    """PixArt (DDPM-family scheduler, 128 px demo): a masked edit is the library's inpainting
    call bit for bit. (What inpainting keeps is tested on the library, in latents: in pixels the
    demo VAE's decoder mixes across the whole latent, so the kept half moves too.)"""
    from dite.engine import load

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from demo_scenes_v2 import sample_scenes

    pipe = load("demo-pixart")
    init = Image.fromarray(sample_scenes(1, 1)[0][0])
    keep_left = np.zeros((128, 128), dtype=np.uint8)
    keep_left[:, 64:] = 255  # repaint the right half
    mask = Image.fromarray(keep_left, mode="L")
    with serve(pipe, name="demo-pixart") as url:
        response = edit(url, png(init), png(mask), prompt=PROMPT, seed=5, steps=STEPS, strength=1.0)
    assert response.status_code == 200, response.text
    expected, _ = library(pipe, prompt=PROMPT, image=init, mask_image=mask, strength=1.0, seed=5,
                          num_inference_steps=STEPS)
    got = png_array(response.json()["data"][0]["b64_json"])
    assert got.shape == (128, 128, 3) and (got == expected[0]).all()
    assert "mask" in png_parameters(response.json()["data"][0]["b64_json"])
    # the kept (left) half's latents are the init image's, as image 0's generator draws them
    import torch

    out = pipe(prompt=PROMPT, image=init, mask_image=mask, strength=1.0, seed=5, num_inference_steps=STEPS,
               output_type="latent", progress=False)
    pixels = torch.from_numpy(np.asarray(init, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        clean = pipe.vae.to_model_space(pipe.vae.encode(pixels).sample(torch.Generator().manual_seed(5)))
    assert torch.equal(out.latents[..., :16], clean[..., :16])
    assert (out.latents[..., 16:] - clean[..., 16:]).abs().max() > 1e-2


def post_all(url, calls):
    with cf.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call, url) for call in calls]]


def test_edits_never_batch_with_other_requests(sd3_pipe, init_png):
    """Same size, steps and guidance: the text-to-image requests batch together, each edit
    (its own init image) runs alone."""
    gen = lambda seed: lambda url: httpx.post(url + GEN, json={"prompt": PROMPT, "seed": seed, "steps": STEPS},  # noqa
                                              timeout=120)
    one_edit = lambda url: edit(url, init_png, prompt=PROMPT, seed=1, steps=STEPS, strength=1.0)  # noqa: E731
    with serve(sd3_pipe, max_batch=8, batch_wait_ms=3000) as url:
        responses = post_all(url, [gen(1), one_edit, gen(2), one_edit])
        text = httpx.get(url + "/metrics").text
    assert [r.status_code for r in responses] == [200] * 4
    assert [r.json()["dite"]["batch_images"] for r in responses] == [2, 1, 2, 1]
    assert metric(text, "dite_batches_total") == 3
    # strength 1.0 on flow matching is text-to-image from the same noise, yet the edits stayed apart.
    assert "init_image" in png_parameters(responses[1].json()["data"][0]["b64_json"])


BAD_EDITS = [
    (dict(image=None), "image", "uploaded image file"),
    (dict(image=b"not a png"), "image", "not a readable image"),
    (dict(image=png(Image.new("1", (8192, 2049)))), "image", "more than this server decodes"),
    (dict(size="32x32"), "size", "differs from the init image"),
    (dict(strength="0"), "strength", "strength must be a number in (0, 1]"),
    (dict(strength="strong"), "strength", "not a number"),
    (dict(steps="2.5"), "steps", "not an integer"),
    (dict(mask=png(mask_l().resize((32, 32)))), "mask", "same size"),
    (dict(mask=png(Image.new("I;16", (64, 64)))), "mask", "black-and-white"),
    (dict(prompt=""), "prompt", "required"),
    (dict(quality="hd"), "quality", "unknown field"),
    (dict(lora="style.safetensors"), "lora", "cannot choose LoRAs"),
    (dict(skip_guidance_layers="x"), "skip_guidance_layers", "list of block indices"),
    (dict(model="dall-e-2"), "model", "not served here"),
]


def test_bad_edits_are_400_naming_the_field(sd3_pipe, init_png, monkeypatch):
    from dite.engine.serve import edits

    with serve(sd3_pipe) as url:
        for change, field, words in BAD_EDITS:
            fields = {"prompt": PROMPT, "steps": STEPS, **change}
            image, mask = fields.pop("image", init_png), fields.pop("mask", None)
            files = {} if image is None else {"image": ("init.png", image, "image/png")}
            if mask is not None:
                files["mask"] = ("mask.png", mask, "image/png")
            response = httpx.post(url + EDIT, files=files or None,
                                  data={k: str(v) for k, v in fields.items()}, timeout=30)
            assert response.status_code == 400, (change, response.text)
            error = response.json()["error"]
            assert error["param"] == field and words in error["message"], (change, error)
        odd = Image.new("RGB", (60, 64))
        response = edit(url, png(odd), prompt=PROMPT)
        assert response.json()["error"]["param"] == "image" and "60x64" in response.json()["error"]["message"]
        monkeypatch.setattr(edits, "MAX_IMAGE_BYTES", len(init_png) - 1)  # the server runs in this process
        too_big = edit(url, init_png, prompt=PROMPT)
        assert too_big.json()["error"]["param"] == "image" and "larger than" in too_big.json()["error"]["message"]
        monkeypatch.undo()
        as_json = httpx.post(url + EDIT, json={"prompt": PROMPT}, timeout=30)
        assert as_json.status_code == 400 and as_json.json()["error"]["param"] == "image"
        text = httpx.get(url + "/metrics").text
    assert metric(text, "dite_requests_total", status="400") == len(BAD_EDITS) + 3
    assert metric(text, "dite_batches_total") == 0  # nothing bad reached the pipeline


SLG = {"skip_guidance_layers": [4, 5], "skip_layer_guidance_scale": 2.0, "skip_layer_guidance_start": 0.0,
       "skip_layer_guidance_stop": 0.5}


def test_slg_on_generations_matches_the_library_and_batches_only_with_its_own(sd3_pipe):
    body = {"prompt": PROMPT, "steps": 6, "seed": 2, "size": "32x32"}
    with serve(sd3_pipe, max_batch=8, batch_wait_ms=3000) as url:
        responses = post_all(url, [lambda u: httpx.post(u + GEN, json={**body, **SLG}, timeout=120),
                                   lambda u: httpx.post(u + GEN, json={**body, **SLG, "seed": 9}, timeout=120),
                                   lambda u: httpx.post(u + GEN, json=body, timeout=120)])
    assert [r.json()["dite"]["batch_images"] for r in responses] == [2, 2, 1]
    alone, parameters = library(sd3_pipe, prompt=PROMPT, num_inference_steps=6, seed=2, height=32, width=32, **SLG)
    plain, _ = library(sd3_pipe, prompt=PROMPT, num_inference_steps=6, seed=2, height=32, width=32)
    got = png_array(responses[0].json()["data"][0]["b64_json"])
    assert np.abs(got.astype(int) - alone[0]).max() <= 1  # batched: README's 1/255
    assert np.abs(plain[0].astype(int) - alone[0]).max() > 10  # and SLG did change the image
    assert (png_array(responses[2].json()["data"][0]["b64_json"]) == plain[0]).all()
    params = png_parameters(responses[0].json()["data"][0]["b64_json"])
    assert params["skip_guidance_layers"] == [4, 5] and params["skip_layer_guidance_scale"] == 2.0


def test_slg_and_lora_fields_refused_clearly(sd3_pipe):
    cases = [({"skip_guidance_layers": [99]}, "skip_guidance_layers", "not a block of this model"),
             ({"skip_guidance_layers": [1], "guidance": 1.0}, "guidance", "guided (CFG)"),
             ({"skip_layer_guidance_scale": 2.0}, "skip_layer_guidance_scale", "needs skip_guidance_layers"),
             ({"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.2},
              "skip_layer_guidance_start", "0 <= start < stop"),
             ({"skip_guidance_layers": [1, 1]}, "skip_guidance_layers", "twice"),
             ({"lora": "style.safetensors"}, "lora", "merged into the pipeline's weights"),
             ({"loras": [["a.safetensors", 1.0]]}, "loras", "dite serve --lora"),
             ({"strength": 0.5}, "strength", "/v1/images/edits")]
    with serve(sd3_pipe) as url:
        for change, field, words in cases:
            response = httpx.post(url + GEN, json={"prompt": PROMPT, **change}, timeout=30)
            assert response.status_code == 400, (change, response.text)
            error = response.json()["error"]
            assert error["param"] == field and words in error["message"], (change, error)


def test_slg_and_mask_refused_for_dit():
    from dite.engine import load

    with serve(load("demo-dit"), name="demo-dit") as url:
        slg = httpx.post(url + GEN, json={"class_label": 3, "skip_guidance_layers": [1]}, timeout=30)
        gray = png(Image.new("RGB", (64, 64), (128, 128, 128)))
        masked = edit(url, gray, png(mask_l()), class_label=3, steps=2)
        ok = edit(url, gray, class_label=3, steps=2, seed=4)
    assert slg.status_code == 400 and slg.json()["error"]["param"] == "skip_guidance_layers"
    assert "for SD3 models" in slg.json()["error"]["message"]
    assert masked.status_code == 400 and masked.json()["error"]["param"] == "mask"
    assert ok.status_code == 200 and png_parameters(ok.json()["data"][0]["b64_json"])["class_label"] == 3


@pytest.fixture(scope="module")
def demo_lora(sd3_pipe, tmp_path_factory):
    """A random rank-2 LoRA on two attention projections of the demo SD3, diffusers keys."""
    import torch
    from safetensors.torch import save_file

    from dite.engine.lora.targets import module_targets

    targets = module_targets(sd3_pipe)
    params = dict(sd3_pipe.transformer.named_parameters())
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.3.attn.to_v"):
        target = targets[module]
        out_dim, in_dim = target.source.unbuild(params[target.param].detach())[target.index].shape
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(2, in_dim, generator=generator) * 0.5
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_dim, 2, generator=generator) * 0.5
    path = tmp_path_factory.mktemp("serve-lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path


def test_server_lora_is_listed_and_applied(demo_lora):
    from dite.engine import load

    pipe = load("demo-sd3", loras=[(demo_lora, 0.5)])
    with serve(pipe) as url:
        models = httpx.get(url + "/v1/models").json()["data"][0]
        health = httpx.get(url + "/health").json()
        response = httpx.post(url + GEN, json={"prompt": PROMPT, "seed": 4, "steps": STEPS}, timeout=120)
    listed = [{"file": "style.safetensors", "sha256": models["loras"][0]["sha256"], "scale": 0.5}]
    assert models["loras"] == listed and health["loras"] == listed
    expected, _ = library(pipe, prompt=PROMPT, seed=4, num_inference_steps=STEPS)
    assert (png_array(response.json()["data"][0]["b64_json"]) == expected[0]).all()
    assert png_parameters(response.json()["data"][0]["b64_json"])["loras"] == listed


def test_cli_serve_lora_end_to_end(demo_lora, sd3_pipe):
    """`dite serve --lora PATH:SCALE`: merged at start-up, reported by /v1/models."""
    import time

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dite.engine.cli", "serve", "--model", "demo-sd3",
                                "--port", str(port), "--lora", f"{demo_lora}:0.5"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "dite serve did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        models = httpx.get(url + "/v1/models").json()["data"][0]
        assert [(m["file"], m["scale"]) for m in models["loras"]] == [("style.safetensors", 0.5)]
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("spec, words", [("{missing}", "does not exist"), ("{lora}:nan", "not a finite")])
def test_cli_serve_refuses_a_bad_lora_before_loading(demo_lora, tmp_path, capsys, spec, words):
    from dite.engine.cli import main

    arg = spec.format(missing=tmp_path / "missing.safetensors", lora=demo_lora)
    assert main(["serve", "--port", str(free_port()), "--lora", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
