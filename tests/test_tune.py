"""`dite tune` and tuned(file=...): the search fits the budget and beats fewer steps on its
calibration inputs, the file reproduces the chosen spec, and it is refused everywhere it was
not tuned for (tiny DiT, 6 steps, a reduced search grid)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from dite.accel import PlanContext, as_methods, resolve
from dite.engine import load
from dite.engine.cli import main
from dite.engine.errors import ConfigError
from dite.engine.runtime import tune as tune_module
from tiny import tiny_dit_pipeline

STEPS, BUDGET, LABELS = 6, 0.6, [3, 7]


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-tune")
    tiny_dit_pipeline(folder, "ddim", num_layers=6)
    return folder


@pytest.fixture(scope="module")
def pipe(dit_folder):
    return load(dit_folder)


@pytest.fixture(scope="module")
def tuned(pipe, tmp_path_factory):
    """One search on a reduced grid (ditcache orders 0, 1 at stride 3, with promptgate on
    the best), and its file."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune_module, "DITCACHE_ORDERS", (0, 1))
        mp.setattr(tune_module, "DITCACHE_STRIDES", (3,))
        lines = []
        data = tune_module.tune(pipe, BUDGET, steps=STEPS, class_labels=LABELS, screen=1, top=3,
                                methods=("ditcache",), log=lines.append)
    path = tmp_path_factory.mktemp("tuned") / "tuned.json"
    tune_module.write_tuned(path, data)
    return data, path, lines


def call(pipe, **kw):
    options = dict(class_labels=LABELS, num_inference_steps=STEPS, seed=tune_module.DEFAULT_SEED, output_type="np",
                   progress=False)
    return pipe(**{**options, **kw})


