"""SD3 from Stability's original single files (docs/checkpoints.md §1.1-1.2).

The tiny pipeline (conftest `sd3`) is written as a release by tests/tiny_sd3.py, with the
text encoders beside the model file ("separate") or inside it ("bundled"). dite must make
the same images from it as diffusers from the folder of the same weights, and agree with
diffusers' own single-file loaders on it.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from dite.engine import load
from dite.engine.errors import CheckpointError, ConfigError
from dite.engine.loading.sd3 import RunningWithoutT5Warning
from dite.engine.loading.weights import StateDictReader
from dite.models import mmdit
from dite.models.denoiser import Conditioning
from dite.models.sd3_releases import sd3_release
from dite.models.tokenizers import TruncationWarning
from tiny_sd3 import T5_FILE, hints, reference_images, write_release
from tiny_tokenizers import BIG_PROMPT

PROMPTS = ["a red circle at the top left", "A small BLUE square, on the right!"]
SIZE = (16, 24)
GEN = dict(num_inference_steps=3, guidance_scale=5.0, max_sequence_length=20)


@pytest.fixture(scope="module", params=["separate", "bundled"])
def release(request, sd3, tmp_path_factory):
    """The model file of the release (its text encoders beside it or inside it)."""
    _, folder = sd3
    return write_release(folder, tmp_path_factory.mktemp(request.param), bundled=request.param == "bundled")


def load_release(path, folder, **kwargs):
    kwargs.setdefault("tokenizers", folder)
    kwargs.setdefault("model_config", hints(folder))
    return load(path, **kwargs)


def generate(pipe, prompts, latents, negative=None):
    return pipe(prompt=prompts, negative_prompt=negative, height=SIZE[0], width=SIZE[1], latents=latents.clone(),
                output_type="np", progress=False, **GEN).images


def test_single_file_matches_diffusers_folder(sd3, release):
    reference, folder = sd3
    expected, latents = reference_images(reference, PROMPTS, ["blurry", ""], GEN["num_inference_steps"],
                                         GEN["guidance_scale"], SIZE, seed=3, max_sequence_length=20)
    pipe = load_release(release, folder)
    assert np.abs(generate(pipe, PROMPTS, latents, ["blurry", ""]) - expected).max() <= 1e-4
    # No scheduler config in a single file: SD3's flow-matching Euler, shift 3.
    sched = pipe.scheduler.to_diffusers_config()
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (sched["shift"], sched["num_train_timesteps"], sched["use_dynamic_shifting"]) == (3.0, 1000, False)
    assert pipe.text.t5 is not None and pipe.text.clip_l.text_projection is None
    assert pipe.text.clip_g.text_projection is not None


def test_diffusers_single_file_pipeline_agrees(sd3, tmp_path):
    """diffusers' StableDiffusion3Pipeline.from_single_file on the bundled file (configs and
    tokenizers from the local folder) gives our pooled vectors and images: in particular it
    replaces CLIP-L's projection with the identity, as we leave it out."""
    from diffusers import StableDiffusion3Pipeline

    _, folder = sd3
    path = write_release(folder, tmp_path, bundled=True)
    theirs = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    theirs.text_encoder_3.eval()  # diffusers leaves the T5 it builds from a single file in training mode (dropout)
    theirs.set_progress_bar_config(disable=True)
    ours = load_release(path, folder)
    with torch.no_grad():
        _, _, pooled, _ = theirs.encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=False,
                                               max_sequence_length=20)
    assert (ours.text.encode(PROMPTS, 20)[1] - pooled).abs().max().item() <= 1e-5
    latents = torch.randn(2, 4, SIZE[0] // 2, SIZE[1] // 2, generator=torch.Generator().manual_seed(4))
    expected = theirs(prompt=PROMPTS, height=SIZE[0], width=SIZE[1], latents=latents.clone(), output_type="np",
                      **GEN).images
    assert np.abs(generate(ours, PROMPTS, latents) - expected).max() <= 1e-4


def test_diffusers_single_file_transformer_agrees(sd3, release):
    """diffusers' own converter of the original MMDiT layout reads the file as we do."""
    from diffusers import SD3Transformer2DModel

    _, folder = sd3
    theirs = SD3Transformer2DModel.from_single_file(str(release), config=str(folder), subfolder="transformer",
                                                    local_files_only=True).eval()
    ours = load_release(release, folder).transformer
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 12, generator=g), torch.tensor([999.0, 3.5])
    cond = Conditioning(context=torch.randn(2, 7, 24, generator=g), pooled=torch.randn(2, 20, generator=g))
    with torch.no_grad():
        expected = theirs(x, encoder_hidden_states=cond.context, pooled_projections=cond.pooled, timestep=t).sample
        assert (ours(x, t, cond) - expected).abs().max().item() <= 1e-5


