"""What tests, benchmarks and the GPU check ask a learner rank, beyond training: its h_T and log-probs for given
chains, item encodings, greedy chains, a fingerprint of its weights, its trainable tensors.

``Probes`` is mixed into ``learner.worker.LearnerWorker`` (so a Ray actor of the worker answers these calls too),
kept apart so the worker's own module reads as the training step. It uses the worker's ``engine`` (DeepSpeed),
``dual`` (``DualHeadModel``), ``learner_cfg``, ``hidden_size``, ``rank``, ``zero3`` and its collective helpers
``_agree_max``, ``_padding_chain`` and ``_gathered``. Under ZeRO-3 every probe is collective: call it on every rank
at once (ranks may pass different numbers of chains or items).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Probes:
    @torch.no_grad()
    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        """h_T (N, d) float32 and the log-prob of every chain token under the current weights (eval mode).

        Collective under ZeRO-3 (every rank must call it; ranks may pass different numbers of chains)."""
        self.engine.eval()
        mbs = self.learner_cfg.micro_batch_size
        batches = [list(range(lo, min(len(chains), lo + mbs))) for lo in range(0, len(chains), mbs)]
        h_T, logps = [], []
        for k in range(self._agree_max(len(batches)) if self.zero3 else len(batches)):
            if k >= len(batches):
                self.engine("chain", *self._padding_chain())
                continue
            p, c = [list(prompt_ids[r]) for r in batches[k]], [list(chains[r]) for r in batches[k]]
            logp, mask, h = self.engine("chain", p, c)
            h_T.append(h.float().cpu())
            logps += [row[m.bool()].tolist() for row, m in zip(logp.float().cpu(), mask.cpu(), strict=True)]
        return (torch.cat(h_T) if h_T else torch.zeros(0, self.hidden_size)), logps

    @torch.no_grad()
    def encode_items(self, item_prompt_ids: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """Item embeddings (n, d) float32 with the current weights (eval mode). Collective under ZeRO-3."""
        self.engine.eval()
        order = sorted(range(len(item_prompt_ids)), key=lambda i: len(item_prompt_ids[i]))
        batches = [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]
        table = torch.zeros(len(order), self.hidden_size, dtype=torch.float32)
        for k in range(self._agree_max(len(batches)) if self.zero3 else len(batches)):
            if k >= len(batches):
                self.engine("last", [[self.dual.pad_id]])
                continue
            table[torch.as_tensor(batches[k])] = self.engine("last", [list(item_prompt_ids[i]) for i in batches[k]]
                                                             ).float().cpu()
        return table

    @torch.no_grad()
    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy reasoning chains (token ids, ending with the answer marker). Collective under ZeRO-3."""
        self.engine.eval()
        return self.engine("greedy", prompt_ids, max_new_tokens, self.zero3 and self.world_size > 1)

    def fingerprint(self) -> float:
        """Sum of all trainable parameters (full, gathered) in float64. Collective under ZeRO-3."""
        total = 0.0
        for p in self.dual.model.parameters():
            if p.requires_grad:
                with self._gathered([p]):
                    total += float(p.detach().double().sum())
        return total

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters (LoRA adapters, or everything for full fine-tuning) under the model's own names
        (peft names with LoRA); full tensors on rank 0, {} elsewhere. Collective under ZeRO-3."""
        out = {}
        for name, p in self.dual.model.named_parameters():
            if p.requires_grad:
                with self._gathered([p]):
                    if self.rank == 0:
                        out[name] = p.detach().cpu().clone()
        return out
