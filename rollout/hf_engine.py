"""The transformers rollout engine: the reference the vLLM engine is checked against, and the fallback.

Sampling is ``generate`` with left padding; the behaviour log-probs and h_T of the sampled chains come from one
extra forward pass over prompt + chain (``DualHeadModel.chain_forward``), which is exactly what the learner
computes, so with equal weights the rollout/learner mismatch alarms read ~0.

The engine always serves the plain base model: the learner broadcasts full (LoRA-merged) weights, so the engine
never needs peft. Weights arrive over the broadcast group of :mod:`r2ec.weight_sync` and are copied in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r2ec.model import DualHeadModel
from r2ec.weight_sync import SyncGroup, TensorMeta, close_group, open_group, receive
from rollout.engine import Completion, Sampling


class HFEngine:
    def __init__(self, model_cfg, rollout_cfg, seed: int, device: str):
        base_cfg = model_cfg.model_copy(update={"lora": model_cfg.lora.model_copy(update={"enabled": False})})
        self.model = DualHeadModel.from_config(base_cfg, device)
        self.batch_size = rollout_cfg.batch_size
        self._group = None

    @property
    def num_sync_ranks(self) -> int:
        return 1

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: Sampling) -> list[Completion]:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        m = self.model
        expanded = [list(p) for p in prompt_ids for _ in range(n)]  # grouped: prompt i -> rows i*n .. i*n+n-1
        out: list[Completion] = []
        step = max(1, self.batch_size * n)
        for lo in range(0, len(expanded), step):
            out.extend(Completion(c, None) for c in m.generate_raw(
                expanded[lo:lo + step], sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p))
        return out

    @torch.no_grad()
    def last_hidden(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.model.encode_items(seqs, batch_size=self.batch_size).cpu()

    @torch.no_grad()
    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        h_T, logps = [], []
        for lo in range(0, len(chains), self.batch_size):
            p, c = prompt_ids[lo:lo + self.batch_size], chains[lo:lo + self.batch_size]
            logp, mask, h = self.model.chain_forward(p, c)
            h_T.append(h.float().cpu())
            for row, m in zip(logp.cpu(), mask.cpu(), strict=True):
                logps.append(row[m.bool()].tolist())
        return torch.cat(h_T), logps

    def join_sync_group(self, info: SyncGroup, first_rank: int) -> None:
        # A second join means the driver rebuilt the group (a rollout worker was replaced): let go of the old one
        # first, so its connections to a dead member are closed rather than left to time out.
        close_group(self._group)
        self._group = None
        self._group = open_group(info, first_rank)

    @torch.no_grad()
    def receive_weights(self, metas: Sequence[TensorMeta], bucket_bytes: int) -> int:
        if self._group is None:
            raise RuntimeError("receive_weights before join_sync_group")
        # state_dict() lists tied weights under both names (sharing storage), so lm_head.weight has a home.
        params = self.model.model.state_dict(keep_vars=True)
        box, unknown = [0], []
        for name, t in receive(self._group, metas, bucket_bytes, device=self.model.device, checksum=box):
            if name in params:
                params[name].data.copy_(t)
            else:  # keep draining the broadcast so the sender is not left hanging, then fail
                unknown.append(name)
        if unknown:
            raise KeyError(f"weight sync: the rollout model has no parameters named {unknown[:5]}")
        return box[0]
