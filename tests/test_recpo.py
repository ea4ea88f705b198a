"""Tests for r2ec.algo.recpo: hand-derived values, sharded == global, loop == vectorised."""

import math
import statistics

import pytest
import torch

from r2ec.algo.recpo import (
    RewardOutput,
    TokenLossOutput,
    catalogue_item_loss,
    centred_rows,
    compute_advantages,
    cosine_scores,
    fused_reward,
    grpo_advantages,
    item_loss,
    kl_penalty,
    relabel_mask,
    rloo_advantages,
    token_loss,
    unit_rows,
)

NEG_INF = float("-inf")
E = math.e

# Row splits used by the "sharded equals global" tests: uneven on purpose, one shard of size 1.
SHARDS = [(0, 2), (2, 3), (3, 6)]


# ---------------------------------------------------------------- cosine_scores


def test_cosine_scores_hand_values():
    # cos([1,0],[3,0]) = 1, cos([1,0],[1,1]) = 1/sqrt2, cos([0,2],[3,0]) = 0, cos([0,2],[1,1]) = 1/sqrt2
    h_user = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    h_items = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    got = cosine_scores(h_user, h_items, tau=0.5)
    r = 1 / math.sqrt(2)
    assert torch.allclose(got, torch.tensor([[2.0, 2 * r], [0.0, 2 * r]]), atol=1e-6)


def test_cosine_scores_upcasts_and_zero_vector_is_finite():
    got = cosine_scores(torch.randn(3, 4).bfloat16(), torch.randn(5, 4).bfloat16(), tau=0.02)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    zero = cosine_scores(torch.zeros(1, 4), torch.randn(2, 4), tau=0.02)
    assert torch.isfinite(zero).all()


def test_cosine_scores_on_a_table_normalised_once_equals_normalising_per_call():
    g = torch.Generator().manual_seed(0)
    h_user, h_items = torch.randn(4, 8, generator=g), torch.randn(30, 8, generator=g) * 5
    v = unit_rows(h_items)
    assert torch.allclose(v.norm(dim=-1), torch.ones(30))
    torch.testing.assert_close(cosine_scores(h_user, v, 0.02, items_unit=True), cosine_scores(h_user, h_items, 0.02))
    # items_unit trusts the caller: a table that is not unit rows is scored as it is (scaled by its norms)
    torch.testing.assert_close(cosine_scores(h_user, 2 * v, 0.02, items_unit=True),
                               2 * cosine_scores(h_user, h_items, 0.02))


# ---------------------------------------------------------------- fused_reward


def test_fused_reward_hand_values():
    # scores [2, 1, 1], target 2: rank 3 (item 1 ties with a smaller index) -> R_d = 1/log2(4) = 0.5;
    # R_c = e^1 / (e^2 + e + e) = 1 / (e + 2).
    out = fused_reward(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([2]), beta=0.05, k_r=1000)
    assert isinstance(out, RewardOutput)
    assert out.rank.tolist() == [3]
    assert out.r_d.item() == pytest.approx(0.5)
    assert out.r_c.item() == pytest.approx(1 / (E + 2))
    assert out.rewards.item() == pytest.approx(0.05 / (E + 2) + 0.95 * 0.5)
    # rank 3 > k_r = 2 -> the discrete part vanishes, only beta * R_c is left
    cut = fused_reward(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([2]), beta=0.05, k_r=2)
    assert cut.r_d.item() == 0.0
    assert cut.rewards.item() == pytest.approx(0.05 / (E + 2))


def test_fused_reward_masked_items_get_zero_probability():
    # [2, -inf, 1], target 2: rank 2 -> R_d = 1/log2(3); R_c = e / (e^2 + 0 + e) = 1 / (e + 1)
    out = fused_reward(torch.tensor([[2.0, NEG_INF, 1.0]]), torch.tensor([2]), beta=0.3)
    assert out.rank.tolist() == [2]
    assert out.r_d.item() == pytest.approx(1 / math.log2(3))
    assert out.r_c.item() == pytest.approx(1 / (E + 1))
    assert out.rewards.item() == pytest.approx(0.3 / (E + 1) + 0.7 / math.log2(3))


