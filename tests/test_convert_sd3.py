"""SD3 conversion: Stability's single files (tests/tiny_sd3.py writes them with the tests' own
renames, not dite's maps) <-> diffusers folders, bitwise tensor by tensor in both
directions; the converted folder runs in diffusers as dite runs the original file; diffusers'
own single-file loader reads what dite writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dite.engine import convert, load
from dite.engine.checkpoints.convert import ConversionNote
from tiny_sd3 import BUNDLED_PREFIX, FOLDER_OF, component_state, hints, original_parts, write_release

PROMPTS = ["a red circle at the top left", "A small BLUE square, on the right!"]
SIZE = (16, 24)
GEN = dict(num_inference_steps=3, guidance_scale=5.0, max_sequence_length=20)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def folder_state(folder, name):
    """A component folder's tensors, whatever its sharding."""
    state = {}
    for file in sorted((folder / name).glob("*.safetensors")):
        state.update(load_file(file))
    return state


def assert_same(actual: dict, expected: dict, what: str):
    assert sorted(actual) == sorted(expected), what
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), f"{what}: {key}"


def expected_folder_state(folder, name):
    """The tiny folder's tensors as dite writes them: T5's embedding once (`shared`), as
    transformers ties encoder.embed_tokens to it."""
    state = component_state(folder, name)
    if name == "text_encoder_3":
        state.pop("encoder.embed_tokens.weight", None)
    return state


@pytest.fixture(scope="module", params=["separate", "bundled"])
def release(request, sd3, tmp_path_factory):
    _, folder = sd3
    return write_release(folder, tmp_path_factory.mktemp(request.param), bundled=request.param == "bundled")


@pytest.fixture(scope="module")
def converted(sd3, release, tmp_path_factory):
    """The release converted to a diffusers folder."""
    _, folder = sd3
    out = tmp_path_factory.mktemp("converted") / "pipe"
    with pytest.warns(ConversionNote) if "incl_clips" in release.name else _no_warning():
        convert(release, out, to="diffusers", tokenizers=folder, model_config=hints(folder))
    return out


class _no_warning:
    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", ConversionNote)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)