def test_tokenizers_found_beside_the_file(sd3, release, tmp_path):
    reference, folder = sd3
    copy = tmp_path / "release"
    shutil.copytree(release.parent, copy)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # as a user would put them: in text_encoders/
        shutil.copytree(folder / name, copy / "text_encoders" / name)
    expected, latents = reference_images(reference, ["a cat"], None, 2, 1.0, SIZE, seed=1)
    pipe = load(copy / release.name, model_config=hints(folder))
    out = pipe(prompt="a cat", height=SIZE[0], width=SIZE[1], num_inference_steps=2, guidance_scale=1.0,
               latents=latents.clone(), output_type="np", progress=False).images
    assert np.abs(out - expected).max() <= 1e-4


def test_missing_tokenizers_are_a_clear_error(sd3, release, tmp_path):
    _, folder = sd3
    with pytest.raises(CheckpointError, match=r"no tokenizer/ folder \(vocab\.json \+ merges\.txt") as info:
        load(release, model_config=hints(folder))
    assert "tokenizers=PATH" in str(info.value) and "--tokenizers" in str(info.value)
    partial = tmp_path / "tokenizers"
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(folder / name, partial / name)
    with pytest.raises(CheckpointError, match=r"no tokenizer_3/ folder \(spiece\.model or tokenizer\.json\)"):
        load_release(release, folder, tokenizers=partial)
    (partial / "tokenizer_3").mkdir()
    with pytest.raises(CheckpointError, match=r"spiece\.model or tokenizer\.json.*tokenizers=PATH"):
        load_release(release, folder, tokenizers=partial)
    # Without T5, its tokenizer is not needed.
    assert load_release(release, folder, tokenizers=partial, text_encoder_3=None).text.t5 is None


def test_without_t5_file_runs_without_t5_and_says_so(sd3, tmp_path):
    _, folder = sd3
    path = write_release(folder, tmp_path, bundled=False, t5=False)
    with pytest.warns(RunningWithoutT5Warning, match=f"no T5 found.*{T5_FILE}.*text_encoder_3=None"):
        pipe = load_release(path, folder)
    assert pipe.text.t5 is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunningWithoutT5Warning)  # asked for: no warning
        load_release(path, folder, text_encoder_3=None)
    _, latents = reference_images(sd3[0], ["a cat"], None, 1, 1.0, SIZE, seed=2)
    same = load(folder, text_encoder_3=None)
    assert np.array_equal(generate(pipe, ["a cat"], latents), generate(same, ["a cat"], latents))


def test_missing_clip_is_a_clear_error(sd3, tmp_path):
    _, folder = sd3
    path = write_release(folder, tmp_path, bundled=False)
    (tmp_path / "text_encoders" / "clip_g.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no text encoders bundled.*CLIP-G \(bigG\) \(clip_g\.safetensors\)"):
        load_release(path, folder)


def test_clip_file_where_t5_is_expected(sd3, tmp_path):
    _, folder = sd3
    path = write_release(folder, tmp_path, bundled=False)
    encoders = tmp_path / "text_encoders"
    shutil.copy(encoders / "clip_l.safetensors", encoders / T5_FILE)
    with pytest.raises(CheckpointError, match=rf"expected a T5 encoder, but .*{T5_FILE} looks like a CLIP text model"):
        load_release(path, folder)


def test_text_encoders_of_another_model(sd3, tmp_path):
    _, folder = sd3
    path = write_release(folder, tmp_path, bundled=False)
    encoders = tmp_path / "text_encoders"
    shutil.copy(encoders / "clip_l.safetensors", encoders / "clip_g.safetensors")
    with pytest.raises(CheckpointError, match="do not fit its MMDiT: their pooled outputs are 16 wide together, "
                                              "the MMDiT takes 20"):
        load_release(path, folder, model_config={**hints(folder), "text_encoder_2": hints(folder)["text_encoder"]})


def test_vae_missing_or_given(sd3, tmp_path):
    reference, folder = sd3
    path = write_release(folder, tmp_path, bundled=True)
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(path).items() if not k.startswith("first_stage_model.")}
    save_file(state, tmp_path / "no_vae.safetensors")
    with pytest.raises(CheckpointError, match=r"holds no VAE .*vae=PATH"):
        load_release(tmp_path / "no_vae.safetensors", folder)
    pipe = load_release(tmp_path / "no_vae.safetensors", folder, vae=folder / "vae")
    expected, latents = reference_images(reference, ["a cat"], None, 1, 1.0, SIZE, seed=5)
    out = pipe(prompt="a cat", height=SIZE[0], width=SIZE[1], num_inference_steps=1, guidance_scale=1.0,
               latents=latents.clone(), output_type="np", progress=False).images
    assert np.abs(out - expected).max() <= 1e-4


