"""r2ec/algo/off_policy.py and token_loss's weights: hand-derived values, shards add up to the whole, and a loop over
tokens equals the vectorised code."""

from __future__ import annotations

import math

import pytest
import torch

from r2ec.algo.off_policy import off_policy_weights
from r2ec.algo.recpo import token_loss

LOGP = torch.tensor([[math.log(0.5), math.log(0.3), float("-inf")], [math.log(0.9), math.log(0.1), math.log(0.2)]])
BEHAVIOUR = torch.tensor([[math.log(0.25), math.log(0.3), 0.0], [math.log(0.3), math.log(0.4), math.log(0.2)]])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])  # w = 2, 1, -, 3, 0.25, 1


def test_hand_values_of_each_correction():
    w_none, s = off_policy_weights(LOGP, BEHAVIOUR, MASK, "none")
    assert torch.equal(w_none, MASK.float()) and s.tokens == 5 and s.corrected == 0
    assert s.ratio_sum == pytest.approx(2 + 1 + 3 + 0.25 + 1)
    assert s.log_ratio_abs_max == pytest.approx(math.log(4))  # w = 0.25
    w_tis, s = off_policy_weights(LOGP, BEHAVIOUR, MASK, "tis", tis_cap=2.0)
    assert torch.allclose(w_tis, torch.tensor([[2.0, 1.0, 0.0], [2.0, 0.25, 1.0]])) and s.corrected == 1
    w_ice, s = off_policy_weights(LOGP, BEHAVIOUR, MASK, "icepop", icepop_low=0.5, icepop_high=2.0)
    assert torch.equal(w_ice, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])) and s.corrected == 2
    with pytest.raises(ValueError, match="'none', 'tis' or 'icepop'"):
        off_policy_weights(LOGP, BEHAVIOUR, MASK, "is")


def test_weighted_token_loss_by_hand_and_its_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.1, 0.2]])).requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    weights, _ = off_policy_weights(logp, BEHAVIOUR, MASK, "tis", tis_cap=2.0)
    out = token_loss(logp, logp.detach(), adv, MASK, num_tokens=5, weights=weights)  # ratio 1: loss = -w A
    assert out.loss.item() == pytest.approx(-(2 * 1 + 1 * 1 + 2 * -2 + 0.25 * -2 + 1 * -2) / 5)
    out.loss.backward()
    # d/dlogp of -w A rho at rho = 1 is -w A / N
    expected = -(weights * adv[:, None]) / 5
    assert torch.allclose(logp.grad, expected)


def test_shards_add_up_and_loop_equals_vectorised():
    g = torch.Generator().manual_seed(0)
    logp = torch.log(torch.rand(6, 7, generator=g) * 0.9 + 0.05)
    behaviour = torch.log(torch.rand(6, 7, generator=g) * 0.9 + 0.05)
    mask = torch.rand(6, 7, generator=g) > 0.3
    adv = torch.randn(6, generator=g)
    for mode in ("none", "tis", "icepop"):
        w, s = off_policy_weights(logp, behaviour, mask, mode)
        halves = [off_policy_weights(logp[i:i + 3], behaviour[i:i + 3], mask[i:i + 3], mode) for i in (0, 3)]
        assert torch.equal(torch.cat([h[0] for h in halves]), w)
        assert sum(h[1].tokens for h in halves) == s.tokens and sum(h[1].corrected for h in halves) == s.corrected
        assert sum(h[1].ratio_sum for h in halves) == pytest.approx(s.ratio_sum)
        n = int(mask.sum())
        whole = token_loss(logp, logp, adv, mask, num_tokens=n, weights=w).loss
        parts = sum(token_loss(logp[i:i + 3], logp[i:i + 3], adv[i:i + 3], mask[i:i + 3], num_tokens=n,
                               weights=w[i:i + 3]).loss for i in (0, 3))
        assert whole.item() == pytest.approx(parts.item())
        loop = 0.0
        for i in range(6):
            for t in range(7):
                if mask[i, t]:
                    r = math.exp(logp[i, t] - behaviour[i, t])
                    wt = {"none": 1.0, "tis": min(r, 2.0), "icepop": 1.0 if 0.5 <= r <= 2.0 else 0.0}[mode]
                    loop += -wt * adv[i].item() / n
        assert whole.item() == pytest.approx(loop, rel=1e-5)
