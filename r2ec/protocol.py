"""Typed data contracts between the driver, the rollout workers and the learner ranks.

Everything here crosses a process boundary (Ray pickles it), so fields are plain Python values and CPU tensors.
Chains are always grouped: the G chains of prompt i are rows ``i*G .. i*G+G-1``.

Deviation from the official code: tokens of an appended answer marker (a chain that hit the length limit or EOS
without writing it) are not policy actions, so they carry no behaviour log-prob and are left out of the token loss;
they still feed the forward pass that gives h_T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


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
                       self.appended_marker[idx], self.h_T[idx], self.weight_version, dict(self.timings))

    @classmethod
    def concat(cls, parts: Sequence[Rollout]) -> Rollout:
        """Join rollouts in order; timings are summed (worker-seconds), the version must agree."""
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
                   torch.cat([p.h_T for p in parts]), versions.pop(), timings)


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


@dataclass
class StepResult:
    """What one learner rank reports after an optimiser step."""

    metrics: dict[str, float]  # scalars: losses, rewards, alarms, timings; summed/averaged by the driver
    table_updates_idx: torch.Tensor  # (K,) long: target items this rank re-encoded with gradient
    table_updates: torch.Tensor  # (K, d) float32: their embeddings after the forward pass (before the step)
    rewards: torch.Tensor  # (U*G,) float32: fused reward of each chain from the rollout's h_T ((0,) in warm-up)
    rewards_learner: torch.Tensor  # (U*G,) float32: the same from the learner's recomputed h_T ((0,) in warm-up)