def edited(path: Path, tmp_path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    out = tmp_path / "edited.json"
    out.write_text(json.dumps(data))
    return out


def test_search_fits_the_budget_and_beats_fewer_steps(tuned, pipe):
    data, _, lines = tuned
    assert data["compute_fraction"] <= BUDGET and data["budget"] == BUDGET and data["metric"] == "compute"
    fewer = data["fewer_steps"]
    assert fewer["steps"] == 3 and fewer["compute_fraction"] == 0.5  # the largest N with N/6 <= 0.6
    assert data["psnr_db"] >= fewer["psnr_db"]
    assert all(row["within_budget"] and row["compute_fraction"] <= BUDGET for row in data["candidates"])
    assert data["candidates"][0]["psnr_db"] == data["psnr_db"]
    valid = data["valid_for"]
    assert valid["model_id"] == pipe.model_id and valid["family"] == "dit" and valid["steps"] == STEPS
    assert valid["scheduler"]["class"] == "DDIMScheduler" and valid["size"] == "16x16" and valid["guidance"] == 4.0
    assert data["dite_version"] and data["date"] and data["calibration"]["class_labels"] == LABELS
    assert any("compute" in line and "PSNR" in line for line in lines)  # one line per candidate
    # The measured compute is what a call of the chosen spec reports.
    if data["spec"] != "none":
        assert call(pipe, accel=data["spec"]).stats["compute_fraction"] == pytest.approx(data["compute_fraction"],
                                                                                         abs=1e-5)


def test_adaptive_threshold_lands_under_the_budget(pipe):
    tuner = tune_module.Tuner(pipe, 0.8, steps=STEPS, class_labels=[3], log=lambda line: None)
    tuner.references()
    m = tuner.bisect(dict(tune_module.ADAPTIVE_START, addon=""), 1, 0.08, 4)
    assert m is not None and m.kind == "adaptive" and m.compute <= 0.8
    assert m.params["threshold"] > 0 and f"threshold={m.params['threshold']:g}" in m.spec
    # A setting that cannot reach the budget even caching whenever allowed is not run.
    runs = tuner.runs
    assert tuner.bisect(dict(tune_module.ADAPTIVE_START, max_cached=1, front=5, addon=""), 1, 0.08, 4) is None
    assert tuner.runs == runs


def test_tuned_file_reproduces_the_stored_spec(tuned, pipe):
    data, path, _ = tuned
    a = call(pipe, accel=f"tuned(file={path})")
    b = call(pipe, accel=data["spec"])
    assert np.array_equal(a.images, b.images)
    assert a.stats["accel"] == b.stats["accel"]
    assert a.parameters[0]["steps"] == data["steps"]


def test_fewer_steps_file_runs_fewer_steps(tuned, pipe, tmp_path):
    _, path, _ = tuned
    fewer = edited(path, tmp_path, lambda d: d.update(spec="none", steps=3))
    out = call(pipe, accel=f"tuned(file={fewer})")
    plain = call(pipe, num_inference_steps=3)
    assert np.array_equal(out.images, plain.images)
    assert out.parameters[0]["steps"] == 3 and len(out.stats["steps"]) == 3 and out.stats["accel"] == "none"


@pytest.mark.parametrize("call_kw, field", [
    (dict(num_inference_steps=STEPS + 1), "6 steps, this call asks for 7"),
    (dict(height=32, width=32), "size 16x16, this call is 32x32"),
])
def test_tuned_refuses_another_call(tuned, pipe, call_kw, field):
    _, path, _ = tuned
    with pytest.raises(ConfigError, match=field) as info:
        call(pipe, accel=f"tuned(file={path})", **call_kw)
    assert "run `dite tune` again" in str(info.value) and "\n" not in str(info.value)


def test_tuned_refuses_another_model_and_scheduler(tuned, pipe, dit_folder, tmp_path):
    _, path, _ = tuned
    other = edited(path, tmp_path, lambda d: d["valid_for"].update(model_id="0123456789abcdef"))
    with pytest.raises(ConfigError, match="another model .*fingerprint 0123456789abcdef"):
        call(pipe, accel=f"tuned(file={other})")
    # Plans built without a pipeline are checked against their context the same way.
    ctx = PlanContext("dit", 6, STEPS, True, model_id=pipe.model_id)
    with pytest.raises(ConfigError, match="another model"):
        resolve(as_methods(f"tuned(file={other})"), ctx)
    with pytest.raises(ConfigError, match="scheduler DDIMScheduler, this call's is DDPMScheduler"):
        call(load(dit_folder, scheduler="ddpm"), accel=f"tuned(file={path})")


def test_tuned_refuses_bad_files(tuned, pipe, tmp_path):
    _, path, _ = tuned
    (tmp_path / "corrupt.json").write_text("{not json")
    (tmp_path / "plan.json").write_text(json.dumps({"format": "dite-fastattn-plan/1", "steps": STEPS, "layers": []}))
    partial = edited(path, tmp_path, lambda d: d["valid_for"].pop("model_id"))
    for file, message in ((tmp_path / "missing.json", "does not exist"), (tmp_path / "corrupt.json", "is not JSON"),
                          (tmp_path / "plan.json", "is a DiTFastAttn plan"), (partial, "has no 'valid_for.model_id'")):
        with pytest.raises(ConfigError, match=message):
            call(pipe, accel=f"tuned(file={file})")
    with pytest.raises(ConfigError, match="tuned needs its file"):
        call(pipe, accel="tuned")


def test_tuned_meets_the_other_methods_checks(tuned, pipe):
    data, path, _ = tuned
    if any(name in data["spec"] for name in ("ditcache", "deltacache", "adaptive")):  # both edit block ranges
        with pytest.raises(ConfigError, match="choose one"):
            call(pipe, accel=f"tuned(file={path})+deltacache")
    with pytest.raises(ConfigError, match="tuned given twice"):
        call(pipe, accel=f"tuned(file={path})+tuned(file={path})")


def test_cli_tune_writes_the_file(dit_folder, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["tune", "--model", str(dit_folder), "--budget", "0.5", "--steps", "4", "--class-label", "3",
                 "--guidance", "1", "--methods", "deltacache", "--quiet", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["format"] == "dite-tuned/1" and data["compute_fraction"] <= 0.5 and data["valid_for"]["steps"] == 4
    err = capsys.readouterr().err
    assert "chose " in err and "tuned in" in err
    code = main(["generate", "--model", str(dit_folder), "--class-label", "3", "--steps", "4", "--guidance", "1",
                 "--quiet", "--accel", f"tuned(file={out})", "-o", str(tmp_path / "x.png")])
    assert code == 0 and (tmp_path / "x.png").exists()
    capsys.readouterr()
    # Tuned unguided, refused guided, in one line naming the field.
    code = main(["generate", "--model", str(dit_folder), "--class-label", "3", "--steps", "4", "--quiet",
                 "--accel", f"tuned(file={out})", "-o", str(tmp_path / "y.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "guidance 1.0, this call is guided" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "0 is not in (0, 1]"),
    (["--budget", "1.5"], "not in (0, 1]"),
    (["--budget", "nan"], "not a finite number"),
    (["--budget", "0.5", "--methods", "warp"], "--methods 'warp'"),
])
def test_cli_tune_bad_input(dit_folder, tmp_path, capsys, args, message):
    assert main(["tune", "--model", str(dit_folder), *args, "-o", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_tune_missing_output_folder(dit_folder, tmp_path, capsys):
    assert main(["tune", "--model", str(dit_folder), "--budget", "0.5", "-o", str(tmp_path / "no" / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


def test_library_refuses_a_bad_budget(pipe):
    for budget in (0, -0.1, 1.01, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="budget"):
            tune_module.Tuner(pipe, budget)


def test_default_prompts_are_no_held_out_demo_captions():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from demo_scenes import all_captions

    held_out = set(all_captions(True))
    assert not held_out & set(tune_module.DEFAULT_PROMPTS)
    assert len(set(tune_module.DEFAULT_PROMPTS)) >= 4


def test_cli_tune_searches_every_family_by_default(dit_folder, tmp_path, monkeypatch):
    seen = {}

    def fake_tune(pipe, budget, **options):
        seen.update(options)
        raise ConfigError("stop here")

    monkeypatch.setattr(tune_module, "tune", fake_tune)
    assert main(["tune", "--model", str(dit_folder), "--budget", "0.5", "--quiet", "-o", str(tmp_path / "t.json")]) == 2
    assert seen["methods"] == tune_module.FAMILIES and "schedule" in seen["methods"]
