"""LoRA (engine/lora, docs/lora.md): parity with diffusers' load_lora_weights on the tiny SD3,
the same weights in kohya key style, exact unload, refusals, metadata."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dite.engine import load
from dite.engine.lora import LoraError
from tiny_lora import PROMPTS, dite_lora_call as ours
from tiny_lora import diffusers_lora_images as expected_with_lora
from tiny_sd3 import reference_images

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "norm1.linear", "norm1_context.linear"]


@pytest.fixture(scope="module")
def lora_file(sd3, tmp_path_factory):
    """A rank-4, alpha-8 LoRA made with peft on the tiny SD3 transformer, saved by diffusers."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference, _ = sd3
    transformer = copy.deepcopy(reference.transformer)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=True)
    transformer.add_adapter(config)
    torch.manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                               transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(path, out, alpha=8.0):
    """The test's own converter: transformer.<module>.lora_A/B -> lora_unet_<module_>.lora_down/up + alpha."""
    kohya = {}
    for key, tensor in load_file(str(path)).items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = tensor
        kohya[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(kohya, str(out))
    return out


def test_lora_matches_diffusers_and_kohya(sd3, lora_file, tmp_path):
    from dite.engine.lora import read_lora

    reference, folder = sd3
    # alpha 8 with rank 4 (scale 2) comes from the adapter config diffusers wrote into the file.
    assert {pair.alpha for pair in read_lora(lora_file).pairs.values()} == {8.0}
    expected, latents = expected_with_lora(reference, lora_file)
    plain, _ = reference_images(reference, PROMPTS, None, 3, 1.0, (16, 16), seed=5, max_sequence_length=16)
    assert np.abs(expected - plain).max() > 1e-2  # the LoRA changes the images
    out = ours(load(folder, loras=[(lora_file, 1.0)]), latents)
    assert np.abs(out.images - expected).max() <= 1e-4
    kohya = to_kohya(lora_file, tmp_path / "kohya.safetensors")
    assert np.abs(ours(load(folder, loras=[(kohya, 1.0)]), latents).images - expected).max() <= 1e-4
    record = out.parameters[0]["loras"]
    assert record == [{"file": lora_file.name, "sha256": record[0]["sha256"], "scale": 1.0}]
    assert len(record[0]["sha256"]) == 10 and str(lora_file.parent) not in json.dumps(out.parameters)


def test_scale_and_unload_restore_bit_for_bit(sd3, lora_file, tmp_path):
    _, folder = sd3
    pipe = load(folder, dtype="float16")
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    kohya = to_kohya(lora_file, tmp_path / "kohya.safetensors")
    pipe.load_lora(lora_file, 0.5)
    pipe.load_lora(kohya, -0.7, name="second")
    changed = [n for n, p in pipe.transformer.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 10
    pipe.unload_lora("second")
    pipe.unload_lora(lora_file.stem)
    for n, p in pipe.transformer.named_parameters():
        assert torch.equal(p, before[n]), n
    assert pipe._lora_state.originals == {}


def test_refusals(sd3, lora_file, tmp_path):
    _, folder = sd3
    pipe = load(folder)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    tensors = load_file(str(lora_file))
    cases = {}
    cases["unknown"] = {**tensors, "transformer.not_a_block.proj.lora_A.weight": torch.ones(4, 8),
                        "transformer.not_a_block.proj.lora_B.weight": torch.ones(8, 4)}
    key_a = next(k for k in tensors if k.endswith("to_q.lora_A.weight"))
    cases["shape"] = {**tensors, key_a: torch.ones(4, tensors[key_a].shape[1] + 3)}
    key_b = key_a.replace("lora_A", "lora_B")
    cases["rank"] = {**tensors, key_b: torch.ones(tensors[key_b].shape[0], 5)}
    cases["junk"] = {**tensors, "something.else": torch.ones(1)}
    messages = {"unknown": "does not have .*not_a_block", "shape": r"to_q is \(\d+, \d+\) in this model",
                "rank": "rank 4 .* but 5", "junk": "something.else"}
    for case, content in cases.items():
        path = tmp_path / f"{case}.safetensors"
        save_file(content, str(path))
        with pytest.raises(LoraError, match=messages[case]):
            pipe.load_lora(path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="cannot read LoRA file"):
        pipe.load_lora(bad)
    with pytest.raises(LoraError, match="does not exist"):
        load(folder, loras=[(tmp_path / "missing.safetensors", 1.0)])
    for scale in (float("nan"), float("inf"), "x"):
        with pytest.raises(LoraError, match="scale"):
            pipe.load_lora(lora_file, scale)
    with pytest.raises(LoraError, match="no LoRA named"):
        pipe.unload_lora("nothing")
    for n, p in pipe.transformer.named_parameters():
        assert torch.equal(p, before[n]), n


def test_refused_while_a_call_runs(sd3, lora_file):
    _, folder = sd3
    pipe = load(folder)
    seen = []

    def hook(i, model_in, t, cond, plan, state):  # runs inside the call, before each step
        if not seen:
            with pytest.raises(LoraError, match="while 1 generation call"):
                pipe.load_lora(lora_file)
            seen.append(True)
        return plan

    pipe(prompt="a", height=16, width=16, num_inference_steps=2, max_sequence_length=8, output_type="latent",
         progress=False, plan_hook=hook)
    assert seen and pipe._lora_state.running == 0
    pipe.load_lora(lora_file)  # allowed again after the call


def test_cli_lora_records_file_hash_and_scale(sd3, lora_file, tmp_path):
    import hashlib

    from PIL import Image

    from dite.engine.cli import main

    _, folder = sd3
    out = tmp_path / "lora.png"
    assert main(["generate", "--model", str(folder), "a boat", "--lora", f"{lora_file}:0.75", "--steps", "2",
                 "--seed", "2", "--size", "16x16", "-o", str(out), "--quiet"]) == 0
    params = json.loads(Image.open(out).text["dite"])
    digest = hashlib.sha256(lora_file.read_bytes()).hexdigest()[:10]
    assert params["loras"] == [{"file": lora_file.name, "sha256": digest, "scale": 0.75}]
    # The same call through the library gives the same image.
    lib = load(folder, loras=[(lora_file, 0.75)])(prompt="a boat", height=16, width=16, num_inference_steps=2,
                                                   seed=2, output_type="np", progress=False)
    assert np.abs(np.asarray(Image.open(out), dtype=np.float32) / 255 - lib.images[0]).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("spec, message", [("{missing}", "does not exist"), ("{lora}:nan", "not a finite"),
                                           ("{lora}:inf", "not a finite"), ("{bad}:1", "cannot read LoRA file")])
def test_cli_refuses_bad_loras_before_loading(lora_file, tmp_path, capsys, spec, message):
    from dite.engine.cli import main

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    out = tmp_path / "x.png"
    arg = spec.format(missing=tmp_path / "missing.safetensors", lora=lora_file, bad=bad)
    # One line, exit 2, no image: the LoRA is checked with the other inputs, before the model loads.
    assert main(["generate", "--model", "demo-sd3", "a cat", "--lora", arg, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    from tiny_pixart import tiny_pixart_pipeline

    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart-lora"))


def test_pixart_lora_matches_peft_on_diffusers(pixart, tmp_path):
    """diffusers has no PixArt LoRA loader: the reference is its PixArt transformer with the
    LoRA injected by peft (unmerged: base + scale * B(A(x)) in every forward)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from tiny_pixart import reference_images as pixart_images

    reference, folder = pixart
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                           "ff.net.2", "proj_out", "linear"])
    base = reference.transformer
    adapted = inject_adapter_in_model(config, copy.deepcopy(base))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    path = tmp_path / "pixart_lora.safetensors"
    state = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(adapted).items()}
    save_file(state, str(path), metadata={"lora_adapter_metadata": json.dumps({"lora_alpha": 2, "r": 4})})
    kwargs = dict(height=16, width=16, use_resolution_binning=False, max_sequence_length=16)
    plain, latents = pixart_images(reference, ["a cat", "a dog"], "", 3, 4.5, (16, 16), seed=1, factor=2, **kwargs)
    reference.transformer = adapted
    try:
        expected, _ = pixart_images(reference, ["a cat", "a dog"], "", 3, 4.5, (16, 16), seed=1, factor=2, **kwargs)
    finally:
        reference.transformer = base
    assert np.abs(expected - plain).max() > 1e-2
    for lora in (path, to_kohya(path, tmp_path / "kohya.safetensors", alpha=2.0)):
        out = load(folder, loras=[(lora, 1.0)])(prompt=["a cat", "a dog"], negative_prompt="", num_inference_steps=3,
                                                guidance_scale=4.5, latents=latents.clone(), output_type="np",
                                                progress=False, **kwargs)
        assert np.abs(out.images - expected).max() <= 1e-4, lora.name


def test_lora_merged_model_runs_with_accel_and_new_fingerprint(sd3, lora_file):
    _, folder = sd3
    pipe = load(folder)
    plain_id = pipe.model_id
    pipe.load_lora(lora_file)
    assert pipe.model_id != plain_id  # calibrated plans are tied to the merged weights
    kw = dict(prompt="a dog", height=16, width=16, num_inference_steps=6, max_sequence_length=16, seed=1,
              output_type="latent", progress=False)
    fast = pipe(accel="ditcache+promptgate", **kw)
    counts = [(s["rows"], s["blocks"]) for s in fast.stats["steps"]]
    assert len(counts) == 6 and any(rows == 1 for rows, _ in counts)  # promptgate dropped rows
    assert torch.isfinite(fast.latents).all() and not torch.equal(fast.latents, pipe(**kw).latents)
    pipe.unload_lora()
    assert pipe.model_id == plain_id
    unmerged = pipe(accel="ditcache+promptgate", **kw)
    assert [(s["rows"], s["blocks"]) for s in unmerged.stats["steps"]] == counts  # the same plans
    assert not torch.equal(unmerged.latents, fast.latents)


def test_kohya_original_names_fused_qkv(sd3, lora_file, tmp_path):
    """sd-scripts names SD3 modules as the original release does (`joint_blocks_0_x_block_attn_qkv`,
    one fused qkv linear): the q, k, v LoRAs of the same weights as one rank-12 LoRA on the fused
    weight (down stacked, up block-diagonal, alpha scaled with the rank) give the same images."""
    reference, folder = sd3
    tensors = load_file(str(to_kohya(lora_file, tmp_path / "kohya.safetensors")))
    fused = {}
    for i in range(3):
        stems = [f"lora_unet_transformer_blocks_{i}_attn_to_{x}" for x in "qkv"]
        downs = [tensors.pop(f"{s}.lora_down.weight") for s in stems]
        ups = [tensors.pop(f"{s}.lora_up.weight") for s in stems]
        for s in stems:
            tensors.pop(f"{s}.alpha")
        stem = f"lora_unet_joint_blocks_{i}_x_block_attn_qkv"
        fused[f"{stem}.lora_down.weight"] = torch.cat(downs)
        fused[f"{stem}.lora_up.weight"] = torch.block_diag(*ups)
        fused[f"{stem}.alpha"] = torch.tensor(24.0)  # alpha / rank stays 8 / 4
    path = tmp_path / "kohya_original.safetensors"
    save_file({**tensors, **fused}, str(path))
    expected, latents = expected_with_lora(reference, lora_file)
    assert np.abs(ours(load(folder, loras=[(path, 1.0)]), latents).images - expected).max() <= 1e-4
