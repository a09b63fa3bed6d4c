"""Parallel generation (engine/parallel) on CPU with gloo: every plan gives the image of one
process (fp32, 1e-5), wrong plans are refused before start. Each multi-process test spawns
its ranks once and runs several cases in them (spawning is most of the time here)."""

from __future__ import annotations

import pytest

from dite.engine.errors import ConfigError
from dite.engine.parallel.plan import ParallelPlan, check_call, check_world, parse_plan

TOLERANCE = 1e-5
FASTATTN = (3, ["full_attn", "residual_window_attn", "output_share", "residual_window_attn"])  # window crosses shards


@pytest.fixture(scope="module")
def folders(sd3, tmp_path_factory):
    from tiny import tiny_dit_pipeline
    from tiny_pixart import tiny_pixart_pipeline

    dit = tmp_path_factory.mktemp("parallel-dit")
    tiny_dit_pipeline(dit)
    _, pixart = tiny_pixart_pipeline(tmp_path_factory.mktemp("parallel-pixart"), depth=4)
    return {"sd3": str(sd3[1]), "pixart": str(pixart), "dit": str(dit), "tmp": str(tmp_path_factory.mktemp("plans"))}


def case(folders, family, parallel, accel=None, images=2, steps=4, fastattn=None):
    call = {"num_inference_steps": steps, "guidance_scale": 4.0, "accel": accel}
    if family == "dit":
        call["labels"] = [3, 5, 1, 7][:images]
    else:
        call["prompts"] = ["a red cube", "two blue balls", "a green tree", "snow"][:images]
    name = f"{family} {parallel} {accel or ''}{' fastattn' if fastattn else ''}"
    return {"name": name, "folder": folders[family], "parallel": parallel, "call": call, "tmp": folders["tmp"],
            "fastattn": fastattn}


def run_cases(nproc, cases):
    from dite.engine.parallel import spawn
    from parallel_cases import compare_cases

    results = spawn(compare_cases, nproc, cases, timeout_s=60)
    for r in results:
        assert r["latents"] <= TOLERANCE and r["images"] <= TOLERANCE, r
        if r["accel_effect"] is not None:
            assert r["accel_effect"] > 1e-4, f"{r['name']}: the accel methods changed nothing, so test nothing"
    return {r["name"]: r for r in results}


def test_plan_parsing():
    assert parse_plan("cfg=2,ulysses=2") == ParallelPlan(cfg=2, ulysses=2)
    assert parse_plan({"data": 2}).world == 2
    assert ParallelPlan(cfg=2, ulysses=2, data=2).coords(5) == (1, 0, 1)
    for bad, words in [("cfg=3", "two branches"), ("tensor=2", "unknown axis"), ("cfg", "NAME=N"),
                       ("cfg=two", "whole number"), ({"cfg": 0}, "positive"), ({}, "dict like")]:
        with pytest.raises(ConfigError, match=words):
            parse_plan(bad)


def test_load_refuses_a_bad_plan_or_no_process_group_before_reading(tmp_path, monkeypatch):
    from dite.engine import load

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match="two branches"):
        load(missing, parallel="cfg=3")
    with pytest.raises(ConfigError, match="needs a process group: run under torchrun"):
        load(missing, parallel={"cfg": 2})


def test_wrong_products_and_calls_are_refused():
    with pytest.raises(ConfigError, match=r"needs 2 x 1 x 1 = 2 processes, but there are 3"):
        check_world(parse_plan("cfg=2"), 3)
    plan = ParallelPlan(cfg=2, ulysses=2)
    ok = dict(guided=True, images=2, grid=(4, 4), stateful_cfg=False)
    check_call(plan, **ok)
    for change, words in [({"guided": False}, "not guided"), ({"grid": (5, 4)}, "5 rows"),
                          ({"stateful_cfg": True}, "CFG sharing")]:
        with pytest.raises(ConfigError, match=words):
            check_call(plan, **{**ok, **change})
    with pytest.raises(ConfigError, match="3 images"):
        check_call(ParallelPlan(data=2), **{**ok, "images": 3})