def test_prompts_long_and_empty(sd3, release):
    """A 5,000-word prompt is cut to what each encoder reads, with a warning naming the limit
    (the same cut diffusers makes); an empty prompt is a prompt."""
    reference, folder = sd3
    pipe = load_release(release, folder)
    for prompt in (BIG_PROMPT, ""):
        expected, latents = reference_images(reference, [prompt], None, 2, 1.0, SIZE, seed=6, max_sequence_length=20)
        kwargs = dict(prompt=prompt, height=SIZE[0], width=SIZE[1], num_inference_steps=2, guidance_scale=1.0,
                      max_sequence_length=20, latents=latents.clone(), output_type="np", progress=False)
        if prompt:
            with pytest.warns(TruncationWarning) as record:
                out = pipe(**kwargs).images
            messages = [str(w.message) for w in record]
            assert any("CLIP reads at most 77" in m for m in messages)
            assert any("T5 reads at most 20" in m for m in messages)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", TruncationWarning)
                out = pipe(**kwargs).images
        assert np.abs(out - expected).max() <= 1e-4


def test_bad_model_config(sd3, release):
    _, folder = sd3
    with pytest.raises(ConfigError, match=r"model_config keys \['depth'\] cannot be set for an SD3 single file"):
        load(release, tokenizers=folder, model_config={"depth": 3})
    with pytest.raises(ConfigError, match=r"model_config\['vae'\] must be a VAEConfig or a config.json dict"):
        load(release, tokenizers=folder, model_config={"num_heads": 2, "vae": "big"})


def test_describe_and_inspect(sd3, release, capsys):
    from dite.engine.cli import main

    _, folder = sd3
    info = load_release(release, folder).describe()
    assert info["family"] == "sd3" and info["variant"] == "custom"  # tiny shapes are no release
    assert info["scheduler"]["shift"] == 3.0 and info["text_encoders"]["t5"] > 0
    assert main(["inspect", str(release), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sd3" and report["layout"] == "original"
    parts = report["parts"]
    assert parts["transformer"] == "model.diffusion_model.*" and parts["vae"] == "first_stage_model.*"
    if "incl_clips" in release.name:
        assert parts["clip_l"] == f"{release} (text_encoders.clip_l.transformer.*)"
    else:
        assert parts["t5xxl"] == str(release.parent / "text_encoders" / T5_FILE)
    assert main(["inspect", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sd3" and report["variant"] == "custom" and report["config"]["depth"] == 3


@pytest.mark.parametrize("release, cfg", [
    ("sd3-medium", mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192)),
    ("sd3.5-large", mmdit.MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm=True)),
    ("sd3.5-medium", mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=384, qk_norm=True,
                                       dual_attention_layers=tuple(range(13)))),
    ("custom", mmdit.MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192, qk_norm=True)),
])
def test_releases_are_recognised(release, cfg, tmp_path, monkeypatch):
    """`dite inspect` on full-size single files: their tensor headers, built on the meta device."""
    import dite.engine.checkpoints.inspect as inspect_module

    with torch.device("meta"):
        state = mmdit.MMDiT(cfg).state_dict()
    state = {"model.diffusion_model." + (k.replace("blocks.", "joint_blocks.", 1) if k.startswith("blocks.") else k): v
             for k, v in state.items()}
    path = tmp_path / "sd3_release.safetensors"
    path.touch()
    monkeypatch.setattr(inspect_module, "open_weights", lambda _: StateDictReader(state, str(path)))
    info = inspect_module.inspect_source(str(path))
    assert sd3_release(cfg) == info["variant"] == release and info["config"]["depth"] == cfg.depth
    assert info["parts"]["vae"] == "missing (pass --vae)" and info["parts"]["clip_l"] == "missing"


def test_cli_tokenizers_option(sd3, tmp_path, capsys):
    from dite.engine.cli import main

    _, folder = sd3
    bare = tmp_path / "without_tokenizers"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer", "tokenizer_2", "tokenizer_3"))
    args = ["generate", "--model", str(bare), "a cat", "--size", "24x16", "--steps", "1", "--quiet",
            "-o", str(tmp_path / "cat.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no tokenizer/ folder" in err and "--tokenizers PATH" in err
    assert main(args + ["--tokenizers", str(folder)]) == 0
    assert (tmp_path / "cat.png").exists()


def test_tokenizers_from_a_hub_repo(sd3, tmp_path, monkeypatch):
    """tokenizers="owner/name" downloads the three tokenizer folders only (no weights)."""
    import huggingface_hub

    _, folder = sd3
    bare = tmp_path / "without_tokenizers"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("tokenizer", "tokenizer_2", "tokenizer_3"))
    calls = []

    def snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    pipe = load(bare, tokenizers="someone/sd3-tokenizers")
    assert calls == [dict(repo_id="someone/sd3-tokenizers", revision=None,
                          allow_patterns=["tokenizer/*", "tokenizer_2/*", "tokenizer_3/*"])]
    assert pipe.text.tokenizer_t5 is not None
