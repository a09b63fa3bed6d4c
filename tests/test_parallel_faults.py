"""Faults of a parallel generation: a rank that dies or raises mid-generation ends every
rank with one error naming it and the cause; ranks making different calls refuse at start."""

from __future__ import annotations

import time

import pytest

from dite.engine.parallel import ParallelError, spawn

TIMEOUT_S = 15


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from tiny import tiny_dit_pipeline

    folder = tmp_path_factory.mktemp("faults-dit")
    tiny_dit_pipeline(folder)
    return str(folder)


@pytest.mark.parametrize("how, cause", [("kill", r"rank 1 died: killed by SIGKILL"),
                                        ("raise", r"rank 1 failed: RuntimeError: injected failure at step 2"),
                                        ("hang", r"rank 1 stopped answering .* 5 s timeout")])
def test_a_failing_rank_stops_every_rank_with_its_cause(dit_folder, how, cause):
    from parallel_cases import fail_mid_generation

    start = time.monotonic()
    with pytest.raises(ParallelError, match=cause) as info:
        spawn(fail_mid_generation, 2, dit_folder, 1, 2, how, 5, timeout_s=5)
    assert info.value.rank == 1
    # Not a speed claim: a bound that a hang (waiting for the dead peer for ever) would break.
    assert time.monotonic() - start < 120


def test_ranks_making_different_calls_refuse_at_start(dit_folder):
    from parallel_cases import mismatched_call

    with pytest.raises(ParallelError, match=r"disagree on the generation call \(differing: latents\)"):
        spawn(mismatched_call, 2, dit_folder, timeout_s=TIMEOUT_S)
