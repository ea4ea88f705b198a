"""What a rollout engine must do; ``hf_engine.HFEngine`` and ``vllm_engine.VllmEngine`` implement it.

An engine owns one copy of the policy's weights (one model process, or one tensor-parallel group for vLLM) and
knows nothing of rewards, groups bookkeeping or Ray: ``rollout.worker.RolloutWorker`` builds on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from r2ec.lora_delta import DeltaPlan
from r2ec.weight_sync import SyncGroup, TensorMeta


@dataclass
class Completion:
    """One sampled continuation, exactly as the engine produced it (not yet cut at or completed with the marker)."""

    token_ids: list[int]
    logp: list[float] | None  # behaviour log-prob of each token under raw logits (temperature 1); None if unknown


@dataclass(frozen=True)
class Sampling:
    temperature: float  # 0 = greedy
    top_k: int  # -1 or 0 = off
    top_p: float
    max_new_tokens: int
    stop: tuple[str, ...]  # stop strings, kept in the output (the answer marker)
    seed: int | None = None


class Engine(Protocol):
    def sample(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Sampling) -> list[Completion]:
        """n completions per prompt, grouped: completion j of prompt i at index i*n + j."""

    def last_hidden(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """(len(seqs), d) float32: final hidden state (after the final norm) at the last token of each sequence.
        Used for h_T (prompt + chain) and for item embeddings (item prompts)."""

    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        """h_T (N, d) float32 at the last token of prompt + chain, and the log-prob of every chain token under
        raw logits. Used where the sampler gave no log-probs, and by tests to compare engines."""

    def join_sync_group(self, info: SyncGroup, first_rank: int) -> None:
        """Join the weight-broadcast group; this engine's model processes take ranks first_rank.. in TP order."""

    def receive_weights(self, metas: Sequence[TensorMeta], bucket_bytes: int, delta: DeltaPlan | None = None) -> int:
        """Receive one broadcast (see r2ec.weight_sync) and load it in place; returns the receive checksum. With
        ``delta`` the broadcast is a LoRA-delta sync (``metas`` = ``delta.metas``): load the merged weights of its
        targets (``r2ec.lora_delta.DeltaApplier``)."""

    @property
    def num_sync_ranks(self) -> int:
        """How many ranks of the broadcast group this engine takes (its tensor-parallel size)."""
