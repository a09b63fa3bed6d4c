"""Bad inputs to `dite convert`, `dite inspect` and tools/convert_folder.py.

Each case runs the command line in-process and checks exit code 2 with one stderr line that
names the problem, and that nothing in the test's folder changed (every file hashed before
and after: the source, unrelated files, no partial output left behind). Then what --force
may do (replace only the destination, once the new output is complete) and what an
interrupted conversion leaves (nothing), including a real SIGTERM.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dite.engine import convert
from dite.engine.checkpoints import safetensors_writer
from dite.engine.cli import main
from dite.engine.errors import DiteError
from tiny import dit_to_original, tiny_dit_pipeline

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and symlink under `root`, by relative path."""
    state = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dite: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


def rewrite_metadata(src: Path, dst: Path, **changes) -> Path:
    """A copy of the safetensors file `src` with metadata keys changed (None: removed)."""
    with safe_open(src, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(tensors, dst, metadata=meta)
    return dst


def recorded_configs(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["configs"])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Read-only originals; each test works on copies (`env`)."""
    root = tmp_path_factory.mktemp("originals")
    folder = root / "pipe"
    tiny_dit_pipeline(folder, "ddim")
    state = dit_to_original(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors"), depth=3)
    pt = root / "DiT-tiny.pt"  # an original release-style .pt (no metadata; heads not in shapes)
    torch.save(state, pt)
    written = root / "dit.safetensors"  # written by dite: carries its config and scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(folder, written, to="original")
    return SimpleNamespace(folder=folder, pt=pt, written=written, state=state)


@pytest.fixture
def env(made, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(made.folder, src / "pipe")
    shutil.copy(made.pt, src / "DiT.pt")
    shutil.copy(made.written, src / "dit.safetensors")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("not a model")
    return SimpleNamespace(tmp=tmp_path, src=src, pipe=src / "pipe", pt=src / "DiT.pt", st=src / "dit.safetensors",
                           other=other, vae=src / "pipe" / "vae", made=made)


def _metadata_case(**edit):
    """A setup writing a copy of the dite-written file with edited metadata; `edit` values are
    strings, or callables of the recorded configs."""
    def setup(e):
        changes = {}
        for key, value in edit.items():
            if callable(value):
                configs = recorded_configs(e.st)
                value(configs)
                value = json.dumps(configs)
            changes[key] = value
        rewrite_metadata(e.st, e.tmp / "edited.safetensors", **changes)
        return ["convert", e.tmp / "edited.safetensors", e.tmp / "out", "--to", "diffusers"]
    return setup


def _set_transformer(**fields):
    def edit(configs):
        configs["transformer"]["config"].update(fields)
    return edit


def _cut(path_attr: str, keep: float):
    def setup(e):
        data = getattr(e, path_attr).read_bytes()
        cut = e.tmp / f"cut{getattr(e, path_attr).suffix}"
        cut.write_bytes(data[: int(len(data) * keep)])
        return ["convert", cut, e.tmp / "out", "--to", "diffusers", "--model-config", '{"num_heads": 2}']
    return setup


def _write(name: str, content: bytes | str, *argv_tail):
    def setup(e):
        path = e.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["convert", path, e.tmp / "out", *argv_tail]
    return setup


def _symlink(link: str, to: str, argv):
    def setup(e):
        (e.tmp / link).symlink_to(getattr(e, to), target_is_directory=getattr(e, to).is_dir())
        return argv(e)
    return setup


def _hardlink(e):
    os.link(e.pt, e.tmp / "hard.pt")
    return ["convert", e.pt, e.tmp / "hard.pt", "--to", "original", "--force"]


def _pickled(e):
    torch.save({"model": Path("x")}, e.tmp / "objects.pt")
    return ["convert", e.tmp / "objects.pt", e.tmp / "out", "--to", "diffusers"]


def _unknown_tensors(e):
    save_file({"foo": torch.zeros(1)}, e.tmp / "foo.safetensors")
    return ["convert", e.tmp / "foo.safetensors", e.tmp / "out", "--to", "diffusers"]


def _corrupted_keys(e):
    state = dict(e.made.state)
    del state["blocks.1.mlp.fc2.bias"]
    torch.save(state, e.tmp / "bad.pt")
    return ["convert", e.tmp / "bad.pt", e.tmp / "out", "--to", "diffusers", "--model-config", '{"num_heads": 2}']


def _broken_file_in(folder: str, name: str, text: str, command: str = "convert"):
    def setup(e):
        (e.pipe / folder / name if folder else e.pipe / name).write_text(text)
        if command == "inspect":
            return ["inspect", e.pipe]
        return ["convert", e.pipe, e.tmp / "out", "--to", "original"]
    return setup


def _shard_index(e):
    index = e.tmp / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    return ["convert", index, e.tmp / "out", "--to", "diffusers"]


def _mkdir(name: str, argv):
    def setup(e):
        (e.tmp / name).mkdir()
        return argv(e)
    return setup


def _chdir_to(attr: str, argv):
    def setup(e):
        os.chdir(getattr(e, attr))
        return argv(e)
    return setup


CONVERT = "convert"
# (id, setup(env) -> argv, what the one line must say)
CASES = [
    # --- the destination would destroy a source (refused, with --force too)
    ("dest-is-source-folder", lambda e: [CONVERT, e.pipe, e.pipe, "--to", "diffusers"], ["is the source"]),
    ("dest-is-source-folder-force", lambda e: [CONVERT, e.pipe, e.pipe, "--to", "diffusers", "--force"],
     ["is the source"]),
    ("dest-is-parent-of-source", lambda e: [CONVERT, e.pipe, e.src, "--to", "diffusers"], ["contains the source"]),
    ("dest-is-parent-of-source-force", lambda e: [CONVERT, e.pipe, e.src, "--to", "diffusers", "--force"],
     ["contains the source"]),
    ("dest-is-grandparent-force", lambda e: [CONVERT, e.pt, e.tmp, "--to", "diffusers", "--force"],
     ["contains the source"]),
    ("dest-inside-source-folder", lambda e: [CONVERT, e.pipe, e.pipe / "converted", "--to", "diffusers"],
     ["lies inside the source folder"]),
    ("dest-inside-source-folder-force", lambda e: [CONVERT, e.pipe, e.pipe / "transformer", "--to", "diffusers",
                                                   "--force"], ["lies inside the source folder"]),
    ("dest-file-inside-source-folder-force", lambda e: [CONVERT, e.pipe, e.pipe / "model_index.safetensors", "--to",
                                                        "original", "--force"], ["lies inside the source folder"]),
    ("dest-is-source-file", lambda e: [CONVERT, e.st, e.st, "--to", "original"], ["is the source"]),
    ("dest-is-source-file-force", lambda e: [CONVERT, e.st, e.st, "--to", "original", "--force"], ["is the source"]),
    ("dest-is-source-pt-force", lambda e: [CONVERT, e.pt, e.pt, "--to", "original", "--force",
                                           "--model-config", '{"num_heads": 2}'], ["is the source"]),
    ("dest-same-file-dotdot-force", lambda e: [CONVERT, e.tmp / "src" / ".." / "src" / "dit.safetensors", e.st,
                                               "--to", "original", "--force"], ["is the source"]),
    ("dest-relative-spelling-force", _chdir_to("tmp", lambda e: [CONVERT, "src/dit.safetensors",
                                                                 "./src/./dit.safetensors", "--to", "original",
                                                                 "--force"]), ["is the source"]),
    ("dest-symlink-to-source-file-force", _symlink("link.safetensors", "st", lambda e: [
        CONVERT, e.st, e.tmp / "link.safetensors", "--to", "original", "--force"]), ["is the source"]),
    ("dest-symlink-to-source-folder-force", _symlink("linkdir", "pipe", lambda e: [
        CONVERT, e.pipe, e.tmp / "linkdir", "--to", "diffusers", "--force"]), ["is the source"]),
    ("source-through-symlinked-folder-force", _symlink("via", "src", lambda e: [
        CONVERT, e.tmp / "via" / "dit.safetensors", e.st, "--to", "original", "--force"]), ["is the source"]),
    ("dest-hardlink-of-source-force", _hardlink, ["is the source"]),
    ("dest-is-vae-source-force", lambda e: [CONVERT, e.pt, e.vae, "--to", "diffusers", "--vae", e.vae, "--force",
                                            "--model-config", '{"num_heads": 2}'], ["is the source"]),
    ("dest-inside-vae-source", lambda e: [CONVERT, e.pt, e.vae / "out", "--to", "diffusers", "--vae", e.vae,
                                          "--model-config", '{"num_heads": 2}'], ["lies inside the source folder"]),
    # --- overwriting, and what a destination may be
    ("dest-exists-without-force", lambda e: [CONVERT, e.pipe, e.other, "--to", "diffusers"],
     ["exists; pass --force"]),
    ("dest-file-exists-without-force", lambda e: [CONVERT, e.pipe, e.tmp / "notes.txt", "--to", "diffusers"],
     ["exists; pass --force"]),
    ("force-folder-where-file-goes", _mkdir("x.safetensors", lambda e: [
        CONVERT, e.pipe, e.tmp / "x.safetensors", "--to", "original", "--force"]),
     ["is a folder and this conversion writes a file"]),
    ("force-file-where-folder-goes", lambda e: [CONVERT, e.pipe, e.tmp / "notes.txt", "--to", "diffusers",
                                                "--force"], ["is a file and this conversion writes a folder"]),
    ("dest-parent-is-a-file", lambda e: [CONVERT, e.pipe, e.tmp / "notes.txt" / "out", "--to", "diffusers"],
     ["notes.txt is a file, not a folder"]),
    ("force-dest-holds-cwd", _chdir_to("other", lambda e: [CONVERT, e.pipe, e.other, "--to", "diffusers",
                                                          "--force"]), ["holds the current folder"]),
    ("empty-destination", lambda e: [CONVERT, e.pipe, "", "--to", "diffusers"], ["destination is empty"]),
    ("to-diffusers-file-name", lambda e: [CONVERT, e.pipe, e.tmp / "out.safetensors", "--to", "diffusers"],
     ["named like a file"]),
    ("to-original-bad-suffix", lambda e: [CONVERT, e.pipe, e.tmp / "out.bin", "--to", "original"],
     ["name it *.safetensors"]),
    ("vae-to-pt", lambda e: [CONVERT, e.vae, e.tmp / "vae.pt", "--to", "original"],
     ["vae original files are safetensors"]),
    ("original-without-transformer", lambda e: [CONVERT, e.pipe, e.tmp / "o.safetensors", "--to", "original",
                                                "--components", "vae"], ["nothing to write"]),
    # --- sources that are not (whole) checkpoints
    ("missing-source", lambda e: [CONVERT, e.tmp / "nowhere.pt", e.tmp / "out", "--to", "diffusers"],
     ["nowhere.pt: no such file or folder"]),
    ("empty-source", lambda e: [CONVERT, "", e.tmp / "out", "--to", "diffusers"], ["source is empty"]),
    ("source-folder-without-index", _mkdir("empty", lambda e: [CONVERT, e.tmp / "empty", e.tmp / "out", "--to",
                                                               "diffusers"]), ["neither model_index.json"]),
    ("source-text-as-safetensors", _write("fake.safetensors", "hello, not tensors", "--to", "diffusers"),
     ["fake.safetensors", "not a readable safetensors"]),
    ("source-empty-file", _write("zero.safetensors", b"", "--to", "diffusers"), ["zero.safetensors"]),
    ("source-unknown-suffix", lambda e: [CONVERT, e.tmp / "notes.txt", e.tmp / "out", "--to", "diffusers"],
     ["unknown weights format"]),
    ("source-truncated-safetensors", _cut("st", 0.6), ["truncated"]),
    ("source-truncated-pt", _cut("pt", 0.5), ["not a readable torch checkpoint"]),
    ("source-with-python-objects", _pickled, ["contains Python objects besides tensors"]),
    ("source-unknown-tensors", _unknown_tensors, ["not a supported model"]),
    ("source-missing-keys", _corrupted_keys, ["1 missing", "blocks.1.mlp.fc2.bias"]),
    ("source-shard-index-missing-shards", _shard_index, ["names missing files"]),
    ("source-bad-model-index", _broken_file_in("", "model_index.json", "{not json"), ["model_index.json",
                                                                                       "not valid JSON"]),
    ("source-component-config-not-object", _broken_file_in("transformer", "config.json", "[1, 2]"),
     ["config.json"]),
    # --- metadata dite recorded, changed since
    ("metadata-config-not-json", _metadata_case(configs="{broken"), ["'configs' is not valid JSON"]),
    ("metadata-config-a-list", _metadata_case(configs="[1, 2]"), ["'configs' is a JSON list"]),
    ("metadata-config-nan", _metadata_case(configs='{"transformer": {"kind": "dit", "config": {"mlp_ratio": NaN}}}'),
     ["NaN is not a number JSON allows"]),
    ("metadata-contradicts-tensors", _metadata_case(configs=_set_transformer(depth=5)),
     ["does not fit its tensors", "depth=5 recorded, 3 in the tensors"]),
    ("metadata-unknown-field", _metadata_case(configs=_set_transformer(wings=2)), ["wings"]),
    ("metadata-heads-a-string", _metadata_case(configs=_set_transformer(num_heads="2")), ["num_heads"]),
    ("metadata-unknown-kind", _metadata_case(configs='{"transformer": {"kind": "unet", "config": {}}}'),
     ["no known kind"]),
    ("metadata-bad-scheduler", _metadata_case(scheduler_config='{"_class_name": "NoSuchScheduler"}'),
     ["scheduler_config", "NoSuchScheduler"]),
    ("metadata-unknown-family", _metadata_case(family="unet"), ["family 'unet'"]),
    # --- model_config
    ("model-config-contradicts-record", lambda e: [CONVERT, e.st, e.tmp / "out", "--to", "diffusers",
                                                   "--model-config", '{"num_heads": 4}'],
     ["num_heads=4 contradicts num_heads=2", "dit.safetensors"]),
    ("model-config-invalid-json", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                             '{"num_heads": }'], ["--model-config is not valid JSON"]),
    ("model-config-a-list", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config", "[2]"],
     ["--model-config", "not a JSON object"]),
    ("model-config-nan", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                    '{"num_heads": NaN}'], ["NaN is not a number JSON allows"]),
    ("model-config-missing-file", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                             e.tmp / "hints.json"], ["hints.json: no such file"]),
    ("model-config-a-folder", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                         e.other], ["is a folder"]),
    ("model-config-empty", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config", ""],
     ["--model-config is empty"]),
    ("model-config-unknown-key", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                            '{"num_hedas": 2}'], ["num_hedas"]),
    ("model-config-heads-fraction", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                               '{"num_heads": 2.5}'], ["num_heads", "2.5"]),
    ("model-config-heads-zero", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                           '{"num_heads": 0}'], ["num_heads", "0"]),
    ("model-config-heads-bool", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--model-config",
                                           '{"num_heads": true}'], ["num_heads", "True"]),
    ("model-config-heads-not-dividing", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers",
                                                   "--model-config", '{"num_heads": 3}'], ["not divisible by 3"]),
    ("model-config-for-a-folder", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--model-config",
                                             '{"num_heads": 2}'], ["model_config is for single checkpoint files"]),
    ("model-config-missing-heads", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers"],
     ["cannot infer the number of heads"]),
    # --- options
    ("unknown-component", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--components", "unet"],
     ["has no component unet"]),
    ("empty-components", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--components", " , "],
     ["names no component"]),
    ("bad-dtype", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--dtype", "fp8"],
     ["--dtype", "fp8"]),
    ("bad-to", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "ckpt"], ["--to", "ckpt"]),
    ("missing-to", lambda e: [CONVERT, e.pipe, e.tmp / "out"], ["--to"]),
    ("missing-destination", lambda e: [CONVERT, e.pipe, "--to", "diffusers"], ["destination"]),
    ("bad-shard-size", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--max-shard-size", "5XB"],
     ["cannot read the size '5XB'"]),
    ("zero-shard-size", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--max-shard-size", "0GB"],
     ["shard size must be positive"]),
    ("bad-text-encoders", lambda e: [CONVERT, e.pipe, e.tmp / "o.safetensors", "--to", "original",
                                     "--text-encoders", "inside"], ["--text-encoders", "inside"]),
    ("separate-encoders-for-dit", lambda e: [CONVERT, e.pipe, e.tmp / "o.safetensors", "--to", "original",
                                             "--text-encoders", "separate"], ["--text-encoders separate is for SD3"]),
    ("tokenizers-for-dit", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--tokenizers", e.other],
     ["has no tokenizers"]),
    ("tokenizers-missing", lambda e: [CONVERT, e.pipe, e.tmp / "out", "--to", "diffusers", "--tokenizers",
                                      e.tmp / "none"], ["--tokenizers", "no such folder"]),
    ("vae-missing", lambda e: [CONVERT, e.pt, e.tmp / "out", "--to", "diffusers", "--vae", e.tmp / "novae",
                               "--model-config", '{"num_heads": 2}'], ["novae: no such file or folder"]),
    ("vae-not-a-vae", lambda e: [CONVERT, e.st, e.tmp / "out", "--to", "diffusers", "--vae", e.pipe / "transformer"],
     ["holds no VAE"]),
    ("vae-for-a-vae", lambda e: [CONVERT, e.vae, e.tmp / "out", "--to", "diffusers", "--vae", e.vae],
     ["--vae adds a VAE to a pipeline"]),
    # --- inspect
    ("inspect-missing", lambda e: ["inspect", e.tmp / "nowhere.safetensors"], ["no such file or folder"]),
    ("inspect-text-as-safetensors", lambda e: ["inspect", _write("fake.safetensors", "hello")(e)[1]],
     ["fake.safetensors"]),
    ("inspect-truncated", lambda e: ["inspect", _cut("st", 0.6)(e)[1]], ["truncated"]),
    ("inspect-bad-model-index", _broken_file_in("", "model_index.json", "{not json", "inspect"),
     ["model_index.json", "not valid JSON"]),
    ("inspect-missing-transformer-config", lambda e: (e.pipe / "transformer" / "config.json").unlink() or
     ["inspect", e.pipe], ["config.json"]),
    ("inspect-model-config-for-a-folder", lambda e: ["inspect", e.pipe, "--model-config", '{"num_heads": 2}'],
     ["model_config is for single checkpoint files"]),
    ("inspect-model-config-contradicts-record", lambda e: ["inspect", e.st, "--model-config", '{"num_heads": 4}'],
     ["num_heads=4 contradicts num_heads=2"]),
    ("inspect-malformed-metadata", lambda e: ["inspect", _metadata_case(configs="{broken")(e)[1]],
     ["'configs' is not valid JSON"]),
    ("inspect-metadata-contradicts-tensors", lambda e: [
        "inspect", _metadata_case(configs=_set_transformer(depth=4))(e)[1]], ["does not fit its tensors"]),
    ("inspect-model-config-nan", lambda e: ["inspect", e.pt, "--model-config", '{"num_heads": Infinity}'],
     ["Infinity is not a number JSON allows"]),
]


@pytest.mark.parametrize("setup, needles", [pytest.param(s, n, id=i) for i, s, n in CASES])
def test_bad_input_is_one_line_and_changes_nothing(env, setup, needles, capsys, monkeypatch):
    monkeypatch.chdir(env.tmp)
    argv = setup(env)
    before = snapshot(env.tmp)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    one_line_error(code, err, *needles)
    assert snapshot(env.tmp) == before  # sources, unrelated files intact; no partial output left


def test_there_are_enough_distinct_bad_inputs():
    ids = [case[0] for case in CASES]
    assert len(set(ids)) == len(ids) >= 45


# ----------------------------------------------------------------------------- the library


@pytest.mark.parametrize("kwargs, needle", [
    ({"to": "diffusers", "dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"to": "checkpoint"}, "unknown target layout 'checkpoint'"),
    ({"to": "original", "text_encoders": "inline"}, "text_encoders must be 'bundled' or 'separate'"),
    ({"to": "diffusers", "components": 5}, "components must be comma-separated names"),
    ({"to": "diffusers", "model_config": [2]}, "model_config must be a dict"),
    ({"to": "diffusers", "max_shard_size": "-5GB"}, "cannot read the size"),
])
def test_library_raises_dite_errors(env, kwargs, needle):
    before = snapshot(env.tmp)
    with pytest.raises(DiteError, match=needle.replace("(", r"\(")) as info:
        convert(env.pipe, env.tmp / "out", **kwargs)
    assert "\n" not in str(info.value)
    assert snapshot(env.tmp) == before


# ----------------------------------------------------------------------------- --force


def test_force_replaces_an_unrelated_folder_and_only_it(env, capsys):
    sources = snapshot(env.src)
    (env.tmp / "neighbour.txt").write_text("next door")
    assert main(["convert", str(env.pipe), str(env.other), "--to", "diffusers", "--force"]) == 0
    assert not (env.other / "keep.txt").exists()  # the old content is gone ...
    assert json.loads((env.other / "model_index.json").read_text())["_class_name"] == "DiTPipeline"  # ... new complete
    assert load_file(env.other / "transformer" / "diffusion_pytorch_model.safetensors").keys() == load_file(
        env.pipe / "transformer" / "diffusion_pytorch_model.safetensors").keys()
    assert snapshot(env.src) == sources and (env.tmp / "neighbour.txt").read_text() == "next door"
    assert not [p for p in env.tmp.iterdir() if "dite-partial" in p.name]


def test_force_replaces_an_unrelated_file(env, capsys):
    old = env.tmp / "old.safetensors"
    save_file({"foo": torch.zeros(3)}, old)
    assert main(["convert", str(env.pipe), str(old), "--to", "original", "--force"]) == 0
    assert "foo" not in load_file(old) and "blocks.0.attn.qkv.weight" in load_file(old)
    assert not [p for p in env.tmp.iterdir() if "dite-partial" in p.name]


def test_force_replaces_a_link_not_what_it_points_to(env, capsys):
    (env.tmp / "link").symlink_to(env.other, target_is_directory=True)
    assert main(["convert", str(env.pipe), str(env.tmp / "link"), "--to", "diffusers", "--force"]) == 0
    assert not (env.tmp / "link").is_symlink() and (env.tmp / "link" / "model_index.json").exists()
    assert (env.other / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- interruptions


def _interrupt_after_first_tensor(monkeypatch, error: BaseException):
    original = safetensors_writer.SafetensorsWriter.write

    def write(self, key, tensor):
        original(self, key, tensor)
        raise error

    monkeypatch.setattr(safetensors_writer.SafetensorsWriter, "write", write)


@pytest.mark.parametrize("force", [False, True])
def test_interrupted_conversion_leaves_nothing(env, monkeypatch, capsys, force):
    _interrupt_after_first_tensor(monkeypatch, KeyboardInterrupt())
    destination = env.other if force else env.tmp / "new" / "deeper" / "out"
    before = snapshot(env.tmp)
    argv = ["convert", str(env.pipe), str(destination), "--to", "diffusers"] + (["--force"] if force else [])
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "dite: interrupted"
    assert snapshot(env.tmp) == before  # the old destination intact, no partial output, no folders made


def test_failed_write_is_one_line_and_leaves_nothing(env, monkeypatch, capsys):
    _interrupt_after_first_tensor(monkeypatch, OSError(28, "No space left on device"))
    before = snapshot(env.tmp)
    code = main(["convert", str(env.pipe), str(env.other), "--to", "diffusers", "--force"])
    one_line_error(code, capsys.readouterr().err.strip(), "No space left on device", "nothing was changed")
    assert snapshot(env.tmp) == before


def test_sigterm_handler_is_restored(env):
    previous = signal.getsignal(signal.SIGTERM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(env.pipe, env.tmp / "out", to="diffusers")
    assert signal.getsignal(signal.SIGTERM) is previous


SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from dite.engine.checkpoints import safetensors_writer as w
    original = w.SafetensorsWriter.write
    def write(self, key, tensor):
        original(self, key, tensor)
        Path(sys.argv[3]).touch()   # the conversion is under way
        time.sleep(120)
    w.SafetensorsWriter.write = write
    from dite.engine.cli import main
    sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--to", "diffusers", "--force"]))
""")


