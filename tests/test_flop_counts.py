"""out.stats is counted when read, and FLOP counts are kept per model config and call shape:
in the process and, where a folder is named (the CLI's), between processes. The numbers are
those of a fresh count."""

from __future__ import annotations

import json

import pytest
import torch

from dite.engine import load
from dite.engine.cli import main
from dite.engine.runtime import accounting
from dite.engine.runtime.accounting import FlopCounts
from tiny import tiny_dit_pipeline

FLOP_KEYS = ("denoiser_flops", "plain_denoiser_flops", "flops_ratio", "attention_flops", "attention_flops_ratio")


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-flops")
    tiny_dit_pipeline(folder, "ddim", num_layers=4)
    return folder


@pytest.fixture
def counted(monkeypatch):
    """The calls of count_call (the meta-device count), recorded."""
    calls = []
    real = accounting.count_call

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(accounting, "count_call", counting)
    return calls


def run(pipe, accel="ditcache"):
    return pipe(class_labels=[3], num_inference_steps=6, output_type="latent", progress=False, seed=1, accel=accel)


def test_stats_are_counted_when_read_and_equal_a_fresh_count(dit_folder, counted):
    pipe = load(dit_folder)
    pipe.flop_counts = FlopCounts()  # this test's own, empty
    out = run(pipe)
    assert counted == []  # nothing counted until stats are read
    assert out.parameters[0]["accel"].startswith("ditcache(")  # the record needs no count
    stats = out.stats
    assert len(counted) == 1 and out.stats is stats
    assert stats["accel"] == out.parameters[0]["accel"]
    fresh = accounting.accel_stats(pipe.transformer, *_replay(pipe), counts=FlopCounts())
    for key in FLOP_KEYS:
        assert stats[key] == fresh[key]
    assert 0 < stats["flops_ratio"] < 1


def _replay(pipe):
    """The arguments accel_stats gets for run(pipe): methods, plans, steps run, shape, conditioning."""
    from dite.models.denoiser import Conditioning

    methods, plans = pipe.plan_steps("ditcache", 6, True)
    out = run(pipe)
    cond = Conditioning(class_labels=torch.tensor([3, pipe.transformer.null_class]), cfg_row_order="cond_first")
    return methods, plans, out.stats["steps"], (1, 4, 8, 8), cond


def test_a_second_call_of_the_same_shape_counts_nothing(dit_folder, counted):
    pipe = load(dit_folder)
    pipe.flop_counts = FlopCounts()
    first = run(pipe).stats
    other = load(dit_folder)  # another pipeline of the same model config
    other.flop_counts = pipe.flop_counts
    second = run(other).stats
    assert len(counted) == 1
    assert {k: first[k] for k in FLOP_KEYS} == {k: second[k] for k in FLOP_KEYS}
    run(pipe, accel="none").stats  # another plan: counted
    assert len(counted) == 2


def test_a_folder_keeps_counts_between_processes(dit_folder, counted, tmp_path):
    pipe = load(dit_folder)
    pipe.flop_counts = FlopCounts(tmp_path / "flops")
    first = run(pipe).stats
    files = list((tmp_path / "flops").glob("*.json"))
    assert len(counted) == 1 and len(files) == 1
    pipe.flop_counts = FlopCounts(tmp_path / "flops")  # a new process: empty memory, same folder
    again = run(pipe).stats
    assert len(counted) == 1
    assert {k: first[k] for k in FLOP_KEYS} == {k: again[k] for k in FLOP_KEYS}
    # A damaged file is counted again (and rewritten), never trusted.
    files[0].write_text("{not json")
    pipe.flop_counts = FlopCounts(tmp_path / "flops")
    assert run(pipe).stats["denoiser_flops"] == first["denoiser_flops"] and len(counted) == 2
    assert json.loads(files[0].read_text())["plain"]


def test_the_key_changes_with_dtype_shape_and_plans(dit_folder):
    from dite.models.denoiser import Conditioning

    model = load(dit_folder).transformer
    _, plans = load(dit_folder).plan_steps("ditcache", 6, True)
    plain = load(dit_folder).plan_steps("none", 6, True)[1]
    cond = Conditioning(class_labels=torch.tensor([3, 0]), cfg_row_order="cond_first")
    key = accounting.count_key(model, plans, (1, 4, 8, 8), cond)
    assert key == accounting.count_key(load(dit_folder).transformer, plans, (1, 4, 8, 8), cond)
    assert key != accounting.count_key(model, plans, (2, 4, 8, 8), cond)
    assert key != accounting.count_key(model, plain, (1, 4, 8, 8), cond)
    assert key != accounting.count_key(model.to(torch.float64), plans, (1, 4, 8, 8), cond)


def test_an_unwritable_folder_is_passed_over(dit_folder, tmp_path, counted):
    blocker = tmp_path / "file"
    blocker.write_text("")
    pipe = load(dit_folder)
    pipe.flop_counts = FlopCounts(blocker / "flops")  # a folder under a file: cannot be made
    assert run(pipe).stats["flops_ratio"] < 1 and len(counted) == 1


def test_cli_generate_keeps_counts_in_dite_cache(dit_folder, tmp_path, monkeypatch, capsys, counted):
    monkeypatch.setenv("DITE_CACHE_DIR", str(tmp_path / "cache"))
    args = ["generate", "--model", str(dit_folder), "--class-label", "3", "--steps", "4", "--accel", "ditcache",
            "--quiet"]
    assert main(args + ["-o", str(tmp_path / "a.png")]) == 0
    first = capsys.readouterr().err
    assert main(args + ["-o", str(tmp_path / "b.png")]) == 0
    second = capsys.readouterr().err
    assert len(counted) == 1 and len(list((tmp_path / "cache" / "flops").glob("*.json"))) == 1
    flops = [line.split("denoiser FLOPs")[1].split("|")[0] for line in (first, second)]
    assert flops[0] == flops[1]
