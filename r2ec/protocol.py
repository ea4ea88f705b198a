"""Typed data contracts between the driver, the rollout workers and the learner ranks.

Everything here crosses a process boundary (Ray pickles it), so fields are plain Python values and CPU tensors.
Chains are always grouped: the G chains of prompt i are rows ``i*G .. i*G+G-1``.

Deviation from the official code: tokens of an appended answer marker (a chain that hit the length limit or EOS
without writing it) are not policy actions, so they carry no behaviour log-prob and are left out of the token loss;
they still feed the forward pass that gives h_T.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from r2ec.spans import Span


@dataclass
class Rollout:
    """G sampled chains for each of B prompts (N = B*G rows), with what the learner needs from the sampler."""

    chain_ids: list[list[int]]  # N chains of token ids, each ending with the answer marker
    logp: torch.Tensor  # (N, L) float32: behaviour log-prob of each chain token (raw logits, temperature 1)
    logp_mask: torch.Tensor  # (N, L) float32: 1 for sampled tokens; 0 for padding and appended marker tokens
    appended_marker: torch.Tensor  # (N,) bool: the marker was appended, not generated
    h_T: torch.Tensor  # (N, d) float32: final hidden state (after the final norm) at the chain's last token
    weight_version: int  # the learner step whose weights produced these chains
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase ("generate", "hidden")
    spans: list[Span] = field(default_factory=list)  # each worker's phases, for the step timeline (r2ec.spans)

    def __post_init__(self) -> None:
        n = len(self.chain_ids)
        for name in ("logp", "logp_mask", "appended_marker", "h_T"):
            if getattr(self, name).shape[0] != n:
                raise ValueError(f"Rollout.{name} has {getattr(self, name).shape[0]} rows for {n} chains")

    def __len__(self) -> int:
        return len(self.chain_ids)

    @property
    def num_sampled_tokens(self) -> int:
        return int(self.logp_mask.sum().item())

    def select(self, rows: Sequence[int]) -> Rollout:
        rows = list(rows)
        idx = torch.as_tensor(rows, dtype=torch.long)
        return Rollout([self.chain_ids[r] for r in rows], self.logp[idx], self.logp_mask[idx],
                       self.appended_marker[idx], self.h_T[idx], self.weight_version, dict(self.timings),
                       list(self.spans))

    @classmethod
    def concat(cls, parts: Sequence[Rollout]) -> Rollout:
        """Join rollouts in order; timings are summed (worker-seconds), spans joined, the version must agree."""
        if not parts:
            raise ValueError("nothing to concatenate")
        versions = {p.weight_version for p in parts}
        if len(versions) != 1:
            raise ValueError(f"rollouts come from different weight versions {sorted(versions)}")
        length = max(p.logp.shape[1] for p in parts)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, length - t.shape[1]))

        timings: dict[str, float] = {}
        for p in parts:
            for k, v in p.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        return cls([c for p in parts for c in p.chain_ids], torch.cat([pad(p.logp) for p in parts]),
                   torch.cat([pad(p.logp_mask) for p in parts]), torch.cat([p.appended_marker for p in parts]),
                   torch.cat([p.h_T for p in parts]), versions.pop(), timings, [s for p in parts for s in p.spans])


@dataclass
class TrainShard:
    """One learner rank's part of an optimiser step: whole groups, plus the step's global normalisers."""

    prompt_ids: list[list[int]]  # U prompts
    rollout: Rollout  # U*G chains, grouped by prompt
    history_idx: torch.Tensor  # (U, H) long: the users' earlier items, -1 padded (masked when scoring)
    target_idx: torch.Tensor  # (U,) long: the next item of each user
    num_tokens: int  # sampled chain tokens in the whole step, all ranks (token-loss normaliser)
    num_chains: int  # chains in the whole step, all ranks: the item-loss normaliser (the official code averages
    # the item term over every chain of the batch, relabelled or not)
    table_updates_idx: torch.Tensor  # (K,) long: item rows re-encoded by any rank in the previous step
    table_updates: torch.Tensor  # (K, d) float32: their new embeddings, applied before scoring

    def __post_init__(self) -> None:
        users = len(self.prompt_ids)
        if len(self.rollout) % max(users, 1) or self.target_idx.shape[0] != users or self.history_idx.shape[0] != users:
            raise ValueError(
                f"TrainShard: {users} prompts, {len(self.rollout)} chains, {self.target_idx.shape[0]} targets and "
                f"{self.history_idx.shape[0]} histories do not form whole groups"
            )


@dataclass
class WarmupShard:
    """One learner rank's part of a warm-up step: users without chains (h is read at prompt + answer marker)."""

    seqs: list[list[int]]  # U token sequences: each user's prompt followed by the answer marker's tokens
    history_idx: torch.Tensor  # (U, H) long: the users' earlier items, -1 padded (masked in the catalogue softmax)
    target_idx: torch.Tensor  # (U,) long: the next item of each user
    num_users: int  # users in the whole step, all ranks: the loss normaliser
    table_updates_idx: torch.Tensor  # (K,) long: item rows re-encoded by any rank in the previous step
    table_updates: torch.Tensor  # (K, d) float32: their new embeddings, applied before the step

    def __post_init__(self) -> None:
        users = len(self.seqs)
        if self.target_idx.shape[0] != users or self.history_idx.shape[0] != users:
            raise ValueError(f"WarmupShard: {users} sequences, {self.target_idx.shape[0]} targets and "
                             f"{self.history_idx.shape[0]} histories")


