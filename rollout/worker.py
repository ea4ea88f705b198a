"""The rollout worker: G reasoning chains per user, each with its behaviour log-probs and final hidden state.

A plain class (the driver applies ``ray.remote``), so it can be stepped through in a debugger or unit-tested
without Ray. It owns one engine (``hf`` or ``vllm``) and the weight version of the policy the engine serves.

Per batch of users (DESIGN §2): sample G chains each with the configured temperature / top-k / top-p, stop at the
answer marker (kept), append the marker to chains that end without it, then compute h_T at the chain's last token
with the engine itself (vLLM: a prefill of prompt + chain, cheap with prefix caching).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from r2ec.lora_delta import DeltaPlan
from r2ec.model import Chain, ChainFinisher
from r2ec.protocol import Rollout
from r2ec.spans import SpanRecorder
from r2ec.weight_sync import SyncGroup, TensorMeta
from rollout.engine import Completion, Engine, Sampling


def build_engine(model_cfg, rollout_cfg, seed: int, device: str, tensor_parallel_size: int = 1,
                 colocated: bool = False, own_process: bool = False) -> Engine:
    """``own_process``: the caller gives this worker a process that does nothing else (a Ray actor), so a vLLM
    engine may run inside it (``rollout.vllm.in_process``)."""
    if rollout_cfg.engine == "vllm":
        from rollout.vllm_engine import VllmEngine

        in_process = own_process and rollout_cfg.vllm.in_process and tensor_parallel_size == 1 and not colocated
        # vLLM places itself on the GPUs CUDA_VISIBLE_DEVICES shows (Ray narrows it to the assigned ones)
        return VllmEngine(model_cfg, rollout_cfg, seed, device.split(":")[0], tensor_parallel_size=tensor_parallel_size,
                          colocated=colocated, in_process=in_process)
    if tensor_parallel_size != 1:
        raise ValueError("the hf rollout engine has no tensor parallelism")
    from rollout.hf_engine import HFEngine

    return HFEngine(model_cfg, rollout_cfg, seed, device)


class RolloutWorker:
    """``engine``: a ready engine to use instead of building one (the colocated learner's shared-module HF engine);
    ``colocated``: build a vLLM engine for the colocated mode (sleep mode on GPU, weights by ``load_packed``);
    ``own_process``: see ``build_engine`` (the driver sets it for its rollout actors; a worker built in a process
    that does other work, a test's or a debugger's, keeps vLLM's engine in processes of its own)."""

    def __init__(self, model_cfg, rollout_cfg, seed: int, device: str = "cpu", worker_index: int = 0,
                 tensor_parallel_size: int = 1, engine: Engine | None = None, colocated: bool = False,
                 own_process: bool = False):
        from r2ec.assets import resolve

        self.sampling_cfg = rollout_cfg.sampling
        self.seed = seed
        self.worker_index = worker_index
        self.engine = engine if engine is not None else build_engine(
            model_cfg, rollout_cfg, seed + 1000 * worker_index, device, tensor_parallel_size, colocated, own_process)
        self.finisher = ChainFinisher.from_pretrained(resolve(model_cfg.name_or_path), model_cfg.answer_marker)
        self.weight_version = 0

    def ready(self) -> dict:
        """Cheap liveness probe for the driver."""
        return {"worker_index": self.worker_index, "weight_version": self.weight_version}

    def _finish(self, completions: Sequence[Completion]) -> tuple[list[Chain], list[list[float] | None]]:
        chains, logps = [], []
        for c in completions:
            k = self.finisher.num_kept(c.token_ids)
            chains.append(self.finisher(c.token_ids[:k]))
            logps.append(None if c.logp is None else c.logp[:k])
        return chains, logps

    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int, seed: int) -> Rollout:
        """G = ``group_size`` sampled chains per prompt, grouped (prompt i -> rows i*G .. i*G+G-1).

        ``seed`` comes from the driver (per step and chunk), not from this worker's history: the same chunk gives
        the same chains on any worker, after a restart or a resume (with the same weights)."""
        s = self.sampling_cfg
        sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            max_new_tokens=s.max_new_tokens, stop=(self.finisher.marker,), seed=seed)
        spans = SpanRecorder(f"rollout-{self.worker_index}")
        t0 = time.perf_counter()
        chains, logps = self._finish(self.engine.sample(prompt_ids, group_size, sampling))
        t1 = time.perf_counter()
        prompts = [list(p) for p in prompt_ids for _ in range(group_size)]
        chain_ids = [c.token_ids for c in chains]
        if any(lp is None for lp in logps):  # the engine's sampler gave none (HF): one pass gives both
            h_T, full = self.engine.chain_states(prompts, chain_ids)
            logps = [f[: len(f) - (len(self.finisher.marker_ids) if c.appended_marker else 0)]
                     for f, c in zip(full, chains, strict=True)]
        else:
            h_T = self.engine.last_hidden([p + c for p, c in zip(prompts, chain_ids, strict=True)])
        t2 = time.perf_counter()
        length = max(len(c) for c in chain_ids)
        logp = torch.zeros((len(chains), length), dtype=torch.float32)
        logp_mask = torch.zeros_like(logp)
        for i, lp in enumerate(logps):
            logp[i, : len(lp)] = torch.as_tensor(lp, dtype=torch.float32)
            logp_mask[i, : len(lp)] = 1.0
        spans.mark("generate", t0, t1)
        spans.mark("hidden", t1, t2)
        return Rollout(chain_ids, logp, logp_mask,
                       torch.as_tensor([c.appended_marker for c in chains], dtype=torch.bool), h_T.float(),
                       self.weight_version,
                       {"generate": t1 - t0, "hidden": t2 - t1, "generated_tokens": float(sum(map(len, chain_ids)))},
                       spans.take())

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[list[Chain], torch.Tensor]:
        """Greedy reasoning and h_T for evaluation: (chains, h_T (B, d) float32). ``max_new_tokens`` 0 = no
        reasoning: every chain is the appended marker alone and h_T is read at prompt + marker (the warm-up's
        representation), without calling the engine's generator."""
        if max_new_tokens == 0:
            chains = [self.finisher([]) for _ in prompt_ids]
        else:
            sampling = Sampling(temperature=0.0, top_k=-1, top_p=1.0, max_new_tokens=max_new_tokens,
                                stop=(self.finisher.marker,))
            chains, _ = self._finish(self.engine.sample(prompt_ids, 1, sampling))
        h_T = self.engine.last_hidden([list(p) + c.token_ids for p, c in zip(prompt_ids, chains, strict=True)])
        return chains, h_T.float()

    def encode_items(self, item_prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Item embeddings (n, d) float32: final hidden state at the last token of each item prompt."""
        return self.engine.last_hidden(item_prompt_ids).float()

    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        return self.engine.chain_states(prompt_ids, chains)

    # ------------------------------------------------------------------------------------------ weight sync
    def sync_ranks(self) -> int:
        """Ranks this worker's engine takes in the weight-broadcast group (its tensor-parallel size)."""
        return self.engine.num_sync_ranks

    def join_sync_group(self, info: SyncGroup, first_rank: int) -> None:
        self.engine.join_sync_group(info, first_rank)

    def receive_weights(self, metas: Sequence[TensorMeta], bucket_bytes: int, version: int,
                        delta: DeltaPlan | None = None) -> int:
        """One broadcast of the weights of ``version`` (with ``delta``, a LoRA-delta sync: ``r2ec.lora_delta``);
        returns the receive checksum."""
        checksum = self.engine.receive_weights(metas, bucket_bytes, delta)
        self.weight_version = version
        return checksum

    def load_packed(self, source: dict, metas: Sequence[TensorMeta], version: int) -> int:
        """Colocated: the learner's weights from a same-host buffer (``r2ec.weight_share``); the reader's checksum."""
        checksum = self.engine.load_packed(source, metas)
        self.weight_version = version
        return checksum