def test_wrong_product_refused_before_start_in_ranks(folders):
    """3 processes for cfg=2: every rank refuses at enable(), before any generation."""
    from dite.engine.parallel import ParallelError

    from dite.engine.parallel import spawn
    from parallel_cases import enable_only

    with pytest.raises(ParallelError, match=r"cfg=2 needs 2 x 1 x 1 = 2 processes, but there are 3"):
        spawn(enable_only, 3, folders["dit"], "cfg=2", timeout_s=30)


def test_cfg_and_data_parallel_equal_one_process(folders):
    cases = [case(folders, f, p) for f in ("sd3", "pixart", "dit") for p in ("cfg=2", "data=2")]
    # The adaptive cache decides per sample; under data alone each sample's rows are on one rank.
    adaptive = case(folders, "dit", "data=2", "adaptive(threshold=10,warmup=1)", steps=6)
    results = run_cases(2, cases + [adaptive])
    assert results.pop(adaptive["name"])["stats"]["calls"] == {"all_gather": 6}
    # One all-gather of this rank's prediction rows per step: 2 images x 8x8 latents x the
    # output channels (SD3 4; PixArt and DiT 8, their learned sigma), fp32, to the other rank.
    for name, r in results.items():
        channels = 4 if name.startswith("sd3") else 8
        for step in r["stats"]["per_step"]:
            assert step == {"step": step["step"], "bytes_sent": 2 * channels * 8 * 8 * 4, "calls": {"all_gather": 1}}


