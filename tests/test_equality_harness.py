"""The equality check itself: what it accepts and what it must refuse (pure Python)."""

import pytest

from tests.harness.equality import (assert_fp8_as_accurate_as_stock, assert_outputs_equal,
                                    prompt_logprob_error)


def out(tokens, logprobs):
    return {"outputs": [{"token_ids": tokens, "logprobs": logprobs}]}


STOCK = out([5, 7], [{"5": -1.0, "9": -2.0}, {"7": -3.6421, "8": -3.6428}])


def test_equal_tokens_and_close_logprobs_pass():
    ours = out([5, 7], [{"5": -1.0004, "9": -2.0}, {"7": -3.6420, "8": -3.6430}])
    assert assert_outputs_equal(STOCK, ours, logprob_atol=1e-3) == pytest.approx(4e-4)


def test_a_near_tie_broken_the_other_way_passes():
    ours = out([5, 8], [{"5": -1.0, "9": -2.0}, {"8": -3.6422, "7": -3.6423}])
    assert_outputs_equal(STOCK, ours, logprob_atol=1e-2)


def test_a_real_token_difference_fails():
    ours = out([5, 8], [{"5": -1.0, "9": -2.0}, {"8": -3.2, "7": -3.6}])
    with pytest.raises(AssertionError, match="not as a tie"):
        assert_outputs_equal(STOCK, ours, logprob_atol=1e-2)


def test_a_tie_with_a_token_missing_from_the_top_logprobs_fails():
    ours = out([5, 8], [{"5": -1.0, "9": -2.0}, {"8": -3.6422, "1": -3.9}])
    with pytest.raises(AssertionError, match="not both in each engine's top logprobs"):
        assert_outputs_equal(STOCK, ours, logprob_atol=1e-2)


def test_logprobs_beyond_tolerance_fail():
    ours = out([5, 7], [{"5": -1.1, "9": -2.0}, {"7": -3.6421, "8": -3.6428}])
    with pytest.raises(AssertionError, match="logprob of token 5"):
        assert_outputs_equal(STOCK, ours, logprob_atol=1e-2)


def scored(*prompt_logprobs):
    return {"outputs": [{"prompt_logprobs": list(p)} for p in prompt_logprobs]}


TRUTH = scored([-1.0, -2.0], [-3.0])
STOCK_FP8 = scored([-1.1, -2.0], [-3.2])  # 0.1 mean, 0.2 largest from the truth


def test_prompt_logprob_error_is_mean_and_largest_over_every_prompt_token():
    mean, largest = prompt_logprob_error(TRUTH, STOCK_FP8)
    assert mean == pytest.approx(0.1) and largest == pytest.approx(0.2)


def test_fp8_as_accurate_as_stock_passes_within_the_slack():
    ours = scored([-0.9, -2.1], [-2.8])  # 0.133 mean, 0.2 largest
    report = assert_fp8_as_accurate_as_stock(TRUTH, STOCK_FP8, ours, "ours")
    assert report["ours_vs_truth"]["max"] == pytest.approx(0.2)


@pytest.mark.parametrize("ours", [scored([-1.0, -2.0], [-3.35]),    # largest 0.35 > 1.5 x 0.2
                                  scored([-1.16, -2.16], [-3.16])])  # mean 0.16 > 1.5 x 0.1
def test_fp8_farther_from_the_truth_than_stock_fails(ours):
    with pytest.raises(AssertionError, match="farther from the bf16 truth"):
        assert_fp8_as_accurate_as_stock(TRUTH, STOCK_FP8, ours, "ours")


def test_prompt_logprobs_of_different_lengths_fail():
    with pytest.raises(ValueError):
        prompt_logprob_error(TRUTH, scored([-1.0], [-3.0]))
