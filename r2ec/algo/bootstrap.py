"""Confidence intervals that resample users: the percentile bootstrap over users (a cluster bootstrap).

A recommender's test samples are not independent: one user contributes many samples (on MovieLens-100k a test user
has 60 on average), and they share the user's taste. Resampling samples treats them as independent and gives
intervals far too narrow; resampling *users*, each with all of their samples, is the standard cure (the "cluster"
or "block" bootstrap). A resample draws U users with replacement out of the U users evaluated; its statistic is the
mean of the per-sample values over every sample of the drawn users (a user drawn twice counts twice):

    mean_b = sum_u w_bu * S_u / sum_u w_bu * C_u,

with S_u the sum of user u's per-sample values, C_u its number of samples and w_bu how often resample b drew u.
The 95% interval is the 2.5% and 97.5% percentiles of mean_b over the resamples (linear interpolation between order
statistics, numpy's and torch's default).

Paired comparisons use the same formula on per-sample differences (method B minus method A on the same samples), so
each resample keeps both methods' samples of a user together and the user-to-user variation common to both cancels.

Users are numbered by the caller (``user`` holds 0..U-1); the draws depend only on (U, resamples, seed), so two
evaluations that number the same users the same way (``user_codes`` sorts the ids) share their draws. Pure: imports
torch only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Resamples are processed in chunks so that the (R, U) weight matrix stays small for tens of thousands of users.
_CHUNK = 128


def user_codes(user_ids: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
    """(N,) long code of each sample's user, numbering the distinct ids in sorted order; and those ids (U,)."""
    users = sorted(set(user_ids))
    code = {u: i for i, u in enumerate(users)}
    return torch.as_tensor([code[u] for u in user_ids], dtype=torch.long), users


def user_sums(values: torch.Tensor, user: torch.Tensor, num_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user sums of ``values`` (N, M) -> (U, M) float64, and per-user sample counts (U,) float64.

    Additive over shards: the sums of two disjoint shards of samples add up to the sums of their union."""
    values = values.to(torch.float64).reshape(len(user), -1)
    sums = torch.zeros(num_users, values.shape[1], dtype=torch.float64).index_add_(0, user, values)
    counts = torch.bincount(user, minlength=num_users).to(torch.float64)
    return sums, counts


def draw_users(num_users: int, resamples: int, seed: int) -> torch.Tensor:
    """(R, U) long: resample b draws users ``draws[b]`` (U draws with replacement out of U)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_users, (resamples, num_users), generator=g)


def resample_means(sums: torch.Tensor, counts: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """(R, M) float64: the mean over all samples of each resample's drawn users (see the module docstring).

    sums (U, M) float64, counts (U,) float64, draws (R, U) long."""
    out = []
    for lo in range(0, len(draws), _CHUNK):
        d = draws[lo: lo + _CHUNK]
        w = torch.zeros(len(d), len(counts), dtype=torch.float64).scatter_add_(
            1, d, torch.ones_like(d, dtype=torch.float64))  # (r, U) times each user was drawn
        out.append((w @ sums) / (w @ counts).unsqueeze(1))
    return torch.cat(out)


def percentile_interval(means: torch.Tensor, level: float = 0.95) -> torch.Tensor:
    """(M, 2) float64 [lo, hi]: the (1-level)/2 and (1+level)/2 percentiles of ``means`` (R, M) over R."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(means.to(torch.float64), q, dim=0).T


def user_bootstrap_ci(values: torch.Tensor, user: torch.Tensor, num_users: int, resamples: int = 1000,
                      seed: int = 0, level: float = 0.95) -> torch.Tensor:
    """(M, 2) float64: the user-bootstrap percentile interval of the mean of each column of ``values`` (N, M) (or
    (N,) -> (1, 2)); ``user`` (N,) long holds each sample's user code in 0..num_users-1."""
    if len(values) == 0:
        raise ValueError("no samples: a bootstrap interval needs at least one")
    sums, counts = user_sums(values, user, num_users)
    if bool((counts == 0).any()):
        raise ValueError(f"{int((counts == 0).sum())} of the {num_users} user codes have no sample; number the "
                         "users that occur 0..U-1 (user_codes)")
    return percentile_interval(resample_means(sums, counts, draw_users(num_users, resamples, seed)), level)


__all__ = ["draw_users", "percentile_interval", "resample_means", "user_bootstrap_ci", "user_codes", "user_sums"]
