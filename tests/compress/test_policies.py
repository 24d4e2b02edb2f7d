"""Budgets and the policies' ranking rules, on hand-made slots and scores."""

import pytest
import torch

from yoco.compress import CORM, H2O, BudgetError, PyramidKV, SnapKV, StreamingLLM, make_policy
from yoco.compress.policies import check_budget, pyramid_limit


@pytest.mark.parametrize("budget", [0, -1, -0.5, 0.0, 1.5, "half", True, None])
def test_bad_budgets_are_refused(budget):
    with pytest.raises(BudgetError):
        SnapKV(budget)


def test_budget_kinds():
    assert check_budget(0.25) == 0.25 and isinstance(check_budget(1.0), float)  # ratio 1 = the whole prompt
    assert check_budget(64) == 64 and check_budget(64.0) == 64
    assert CORM().budget is None  # CORM's rule needs no budget
    prompt = torch.tensor([100, 7])
    assert SnapKV(0.25).limit(prompt, 0, 1).tolist() == [25, 2]
    assert SnapKV(40).limit(prompt, 0, 1).tolist() == [40, 40]


def test_unknown_policy_and_bad_options():
    with pytest.raises(BudgetError, match="unknown compression policy"):
        make_policy("quest", 0.5)
    with pytest.raises(BudgetError, match="odd kernel_size"):
        SnapKV(0.5, kernel_size=4)
    with pytest.raises(BudgetError, match="recent_queries"):
        CORM(window=8, recent_queries=16)
    with pytest.raises(BudgetError, match="sink"):
        StreamingLLM(4).check_limit(torch.tensor([4]))


def test_pyramid_schedule_follows_the_paper():
    cap, window, beta, L = 132, 32, 20, 5
    prompt = torch.tensor([10_000])
    per_layer = [int(pyramid_limit(torch.tensor([cap]), prompt, window, beta, i, L)) for i in range(L)]
    low = (cap - window) / beta
    high = 2 * (cap - window) - low
    assert per_layer == [window + int(high - i * (high - low) / (L - 1)) for i in range(L)]
    assert per_layer[0] > per_layer[-1] and abs(sum(per_layer) / L - cap) <= 1
    # infeasible (cap <= window) and single-layer caches fall back to SnapKV's flat budget
    assert int(pyramid_limit(torch.tensor([20]), prompt, window, beta, 3, L)) == 20
    assert int(pyramid_limit(torch.tensor([cap]), prompt, window, beta, 0, 1)) == cap
    # a short prompt clamps the top layer to the prompt
    short = torch.tensor([150])
    assert int(pyramid_limit(torch.tensor([cap]), short, window, beta, 0, L)) <= 150
    assert PyramidKV(cap).limit(prompt, 2, L).tolist() == [per_layer[2]]


def test_rankings():
    slots = torch.arange(10).view(1, 1, 10)
    score = torch.tensor([[[5.0, 0, 0, 9, 0, 0, 0, 1, 0, 0]]])
    limit = torch.tensor([4])
    top = lambda p, n: sorted(p.priority(slots, 9, score, limit, None).topk(n).indices.flatten().tolist())  # noqa: E731
    assert top(StreamingLLM(4, n_sink=2), 4) == [0, 1, 8, 9]
    assert top(H2O(4, recent=0.5), 4) == [0, 3, 8, 9]
    assert top(SnapKV(4, window=2, kernel_size=1), 4) == [0, 3, 8, 9]
    # CORM evicts old tokens no recent query attended to
    corm = CORM(window=3, recent_queries=2)
    last_attended = torch.tensor([[[9, 2, 3, 8, 4, 5, 6, 7, 8, 9]]])
    assert corm.evicted(slots, 9, last_attended).nonzero()[:, 2].tolist() == [1, 2, 4, 5, 6]