def test_fused_reward_errors_dtype_and_no_grad():
    with pytest.raises(ValueError):
        fused_reward(torch.tensor([[1.0, NEG_INF]]), torch.tensor([1]))  # target masked
    with pytest.raises(ValueError):
        fused_reward(torch.tensor([[1.0, float("nan")]]), torch.tensor([0]))
    scores = torch.randn(4, 50, requires_grad=True)
    out = fused_reward(scores.bfloat16(), torch.tensor([0, 1, 2, 3]))
    assert out.rewards.dtype == torch.float32 and not out.rewards.requires_grad
    assert out.rewards.shape == out.r_d.shape == out.r_c.shape == out.rank.shape == (4,)


def test_fused_reward_loop_equals_vectorised():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        scores = torch.randint(-3, 4, (10, 30), generator=g).double()  # many ties
        target = torch.randint(0, 30, (10,), generator=g)
        drop = torch.rand(10, 30, generator=g) < 0.3
        drop[torch.arange(10), target] = False
        scores = scores.masked_fill(drop, NEG_INF)
        out = fused_reward(scores, target, beta=0.1, k_r=8)
        for n, row in enumerate(scores.tolist()):
            t = target[n].item()
            rank = 1 + sum(1 for j, s in enumerate(row) if s > row[t] or (s == row[t] and j < t))
            r_d = 1 / math.log2(rank + 1) if rank <= 8 else 0.0
            r_c = math.exp(row[t]) / sum(math.exp(s) for s in row)  # exp(-inf) = 0
            assert out.rank[n].item() == rank
            assert out.rewards[n].item() == pytest.approx(0.1 * r_c + 0.9 * r_d, abs=1e-12)


# ---------------------------------------------------------------- advantages


def test_grpo_hand_values():
    # [1, 0, 0, 0]: mean 0.25, unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25 -> std 0.5
    # -> A = [0.75, -0.25, -0.25, -0.25] / 0.5; a constant group gives 0 / eps = 0.
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3]]))
    assert adv.tolist()[0] == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-6)
    assert adv.tolist()[1] == [0.0, 0.0, 0.0, 0.0]


def test_rloo_hand_values():
    # A_i = R_i - mean of the other three: [1 - 0, 0 - 1/3, 0 - 1/3, 0 - 1/3]
    adv = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert adv.tolist()[0] == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3], abs=1e-6)


def test_advantages_errors_and_dispatch():
    for fn in (grpo_advantages, rloo_advantages):
        with pytest.raises(ValueError, match="G >= 2"):
            fn(torch.ones(3, 1))
        with pytest.raises(ValueError):
            fn(torch.ones(4))  # must be (num_groups, G)
    with pytest.raises(ValueError):
        compute_advantages(torch.ones(2, 2), "ppo")
    r = torch.rand(3, 5)
    assert torch.equal(compute_advantages(r, "grpo"), grpo_advantages(r))
    assert torch.equal(compute_advantages(r, "rloo"), rloo_advantages(r))


def test_advantages_loop_equals_vectorised():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        rewards = torch.rand(5, 6, generator=g).double()
        grpo = grpo_advantages(rewards)
        rloo = rloo_advantages(rewards)
        for b, row in enumerate(rewards.tolist()):
            mean, std = statistics.fmean(row), statistics.stdev(row)
            for i, r in enumerate(row):
                others = [x for j, x in enumerate(row) if j != i]
                assert grpo[b, i].item() == pytest.approx((r - mean) / (std + 1e-8), abs=1e-12)
                assert rloo[b, i].item() == pytest.approx(r - sum(others) / len(others), abs=1e-12)


def test_advantages_sharded_by_groups_equals_global():
    rewards = torch.rand(6, 4)
    for fn in (grpo_advantages, rloo_advantages):
        parts = [fn(rewards[a:b]) for a, b in SHARDS]
        assert torch.equal(torch.cat(parts), fn(rewards))


# ---------------------------------------------------------------- relabel_mask


def test_relabel_mask_hand_values():
    adv = torch.tensor([[0.5, 1.0, 1.0, -1.0]])  # chains 1 and 2 tie: chain 1 (lower index) first
    assert relabel_mask(adv, 1).tolist() == [[False, True, False, False]]
    assert relabel_mask(adv, 2).tolist() == [[False, True, True, False]]
    assert relabel_mask(adv, 3).tolist() == [[True, True, True, False]]
    assert relabel_mask(adv, 10).tolist() == [[True, True, True, True]]  # clipped to G
    assert relabel_mask(adv, 0).tolist() == [[False, False, False, False]]
    with pytest.raises(ValueError):
        relabel_mask(adv, -1)
    with pytest.raises(ValueError):
        relabel_mask(torch.tensor([[float("nan"), 0.0]]), 1)


