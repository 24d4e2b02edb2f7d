"""Budgets and the policies' ranking rules, on hand-made slots, scores and stores (TOVA against the paper's
algorithm written out, AdaKV's allocation against a naive one)."""

import pytest
import torch
from harness import cpu_step

from yoco.compress import CORM, H2O, BudgetError, CompressedKV, PyramidKV, SnapKV, StreamingLLM, make_policy
from yoco.compress.policies import TOVA, AdaKV, check_budget, policy_for_context, pyramid_limit


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


# ---------------------------------------------------------------------- TOVA
def hand_made_store(policy, batch_size=1, n_kv_heads=2, dim=8, pad=None):
    return CompressedKV(policy, layer=0, n_layers=1, batch_size=batch_size, n_kv_heads=n_kv_heads, key_dim=dim,
                        value_dim=dim, dtype=torch.float32, pad=pad)


def kept_slots(store):
    """Per head, the sorted slots the store holds (one row)."""
    return [sorted(s for s in store.slots[0, head].tolist() if s >= 0) for head in range(store.slots.shape[1])]


def paper_tova(q, k, prompt, cache_size, heads):
    """The paper's TOVA written out (float64, one row): the prompt's last query keeps its top
    ``cache_size`` tokens; each new token joins the cache, its query attends the cache and itself, then
    the token it attended least of those leaves. Yields, per decode step, each K/V head's attended slots."""
    H, n, d = q.shape[1], k.shape[1], q.shape[-1]
    group = H // n

    def weights(t, held):  # [n] lists: query t's weight per K/V head on each slot of held[head]
        out = []
        for head in range(n):
            keys = k[0, head, held[head]].double()
            probs = torch.softmax(q[0, head * group:(head + 1) * group, t].double() @ keys.T * d ** -0.5, -1)
            out.append(probs.sum(0))
        if heads == "layer":
            total = sum(out)
            out = [total] * n
        return out

    held = [list(range(prompt))] * n
    w = weights(prompt - 1, held)
    held = [sorted(torch.tensor(held[h])[w[h].topk(cache_size).indices].tolist()) for h in range(n)]
    for t in range(prompt, q.shape[2]):
        held = [h_slots + [t] for h_slots in held]
        yield held
        w = weights(t, held)
        held = [[s for i, s in enumerate(held[h]) if i != int(w[h].argmin())] for h in range(n)]


@pytest.mark.parametrize("heads", ["kv", "layer"])
def test_tova_evicts_what_the_latest_query_attended_least(heads):
    # 2 K/V heads of 2 query heads each; a 20-token prompt; budget 7 = the paper's cache_size 6
    torch.manual_seed(0)
    prompt, steps, budget = 20, 30, 7
    q, k = torch.randn(1, 4, prompt + steps, 8), torch.randn(1, 2, prompt + steps, 8)
    store = hand_made_store(TOVA(budget, heads=heads))
    store.append(k[:, :, :prompt], k[:, :, :prompt])
    store.attend(q[:, :, :prompt], cpu_step(0, prompt))
    store.compress()
    assert store.entries == budget
    expected = paper_tova(q, k, prompt, budget - 1, heads)
    for t in range(prompt, prompt + steps):
        store.append(k[:, :, t:t + 1], k[:, :, t:t + 1])
        assert kept_slots(store) == next(expected), f"step {t}"
        store.attend(q[:, :, t:t + 1], cpu_step(t, 1))
        assert store.entries == budget  # never grows
    if heads == "layer":
        assert kept_slots(store)[0] == kept_slots(store)[1]
    else:
        assert kept_slots(store)[0] != kept_slots(store)[1]  # the heads chose for themselves


def test_tova_keeps_the_tokens_of_a_several_token_call():
    torch.manual_seed(1)
    q, k = torch.randn(1, 4, 23, 8), torch.randn(1, 2, 23, 8)
    store = hand_made_store(TOVA(8))
    store.append(k[:, :, :20], k[:, :, :20])
    store.attend(q[:, :, :20], cpu_step(0, 20))
    store.compress()
    before = kept_slots(store)
    score = {s: float(w) for s, w in zip(store.slots[0, 0].tolist(), store.score[0, 0])}  # the last query's weights
    store.append(k[:, :, 20:23], k[:, :, 20:23])  # three tokens in one call: all three stay
    least = sorted(before[0], key=score.get)[:3]
    assert kept_slots(store)[0] == sorted(set(before[0]) - set(least)) + [20, 21, 22]
    assert store.entries == 8


def test_tova_options():
    assert make_policy("tova", 16).heads == "kv" and make_policy("TOVA", 0.5).budget == 0.5
    assert policy_for_context("tova:heads=layer", 0.25, 100).heads == "layer"
    with pytest.raises(BudgetError, match="TOVA heads must be"):
        TOVA(16, heads="query")
    with pytest.raises(BudgetError, match="budget is required"):
        TOVA(None)


