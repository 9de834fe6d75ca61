"""The margin-aware greedy comparison (tests/support/margins.py) fails where it should."""

from __future__ import annotations

import pytest
from margins import MARGIN_BOUND, compare_greedy, served_margins

CLEAR = [0.5, 0.4, 0.3, 0.2, 0.1]


def test_equal_runs_are_compared_to_the_end():
    comparison = compare_greedy([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [CLEAR], min_compared=5)
    assert comparison.complete and comparison.compared == 5
    assert "all 5 steps compared" in str(comparison)


def test_a_difference_at_a_clear_step_fails_and_names_it():
    with pytest.raises(AssertionError, match=r"differ at step 2 \(9 != 3\).*not a near tie"):
        compare_greedy([1, 2, 9, 4, 5], [1, 2, 3, 4, 5], [CLEAR], min_compared=0)


def test_a_near_tie_ends_the_comparison_there():
    margins = [0.5, 0.4, MARGIN_BOUND / 2, 0.2, 0.1]
    comparison = compare_greedy([1, 2, 9, 7, 7], [1, 2, 3, 4, 5], [margins], min_compared=2)
    assert not comparison.complete
    assert (comparison.compared, comparison.parted_at) == (2, 2)
    assert "part at step 2, a near tie" in str(comparison)
    # Agreeing through a near tie, the comparison goes on.
    comparison = compare_greedy([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [margins], min_compared=5)
    assert comparison.complete


def test_the_smallest_margin_of_either_run_decides():
    other = [0.5, 0.4, 0.001, 0.2, 0.1]
    comparison = compare_greedy([1, 2, 9], [1, 2, 3], [CLEAR, other], min_compared=2)
    assert comparison.parted_at == 2


def test_too_few_compared_steps_fail():
    margins = [0.5, MARGIN_BOUND / 2, 0.3]
    with pytest.raises(AssertionError, match="fewer than 3 steps compared"):
        compare_greedy([1, 9, 3], [1, 2, 3], [margins], min_compared=3)


def test_whole_answers_that_agree_need_no_minimum():
    """A short answer compared to its end (both runs stop there) is a complete comparison."""
    comparison = compare_greedy([7], [7], [CLEAR], min_compared=16)
    assert comparison.compared == 1 and comparison.parted_at is None


def test_runs_of_different_lengths_fail_without_a_parting():
    with pytest.raises(AssertionError, match="one run is longer"):
        compare_greedy([1, 2, 3], [1, 2, 3, 4], [CLEAR], min_compared=0)


def test_served_margins_are_top1_minus_top2():
    choice = {
        "token_ids": [5, 6],
        "logprobs": {
            "content": [
                {"top_logprobs": [{"logprob": -0.1}, {"logprob": -2.6}]},
                {"top_logprobs": [{"logprob": -1.0}, {"logprob": -1.0}]},
            ]
        },
    }
    assert served_margins(choice) == pytest.approx([2.5, 0.0])
    with pytest.raises(AssertionError, match="MARGIN_PARAMS"):
        served_margins({"token_ids": [5], "logprobs": None})