def test_relabel_mask_loop_equals_vectorised_with_ties():
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        adv = torch.randint(-2, 3, (7, 5), generator=g).float()
        for k in (1, 2, 4):
            got = relabel_mask(adv, k)
            for b, row in enumerate(adv.tolist()):
                chosen = set(sorted(range(5), key=lambda i: (-row[i], i))[:k])
                assert got[b].tolist() == [i in chosen for i in range(5)]


# ---------------------------------------------------------------- token_loss


def _token_example():
    """Two chains, three tokens; chain 1's last token is padding with logp = -inf."""
    old_logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    ratios = torch.tensor([[1.0, 1.5, 0.5], [1.5, 0.5, 1.0]])
    logp = (old_logp + ratios.log()).clone()
    logp[1, 2] = NEG_INF
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old_logp, adv, mask


def test_token_loss_hand_values_and_branches():
    logp, old_logp, adv, mask = _token_example()
    # eps_low 0.2, eps_high 0.28 -> clip range [0.8, 1.28]. per-token -min(rho A, clip(rho) A):
    #   A=+1, rho=1.0: min(1, 1)         = 1     -> -1     (inside range)
    #   A=+1, rho=1.5: min(1.5, 1.28)    = 1.28  -> -1.28  (clipped branch active)
    #   A=+1, rho=0.5: min(0.5, 0.8)     = 0.5   -> -0.5   (unclipped: pessimistic)
    #   A=-1, rho=1.5: min(-1.5, -1.28)  = -1.5  -> 1.5    (unclipped: pessimistic)
    #   A=-1, rho=0.5: min(-0.5, -0.8)   = -0.8  -> 0.8    (clipped branch active)
    # sum = -0.48 over 5 trained tokens; 2 of 5 clipped.
    out = token_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28)
    assert isinstance(out, TokenLossOutput)
    assert out.loss.item() == pytest.approx(-0.48 / 5, abs=1e-6)
    assert out.clip_frac.item() == pytest.approx(2 / 5)
    assert not out.clip_frac.requires_grad
    out.loss.backward()
    # d/dlogp of -rho A = -rho A (times 1/5) where the unclipped branch is active, 0 where clipped / masked
    expected = torch.tensor([[-1.0, 0.0, -0.5], [1.5, 0.0, 0.0]]) / 5
    assert torch.allclose(logp.grad, expected, atol=1e-6)


def test_token_loss_global_normaliser_and_float_mask():
    logp, old_logp, adv, mask = _token_example()
    a = token_loss(logp, old_logp, adv, mask, num_tokens=10).loss
    b = token_loss(logp, old_logp, adv, mask.float(), num_tokens=10).loss
    assert a.item() == pytest.approx(-0.48 / 10, abs=1e-6)
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        token_loss(logp, old_logp, adv, mask, num_tokens=0)


def test_token_loss_nan_safe_on_masked_positions():
    g = torch.Generator().manual_seed(0)
    old_logp = -torch.rand(3, 6, generator=g)
    logp = (old_logp + 0.1 * torch.randn(3, 6, generator=g)).clone()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 4:] = False
    logp[0, 4], logp[1, 5], logp[2, 4] = NEG_INF, float("nan"), 1e30
    old_logp = old_logp.clone()
    old_logp[2, 5] = NEG_INF
    logp.requires_grad_(True)
    out = token_loss(logp, old_logp, torch.tensor([1.0, -2.0, 0.5]), mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.clip_frac)
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()  # no gradient on untrained positions
    assert out.clip_frac.item() == 0.0  # with these ratios nothing is clipped ...
    assert (logp.grad[mask] != 0).all()  # ... so every trained token gets a gradient


def ref_token_loss(logp, old_logp, adv, mask, eps_low, eps_high, num_tokens):
    total, clipped_count = 0.0, 0
    for n in range(len(logp)):
        for t in range(len(logp[n])):
            if not mask[n][t]:
                continue
            rho = math.exp(logp[n][t] - old_logp[n][t])
            unclipped = rho * adv[n]
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high) * adv[n]
            total += -min(unclipped, clipped)
            clipped_count += clipped < unclipped
    return total / num_tokens, clipped_count / num_tokens


def _random_tokens(seed, n=6, t=7):
    g = torch.Generator().manual_seed(seed)
    old_logp = -3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    logp = old_logp + 0.5 * torch.randn(n, t, generator=g, dtype=torch.float64)  # ratios in & out of range
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    return logp.requires_grad_(True), old_logp, adv, mask


