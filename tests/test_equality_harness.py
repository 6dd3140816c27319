"""The equality check itself: what it accepts and what it must refuse (pure Python)."""

import pytest

from tests.harness.equality import assert_outputs_equal


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