def test_sigterm_cleans_up_as_ctrl_c_does(env):
    """A real SIGTERM to a converting process: deterministic because the writer announces
    (a marker file) that it has written a tensor and then waits for the signal."""
    marker = env.tmp / "started"
    before = snapshot(env.tmp)
    process = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(env.pipe), str(env.other), str(marker)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=env.tmp)
    try:
        for _ in range(1200):
            if marker.exists() or process.poll() is not None:
                break
            import time

            time.sleep(0.1)
        assert marker.exists(), process.communicate(timeout=30)
        assert any("dite-partial" in p.name for p in env.tmp.iterdir())  # writing is under way
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and err.strip() == "dite: interrupted", err
    marker.unlink()
    assert snapshot(env.tmp) == before  # the old destination intact, nothing partial left


# ----------------------------------------------------------------------------- tools/convert_folder.py


def _tool():
    spec = importlib.util.spec_from_file_location("convert_folder_tool", ROOT / "tools" / "convert_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch(e):
    batch = e.tmp / "batch"
    batch.mkdir()
    shutil.copy(e.pt, batch / "DiT.pt")
    return batch


TOOL_CASES = [
    ("input-missing", lambda e: [e.tmp / "nowhere", e.tmp / "out", "--to", "diffusers"], ["nowhere: no such folder"]),
    ("input-is-a-file", lambda e: [e.pt, e.tmp / "out", "--to", "diffusers"], ["is a file"]),
    ("output-is-a-file", lambda e: [_batch(e), e.tmp / "notes.txt", "--to", "diffusers"], ["notes.txt is a file"]),
    ("output-is-input", lambda e: [_batch(e), e.tmp / "batch", "--to", "original"], ["is the input folder"]),
    ("output-holds-input", lambda e: [_batch(e), e.tmp, "--to", "diffusers"], ["holds the input folder"]),
    ("two-sources-one-output", lambda e: (shutil.copy(e.st, _batch(e) / "DiT.safetensors"),
                                          [e.tmp / "batch", e.tmp / "out", "--to", "diffusers"])[1],
     ["would both be written to"]),
    ("model-config-bad-json", lambda e: [_batch(e), e.tmp / "out", "--to", "diffusers", "--model-config", "{x}"],
     ["--model-config is not valid JSON"]),
    ("model-config-nan", lambda e: [_batch(e), e.tmp / "out", "--to", "diffusers", "--model-config",
                                    '{"num_heads": NaN}'], ["NaN is not a number JSON allows"]),
    ("model-config-no-file", lambda e: [_batch(e), e.tmp / "out", "--to", "diffusers", "--model-config",
                                        e.tmp / "h.json"], ["h.json: no such file"]),
    ("bad-to", lambda e: [_batch(e), e.tmp / "out", "--to", "checkpoint"], ["--to", "checkpoint"]),
]


@pytest.mark.parametrize("setup, needles", [pytest.param(s, n, id=i) for i, s, n in TOOL_CASES])
def test_convert_folder_bad_input(env, setup, needles, capsys):
    tool = _tool()
    argv = [str(a) for a in setup(env)]
    before = snapshot(env.tmp)
    try:
        code = tool.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("convert_folder: error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert snapshot(env.tmp) == before


def test_convert_folder_takes_model_config(env, capsys):
    tool = _tool()
    batch = _batch(env)
    assert tool.main([str(batch), str(env.tmp / "out"), "--to", "diffusers"]) == 1  # heads unknown: fails, goes on
    assert "cannot infer the number of heads" in capsys.readouterr().err
    hints = env.tmp / "hints.json"
    hints.write_text('{"num_heads": 2}')
    for given in ('{"num_heads": 2}', str(hints)):
        assert tool.main([str(batch), str(env.tmp / "out"), "--to", "diffusers", "--force", "--model-config",
                          given]) == 0
        config = json.loads((env.tmp / "out" / "DiT" / "transformer" / "config.json").read_text())
        assert config["num_attention_heads"] == 2