def test_token_loss_loop_equals_vectorised():
    for seed in range(4):
        logp, old_logp, adv, mask = _random_tokens(seed)
        out = token_loss(logp, old_logp, adv, mask, eps_low=0.2, eps_high=0.28, num_tokens=50)
        ref_loss, ref_clip = ref_token_loss(
            logp.tolist(), old_logp.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, 50
        )
        assert out.loss.item() == pytest.approx(ref_loss, abs=1e-12)
        assert out.clip_frac.item() == pytest.approx(ref_clip, abs=1e-12)


def test_token_loss_sharded_equals_global():
    logp, old_logp, adv, mask = _random_tokens(11)
    num_tokens = int(mask.sum())
    full = token_loss(logp, old_logp, adv, mask)
    (full_grad,) = torch.autograd.grad(full.loss, logp)
    loss_sum, clip_sum = 0.0, 0.0
    for a, b in SHARDS:  # each shard uses the GLOBAL token count; gradients accumulate in logp.grad
        part = token_loss(logp[a:b], old_logp[a:b], adv[a:b], mask[a:b], num_tokens=num_tokens)
        part.loss.backward()
        loss_sum, clip_sum = loss_sum + part.loss.item(), clip_sum + part.clip_frac.item()
    assert loss_sum == pytest.approx(full.loss.item(), abs=1e-6)
    assert clip_sum == pytest.approx(full.clip_frac.item(), abs=1e-6)
    assert torch.allclose(logp.grad, full_grad, atol=1e-6)


def test_token_loss_bf16_inputs():
    logp, old_logp, adv, mask = _random_tokens(3)
    out = token_loss(logp.detach().bfloat16(), old_logp.bfloat16(), adv.bfloat16(), mask)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


# ---------------------------------------------------------------- kl_penalty


def test_kl_penalty_hand_values():
    # token 0: ref - logp = log(0.25) - log(0.5) = -log 2 -> k3 = 0.5 + log 2 - 1; token 1: delta 0 -> 0;
    # token 2 is padding (-inf). Mean over 2 trained tokens.
    logp = torch.tensor([[math.log(0.5), -1.0, NEG_INF]], requires_grad=True)
    ref_logp = torch.tensor([[math.log(0.25), -1.0, -2.0]])
    mask = torch.tensor([[True, True, False]])
    kl = kl_penalty(logp, ref_logp, mask)
    assert kl.item() == pytest.approx((0.5 + math.log(2) - 1) / 2, abs=1e-6)
    kl.backward()
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - 0.5 on token 0, 0 on token 1 and the padding
    assert torch.allclose(logp.grad, torch.tensor([[0.5 / 2, 0.0, 0.0]]), atol=1e-6)
    assert kl_penalty(logp, ref_logp, mask, num_tokens=4).item() == pytest.approx(kl.item() / 2)


def test_kl_penalty_loop_equals_vectorised_and_sharded():
    for seed in range(3):
        logp, ref_logp, _, mask = _random_tokens(seed)
        full = kl_penalty(logp, ref_logp, mask)
        ref, count = 0.0, 0
        for lp_row, rf_row, m_row in zip(logp.tolist(), ref_logp.tolist(), mask.tolist(), strict=True):
            for lp, rf, m in zip(lp_row, rf_row, m_row, strict=True):
                if m:
                    ref += math.exp(rf - lp) - (rf - lp) - 1
                    count += 1
        assert full.item() == pytest.approx(ref / count, abs=1e-12)

        (full_grad,) = torch.autograd.grad(full, logp)
        parts = [kl_penalty(logp[a:b], ref_logp[a:b], mask[a:b], num_tokens=count) for a, b in SHARDS]
        total = sum(parts)
        total.backward()
        assert total.item() == pytest.approx(full.item(), abs=1e-6)
        assert torch.allclose(logp.grad, full_grad, atol=1e-6)


# ---------------------------------------------------------------- item_loss


