"""DeltaHistory: exact Newton extrapolation of a cached block range's delta, per batch row."""

import pytest
import torch

from dite.engine.errors import ConfigError
from dite.engine.runtime.forecast import DeltaHistory

KEY = (2, 5)


def poly(coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-row polynomial trajectory: coeffs [deg+1, B, ...], x [B] -> sum_k coeffs[k] x^k."""
    shape = (-1,) + (1,) * (coeffs.dim() - 2)
    return sum(c * x.view(shape).to(c.dtype) ** k for k, c in enumerate(coeffs))


def record_poly(hist, coeffs, xs, key=KEY, stream="image"):
    for x in xs:
        hist.record(key, x, {stream: poly(coeffs, x)})


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("degree", [0, 1, 2])
def test_order_k_is_exact_for_degree_k_on_uneven_per_row_coords(degree, dtype, rtol):
    g = torch.Generator().manual_seed(degree)
    batch = 3
    coeffs = torch.randn(degree + 1, batch, 4, 5, generator=g, dtype=torch.float64).to(dtype)
    # Uneven and different per row (a sigma-like coordinate falling towards 0).
    xs = torch.tensor([[1.0, 0.93, 0.71], [0.9, 0.55, 0.5], [0.8, 0.74, 0.41],
                       [0.6, 0.37, 0.22]], dtype=torch.float64)
    hist = DeltaHistory(order=degree)
    record_poly(hist, coeffs, xs[:3].to(dtype))
    target = xs[3].to(dtype)
    got = hist.forecast(KEY, target)["image"]
    want = poly(coeffs.double(), xs[3])
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * want.abs().max().item())


def test_order_one_is_exact_where_order_zero_is_not():
    coeffs = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.float64).view(2, 2, 1)
    xs = [torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64)]
    target = torch.tensor([2.5, 4.0], dtype=torch.float64)
    want = poly(coeffs, target)
    h0, h1 = DeltaHistory(order=0), DeltaHistory(order=1)
    record_poly(h0, coeffs, xs)
    record_poly(h1, coeffs, xs)
    torch.testing.assert_close(h1.forecast(KEY, target)["image"], want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(h0.forecast(KEY, target)["image"], want)


def test_order_two_beats_order_one_on_a_parabola():
    coeffs = torch.tensor([0.2, -1.0, 4.0], dtype=torch.float64).view(3, 1, 1)
    xs = [torch.tensor([v], dtype=torch.float64) for v in (0.0, 0.3, 1.0)]
    target = torch.tensor([1.7], dtype=torch.float64)
    want = poly(coeffs, target)
    h1, h2 = DeltaHistory(order=1), DeltaHistory(order=2)
    record_poly(h1, coeffs, xs)
    record_poly(h2, coeffs, xs)
    torch.testing.assert_close(h2.forecast(KEY, target)["image"], want, rtol=1e-12, atol=1e-12)
    assert (h1.forecast(KEY, target)["image"] - want).abs().max() > 1.0


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_order_zero_and_single_record_return_the_last_delta_bitwise(order, dtype):
    g = torch.Generator().manual_seed(1)
    hist = DeltaHistory(order=order)
    first = torch.randn(2, 3, 4, generator=g).to(dtype)
    last = torch.randn(2, 3, 4, generator=g).to(dtype)
    hist.record(KEY, 0.0, {"image": first})
    if order == 0:
        hist.record(KEY, 1.0, {"image": last})
        got = hist.forecast(KEY, 7.5)["image"]
        assert torch.equal(got, last) and got.dtype == dtype
        picked = hist.forecast(KEY, 7.5, rows=torch.tensor([1]))["image"]
        assert torch.equal(picked, last[1:])
    else:  # one record: the order drops to 0
        got = hist.forecast(KEY, 7.5)["image"]
        assert torch.equal(got, first) and got.dtype == dtype


def test_order_two_with_two_records_is_order_one():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    h1, h2 = DeltaHistory(order=1), DeltaHistory(order=2)
    for h in (h1, h2):
        h.record(KEY, 0.9, {"image": a})
        h.record(KEY, 0.6, {"image": b})
    got = h2.forecast(KEY, 0.45)["image"]
    torch.testing.assert_close(got, h1.forecast(KEY, 0.45)["image"], rtol=0, atol=0)
    torch.testing.assert_close(got, b + (b - a) * (0.45 - 0.6) / (0.6 - 0.9), rtol=1e-5, atol=1e-5)


def test_rows_with_different_history_lengths_in_one_call():
    # Row 0: three records on a parabola (order 2). Row 1: two records (order 1).
    # Row 2: one record (order 0). All forecast in one vectorised call.
    hist = DeltaHistory(order=2)

    def f(x: float, rows: list[int]) -> torch.Tensor:  # row 0: x^2, row 1: 2x + 1, row 2: 5
        return torch.tensor([[x * x], [2 * x + 1], [5.0]], dtype=torch.float64)[rows]

    hist.record(KEY, 0.0, {"image": f(0.0, [0, 1, 2])})
    hist.record(KEY, 1.0, {"image": f(1.0, [0, 1])}, rows=torch.tensor([0, 1]))
    hist.record(KEY, 3.0, {"image": f(3.0, [0])}, rows=torch.tensor([0]))
    got = hist.forecast(KEY, 4.0)["image"].flatten()
    # row 0: 16 (exact parabola); row 1: the line through x=0,1 of 2x+1 at 4 -> 9; row 2: 5
    torch.testing.assert_close(got, torch.tensor([16.0, 9.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(hist.last_coord(KEY), torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))


def test_recording_a_subset_keeps_the_other_rows_history():
    hist = DeltaHistory(order=1)
    a = torch.arange(12.0).view(3, 4)
    hist.record(KEY, 0.0, {"image": a})
    hist.record(KEY, 1.0, {"image": a + 1})
    before = hist.forecast(KEY, 2.0, rows=torch.tensor([0, 2]))["image"]
    hist.record(KEY, 2.0, {"image": torch.full((1, 4), 100.0)}, rows=torch.tensor([1]))
    after = hist.forecast(KEY, 2.0)["image"]
    assert torch.equal(after[[0, 2]], before)
    torch.testing.assert_close(after[1], torch.full((4,), 100.0))  # a record at the target coordinate
    torch.testing.assert_close(hist.last_coord(KEY), torch.tensor([1.0, 2.0, 1.0]))


def test_recording_at_the_same_coordinate_replaces_the_newest_record():
    hist = DeltaHistory(order=1)
    hist.record(KEY, 0.0, {"image": torch.zeros(1, 2)})
    hist.record(KEY, 1.0, {"image": torch.ones(1, 2)})
    hist.record(KEY, 1.0, {"image": torch.full((1, 2), 3.0)})  # replaces, coords stay distinct
    torch.testing.assert_close(hist.forecast(KEY, 2.0)["image"], torch.full((1, 2), 6.0))


def test_ring_buffer_keeps_only_the_newest_records():
    hist = DeltaHistory(order=1)
    for x, v in [(0.0, 100.0), (1.0, 1.0), (2.0, 2.0), (3.0, 3.0)]:  # the first point is off the line
        hist.record(KEY, x, {"image": torch.full((2, 1), v)})
    assert hist._ranges[KEY].values["image"].shape[0] == 2  # order+1 records, no more
    torch.testing.assert_close(hist.forecast(KEY, 5.0)["image"], torch.full((2, 1), 5.0))


def test_select_rows_keeps_and_renumbers_rows():
    hist = DeltaHistory(order=1)
    rows = torch.arange(4.0).view(4, 1, 1)
    hist.record(KEY, 0.0, {"image": rows})
    hist.record(KEY, 1.0, {"image": rows * 2})  # row r: r + r * x
    hist.select_rows(slice(2, 4))
    assert hist.batch == 2
    torch.testing.assert_close(hist.forecast(KEY, 3.0)["image"].flatten(), torch.tensor([8.0, 12.0]))
    hist.select_rows(torch.tensor([1]))
    torch.testing.assert_close(hist.forecast(KEY, 3.0)["image"].flatten(), torch.tensor([12.0]))
    hist.record(KEY, 2.0, {"image": torch.zeros(1, 1, 1)})
    with pytest.raises(ConfigError, match="rows"):
        hist.record(KEY, 3.0, {"image": torch.zeros(2, 1, 1)})


def test_two_streams_image_and_text():
    g = torch.Generator().manual_seed(3)
    batch, n, t, d = 2, 6, 3, 4
    ci = torch.randn(2, batch, n, d, generator=g, dtype=torch.float64)
    ct = torch.randn(2, batch, t, d, generator=g, dtype=torch.float64)
    hist = DeltaHistory(order=1)
    for x in (0.25, 0.75):
        xx = torch.full((batch,), x, dtype=torch.float64)
        hist.record(KEY, x, {"image": poly(ci, xx), "text": poly(ct, xx)})
    out = hist.forecast(KEY, 1.5)
    target = torch.full((batch,), 1.5, dtype=torch.float64)
    assert out["image"].shape == (batch, n, d) and out["text"].shape == (batch, t, d)
    torch.testing.assert_close(out["image"], poly(ci, target))
    torch.testing.assert_close(out["text"], poly(ct, target))
    with pytest.raises(ConfigError, match="streams"):
        hist.record(KEY, 2.0, {"image": poly(ci, target)})


def test_forecasting_unrecorded_rows_raises():
    hist = DeltaHistory(order=2)
    with pytest.raises(ConfigError, match=r"blocks \[2, 5\).*no earlier step recorded"):
        hist.forecast(KEY, 0.5)
    hist.batch = 3  # a batch size known from another range
    hist.record(KEY, 1.0, {"image": torch.ones(2, 4)}, rows=torch.tensor([0, 2]))
    assert hist.recorded(KEY).tolist() == [True, False, True]
    assert hist.recorded(KEY, torch.tensor([1, 2])).tolist() == [False, True]
    assert torch.isnan(hist.last_coord(KEY)[1])
    with pytest.raises(ConfigError, match=r"blocks \[2, 5\).*rows \[1\].*never recorded"):
        hist.forecast(KEY, 0.5)
    torch.testing.assert_close(hist.forecast(KEY, 0.5, rows=torch.tensor([2]))["image"], torch.ones(1, 4))
    with pytest.raises(ConfigError, match=r"rows \[1\]"):  # still missing after a forecast of other rows
        hist.forecast(KEY, 0.5, rows=torch.tensor([1, 2]))
    hist.record(KEY, 1.0, {"image": torch.full((1, 4), 2.0)}, rows=torch.tensor([1]))
    torch.testing.assert_close(hist.forecast(KEY, 0.5)["image"][1], torch.full((4,), 2.0))


def test_first_record_of_a_subset_needs_a_known_batch():
    with pytest.raises(ConfigError, match="record all rows first"):
        DeltaHistory(order=1).record(KEY, 0.0, {"image": torch.ones(1, 2)}, rows=torch.tensor([0]))
    with pytest.raises(ConfigError, match="order"):
        DeltaHistory(order=-1)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_no_host_reads_once_every_row_has_recorded(order):
    # Meta tensors hold no data: any .item()/.tolist()/bool() on them raises, so running
    # record and forecast on meta proves they never wait for the device (zero host syncs).
    meta = torch.device("meta")
    hist = DeltaHistory(order=order)
    hist.record(KEY, 0.5, {"image": torch.empty(2, 3, 4, device=meta), "text": torch.empty(2, 5, 4, device=meta)})
    hist.record(KEY, torch.tensor(0.3, device=meta),
                {"image": torch.empty(1, 3, 4, device=meta), "text": torch.empty(1, 5, 4, device=meta)},
                rows=torch.tensor([1], device=meta))
    out = hist.forecast(KEY, torch.full((1,), 0.1, device=meta), rows=torch.tensor([1], device=meta))
    assert out["image"].shape == (1, 3, 4) and out["text"].shape == (1, 5, 4)
    assert hist.forecast(KEY, 0.1)["image"].shape == (2, 3, 4)
    hist.select_rows(slice(1, 2))
    assert hist.forecast(KEY, 0.1)["text"].shape == (1, 5, 4)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_shared_slot_path_matches_the_per_row_path(order, dtype, tol):
    """Whole-batch records at host coordinates take the host-scalar path (no index kernels);
    the same records written row by row take the general one: the forecasts agree."""
    g = torch.Generator().manual_seed(order)
    shared, per_row = DeltaHistory(order), DeltaHistory(order)
    all_rows = torch.arange(3)
    for k, x in enumerate([0.0, 1.0, 3.0, 4.0, 7.0][: order + 2]):
        d = {"image": torch.randn(3, 4, 5, generator=g).to(dtype), "text": torch.randn(3, 2, generator=g).to(dtype)}
        shared.record(KEY, x, d)
        if k == 0:
            per_row.record(KEY, x, d)
        else:
            per_row.record(KEY, x, d, rows=all_rows)  # a subset record (of every row): per-row bookkeeping
        assert shared._ranges[KEY].shared is not None
    assert per_row._ranges[KEY].shared is None
    for x in (7.5, 9.0):
        for rows in (None, torch.tensor([2, 0])):
            a, b = shared.forecast(KEY, x, rows=rows), per_row.forecast(KEY, x, rows=rows)
            for s in a:
                assert a[s].dtype == dtype
                scale = b[s].double().abs().max().item()
                torch.testing.assert_close(a[s].double(), b[s].double(), rtol=tol, atol=tol * scale)


def test_a_subset_record_ends_the_shared_path_and_the_rows_keep_their_histories():
    hist = DeltaHistory(order=1)
    hist.record(KEY, 0.0, {"image": torch.tensor([[0.0], [0.0]])})
    hist.record(KEY, 1.0, {"image": torch.tensor([[1.0], [2.0]])})
    assert hist._ranges[KEY].shared is not None
    torch.testing.assert_close(hist.forecast(KEY, 2.0)["image"], torch.tensor([[2.0], [4.0]]))
    hist.record(KEY, 2.0, {"image": torch.tensor([[10.0]])}, rows=torch.tensor([1]))  # row 1 only
    assert hist._ranges[KEY].shared is None
    # row 0: the line through (0, 0), (1, 1); row 1: through (1, 2), (2, 10)
    torch.testing.assert_close(hist.forecast(KEY, 3.0)["image"], torch.tensor([[3.0], [18.0]]))
    hist.record(KEY, 3.0, {"image": torch.tensor([[3.0], [18.0]])})  # whole batch again: still per row
    assert hist._ranges[KEY].shared is None
    torch.testing.assert_close(hist.forecast(KEY, 4.0)["image"], torch.tensor([[4.0], [26.0]]))


@pytest.mark.parametrize("per_row", [False, True])
def test_a_lower_degree_uses_only_the_newest_records(per_row):
    """One order-2 history serves order-1 (and order-0) forecasts on chosen steps: the same
    numbers an order-1 history of the same records gives."""
    g = torch.Generator().manual_seed(5)
    h2, h1 = DeltaHistory(order=2), DeltaHistory(order=1)
    rows = torch.arange(2) if per_row else None
    for k, x in enumerate((0.0, 1.0, 3.0)):
        d = {"image": torch.randn(2, 3, generator=g)}
        for h in (h2, h1):
            h.record(KEY, x, d, rows=rows if k else None)
    assert (h2._ranges[KEY].shared is None) == per_row
    torch.testing.assert_close(h2.forecast(KEY, 4.0, degree=1)["image"], h1.forecast(KEY, 4.0)["image"],
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(h2.forecast(KEY, 4.0, degree=0)["image"], h2.forecast(KEY, 3.0, degree=0)["image"])
    torch.testing.assert_close(h2.forecast(KEY, 4.0, degree=0)["image"], h1._ranges[KEY].values["image"][
        h1._ranges[KEY].head[0]])
    assert not torch.allclose(h2.forecast(KEY, 4.0)["image"], h2.forecast(KEY, 4.0, degree=1)["image"])
