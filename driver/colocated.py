"""A learner rank and a rollout engine in one process: the colocated mode (``cluster.colocate``).

A plain class (``driver.system`` applies ``ray.remote``; a test or a debugger can use it directly) that holds one
``learner.worker.LearnerWorker`` and one ``rollout.worker.RolloutWorker`` and answers the calls of both. The driver
uses the same actor as learner rank r and as rollout worker r; Ray runs its calls one at a time, so sampling and
training take turns on the rank's GPU.

- ``rollout.engine: hf``: the engine is built on the learner's own module (``HFEngine.sharing``), so it always
  serves the learner's current weights: a weight sync only moves the version. It samples with the learner's LoRA
  unmerged and in the learner's dtype (float32 on CPU), where the separate mode's engine gets merged weights in
  ``model.dtype``.
- ``rollout.engine: vllm``: the engine keeps its own copy. It is built before the learner, so vLLM's engine process
  starts before this process takes the learner's ``torch.distributed`` environment (RANK, WORLD_SIZE, ...) and, on a
  GPU, sizes its memory (``rollout.vllm.gpu_memory_utilization``) before the learner allocates. A weight sync packs
  the full merged weights into one same-host buffer (``r2ec.weight_share``: a CUDA IPC handle on GPU, a
  shared-memory file on CPU) that the engine reloads from; both sides' checksums go back to the driver. On a GPU the
  engine sleeps during every learner call (KV cache dropped, weights offloaded to CPU memory) and wakes for every
  rollout call, after the learner's cached CUDA blocks are released so vLLM can map the memory back.

Faults: the actor is a learner rank, and a learner rank cannot be replaced mid-run; when it dies the run fails and
``r2ec train --resume auto`` continues from the last checkpoint (the driver treats it so).

Limits: one engine per rank without tensor parallelism (validated by the config); with vLLM on a GPU the engine and
the learner must see the GPU under the same index (Ray's default: CUDA_VISIBLE_DEVICES narrowed to the one GPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from r2ec.config import LearnerConfig, ModelConfig, RecPOConfig, RolloutConfig, WarmupConfig
from r2ec.protocol import Rollout, StepResult, TrainShard, WarmupShard


class ColocatedWorker:
    def __init__(self, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, learner_cfg: LearnerConfig,
                 recpo_cfg: RecPOConfig, rank: int, world_size: int, master_addr: str, master_port: int, device: str,
                 seed: int, load_universal: bool = False, warmup_cfg: WarmupConfig | None = None):
        from learner.worker import LearnerWorker
        from rollout.worker import RolloutWorker

        def learner() -> LearnerWorker:
            return LearnerWorker(model_cfg, learner_cfg, recpo_cfg, rank, world_size, master_addr, master_port,
                                 device=device, seed=seed, load_universal=load_universal, warmup_cfg=warmup_cfg)

        self.shared = rollout_cfg.engine == "hf"
        if self.shared:
            from rollout.hf_engine import HFEngine

            self.learner = learner()
            self.rollout = RolloutWorker(model_cfg, rollout_cfg, seed, device=device, worker_index=rank,
                                         engine=HFEngine.sharing(self.learner.dual, rollout_cfg))
        else:
            if device.startswith("cuda:") and device != "cuda:0":
                raise RuntimeError(f"colocated vLLM on {device}: vLLM places itself on cuda:0 of this process, so the "
                                   "learner must be there too (let Ray narrow CUDA_VISIBLE_DEVICES to the rank's GPU)")
            self.rollout = RolloutWorker(model_cfg, rollout_cfg, seed, device=device, worker_index=rank,
                                         colocated=True)
            self.rollout.engine.sleep()
            self.learner = learner()

    # ------------------------------------------------------------------------------------------ taking turns
    def _rollout_turn(self, weights_only: bool = False) -> None:
        """Wake the vLLM engine (``weights_only``: its weights alone, the KV cache with the next full wake)."""
        engine = self.rollout.engine
        if not self.shared and engine.asleep:
            if self.learner.device.type == "cuda":
                torch.cuda.empty_cache()  # the learner's cached blocks, so vLLM can map its memory back
            engine.wake_up(weights_only=weights_only)

    def _learner_turn(self) -> None:
        if not self.shared:
            self.rollout.engine.sleep()

    def ready(self) -> dict[str, Any]:
        return {**self.learner.ready(), "colocated": True, "rollout": self.rollout.ready()}

    # ------------------------------------------------------------------------------------------ rollout calls
    def generate(self, prompt_ids: Sequence[Sequence[int]], group_size: int, seed: int) -> Rollout:
        self._rollout_turn()
        return self.rollout.generate(prompt_ids, group_size, seed)

    def greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[list, torch.Tensor]:
        self._rollout_turn()
        return self.rollout.greedy(prompt_ids, max_new_tokens)

    def encode_items(self, item_prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        self._rollout_turn()
        return self.rollout.encode_items(item_prompt_ids)

    def chain_states(self, prompt_ids: Sequence[Sequence[int]], chains: Sequence[Sequence[int]]
                     ) -> tuple[torch.Tensor, list[list[float]]]:
        self._rollout_turn()
        return self.rollout.chain_states(prompt_ids, chains)

    def sync_weights(self, version: int) -> tuple[int | None, int | None]:
        """Bring the engine to the learner's current weights, as version ``version``; (the learner's checksum, the
        engine's), both None when the engine shares the learner's module. Collective under ZeRO-3 (every rank packs
        its full copy)."""
        if self.shared:
            self.rollout.weight_version = version
            return None, None
        from r2ec.weight_share import cuda_handle, file_buffer, layout

        metas = self.learner.weight_metas()
        _, nbytes = layout(metas)
        cuda = self.learner.device.type == "cuda"
        if cuda:
            self._rollout_turn(weights_only=True)  # the KV cache comes back after the buffer is freed
            buf, path = torch.empty(nbytes, dtype=torch.uint8, device=self.learner.device), None
        else:
            buf, path = file_buffer(nbytes)
        try:  # the file goes whatever fails, packing included
            sent = self.learner.pack_weights(buf)
            if cuda:
                torch.cuda.synchronize(self.learner.device)
            source = {"cuda_ipc": cuda_handle(buf)} if cuda else {"file": path, "nbytes": nbytes}
            got = self.rollout.load_packed(source, metas, version)
        finally:
            del buf
            if path is not None:
                os.remove(path)
        self._rollout_turn()
        return sent, got

    # ------------------------------------------------------------------------------------------ learner calls
    def set_items(self, item_prompt_ids: list[list[int]], table: torch.Tensor) -> None:
        self._learner_turn()
        self.learner.set_items(item_prompt_ids, table)

    def train_step(self, shard: TrainShard) -> StepResult:
        self._learner_turn()
        return self.learner.train_step(shard)

    def warmup_step(self, shard: WarmupShard) -> StepResult:
        self._learner_turn()
        return self.learner.warmup_step(shard)

    def save_checkpoint(self, directory: str) -> None:
        self._learner_turn()
        self.learner.save_checkpoint(directory)

    def load_checkpoint(self, directory: str, universal_dir: str | None = None) -> dict[str, Any]:
        self._learner_turn()
        return self.learner.load_checkpoint(directory, universal_dir)

    def fingerprint(self) -> float:
        self._learner_turn()
        return self.learner.fingerprint()