def test_item_loss_hand_values_and_gradients():
    # Orthogonal unit vectors, tau 0.5 -> logits [[2, 0], [0, 2]]; each chain's own target has
    # log p = 2 - log(e^2 + 1) = -log(1 + e^-2).
    h_user = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    h_items = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    adv = torch.tensor([1.0, -0.5])
    log_p = -math.log(1 + E**-2)
    both = item_loss(h_user, h_items, labels, adv, torch.tensor([True, True]), tau=0.5)
    # -(1 * log p + (-0.5) * log p) / 2 chains
    assert both.item() == pytest.approx(-0.5 * log_p / 2, abs=1e-6)
    only_first = item_loss(h_user, h_items, labels, adv, torch.tensor([True, False]), tau=0.5)
    assert only_first.item() == pytest.approx(-log_p / 2, abs=1e-6)  # still divided by ALL chains
    global_norm = item_loss(h_user, h_items, labels, adv, torch.tensor([True, False]), 0.5, num_chains=4)
    assert global_norm.item() == pytest.approx(-log_p / 4, abs=1e-6)

    only_first.backward()
    assert h_user.grad.abs().sum() > 0 and h_items.grad.abs().sum() > 0
    # chain 1 is not relabelled: its hidden state gets no gradient
    assert h_user.grad[1].abs().sum() == 0


def test_item_loss_nan_safe_for_non_relabelled_chains():
    h_user = torch.randn(3, 4, requires_grad=True)
    h_items = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([0.7, float("nan"), float("inf")])
    loss = item_loss(h_user, h_items, torch.tensor([0, 1, 2]), adv, torch.tensor([True, False, False]))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(h_user.grad).all() and torch.isfinite(h_items.grad).all()


def ref_item_loss(h_user, h_items, labels, adv, relabel, tau, num_chains):
    def unit(v):
        norm = max(math.sqrt(sum(x * x for x in v)), 1e-8)
        return [x / norm for x in v]

    items = [unit(v) for v in h_items]
    total = 0.0
    for n, u in enumerate(h_user):
        if not relabel[n]:
            continue
        u = unit(u)
        logits = [sum(a * b for a, b in zip(u, v, strict=True)) / tau for v in items]
        log_z = math.log(sum(math.exp(z) for z in logits))
        total += -adv[n] * (logits[labels[n]] - log_z)
    return total / num_chains


def _random_items(seed, n=6, m=4, d=5):
    g = torch.Generator().manual_seed(seed)
    h_user = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    h_items = torch.randn(m, d, generator=g, dtype=torch.float64).requires_grad_(True)
    labels = torch.randint(0, m, (n,), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    relabel = torch.rand(n, generator=g) < 0.6
    return h_user, h_items, labels, adv, relabel


def test_item_loss_loop_equals_vectorised():
    for seed in range(4):
        h_user, h_items, labels, adv, relabel = _random_items(seed)
        got = item_loss(h_user, h_items, labels, adv, relabel, tau=0.1, num_chains=9)
        ref = ref_item_loss(
            h_user.tolist(), h_items.tolist(), labels.tolist(), adv.tolist(), relabel.tolist(), 0.1, 9
        )
        assert got.item() == pytest.approx(ref, abs=1e-10)


def test_item_loss_sharded_equals_global():
    # each shard holds its own chains but all M candidates; gradients accumulate on both leaves
    h_user, h_items, labels, adv, relabel = _random_items(5)
    full = item_loss(h_user, h_items, labels, adv, relabel, tau=0.05)
    full_gu, full_gi = torch.autograd.grad(full, (h_user, h_items))
    total = 0.0
    for a, b in SHARDS:
        part = item_loss(h_user[a:b], h_items, labels[a:b], adv[a:b], relabel[a:b], 0.05, num_chains=6)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    assert torch.allclose(h_user.grad, full_gu, atol=1e-6)
    assert torch.allclose(h_items.grad, full_gi, atol=1e-6)
    assert h_items.grad.abs().sum() > 0


def test_item_loss_gradient_is_minus_adv_grad_log_p():
    # The official ratio form -A * p / sg(p) has the same gradient as our -A * log p at ratio 1.
    h_user, h_items, labels, adv, relabel = _random_items(2)
    ours = item_loss(h_user, h_items, labels, adv, relabel, tau=0.1)
    g_ours = torch.autograd.grad(ours, (h_user, h_items))
    log_p = torch.log_softmax(cosine_scores(h_user, h_items, 0.1), -1).gather(1, labels[:, None]).squeeze(1)
    p = log_p.exp()
    ratio_form = -(relabel * adv * p / p.detach()).sum() / len(adv)
    g_ratio = torch.autograd.grad(ratio_form, (h_user, h_items))
    for a, b in zip(g_ours, g_ratio, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


# ---------------------------------------------------------------- catalogue_item_loss


def test_catalogue_item_loss_hand_values_and_gradients():
    # Catalogue of 3 unit rows, tau 0.5. User 0 = [1, 0] with target 0 and item 2 in its history: logits
    # [2, 0, masked] -> log p = 2 - log(e^2 + e^0) = -log(1 + e^-2). User 1 = [0, 1] with target 1, no history:
    # logits [0, 2, 0] -> log p = 2 - log(e^2 + 2).
    cands = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], requires_grad=True)
    h_user = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    history = torch.tensor([[2, -1], [-1, -1]])
    adv = torch.tensor([1.0, 2.0])
    loss = catalogue_item_loss(h_user, cands, torch.tensor([0, 1]), history, adv, torch.tensor([True, True]),
                               tau=0.5, num_chains=4)
    expected = -(1.0 * -math.log(1 + E**-2) + 2.0 * (2 - math.log(E**2 + 2))) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert h_user.grad.abs().sum() > 0 and cands.grad.abs().sum() > 0
    only_user0 = catalogue_item_loss(h_user[:1], cands, torch.tensor([0]), history[:1], adv[:1],
                                     torch.tensor([True]), tau=0.5)
    grad = torch.autograd.grad(only_user0, cands)[0]
    assert grad[2].abs().sum() == 0 and grad[1].abs().sum() > 0  # its masked history row gets no gradient