Reduce = Literal["sum", "mean", "max"]


def _metric(reduce: Reduce, key: str | None = None, optional: bool = False):
    """A metric field: how it combines over learner ranks and, where the name is not an identifier, its key."""
    meta = {"reduce": reduce, "key": key}
    return field(default=None, metadata=meta) if optional else field(metadata=meta)


class RankMetrics(Mapping[str, float]):
    """One learner rank's scalars for one step. Each field declares how it combines over ranks:

    - ``sum``: parts of one globally normalised quantity (the losses: every rank divides by the step's global
      counts, so the ranks' parts add up to the loss) and counts (tokens, users);
    - ``max``: alarms and times (the worst rank is the one to see; the step waits for the slowest rank);
    - ``mean``: statistics of a rank's own chains (each rank holds the same number of chains, so the mean over
      ranks is the statistic over the step).

    Read like a mapping of metric key to value (fields left ``None`` are absent), so a record is
    ``{**metrics}``; :meth:`reduce` combines the ranks' records into the step's."""

    @classmethod
    def _keys(cls) -> list[tuple[str, str, Reduce]]:  # (attribute, key, reduction) per field
        return [(f.name, f.metadata["key"] or f.name, f.metadata["reduce"]) for f in fields(cls)]

    def __getitem__(self, key: str) -> float:
        for attr, k, _ in self._keys():
            if k == key and getattr(self, attr) is not None:
                return getattr(self, attr)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for attr, k, _ in self._keys() if getattr(self, attr) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @classmethod
    def reduce(cls, per_rank: Sequence[RankMetrics]) -> dict[str, float]:
        """The step's record from every rank's metrics (a field unset on the first rank is left out)."""
        if not per_rank or any(type(m) is not cls for m in per_rank):
            raise TypeError(f"{cls.__name__}.reduce needs a non-empty list of {cls.__name__}, got "
                            f"{[type(m).__name__ for m in per_rank]}")
        out: dict[str, float] = {}
        for attr, key, how in cls._keys():
            vals = [getattr(m, attr) for m in per_rank]
            if vals[0] is None:
                continue
            out[key] = sum(vals) if how == "sum" else max(vals) if how == "max" else sum(vals) / len(vals)
        return out


