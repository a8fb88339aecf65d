"""OP, BWT and plasticity against the HFT paper's formulas, and clear errors for malformed matrices."""

import math

import pytest
import torch

from hft_plugin import HFTError
from hft_plugin.metrics import MetricError, bwt, check_matrix, op, plasticity

S = [
    [0.9, None, None, None],
    [0.7, 0.8, None, None],
    [0.6, 0.5, 0.9, None],
    [0.4, 0.6, 0.7, 1.0],
]


def test_last_row_by_default_matches_the_paper_formulas():
    # OP_t = 1/t sum_{i<=t} S_{t,i}; BWT_t = 1/(t-1) sum_{i<t} (S_{t,i} - S_{i,i}) (1-based in the paper)
    assert op(S) == pytest.approx((0.4 + 0.6 + 0.7 + 1.0) / 4)
    assert bwt(S) == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8) + (0.7 - 0.9)) / 3)
    assert plasticity(S) == pytest.approx((0.9 + 0.8 + 0.9 + 1.0) / 4)


@pytest.mark.parametrize("t, want_op, want_bwt, want_plasticity", [
    (0, 0.9, None, 0.9),
    (1, (0.7 + 0.8) / 2, 0.7 - 0.9, (0.9 + 0.8) / 2),
    (2, (0.6 + 0.5 + 0.9) / 3, ((0.6 - 0.9) + (0.5 - 0.8)) / 2, (0.9 + 0.8 + 0.9) / 3),
])
def test_any_row_on_request(t, want_op, want_bwt, want_plasticity):
    assert op(S, t) == pytest.approx(want_op)
    assert plasticity(S, t=t) == pytest.approx(want_plasticity)
    if want_bwt is None:
        with pytest.raises(MetricError, match="at least two tasks"):
            bwt(S, t)
    else:
        assert bwt(S, t) == pytest.approx(want_bwt)


def test_upper_triangle_is_ignored():
    full = [[row[i] if row[i] is not None else 123.0 for i in range(4)] for row in S]
    assert (op(full), bwt(full), plasticity(full)) == (op(S), bwt(S), plasticity(S))


def test_no_forgetting_gives_zero_bwt_and_learning_nothing_gives_zero_plasticity():
    kept = [[1.0, None], [1.0, 1.0]]
    assert bwt(kept) == 0.0 and op(kept) == 1.0
    assert plasticity([[0.0, None], [0.0, 0.0]]) == 0.0


def test_arrays_and_tensors_are_accepted():
    np = pytest.importorskip("numpy")
    matrix = [[0.5, 0.0], [0.25, 0.75]]
    for form in (np.array(matrix), torch.tensor(matrix), tuple(tuple(r) for r in matrix)):
        assert op(form) == pytest.approx(0.5)
        assert bwt(form) == pytest.approx(-0.25)
        assert plasticity(form) == pytest.approx(0.625)


def test_single_task():
    assert op([[0.3]]) == pytest.approx(0.3)
    assert plasticity([[0.3]]) == pytest.approx(0.3)


@pytest.mark.parametrize("bad, match", [
    ([], "empty"),
    ("0.5", "list of rows"),
    (0.5, "list of rows"),
    ([[0.5, 0.1]], r"square .* row 0 has 2 entries, expected 1"),
    ([[0.5], [0.1, 0.2]], r"row 0 has 1 entries, expected 2"),
    ([[0.5, None], [None, 0.2]], r"S\[1\]\[0\] is missing"),
    ([[0.5, None], [float("nan"), 0.2]], r"S\[1\]\[0\] = nan is not a finite number"),
    ([[0.5, None], [0.1, float("inf")]], r"S\[1\]\[1\] = inf"),
    ([[0.5, None], [0.1, "high"]], r"S\[1\]\[1\] = 'high'"),
    ([[0.5, "x"], [0.1, 0.2]], r"S\[0\]\[1\] = 'x' is not a number or None"),
    ([[True, None], [0.1, 0.2]], r"S\[0\]\[0\] = True"),
    ([0.5, 0.2], "Row 0 of the score matrix is float"),
])
def test_malformed_matrices_get_a_clear_error(bad, match):
    for metric in (op, bwt, plasticity):
        with pytest.raises(MetricError, match=match):
            metric(bad)


@pytest.mark.parametrize("t, match", [(4, r"outside the score matrix's rows 0\.\.3"), (-1, "outside"),
                                      (1.0, "not a row index"), (True, "not a row index")])
def test_bad_row_index(t, match):
    with pytest.raises(MetricError, match=match):
        op(S, t)


def test_metric_error_is_an_hft_error_and_a_value_error():
    assert issubclass(MetricError, HFTError) and issubclass(MetricError, ValueError)


def test_check_matrix_returns_floats_and_keeps_missing_upper_entries():
    clean = check_matrix([[1, None], [0, 1]])
    assert clean == [[1.0, None], [0.0, 1.0]]
    assert all(isinstance(v, float) for row in clean for v in row if v is not None)
    assert not any(math.isnan(v) for row in clean for v in row if v is not None)