def test_catalogue_item_loss_never_masks_the_target():
    table = torch.eye(3)
    h_user = torch.tensor([[1.0, 0.0, 0.0]])
    # the target (0) is also in the history (a repeat): it stays rankable, the other history item is masked
    loss = catalogue_item_loss(h_user, table, torch.tensor([0]), torch.tensor([[0, 1]]), torch.ones(1),
                               torch.ones(1, dtype=torch.bool), tau=1.0)
    assert loss.item() == pytest.approx(-(1 - math.log(E + 1)), abs=1e-6)


def _random_catalogue(seed, n=6, v=7, d=5, h=3):
    g = torch.Generator().manual_seed(seed)
    h_user = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_(True)
    table = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.randint(0, v, (n,), generator=g)
    history = torch.randint(-1, v, (n, h), generator=g)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    relabel = torch.rand(n, generator=g) < 0.7
    return h_user, table, target, history, adv, relabel


def test_catalogue_item_loss_loop_equals_vectorised():
    def unit(x):
        norm = max(math.sqrt(sum(a * a for a in x)), 1e-8)
        return [a / norm for a in x]

    for seed in range(4):
        h_user, table, target, history, adv, relabel = _random_catalogue(seed)
        got = catalogue_item_loss(h_user, table, target, history, adv, relabel, tau=0.1, num_chains=9)
        rows = table.tolist()
        total = 0.0
        for n in range(len(h_user)):
            if not relabel[n]:
                continue
            u = unit(h_user[n].tolist())
            masked = {int(x) for x in history[n] if x >= 0 and x != target[n]}
            logits = {j: sum(a * b for a, b in zip(u, unit(r), strict=True)) / 0.1 for j, r in enumerate(rows)
                      if j not in masked}
            log_z = math.log(sum(math.exp(z) for z in logits.values()))
            total += -float(adv[n]) * (logits[int(target[n])] - log_z)
        assert got.item() == pytest.approx(total / 9, abs=1e-10)


def test_catalogue_item_loss_sharded_equals_global():
    h_user, table, target, history, adv, relabel = _random_catalogue(7)
    full = catalogue_item_loss(h_user, table, target, history, adv, relabel, 0.05)
    full_gu, full_gt = torch.autograd.grad(full, (h_user, table))
    total = 0.0
    for a, b in SHARDS:
        part = catalogue_item_loss(h_user[a:b], table, target[a:b], history[a:b], adv[a:b], relabel[a:b], 0.05,
                                   num_chains=6)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-9)
    assert torch.allclose(h_user.grad, full_gu, atol=1e-9) and torch.allclose(table.grad, full_gt, atol=1e-9)
    assert table.grad.abs().sum() > 0


def test_catalogue_item_loss_without_history_on_the_batch_targets_equals_item_loss():
    # With no history and the batch's targets as the whole catalogue, the catalogue loss is the in-batch loss.
    h_user, h_items, labels, adv, relabel = _random_items(3)
    got = catalogue_item_loss(h_user, h_items, labels, torch.full((len(labels), 1), -1), adv, relabel, 0.1)
    assert got.item() == pytest.approx(item_loss(h_user, h_items, labels, adv, relabel, 0.1).item(), abs=1e-12)


def test_centred_rows_subtracts_the_mean_row():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.equal(centred_rows(x), torch.tensor([[-1.0, -2.0], [1.0, 2.0]]))  # mean row (2, 4), by hand
