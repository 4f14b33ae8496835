"""Report metrics against values computed by hand on tiny inputs (no model, no native ops)."""

import math

import pytest
import torch

from lowbit.compare.data import strided_windows
from lowbit.compare.metrics import (
    AgreementAccumulator,
    first_divergence,
    kl_divergence,
    perplexity,
    relative_error,
    token_nll,
    top1_agreement,
    topk_overlap,
)


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(7, 50)
    logp = torch.log_softmax(logits, -1)
    assert torch.equal(kl_divergence(logp, logp), torch.zeros(7, dtype=torch.float64))


def test_kl_matches_hand_computed_value():
    p, q = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.25, 0.75], dtype=torch.float64)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # 0.1438...
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-12)


def test_kl_ignores_tokens_the_reference_rules_out():
    # 0 · log(0 / q) is 0, not NaN.
    p, q = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(math.log(2), rel=1e-12)


def test_perplexity_of_a_uniform_distribution_is_the_vocab_size():
    vocab, n = 11, 5
    nll = token_nll(torch.zeros(n, vocab), torch.arange(n))
    assert torch.allclose(nll, torch.full((n,), math.log(vocab), dtype=torch.float64))
    assert perplexity(float(nll.sum()), n) == pytest.approx(vocab, rel=1e-12)


def test_perplexity_of_a_known_distribution():
    # Targets get probability 1/2 and 1/8: perplexity = (1/2 · 1/8)^(-1/2) = 4.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]], dtype=torch.float64)
    nll = token_nll(probs.log(), torch.tensor([0, 1]))
    assert perplexity(float(nll.sum()), 2) == pytest.approx(4.0, rel=1e-12)


def test_perplexity_rejects_nothing_scored():
    with pytest.raises(ValueError, match="at least one"):
        perplexity(0.0, 0)


def test_top1_agreement_of_a_known_pair():
    ref = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    other = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    assert top1_agreement(ref, other).tolist() == [1.0, 0.0, 1.0, 0.0]


def test_topk_overlap_counts_shared_members_regardless_of_order():
    ref = torch.tensor([[6.0, 5, 4, 3, 2, 1, 0]])
    same_set = torch.tensor([[2.0, 3, 4, 5, 6, 1, 0]])  # same top-5, reversed order
    two_shared = torch.tensor([[6.0, 5, 0, 0, 0, 9, 8]])  # top-2: tokens 5 and 6
    assert topk_overlap(ref, same_set, 5).item() == 1.0
    assert topk_overlap(ref, two_shared, 2).item() == 0.0
    assert topk_overlap(ref, ref + 1, 3).item() == 1.0


def test_relative_error():
    ref = torch.tensor([3.0, 4.0])
    assert relative_error(ref, ref) == 0.0
    assert relative_error(ref, torch.tensor([3.0, 4.5])) == pytest.approx(0.1)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # stopped early counts as diverging


def test_accumulator_over_windows_equals_one_pass():
    torch.manual_seed(0)
    ref_logits, logits = torch.randn(40, 30), torch.randn(40, 30)
    ref_hidden, hidden = torch.randn(40, 8), torch.randn(40, 8)
    whole, split = AgreementAccumulator(), AgreementAccumulator()
    whole.add(ref_logits, logits, ref_hidden, hidden)
    for rows in (slice(0, 13), slice(13, 40)):
        split.add(ref_logits[rows], logits[rows], ref_hidden[rows], hidden[rows])
    a, b = whole.result(), split.result()
    assert a.positions == b.positions == 40
    for field in ("kl_mean", "kl_p99", "top1", "top5", "logits_rel_error", "hidden_rel_error"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12)
    assert a.logits_rel_error == pytest.approx(relative_error(ref_logits, logits), rel=1e-12)


def test_accumulator_of_identical_outputs():
    logits, hidden = torch.randn(10, 20), torch.randn(10, 4)
    acc = AgreementAccumulator()
    acc.add(logits, logits.clone(), hidden, hidden.clone())
    r = acc.result()
    assert (r.kl_mean, r.kl_p99, r.top1, r.top5, r.logits_rel_error) == (0.0, 0.0, 1.0, 1.0, 0.0)


@pytest.mark.parametrize("n, context, stride", [(2, 4, 3), (10, 4, 2), (100, 32, 16), (33, 8, 7), (50, 16, 5)])
def test_strided_windows_score_every_position_once(n, context, stride):
    windows = strided_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.end - w.scored, w.end)]
    assert scored == list(range(1, n))
    for w in windows:
        assert 0 < w.scored < w.end - w.begin <= context  # a prediction inside the window for each
    # After the first window, each scored token sees at least context - stride tokens of history.
    for w in windows[1:]:
        assert (w.end - w.scored) - w.begin >= context - stride


def test_strided_windows_reject_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        strided_windows(1, 8, 4)
    for stride in (0, 8, 9):
        with pytest.raises(ValueError, match="stride"):
            strided_windows(10, 8, stride)


def test_rank_correlation():
    from lowbit.compare.metrics import rank_correlation

    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6·4 / (5·24)
    assert rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # ties take their mean rank
    assert rank_correlation([1, 2], [1, 2]) is None and rank_correlation([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="one length"):
        rank_correlation([1, 2, 3], [1, 2])