@dataclass(eq=True)
class StepMetrics(RankMetrics):
    """A RecPO step on one learner rank (``LearnerWorker.train_step``)."""

    loss_token: float = _metric("sum")  # this rank's share of the token loss (the step's token mean)
    loss_item: float = _metric("sum")  # this rank's share of the item loss (the step's user mean)
    reward_mean: float = _metric("mean")  # fused reward of this rank's chains
    reward_std: float = _metric("mean")
    r_d_mean: float = _metric("mean")  # the reward's discrete (rank) part
    r_c_mean: float = _metric("mean")  # the reward's continuous (target softmax) part
    target_rank_mean: float = _metric("mean")  # the target's rank under each chain's h_T (0 = top)
    adv_abs_mean: float = _metric("mean")
    clip_frac: float = _metric("mean")  # fraction of sampled tokens whose ratio was clipped
    grad_norm: float = _metric("mean")  # the global gradient norm (equal on every rank), mean over updates
    diag_table_cos_mean: float = _metric("mean")  # mean cosine between item rows (near 1: collapsed table)
    diag_score_std: float = _metric("mean")  # std of catalogue scores per user
    chain_len_mean: float = _metric("mean")
    num_tokens: float = _metric("sum")  # sampled (policy) tokens of the step
    tokens_forward_learner: float = _metric("sum")  # prompt + chain tokens the token term's forwards ran (padding
    # excluded): G x (P + C) per group unpacked, P + G x C with learner.pack_prompts
    item_candidates: float = _metric("mean")  # catalogue rows in the item loss per update
    alarm_h_T_max_diff: float = _metric("max")  # learner vs rollout h_T: weights or numerics disagree
    alarm_logp_abs_diff_mean: float = _metric("max")  # learner vs sampler log-prob per token
    # pi_old / pi_sampler over the trained tokens (r2ec/algo/off_policy.py): ~1 on-policy, the staleness with
    # rollout.async; the share the correction truncated (tis) or dropped (icepop); the largest |log ratio|
    offpolicy_ratio_mean: float = _metric("mean")
    offpolicy_corrected_frac: float = _metric("mean")
    offpolicy_log_ratio_abs_max: float = _metric("max")
    time_reward_s: float = _metric("max")
    time_old_logp_s: float = _metric("max")
    time_token_s: float = _metric("max")  # with learner.fuse_item_term it holds the item term's user side too
    time_item_s: float = _metric("max")  # fused: the targets' encoding and their backward only
    time_optimizer_s: float = _metric("max")
    time_train_s: float = _metric("max")
    tokens_per_s_learner: float = _metric("sum")  # the ranks train in parallel: their rates add up
    loss_kl: float | None = _metric("sum", optional=True)  # this rank's share of the KL term (recpo.kl_coef > 0)
    grad_norm_token: float | None = _metric("mean", optional=True)  # the token term's own gradient norm (ZeRO-0,
    grad_norm_item: float | None = _metric("mean", optional=True)  # one rank: LearnerWorker._grads_snapshot)


@dataclass(eq=True)
class WarmupMetrics(RankMetrics):
    """A warm-up step on one learner rank (``LearnerWorker.warmup_step``), the item term alone."""

    loss_item: float = _metric("sum")
    target_rank_mean: float = _metric("mean")
    train_ndcg_at_10: float = _metric("mean", key="train_ndcg@10")
    grad_norm: float = _metric("mean")
    diag_table_cos_mean: float = _metric("mean")
    diag_score_std: float = _metric("mean")
    item_candidates: float = _metric("mean")
    num_users: float = _metric("sum")
    time_item_s: float = _metric("max")
    time_optimizer_s: float = _metric("max")
    time_train_s: float = _metric("max")


@dataclass
class StepResult:
    """What one learner rank reports after an optimiser step."""

    metrics: StepMetrics | WarmupMetrics  # scalars, each with its reduction over ranks (RankMetrics.reduce)
    table_updates_idx: torch.Tensor  # (K,) long: target items this rank re-encoded with gradient
    table_updates: torch.Tensor  # (K, d) float32: their embeddings after the forward pass (before the step)
    rewards: torch.Tensor  # (U*G,) float32: fused reward of each chain from the rollout's h_T ((0,) in warm-up)
    rewards_learner: torch.Tensor  # (U*G,) float32: the same from the learner's recomputed h_T ((0,) in warm-up)
    spans: list[Span] = field(default_factory=list)  # this rank's phases, for the step timeline (r2ec.spans)
