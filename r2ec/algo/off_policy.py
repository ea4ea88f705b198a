"""Off-policy correction of the token term for the one-step-off pipeline (``rollout.async``), as pure tensor code.

With ``rollout.async`` the chains of step k are sampled with the weights after step k - 2 (the behaviour policy
pi_b, whose per-token log-probs the sampler returns) while the learner holds the weights after step k - 1 (pi_theta,
which is also the PPO term's pi_old: the ratio inside the clip stays exactly 1 with one update per rollout). The
per-token importance ratio w = pi_theta / pi_b (detached) corrects for the gap (``recpo.off_policy``):

- ``none``: w is ignored (each token weighs 1), as the synchronous loop;
- ``tis``: truncated importance sampling, each token's loss weighted by min(w, ``recpo.tis_cap``) (verl's and
  slime's "TIS"; the cap bounds the variance a few unlikely tokens would add);
- ``icepop``: tokens whose w leaves [``recpo.icepop_low``, ``recpo.icepop_high``] get weight 0, the others 1
  (IcePop, Ring-1T: a token the two policies disagree on is dropped rather than reweighted).

Neither is in the R2ec paper, whose trainer samples on-policy. The statistics (``OffPolicyStats``) are sums and
counts over this shard's trained tokens, so the caller can combine shards exactly.

Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Correction = Literal["none", "tis", "icepop"]


@dataclass
class OffPolicyStats:
    tokens: int  # trained tokens (mask) of this shard
    ratio_sum: float  # sum of w over them
    corrected: int  # tokens whose weight differs from w (truncated by tis, dropped by icepop); 0 for none
    log_ratio_abs_max: float  # max |log w| over them (0 when there are none)


def off_policy_weights(logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor, mode: Correction,
                       tis_cap: float = 2.0, icepop_low: float = 0.5, icepop_high: float = 2.0
                       ) -> tuple[torch.Tensor, OffPolicyStats]:
    """Per-token weights (N, T) of the token loss (detached, 0 off the mask) and the ratio statistics.

    Args:
        logp: (N, T) log pi_theta of each token (the learner's; detached here).
        behaviour_logp: (N, T) log pi_b of each token (the sampler's).
        mask: (N, T) bool or float, 1 on the trained tokens.
    """
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    # torch.where, so padding's -inf / NaN never reaches exp
    log_w = torch.where(keep, logp.detach().float() - behaviour_logp.detach().float().to(logp.device), zero)
    w = torch.where(keep, torch.exp(log_w), zero)
    if mode == "none":
        weights, corrected = keep.float(), torch.zeros((), dtype=torch.long)
    elif mode == "tis":
        weights = w.clamp(max=tis_cap)
        corrected = (keep & (w > tis_cap)).sum()
    elif mode == "icepop":
        inside = keep & (w >= icepop_low) & (w <= icepop_high)
        weights, corrected = inside.float(), (keep & ~inside).sum()
    else:
        raise ValueError(f"off-policy correction must be 'none', 'tis' or 'icepop', got {mode!r}")
    n = int(keep.sum())
    stats = OffPolicyStats(tokens=n, ratio_sum=float(w.sum()), corrected=int(corrected),
                           log_ratio_abs_max=float(log_w.abs().max()) if n else 0.0)
    return weights, stats
