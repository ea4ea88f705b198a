"""The RecPO learner: one DeepSpeed data-parallel rank (a plain class; the driver applies ``ray.remote``).

Each rank receives whole groups of chains (``TrainShard``) and takes RecPO steps on them: ``learner/recpo_step.py``
says how (rewards and advantages, token term, item term, optimiser step) and where the step deviates from the
paper. A warm-up step (``warmup_step``, ``WarmupShard``) is the item term alone on prompt + answer marker with
advantage 1, then one optimiser step, at ``warmup.lr``.

DeepSpeed usage the driver must respect:
- ``gradient_accumulation_steps`` is the number of backward calls of one update (token micro-batches of one
  mini-batch + 1); the boundary is set explicitly (False, ..., True) and ``engine.step()`` runs once per update, so
  an update is always exactly one optimiser step even when a shard is smaller than configured. ``engine.backward(loss, scale_wrt_gas=False)``:
  our losses are already normalised.
- Under ZeRO-2/3 every backward, and under ZeRO-3 every forward, is collective. Ranks agree on the number of
  micro-batches (an all-reduce of the count) and a rank with fewer chains runs zero-loss padding micro-batches, so
  unequal shards cannot deadlock. For the same reason ``train_step``, ``chain_states``, ``encode_items``,
  ``greedy``, ``fingerprint``, ``full_state_dict``, ``trainable_state_dict`` and ``broadcast_weights`` must be
  called on EVERY rank at the same time under ZeRO-3 (``train_step`` also under ZeRO-1/2 with world size > 1).
- ``weight_metas`` and ``sync_address`` are local (rank 0 answers). ``pack_weights`` (colocated mode) runs on every
  rank, collective under ZeRO-3.
- ``save_checkpoint`` and ``load_checkpoint`` are collective on every ZeRO stage. A checkpoint written by W ranks
  is loaded by W ranks as is (bit-exact resume, RNG states included); by another number of ranks only after
  ``learner.universal.to_universal`` and with ``load_universal=True`` (see that module for what it supports).

Deviations from the paper / official code (the step's own: ``learner/recpo_step.py``):
- On CPU the learner always trains in float32 (the configured dtype is used on GPU); weights are broadcast in the
  configured ``model.dtype``, the dtype the rollout engines run.

Imports no vllm and no ray; deepspeed is imported lazily inside methods.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import socket
import time
from typing import Any

import torch

from learner.checkpointing import load_rank, save_rank
from learner.ds_config import build_ds_config, training_dtype
from learner.item_term import item_term, score_std_mean, table_cosine_mean
from learner.policy import PolicyNet
from learner.probes import Probes
from learner.recpo_step import RecPOStep
from learner.weights import WeightExport
from r2ec.algo.metrics import ndcg_at_k
from r2ec.config import LearnerConfig, ModelConfig, RecPOConfig, WarmupConfig
from r2ec.item_table import ItemTable
from r2ec.lora_delta import DeltaPlan
from r2ec.model import DualHeadModel
from r2ec.packing import shared_prefix, tail_groups
from r2ec.protocol import StepResult, WarmupMetrics, WarmupShard
from r2ec.spans import SpanRecorder
from r2ec.weight_sync import SyncGroup, TensorMeta, bound_store


class LearnerWorker(RecPOStep, Probes):
    """One DeepSpeed data-parallel rank of the RecPO learner (see the module docstring for the step)."""

    def __init__(self, model_cfg: ModelConfig, learner_cfg: LearnerConfig, recpo_cfg: RecPOConfig, rank: int,
                 world_size: int, master_addr: str, master_port: int, device: str, seed: int,
                 load_universal: bool = False, warmup_cfg: WarmupConfig | None = None):
        if recpo_cfg.kl_coef > 0 and not model_cfg.lora.enabled:
            raise ValueError("recpo.kl_coef > 0 needs model.lora.enabled: the reference policy is the model with its "
                             "adapters disabled")
        if learner_cfg.prompts_per_step % world_size:
            raise ValueError(f"learner.prompts_per_step ({learner_cfg.prompts_per_step}) must be a multiple of the "
                             f"learner world size ({world_size})")
        if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        import deepspeed

        self.model_cfg, self.learner_cfg, self.recpo_cfg = model_cfg, learner_cfg, recpo_cfg
        self.rank, self.world_size, self.master_addr = rank, world_size, master_addr
        self.seed, self.load_universal, self.warmup_cfg = seed, load_universal, warmup_cfg
        self.zero3 = learner_cfg.zero_stage == 3
        self._join_process_group(device, master_port)

        # The same seed on every rank: LoRA's random init must be identical everywhere (ZeRO-3 keeps each rank's
        # own shard of the freshly built model; ZeRO-0/1/2 broadcast rank 0's weights anyway).
        torch.manual_seed(seed)
        self.dtype = training_dtype(model_cfg.dtype, device)
        self.dual = DualHeadModel.from_config(model_cfg.model_copy(update={"dtype": self.dtype}), self.device)
        model = self.dual.model
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if model_cfg.lora.enabled:
                # With frozen embeddings the blocks' inputs carry no grad. Non-reentrant checkpointing (used here)
                # does not need them to; the reentrant variant would silently drop the adapters' gradients, so the
                # embedding output is made to require grad as a guard (peft's usual recipe; costs one tiny grad).
                model.enable_input_require_grads()
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in trainable)
        self.hidden_size = int(model.config.hidden_size)

        group_size = recpo_cfg.group_size
        self.chains_per_rank = learner_cfg.prompts_per_step // world_size * group_size
        # Backward calls of one optimiser update: the token micro-batches of one mini-batch, plus the item term. The
        # nominal count: packed micro-batches of whole groups (micro_batch_size < group_size) or a token budget make
        # the real one differ. Only DeepSpeed's bookkeeping reads it: the boundaries are set by hand and no loss is
        # scaled by it (scale_wrt_gas=False).
        chains_per_update = self.chains_per_rank // learner_cfg.mini_batches
        self.backward_calls = math.ceil(chains_per_update / learner_cfg.micro_batch_size) + 1
        ds_config = build_ds_config(learner_cfg, learner_cfg.micro_batch_size, self.backward_calls, self.dtype,
                                    load_universal=load_universal)
        optimizer = torch.optim.AdamW(trainable, lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=PolicyNet(self.dual), optimizer=optimizer, config=ds_config)
        torch.manual_seed(seed + rank)  # dropout etc. differ across ranks from here on

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.export = WeightExport(base, rank, self.zero3, model_cfg.dtype, self._gathered,
                                   lora_delta=learner_cfg.weight_sync == "lora_delta")
        self.item_prompt_ids: list[list[int]] = []
        self.item_prefix = 0  # set_items: the item prompts' shared prefix length (0: not packed)
        self.items: ItemTable | None = None  # this rank's copy of the item table (r2ec/item_table.py)
        self.spans = SpanRecorder(f"learner-{rank}")  # this rank's phases per step, for the timeline

    def _join_process_group(self, device: str, master_port: int) -> None:
        """Place this rank on its device and join the learner ranks' process group (DeepSpeed's too)."""
        import deepspeed

        rank, world_size, master_addr = self.rank, self.world_size, self.master_addr
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        # One GPU per rank: "cuda:N" is the one Ray assigned, in this process's numbering (the Ray layer resolves it:
        # driver.remote.local_cuda_index); plain "cuda" is cuda:0, right when Ray narrowed CUDA_VISIBLE_DEVICES to it.
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=self.learner_cfg.timeout_s)
        if not torch.distributed.is_initialized():
            # Our own store, listening on MASTER_ADDR only (torch's env:// store would listen on every interface);
            # DeepSpeed then finds the process group initialised and uses it.
            store = bound_store(master_addr, master_port, world_size, rank == 0, timeout)
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                                 timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, rank=rank,
                                   world_size=world_size)

    # ------------------------------------------------------------------------------------------ small helpers
    def ready(self) -> dict[str, Any]:
        """Cheap liveness probe for the driver."""
        return {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "zero_stage": self.learner_cfg.zero_stage, "dtype": self.dtype, "trainable_params": self.num_trainable,
                "backward_calls_per_step": self.backward_calls}

    def _agree_max(self, n: int) -> int:
        """The largest ``n`` over all ranks (collective), so every rank runs the same number of passes."""
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def _padding_chain(self) -> tuple[list[list[int]], list[list[int]]]:
        # A two-token sequence: the smallest input chain_forward accepts (one predicted token).
        return [[self.dual.pad_id]], [[self.dual.pad_id]]

    def _gathered(self, params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
        if not (self.zero3 and params):
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    # ------------------------------------------------------------------------------------------ items
    def set_items(self, item_prompt_ids: list[list[int]], table: torch.Tensor) -> None:
        """Item prompts (token ids of all V items) and the item table H_V (V, d) float32 kept on this rank."""
        if len(item_prompt_ids) != table.shape[0]:
            raise ValueError(f"{len(item_prompt_ids)} item prompts for a table of {table.shape[0]} rows")
        if table.dim() != 2 or table.shape[1] != self.hidden_size:
            raise ValueError(f"item table must be (V, {self.hidden_size}), got {tuple(table.shape)}")
        self.item_prompt_ids = [list(p) for p in item_prompt_ids]
        # the tokens every item prompt shares (chat template + instruction), computed once per packed row
        self.item_prefix = shared_prefix(self.item_prompt_ids) if self.learner_cfg.pack_prompts else 0
        self.items = ItemTable(table.detach().to(self.device, torch.float32).clone())

    def _items(self) -> ItemTable:
        if self.items is None:
            raise RuntimeError("a training step before set_items: the learner has no item table")
        return self.items

    @property
    def table(self) -> torch.Tensor:
        """This rank's item table rows H_V (V, d) float32."""
        return self._items().rows

    def _set_lr(self, lr: float) -> None:
        # The warm-up and the RecPO steps share one AdamW (its moments carry over); only the rate differs.
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _encode(self, seqs: list[list[int]]) -> torch.Tensor:
        """Final hidden states with gradient; an empty list still runs one padding forward (ZeRO-3 collectives)."""
        if not seqs:
            return self.engine("last", [[self.dual.pad_id]])[:0]
        return self.engine("last", [list(s) for s in seqs])

    def _encode_items(self, items: list[int]) -> torch.Tensor:
        """Items' encodings with gradient, by item index. With ``learner.pack_prompts`` the item prompts' shared
        prefix is computed once per packed row and every target's own tokens attend to it (r2ec/packing.py):
        the same encodings and gradients within float rounding, prefix + the targets' own tokens instead of
        K x (prefix + own). One forward either way (ZeRO-3 ranks stay in step)."""
        P = self.item_prefix
        if not items or P == 0:
            return self._encode([self.item_prompt_ids[v] for v in items])
        return self.engine("last_packed", *tail_groups([self.item_prompt_ids[v] for v in items], P))

    # ------------------------------------------------------------------------------------------ training
    def warmup_step(self, shard: WarmupShard) -> StepResult:
        """One warm-up optimiser step (the paper's "w/o reasoning" objective): the item term with h read at
        prompt + answer marker, advantage 1 for every user, at ``warmup.lr``. Collective like ``train_step``.

        Metrics: ``loss_item`` is this rank's share of the global loss; ``target_rank_mean`` / ``train_ndcg@10``
        rank each user's target over the catalogue as the catalogue loss sees it (stale rows shifted by the step's
        drift, the step's targets fresh, history masked), with the state before the update."""
        if self.warmup_cfg is None:
            raise RuntimeError("warmup_step on a LearnerWorker built without warmup_cfg")
        t_start = time.perf_counter()
        self._items().apply(shard.table_updates_idx, shard.table_updates)  # the other ranks' rows of the last step
        self._set_lr(self.warmup_cfg.lr)
        table_cos = table_cosine_mean(self.table)
        self.engine.train()
        self.engine.set_gradient_accumulation_boundary(True)
        U = len(shard.seqs)
        term = item_term(self._encode, self._encode_items, self.table, shard.seqs, shard.target_idx,
                         shard.history_idx, torch.ones(U), shard.num_users, self.model_cfg.tau,
                         self.warmup_cfg.item_negatives, self.rank, self.world_size,
                         items_frozen=self.model_cfg.item_table == "frozen")
        self.engine.backward(term.loss * self.world_size, scale_wrt_gas=False)
        self._items().apply(term.items, term.h_items)
        t_item = time.perf_counter() - t_start
        with torch.no_grad():
            scores = self.dual.item_scores(term.h_user, self.table, shard.history_idx.to(self.device),
                                           shard.target_idx.to(self.device))
        rank = term.rank.double()
        t0 = time.perf_counter()
        norms = self._optimizer_step(None)
        t_opt = time.perf_counter() - t0
        self.spans.mark("item", t_start, t_start + t_item)
        self.spans.mark("optimizer", t0, t0 + t_opt)
        metrics = WarmupMetrics(
            loss_item=term.loss_local,
            target_rank_mean=float(rank.mean()) if U else float("nan"),
            train_ndcg_at_10=float(ndcg_at_k(rank, 10).mean()) if U else float("nan"),
            grad_norm=norms["grad_norm"],
            diag_table_cos_mean=table_cos,
            diag_score_std=score_std_mean(scores) if U else float("nan"),
            item_candidates=float(term.candidates),
            num_users=float(U),
            time_item_s=t_item,
            time_optimizer_s=t_opt,
            time_train_s=time.perf_counter() - t_start,
        )
        return StepResult(metrics=metrics, table_updates_idx=term.items,
                          table_updates=term.h_items.float().cpu(), rewards=torch.zeros(0),
                          rewards_learner=torch.zeros(0), spans=self.spans.take())

    def _agree_sum(self, n: int) -> int:
        if self.world_size == 1:
            return n
        t = torch.tensor([n], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t)
        return int(t.item())

    def _grads_snapshot(self) -> list[torch.Tensor] | None:
        """The token term's accumulated gradients, where they can be read exactly: ZeRO-0 at one rank (ZeRO-1/2/3
        partition and reduce gradients inside backward; with several ranks they are averaged only at the
        boundary). Elsewhere None, and the per-term norms are not reported."""
        if self.learner_cfg.zero_stage != 0 or self.world_size != 1:
            return None
        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    def _optimizer_step(self, token_grads: list[torch.Tensor] | None) -> dict[str, float]:
        """engine.step() exactly once, with the gradient norm (before clipping) and, when ``token_grads`` is given,
        the norms of the token term and of the item term (the rest of the accumulated gradient)."""
        nan = float("nan")
        norms: dict[str, float] = {}
        if token_grads is not None:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            total = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            norms["grad_norm_token"] = float(torch.nn.utils.get_total_norm(token_grads)) if token_grads else 0.0
            items = [t - g for t, g in zip(total, token_grads, strict=True)]
            norms["grad_norm_item"] = float(torch.nn.utils.get_total_norm(items)) if items else 0.0
        grad_norm = self._stage0_grad_norm()
        steps_before = self.engine.global_steps
        self.engine.step()
        if self.engine.global_steps != steps_before + 1:
            raise RuntimeError("DeepSpeed did not take exactly one optimiser step at the accumulation boundary")
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        norms["grad_norm"] = float(grad_norm) if grad_norm is not None else nan
        return norms

    def _stage0_grad_norm(self) -> float | None:
        """Without ZeRO, DeepSpeed's fp32 path clips but does not report the norm; after the boundary backward the
        gradients are already averaged over ranks, so the norm (before clipping) is computed here."""
        if self.learner_cfg.zero_stage != 0 or self.dtype != "float32":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    # ------------------------------------------------------------------------------------------ weight export
    # The learner's side of every weight hand-off is learner/weights.py's WeightExport; these are its Ray-facing calls.
    def weight_metas(self) -> list[TensorMeta]:
        """Hugging Face names, shapes and the engines' dtype of the full model, in sync order. Local."""
        return self.export.metas()

    def full_state_dict(self, merged: bool = True) -> dict[str, torch.Tensor]:
        """The full model under Hugging Face names on rank 0 ({} elsewhere). Collective under ZeRO-3."""
        return self.export.full_state_dict(merged)

    def pack_weights(self, buf: torch.Tensor) -> int:
        """Colocated mode: the full merged weights into this rank's hand-off buffer. Collective under ZeRO-3."""
        return self.export.pack(buf)

    def delta_plan(self) -> DeltaPlan:
        """What a LoRA-delta sync sends (``learner.weight_sync: lora_delta``). Local."""
        return self.export.delta_plan()

    def broadcast_weights(self, info: SyncGroup | None, bucket_bytes: int) -> int | None:
        """Rank 0 sends the full merged weights (with ``learner.weight_sync: lora_delta``, the adapters) to every
        rollout engine. Call on every rank at once."""
        return self.export.broadcast(info, bucket_bytes, self.device,
                                     delta=self.learner_cfg.weight_sync == "lora_delta")

    def sync_address(self) -> tuple[str, int]:
        """Address for the weight-sync group's store: MASTER_ADDR (rank 0's node) and a port free right now."""
        with socket.socket() as s:
            s.bind((self.master_addr, 0))
            return self.master_addr, int(s.getsockname()[1])

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        """This rank's part of the learner checkpoint (learner/checkpointing.py). Collective: every rank at once."""
        save_rank(self.engine, self.rank, self.world_size, directory)

    def load_checkpoint(self, directory: str, universal_dir: str | None = None) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote (learner/checkpointing.py). Collective: every rank at once."""
        return load_rank(self.engine, self.rank, self.world_size, self.seed, self.load_universal, directory,
                         universal_dir)