def test_original_to_diffusers_is_bitwise(sd3, converted):
    _, folder = sd3
    for name in COMPONENTS:
        assert_same(folder_state(converted, name), expected_folder_state(folder, name), name)
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert all(index[name] != [None, None] for name in COMPONENTS + ("tokenizer", "tokenizer_2", "tokenizer_3"))
    scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["_class_name"], scheduler["shift"]) == ("FlowMatchEulerDiscreteScheduler", 3.0)
    with safe_open(converted / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["family"] == "sd3" and meta["variant"] == "custom" and str(meta["source"]).endswith(".safetensors")
    assert json.loads(meta["config"])["depth"] == 3 and meta["dite_version"]


def test_converted_folder_runs_in_diffusers_like_dite_on_the_file(sd3, release, converted):
    from diffusers import StableDiffusion3Pipeline

    _, folder = sd3
    theirs = StableDiffusion3Pipeline.from_pretrained(converted, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    ours = load(release, tokenizers=folder, model_config=hints(folder))
    latents = torch.randn(2, 4, SIZE[0] // 2, SIZE[1] // 2, generator=torch.Generator().manual_seed(4))
    expected = theirs(prompt=PROMPTS, negative_prompt=["blurry", ""], height=SIZE[0], width=SIZE[1],
                      latents=latents.clone(), output_type="np", **GEN).images
    images = ours(prompt=PROMPTS, negative_prompt=["blurry", ""], height=SIZE[0], width=SIZE[1],
                  latents=latents.clone(), output_type="np", progress=False, **GEN).images
    assert np.abs(images - expected).max() <= 1e-4


def test_diffusers_to_original_is_bitwise(sd3, tmp_path):
    """The folder -> Stability's names, bundled and separate, against the tests' own renames."""
    _, folder = sd3
    parts = original_parts(folder)
    bundled = tmp_path / "bundled" / "sd3_tiny_incl_clips_t5xxlfp16.safetensors"
    convert(folder, bundled, to="original")
    expected = dict(parts["model"])
    for part in ("clip_l", "clip_g", "t5xxl"):
        expected.update({BUNDLED_PREFIX[part] + k: v for k, v in parts[part].items()})
    expected[BUNDLED_PREFIX["t5xxl"] + "encoder.embed_tokens.weight"] = parts["t5xxl"]["shared.weight"]
    assert_same(load_file(bundled), expected, "bundled")

    separate = tmp_path / "separate" / "sd3_tiny.safetensors"
    convert(folder, separate, to="original", text_encoders="separate")
    assert_same(load_file(separate), parts["model"], "model file")
    for part, file in (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl", "t5xxl_fp32")):
        assert_same(load_file(separate.parent / "text_encoders" / f"{file}.safetensors"), parts[part], part)


def test_round_trips(sd3, release, converted, tmp_path):
    """original -> diffusers -> original and diffusers -> original -> diffusers, bitwise
    (but for the bundled file's random CLIP-L projection, which SD3 never uses)."""
    _, folder = sd3
    bundled = "incl_clips" in release.name
    back = tmp_path / release.name
    convert(converted, back, to="original", text_encoders="bundled" if bundled else "separate")
    original = load_file(release)
    original.pop(BUNDLED_PREFIX["clip_l"] + "text_projection.weight", None)
    assert_same(load_file(back), original, "model file")
    if not bundled:
        for file in ("clip_l", "clip_g"):
            assert_same(load_file(back.parent / "text_encoders" / f"{file}.safetensors"),
                        load_file(release.parent / "text_encoders" / f"{file}.safetensors"), file)
    again = tmp_path / "again"
    convert(back, again, to="diffusers", tokenizers=folder, model_config=hints(folder))
    for name in COMPONENTS:
        assert_same(folder_state(again, name), folder_state(converted, name), name)


def test_diffusers_single_file_loader_reads_what_dite_writes(sd3, tmp_path):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    reference, folder = sd3
    path = tmp_path / "sd3_tiny_incl_clips_t5xxlfp16.safetensors"
    convert(folder, path, to="original")
    theirs = StableDiffusion3Pipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    theirs.text_encoder_3.eval()
    theirs.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, SIZE[0] // 2, SIZE[1] // 2, generator=torch.Generator().manual_seed(5))
    expected = reference(prompt=PROMPTS[:1], height=SIZE[0], width=SIZE[1], latents=latents.clone(),
                         output_type="np", **GEN).images
    images = theirs(prompt=PROMPTS[:1], height=SIZE[0], width=SIZE[1], latents=latents.clone(), output_type="np",
                    **GEN).images
    assert np.abs(images - expected).max() <= 1e-4
    transformer = SD3Transformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                                         local_files_only=True)
    assert_same({k: v for k, v in transformer.state_dict().items()}, expected_folder_state(folder, "transformer"),
                "transformer")


def test_encoder_files_to_folders_and_back(sd3, tmp_path):
    """Stability's text_encoders/*.safetensors <-> transformers folders, each on its own."""
    _, folder = sd3
    release = write_release(folder, tmp_path / "release", bundled=False)
    for part, name in FOLDER_OF.items():
        file = release.parent / "text_encoders" / ("t5xxl_fp16.safetensors" if part == "t5xxl" else f"{part}.safetensors")
        config = json.loads((folder / name / "config.json").read_text())
        model_config = {"text_encoder": config} if part != "t5xxl" else None
        out = tmp_path / name
        if part == "t5xxl":
            convert(file, out, to="diffusers")
        else:
            convert(file, out, to="diffusers", model_config=model_config)
        back = tmp_path / f"{part}.safetensors"
        convert(out, back, to="original")
        assert_same(load_file(back), load_file(file), part)


def test_separate_encoders_never_overwrite_the_source_files(sd3, tmp_path):
    """SD3 --text-encoders separate writes text_encoders/*.safetensors beside the output: where
    those are the source's own encoder files, it is refused, --force or not, and nothing changes."""
    from dite.engine.errors import DiteError

    _, folder = sd3
    release = write_release(folder, tmp_path / "release", bundled=False)
    before = {p: p.read_bytes() for p in release.parent.rglob("*") if p.is_file()}
    for force in (False, True):
        with pytest.raises(DiteError, match=r"text_encoders/clip_l.safetensors is the source"):
            convert(release, release.parent / "copy.safetensors", to="original", text_encoders="separate",
                    force=force, model_config=hints(folder))
    assert {p: p.read_bytes() for p in release.parent.rglob("*") if p.is_file()} == before