# ---------------------------------------------------------------------- AdaKV
def naive_adakv_choice(score, pad, limit, window, alpha):
    """Per row, per head, the slots Ada-SnapKV keeps (kernel_size 1) written out: each head's window,
    then its own top floor(alpha * limit) - window others, then the rest of limit x heads by score across
    every head of the row."""
    B, h, S = score.shape
    chosen = []
    for b in range(B):
        n = int(limit[b])
        real = list(range(int(pad[b]), S))
        recent = real[-window:]
        guaranteed = max(0, int(alpha * n) - window)
        rows = []
        for head in range(h):
            others = sorted((s for s in real if s not in recent), key=lambda s: -float(score[b, head, s]))
            rows.append(set(recent) | set(others[:guaranteed]))
        rest = sorted(((float(score[b, head, s]), head, s) for head in range(h) for s in real if s not in rows[head]),
                      reverse=True)
        for _, head, s in rest[:n * h - sum(len(r) for r in rows)]:
            rows[head].add(s)
        chosen.append([sorted(r) for r in rows])
    return chosen


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 1.0])
def test_adakv_shares_the_layer_budget_across_heads(alpha):
    torch.manual_seed(2)
    B, h, S, budget, window = 2, 4, 24, 7, 2  # 0.5 x 7: the floor of 3.5 counts
    pad = torch.tensor([0, 5])
    policy = AdaKV(budget, window=window, kernel_size=1, alpha_safeguard=alpha)
    store = hand_made_store(policy, batch_size=B, n_kv_heads=h, pad=pad)
    store.append(torch.randn(B, h, S, 8), torch.randn(B, h, S, 8))
    # heads of very different sharpness: the allocation must move budget between them
    store.score = torch.rand(B, h, S) ** torch.tensor([1.0, 8.0, 0.5, 3.0])[:, None]
    limit = policy.limit(store.prompt_tokens(), 0, 1)
    expected = naive_adakv_choice(store.score, pad, limit, window, alpha)
    head_limit = policy.head_limits(store, limit)
    assert head_limit.tolist() == [[len(r) for r in row] for row in expected]
    assert head_limit.sum(-1).tolist() == [budget * h] * B
    assert bool((head_limit >= int(alpha * budget)).all()) and bool((head_limit >= window).all())
    if alpha < 1:
        assert head_limit.max() > budget  # really uneven
    else:
        assert head_limit.tolist() == [[budget] * h] * B  # every head its own budget: SnapKV
    store.compress()
    assert store.live().tolist() == head_limit.tolist() and store.entries == int(head_limit.max())
    for b in range(B):
        assert [sorted(s for s in store.slots[b, head].tolist() if s >= 0) for head in range(h)] == expected[b]


@pytest.mark.parametrize("scores", ["uniform", "same-in-every-head"])
def test_adakv_with_heads_scoring_alike_is_snapkv(scores):
    torch.manual_seed(3)
    B, h, S = 2, 4, 30
    if scores == "uniform":
        score = torch.ones(B, h, S)
    else:
        score = torch.rand(B, 1, S).expand(B, h, S).clone()
    keys = torch.randn(B, h, S, 8)
    chosen = []
    for policy in (AdaKV(9, window=4), SnapKV(9, window=4)):
        store = hand_made_store(policy, batch_size=B, n_kv_heads=h, pad=torch.tensor([0, 4]))
        store.append(keys, keys)
        store.score = score.clone()
        store.compress()
        chosen.append((store.slots.tolist(), store.head_limit.tolist()))
    assert chosen[0] == chosen[1]
    assert chosen[0][1] == [[9] * h] * B


def test_adakv_options():
    assert make_policy("adakv", 0.25).alpha_safeguard == 0.2
    assert policy_for_context("adakv:alpha_safeguard=0.5:window=8", 0.25, 100).alpha_safeguard == 0.5
    for alpha in (-0.1, 1.5, "high"):
        with pytest.raises(BudgetError, match="alpha_safeguard"):
            AdaKV(0.25, alpha_safeguard=alpha)
    with pytest.raises(BudgetError, match="odd kernel_size"):
        AdaKV(0.25, kernel_size=2)


@pytest.mark.parametrize("kernel_size", [1, 5, 7])
def test_snapkv_pools_the_older_keys_as_snapkvs_code_does(kernel_size):
    # SnapKV's reference code (and kvpress's SnapKVPress): the window's attention over the older keys,
    # avg_pool1d with zero padding counted (count_include_pad), the window itself ranked above all
    S, window = 20, 6
    torch.manual_seed(kernel_size)
    score = torch.rand(1, 2, S)
    priority = SnapKV(8, window=window, kernel_size=kernel_size).priority(
        torch.arange(S).expand(1, 2, S), S - 1, score, None, None)
    expected = torch.nn.functional.avg_pool1d(score[..., :S - window], kernel_size, stride=1,
                                              padding=kernel_size // 2)
    torch.testing.assert_close(priority[..., :S - window].float(), expected, rtol=1e-6, atol=1e-7)
    assert bool((priority[..., S - window:] > priority[..., :S - window].max()).all())


@pytest.mark.parametrize("policy", [SnapKV(8, window=4), PyramidKV(8, window=4), AdaKV(8, window=4)])
def test_snapkv_pools_a_left_padded_row_as_alone(policy):
    # a row's left padding is no neighbour of its first tokens: their pooled scores (what decides
    # which prompt tokens are kept) are the row's own, not diluted by the pads' zeros
    S, pad = 12, 3
    torch.manual_seed(0)
    score = torch.rand(1, 2, S)
    alone = policy.priority(torch.arange(S).expand(1, 2, S), S - 1, score, None, None)
    slots = torch.arange(S + pad).expand(1, 2, S + pad)
    padded_score = torch.cat((torch.zeros(1, 2, pad), score), dim=-1)
    padded = policy.priority(slots, S + pad - 1, padded_score, None, torch.tensor([pad]))
    older = slice(0, S - 4)  # the entries scored by pooling (the last 4 are the protected window)
    torch.testing.assert_close(padded[..., pad:][..., older], alone[..., older], rtol=0, atol=1e-6)
