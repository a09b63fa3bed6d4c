"""The dite command line: generate writes PNGs with parameters; errors are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from dite.engine.cli import main
from tiny import tiny_dit_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit")
    tiny_dit_pipeline(path, "ddim")
    return path


def test_generate_writes_pngs_with_parameters(folder, tmp_path, capsys):
    out = tmp_path / "img.png"
    code = main(["generate", "--model", str(folder), "--class-label", "3", "--class-label", "goldfish",
                 "--steps", "2", "--guidance", "3", "--seed", "5", "-o", str(out), "--quiet"])
    assert code == 0
    paths = [tmp_path / "img-0-5.png", tmp_path / "img-1-6.png"]  # {stem}-{index}-{seed}
    assert capsys.readouterr().out.split() == [str(p) for p in paths]
    params = [json.loads(Image.open(p).text["dite"]) for p in paths]
    assert [(p["class_label"], p["seed"]) for p in params] == [(3, 5), (1, 6)]
    for p in params:
        assert p["steps"] == 2 and p["guidance"] == 3.0 and p["scheduler"] == "ddim"
        assert p["size"] == "16x16" and p["model"] == folder.name and p["dite_version"]
    assert Image.open(paths[0]).size == (16, 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--model", "{folder}", "--class-label", "5000"], "class label 5000 is out of range"),
        (["generate", "--model", "{folder}"], "give --class-label ID"),
        (["generate", "--model", "{folder}", "a prompt"], "class-conditional DiT"),
        (["generate", "--model", "{folder}", "--class-label", "1", "--size", "18x16"], "width 18"),
        (["generate", "--model", "/nowhere/model", "--class-label", "1"], "no such file or folder"),
        (["inspect", "/nowhere/file.safetensors"], "no such file or folder"),
    ],
)
def test_errors_are_one_line(folder, argv, message, capsys):
    argv = [a.format(folder=folder) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dite: error: ") and message in err and "\n" not in err


def test_inspect(folder, capsys):
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "dit" and info["pipeline"] == "DiTPipeline"
    assert info["config"]["depth"] == 3 and info["config"]["num_heads"] == 2
    transformer = info["components"]["transformer"]
    assert transformer["dtypes"] == {"F32": transformer["tensors"]} and transformer["parameters"] > 0
    assert main(["inspect", str(folder)]) == 0
    assert "family: dit" in capsys.readouterr().out


def test_console_script_is_installed(tmp_path):
    # From a directory outside the source tree: the installed package must import anywhere.
    result = subprocess.run([sys.executable, "-m", "dite.engine.cli", "--version"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("dite ")


def test_unreachable_hub_is_one_line(tmp_path):
    """A hub repo id with the hub unreachable (endpoint on a closed loopback port)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-m", "dite.engine.cli", "inspect", "nobody/no-such-model"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("dite: error: could not download nobody/no-such-model")
    assert "Traceback" not in result.stderr
