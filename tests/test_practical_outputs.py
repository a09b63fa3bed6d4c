"""`dite generate` for real use: prompt files, --batch-count, file names, formats, existing
files kept, random seeds, metadata (A1111 "parameters", model hash, class names) and
--from-image re-running an image bit for bit."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from dite.engine.cli import main
from dite.engine.outputs.model_hash import model_hash
from dite.engine.outputs.writers import USER_COMMENT, EXIF_IFD, UNICODE_PREFIX, read_parameters
from tiny import tiny_dit_pipeline

DIT = ["generate", "--quiet", "--steps", "2", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("practical") / "dit"
    tiny_dit_pipeline(folder, "ddim")
    return folder


def run(capsys, *argv) -> tuple[int, list[str], str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.split(), captured.err


def settings(path) -> dict:
    return read_parameters(path)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_prompt_file_plain_lines_one_call_per_line(dit, tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("# two classes\n1\n\ngoldfish\n3\n")
    code, out, _ = run(capsys, *DIT, "--model", dit, "--prompt-file", tmp_path / "labels.txt", "--seed", "10",
                       "-o", tmp_path / "img.png")
    assert code == 0
    assert out == [str(tmp_path / f"img-{k}-{10 + k}.png") for k in range(3)]
    params = [settings(p) for p in out]
    assert [(p["class_label"], p["seed"], p["prompt_file_line"]) for p in params] == [(1, 10, 2), (1, 11, 4), (3, 12, 5)]
    assert params[0]["class_name"] == "goldfish" and "class_name" not in params[2]  # id2label has classes 0, 1


def test_prompt_file_json_lines_per_line_settings(dit, tmp_path, capsys):
    lines = [{"class_label": 1, "seed": 7, "steps": 3, "size": "32x16"},
             {"class_label": "tench", "guidance": 1.0, "accel": "ditcache(stride=2)"},
             {"class_label": 0}]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    code, out, _ = run(capsys, *DIT, "--model", dit, "--prompt-file", tmp_path / "jobs.jsonl", "--seed", "100",
                       "--name-pattern", "{line}-{seed}", "-o", tmp_path / "x.png")
    assert code == 0
    # Lines without a seed run on from --seed (100, 101); line 1's own seed takes no turn.
    assert out == [str(tmp_path / name) for name in ("1-7.png", "2-100.png", "3-101.png")]
    first, second, third = (settings(p) for p in out)
    assert (first["steps"], first["size"], first["seed"]) == (3, "32x16", 7)
    assert Image.open(out[0]).size == (32, 16)
    assert second["guidance"] == 1.0 and second["accel_spec"] == "ditcache(stride=2)" and second["steps"] == 2
    assert third["class_label"] == 0 and third["guidance"] == 4.0


@pytest.mark.parametrize("content, message", [
    ('{"class_label": 1}\n{"class_label": 2, "colour": "red"}', ["line 2", "'colour'"]),
    ('{"class_label": 1}\n{not json', ["line 2", "not a JSON object"]),
    ('{"class_label": 1, "size": "17"}', ["line 1", "'size'", "256x256"]),
    ('{"class_label": 1, "steps": 0}', ["line 1", "'steps'", "between 1 and"]),
    ('{"class_label": 1, "seed": -5}', ["line 1", "'seed'"]),
    ('{"class_label": 1, "accel": "turbo"}', ["--accel 'turbo'"]),
    ('{"prompt": "a cat"}', ["line 1", "class_label"]),
    ("\n# nothing\n", ["holds no prompts"]),
])
def test_bad_prompt_files_refused_before_loading(dit, tmp_path, capsys, monkeypatch, content, message):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("dite.engine.loading.loader.load", load)
    (tmp_path / "p.jsonl").write_text(content)
    code, out, err = run(capsys, *DIT, "--model", dit, "--prompt-file", tmp_path / "p.jsonl", "-o", tmp_path / "a.png")
    assert code == 2 and not out and not list(tmp_path.glob("*.png"))
    line = err.strip()
    assert line.startswith("dite: error: ") and "\n" not in line and all(m in line for m in message), line


def test_batch_count_and_formats(dit, tmp_path, capsys):
    code, out, _ = run(capsys, *DIT, "--model", dit, "--class-label", "1", "--class-label", "0", "--batch-count", "2",
                       "--seed", "3", "-o", tmp_path / "b.jpg")
    assert code == 0 and out == [str(tmp_path / f"b-{k}-{3 + k}.jpg") for k in range(4)]
    image = Image.open(out[0])
    assert image.format == "JPEG"
    assert [settings(p)["seed"] for p in out] == [3, 4, 5, 6]  # what --from-image reads, from EXIF
    comment = image.getexif().get_ifd(EXIF_IFD)[USER_COMMENT]
    assert comment.startswith(UNICODE_PREFIX)
    text = comment[len(UNICODE_PREFIX):].decode("utf-16-be")
    assert text.startswith("class 1 (goldfish)\nSteps: 2, Sampler: ddim, CFG scale: 4.0, Seed: 3, Size: 16x16")
    code, out, _ = run(capsys, *DIT, "--model", dit, "--class-label", "1", "-o", tmp_path / "one.webp")
    assert code == 0 and out == [str(tmp_path / "one.webp")] and Image.open(out[0]).format == "WEBP"
    assert settings(out[0])["class_label"] == 1


def test_existing_outputs_are_kept_unless_overwrite(dit, tmp_path, capsys):
    target = tmp_path / "keep.png"
    target.write_bytes(b"precious")
    code, out, err = run(capsys, *DIT, "--model", dit, "--class-label", "1", "-o", target)
    assert code == 2 and target.read_bytes() == b"precious"
    assert "keep.png exists" in err and "--overwrite" in err and "\n" not in err.strip()
    code, out, _ = run(capsys, *DIT, "--model", dit, "--class-label", "1", "-o", target, "--overwrite")
    assert code == 0 and Image.open(target).format == "PNG"
    # A name pattern that gives two images one file, or an unknown field: refused.
    code, _, err = run(capsys, *DIT, "--model", dit, "--class-label", "1", "--class-label", "0", "--name-pattern",
                       "{stem}", "-o", tmp_path / "p.png")
    assert code == 2 and "the same file" in err
    code, _, err = run(capsys, *DIT, "--model", dit, "--class-label", "1", "--name-pattern", "{colour}",
                       "-o", tmp_path / "p.png")
    assert code == 2 and "{colour}" in err and not list(tmp_path.glob("p*"))


def test_random_seed_is_printed_and_recorded(dit, tmp_path, capsys):
    code, out, err = run(capsys, *DIT, "--model", dit, "--class-label", "1", "--seed", "-1", "-o", tmp_path / "r.png")
    assert code == 0
    seed = settings(out[0])["seed"]
    assert f"seed {seed} (random)" in err and settings(out[0])["random_seed"] is True


def test_metadata_records_how_and_with_what(dit, tmp_path, capsys):
    code, out, _ = run(capsys, *DIT, "--model", dit, "--class-label", "goldfish", "-o", tmp_path / "m.png")
    assert code == 0
    params = settings(out[0])
    weights = sorted((dit / "transformer").glob("*.safetensors"))
    assert len(weights) == 1
    expected_hash = hashlib.sha256(weights[0].read_bytes()).hexdigest()[:10]
    assert params["model_hash"] == expected_hash
    assert (params["dtype"], params["vae_dtype"], params["device"], params["executor"]) == \
        ("float32", "float32", "cpu", "eager")
    assert (params["pipeline_class"], params["transformer_class"], params["class_name"]) == \
        ("DiTPipeline", "DiT", "goldfish")
    text = Image.open(out[0]).text["parameters"]
    assert text.splitlines()[0] == "class 1 (goldfish)"
    assert f"Model hash: {expected_hash}, Model: dit" in text and "Seed: 0" in text and "Dtype: float32" in text


def test_model_hash_is_cached(tmp_path, monkeypatch):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 1000)
    monkeypatch.setenv("DITE_CACHE_DIR", str(tmp_path / "cache"))
    assert model_hash(weights) == hashlib.sha256(b"x" * 1000).hexdigest()[:10]
    cache = json.loads((tmp_path / "cache" / "model-hashes.json").read_text())
    (key,) = cache
    assert key.startswith(str(weights.resolve()) + "|1000|")
    cache[key] = "from-cache"  # an unchanged file is not read again
    (tmp_path / "cache" / "model-hashes.json").write_text(json.dumps(cache))
    assert model_hash(weights) == "from-cache"
    weights.write_bytes(b"y" * 1001)  # a changed file is
    assert model_hash(weights) == hashlib.sha256(b"y" * 1001).hexdigest()[:10]
    assert model_hash("owner/not-a-path") is None


def test_from_image_reruns_bit_for_bit(dit, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "--quiet", "--model", dit, "--class-label", "1", "--class-label", "0",
                       "--steps", "3", "--guidance", "2.5", "--seed", "-1", "--size", "32x16", "--dtype", "bf16",
                       "--accel", "ditcache(stride=2)", "-o", tmp_path / "orig.png")
    assert code == 0
    original = out[1]  # the second image of a batch of two: its own seed and label
    # A local model's path is not recorded: --model is needed, and asked for in one line.
    code, _, err = run(capsys, "generate", "--quiet", "--from-image", original, "-o", tmp_path / "again.png")
    assert code == 2 and "give --model PATH" in err
    code, out, _ = run(capsys, "generate", "--quiet", "--from-image", original, "--model", dit,
                       "-o", tmp_path / "again.png")
    assert code == 0 and out == [str(tmp_path / "again.png")]
    before, after = settings(original), settings(out[0])
    for key in ("seed", "class_label", "steps", "guidance", "size", "dtype", "vae_dtype", "accel_spec", "model_hash"):
        assert before[key] == after[key], key
    assert before["dtype"] == "bfloat16"
    # Image 2 of a batch is re-made alone: the same numbers but not the same batched kernels,
    # so in bf16 a pixel may move by a level (seen once in a full-suite run).
    assert np.abs(pixels(original).astype(int) - pixels(out[0]).astype(int)).max() <= 1
    # An image made alone is re-made bit for bit.
    code, out, _ = run(capsys, "generate", "--quiet", "--from-image", out[0], "--model", dit,
                       "-o", tmp_path / "third.png")
    assert code == 0 and np.array_equal(pixels(tmp_path / "again.png"), pixels(out[0]))
    # An option given explicitly wins over the recorded one.
    code, out, _ = run(capsys, "generate", "--quiet", "--from-image", original, "--model", dit, "--steps", "2",
                       "-o", tmp_path / "fewer.png")
    assert code == 0 and settings(out[0])["steps"] == 2 and settings(out[0])["seed"] == before["seed"]


def test_from_image_of_the_demo_sd3_needs_no_model(tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "--quiet", "a red cube", "--negative-prompt", "blurry", "--steps", "2",
                       "--seed", "4", "--dtype", "fp32", "-o", tmp_path / "cube.webp")
    assert code == 0
    code, again, _ = run(capsys, "generate", "--quiet", "--from-image", out[0], "-o", tmp_path / "cube-again.png")
    assert code == 0
    params = settings(again[0])
    assert (params["prompt"], params["negative_prompt"], params["seed"], params["model"]) == \
        ("a red cube", "blurry", 4, "demo-sd3")
    assert Image.open(again[0]).text["parameters"].startswith("a red cube\nNegative prompt: blurry\nSteps: 2")


def test_from_image_without_settings_is_one_line(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    code, _, err = run(capsys, "generate", "--from-image", tmp_path / "plain.png", "-o", tmp_path / "o.png")
    assert code == 2 and "holds no dite settings" in err