def ulysses_step_bytes(*, rows, heads, head_dim, tokens, depth, out_channels, patch, text_tokens=0, ranks=2,
                       item=4):
    """Bytes one rank sends per plain step under ulysses=`ranks`, counted from the model's
    sizes: per block the q, k, v of its tokens to the other ranks' heads and the attention
    output back (all-to-all: (P-1)/P of the tensor), the text rows of the output to every
    other rank (all-gather), then the final layer's output band to every other rank."""
    band = tokens // ranks
    qkv = 3 * rows * heads * band * head_dim * item * (ranks - 1) // ranks
    out = rows * (heads // ranks) * tokens * head_dim * item * (ranks - 1) // ranks
    text = rows * (heads // ranks) * text_tokens * head_dim * item * (ranks - 1)
    final = rows * out_channels * patch * patch * band * item * (ranks - 1)  # unpatchified band
    return depth * (qkv + out + text) + final


def test_ulysses_equals_one_process(folders):
    results = run_cases(2, [case(folders, "sd3", "ulysses=2", "todo(factor=1.6,blocks=0:3)"),
                            case(folders, "pixart", "ulysses=2", "ditcache+promptgate(step=2)"),
                            case(folders, "dit", "ulysses=2", fastattn=FASTATTN),
                            case(folders, "sd3", "ulysses=2", images=1),
                            case(folders, "dit", "ulysses=2", images=1)])
    # Accounting, against counts made from the tiny models' sizes (tests/tiny.py: 2 heads of
    # 16, 3 blocks, 8x8 latents in patches of 2 = 16 tokens; SD3 4 output channels and
    # 77 CLIP + T5 text tokens, DiT 8 (learned sigma)); 1 image, guided: 2 rows.
    sd3 = results["sd3 ulysses=2 "]
    text = 77 + sd3["parameters"]["max_sequence_length"]
    expected = {"sd3 ulysses=2 ": (ulysses_step_bytes(rows=2, heads=2, head_dim=16, tokens=16, depth=3,
                                                      out_channels=4, patch=2, text_tokens=text), 3 + 1),
                "dit ulysses=2 ": (ulysses_step_bytes(rows=2, heads=2, head_dim=16, tokens=16, depth=3,
                                                      out_channels=8, patch=2), 1)}
    for name, (step_bytes, gathers) in expected.items():
        for step in results[name]["stats"]["per_step"]:
            assert step["bytes_sent"] == step_bytes, name
            assert step["calls"] == {"all_to_all": 2 * 3, "all_gather": gathers}, name


def test_promptgate_freed_rank_joins_sequence_parallelism(folders):
    """cfg=2: from the gate on, the unconditional rank takes half the tokens and heads of the
    conditional rows, with its half of the DiTCache deltas (SD3: image and replicated text
    streams) and of DiTFastAttn's stored residuals and outputs."""
    forecasting = [case(folders, "sd3", "cfg=2", "ditcache(order=1)+promptgate(step=2)", steps=6),
                   case(folders, "dit", "cfg=2", ADAPTIVE["dit"] + "+promptgate(step=2)", steps=6),
                   case(folders, "pixart", "cfg=2", "adaptive(threshold=1.1,warmup=1,judge=forecast)+promptgate(step=2)",
                        steps=6)]
    results = run_cases(2, [case(folders, "sd3", "cfg=2", "ditcache+promptgate(step=2)"),
                            case(folders, "pixart", "cfg=2", "ditcache+promptgate(step=2)"),
                            case(folders, "dit", "cfg=2", "promptgate(step=2)", fastattn=FASTATTN)] + forecasting)
    # Forecasting and adaptive ranges: their delta histories (and the adaptive cache's
    # references and signal history) are handed over split by tokens too; the adaptive
    # decisions are the one-process ones, their sums all-reduced over the joined pair.
    check_adaptive({c["name"]: results[c["name"]] for c in forecasting[1:]})
    for r in results.values():
        stats = r["stats"]
        assert stats["freed_at_step"] == 2 and stats["freed_ranks"] == "join the conditional ranks' Ulysses group"
        assert stats["per_step"][2]["calls"]["broadcast_object"] == 1  # the caches' hand-over, once
        assert "all_to_all" not in stats["per_step"][1]["calls"] and "all_to_all" in stats["per_step"][3]["calls"]


def test_cfg_times_ulysses_equals_one_process(folders):
    results = run_cases(4, [case(folders, "sd3", "cfg=2,ulysses=2", "ditcache+promptgate(step=2)"),
                            case(folders, "pixart", "cfg=2,ulysses=2", "todo"),
                            case(folders, "dit", "cfg=2,ulysses=2", fastattn=FASTATTN)])
    gated = results["sd3 cfg=2,ulysses=2 ditcache+promptgate(step=2)"]["stats"]
    # 2 heads cannot split 4 ways: the freed ranks stay idle and receive the prediction.
    assert gated["freed_at_step"] == 2 and gated["freed_ranks"] == "idle"


def test_cli_nproc_writes_the_one_process_images(folders, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from dite.engine.cli import main

    base = ["generate", "--model", folders["dit"], "--class-label", "1", "--class-label", "2", "--steps", "3",
            "--quiet"]
    assert main(base + ["--nproc", "3", "--parallel", "cfg=2", "-o", str(tmp_path / "x.png")]) == 2
    assert "cfg=2 needs 2 x 1 x 1 = 2 processes, but there are 3" in capsys.readouterr().err
    assert main(base + ["--nproc", "2", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs --parallel" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before start: nothing written
    assert main(base + ["--nproc", "2", "--parallel", "cfg=2", "--seed", "7", "-o", str(tmp_path / "par.png")]) == 0
    assert main(base + ["--seed", "7", "-o", str(tmp_path / "one.png")]) == 0
    for k in (0, 1):  # several images are named {stem}-{index}-{seed}
        parallel, one = (np.asarray(Image.open(tmp_path / f"{n}-{k}-{7 + k}.png")) for n in ("par", "one"))
        assert (parallel == one).all()
    # A random seed is drawn once, before the ranks start: they all use it.
    assert main(base + ["--nproc", "2", "--parallel", "cfg=2", "--seed", "-1", "-o", str(tmp_path / "r.png")]) == 0
    assert len(list(tmp_path.glob("r-*.png"))) == 2


# Thresholds at which the tiny models' two samples decide differently at some steps (found by
# running them on one process): a decision one rank took alone would show as a wrong image.
ADAPTIVE = {"sd3": "adaptive(threshold=1.1,warmup=1)", "pixart": "adaptive(threshold=1.1,warmup=1)",
            "dit": "adaptive(threshold=0.9,warmup=1)"}


def check_adaptive(results):
    """Every rank decided as one process did (the images match within TOLERANCE, and the
    decisions are the one-process ones); the decisions ran some samples and skipped others;
    each judged decision cost one all-reduce of the per-sample sums."""
    for name, r in results.items():
        parallel, one = r["decisions"]
        stats = r["stats"]
        if stats["freed_ranks"] == "idle" and len(parallel) < len(one):  # rank 0 freed by PromptGate
            assert parallel[-1]["step"] < stats["freed_at_step"] <= one[len(parallel)]["step"], name
        else:
            assert len(parallel) == len(one), name
        assert parallel == one[:len(parallel)], name
        flat = [ran for d in one for ran in d["ran"]]
        assert True in flat and False in flat, f"{name}: the decisions were all alike: {one}"
        if "schedule" in name:  # its listed steps run without judging
            continue
        # The first adaptive step has no reference: every sample runs, nothing is judged. After
        # the gate under cfg=2 alone, with the freed rank idle, the conditional rank holds its
        # samples whole: no exchange (joined, the two ranks split its tokens and exchange).
        alone_after = stats["freed_at_step"] if stats["freed_ranks"] == "idle" and "ulysses" not in name else 99
        judged = [s["step"] for s in stats["per_step"] if "all_reduce" in s["calls"]]
        assert judged == [d["step"] for d in parallel[1:] if d["step"] < alone_after], name
        for s in stats["per_step"]:
            assert s["calls"].get("all_reduce", 0) <= 1, name


def test_adaptive_cache_decides_alike_on_every_rank(folders):
    """The adaptive cache (and schedule(threshold=...), which emits the same ranges) under
    cfg=2 and ulysses=2: per-sample sums are all-reduced before the decision."""
    cases = [case(folders, f, p, ADAPTIVE[f], steps=6) for f in ("sd3", "pixart", "dit") for p in ("cfg=2", "ulysses=2")]
    scheduled = case(folders, "sd3", "cfg=2", "schedule(run=0.3,threshold=1.1)", steps=6)
    gated = case(folders, "pixart", "cfg=2", ADAPTIVE["pixart"] + "+promptgate(step=3)", steps=6)
    results = run_cases(2, cases + [scheduled, gated])
    check_adaptive(results)
    # cfg=2: per step one prediction gather (2 images x 4 channels x 8x8, fp32) plus, where a
    # decision is judged, the sums: [2, 2 samples] fp32 to the other rank.
    for step in results[cases[0]["name"]]["stats"]["per_step"]:
        judged = step["calls"].get("all_reduce", 0)
        assert step["bytes_sent"] == 2 * 4 * 8 * 8 * 4 + judged * 2 * 2 * 4


def test_adaptive_cache_under_cfg_times_ulysses(folders):
    """4 ranks: the sums of a sample come from 2 CFG rows x 2 token bands; after PromptGate's
    gate (the freed ranks idle while a range forecasts) from the conditional ranks' 2 bands."""
    gated = case(folders, "sd3", "cfg=2,ulysses=2", ADAPTIVE["sd3"] + "+promptgate(step=3)", steps=6)
    results = run_cases(4, [case(folders, f, "cfg=2,ulysses=2", ADAPTIVE[f], steps=6) for f in ("sd3", "pixart", "dit")]
                        + [gated])
    check_adaptive(results)
    stats = results[gated["name"]]["stats"]
    assert stats["freed_at_step"] == 3 and stats["freed_ranks"] == "idle"
