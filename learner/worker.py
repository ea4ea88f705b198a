"""The RecPO learner: one DeepSpeed data-parallel rank (a plain class; the driver applies ``ray.remote``).

Each rank receives whole groups of chains (``TrainShard``) and, per RecPO step:

1. applies the item-table rows re-encoded by every rank in the previous step;
2. scores the rollout's h_T with the rec_head, s(v) = cos(h_T, H_V[v]) / tau over the full catalogue with the
   user's history masked, and turns the scores into RecPO's fused reward R = beta R_c + (1 - beta) R_d (R_d =
   NDCG@k_r of the target, R_c = its full-catalogue softmax probability), group-relative advantages (GRPO / RLOO)
   and the relabel mask (the top-k chains of each group by advantage, the paper's i*);
3. token term: PPO-style clipped surrogate on the sampled chain tokens, micro-batch by micro-batch;
4. item term: advantage-weighted softmax of the relabelled chains' h_T against the step's target items, both
   recomputed WITH gradient (one extra backward), gathered over all ranks; with ``item_negatives: catalogue`` also
   against the whole cached table (learner/item_term.py);
5. one optimiser step (``engine.step()``), with DeepSpeed's ZeRO 0-3.
With ``learner.mini_batches`` M > 1, steps 3-5 run once per mini-batch of whole groups (M optimiser updates), all
against pi_old computed in one no-grad pass before the first. A warm-up step (``warmup_step``, ``WarmupShard``) is
step 4 alone on prompt + answer marker with advantage 1, then step 5, at ``warmup.lr``.
(The formulas are written out in r2ec/algo/recpo.py and in DESIGN.md section 2.)

Every loss is normalised by a GLOBAL count (``shard.num_tokens``, ``shard.num_chains``), so the per-rank
losses add up to the step's loss. DeepSpeed averages gradients over the data-parallel ranks; each loss is therefore
multiplied by the world size, which turns that average into the global sum: W ranks with U/W users each take
exactly the update one rank takes with all U users ("sharded equals global", tested).

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

Deviations from the paper / official code (github YRYangang/RRec):
- By default one optimiser update per rollout (on-policy, as TRL's ``num_iterations=1``): ``old_logp`` is the
  learner's own ``logp.detach()``, so the ratio is exactly 1 and the clip never binds (clip_frac is 0). With
  ``learner.mini_batches`` M > 1, pi_old is the learner's log-prob under the weights that sampled the chains, so
  the clip binds from the second update on; the official trainer also takes several updates per rollout (one per
  mini-batch of 8 chains) but always with ratio 1 (docs/training.md). The sampler's behaviour log-probs are used
  only for the alarm ``alarm_logp_abs_diff_mean`` (sampler vs learner mismatch), not as pi_old.
- Rewards and advantages come from the rollout's h_T (what the sampler's weights produced); the learner's h_T from
  the same forward pass feeds ``rewards_learner`` and ``alarm_h_T_max_diff`` as a consistency check.
- The item term's in-batch candidates are the step's distinct targets over all ranks (the official code gathers
  them too, ``gather_negs_across_processes``); duplicate targets are one candidate here (the official code keeps
  each user's target as a separate candidate, so a duplicated target appears twice in the denominator).
- Warm-up steps and catalogue negatives are not in the paper (both off by default).
- Appended answer-marker tokens (chains cut by length or EOS) are not policy actions and get no token loss
  (``rollout.logp_mask``); they still enter the forward pass that gives h_T.
- A KL penalty (not in the paper, off by default): with ``recpo.kl_coef > 0`` the token term also gets
  kl_coef x k3(pi_ref, pi_theta) on the sampled tokens, pi_ref being the model with its LoRA adapters disabled (the
  weights the run started from, no copy): one extra no-grad forward per micro-batch. LoRA only (the config refuses
  it for full fine-tuning, which would need a frozen copy of the model).
- On CPU the learner always trains in float32 (the configured dtype is used on GPU); weights are broadcast in the
  configured ``model.dtype``, the dtype the rollout engines run.

Imports no vllm and no ray; deepspeed is imported lazily inside methods.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from learner.ds_config import build_ds_config, training_dtype
from learner.item_term import item_term, score_std_mean, table_cosine_mean
from learner.weights import WeightExport
from r2ec.algo.metrics import ndcg_at_k
from r2ec.algo.recpo import RewardOutput, compute_advantages, fused_reward, kl_penalty, relabel_mask, token_loss
from r2ec.config import LearnerConfig, ModelConfig, RecPOConfig, WarmupConfig
from r2ec.item_table import ItemTable
from r2ec.model import DualHeadModel
from r2ec.protocol import StepResult, TrainShard, WarmupShard
from r2ec.rng import rng_state, seed_all, set_rng_state
from r2ec.weight_sync import SyncGroup, TensorMeta, bound_store


class _PolicyNet(torch.nn.Module):
    """Routes every computation through one root ``forward`` so DeepSpeed sees ordinary forward passes.

    ZeRO-3 gathers parameters in module hooks and resets its prefetch trace in the root module's hooks; calling
    sub-modules directly would skip the latter. ``kind`` picks the computation.
    """

    def __init__(self, dual: DualHeadModel):
        super().__init__()
        self.model = dual.model  # the HF (or peft) model: the only registered sub-module
        self.dual = dual  # not an nn.Module: a plain attribute

    def forward(self, kind: str, *args: Any) -> Any:
        if kind == "chain":  # (prompt_ids, chains) -> logp (B, L-1), mask (B, L-1), h_T (B, d)
            return self.dual.chain_forward(*args)
        if kind == "last":  # (seqs,) -> (B, d) final hidden state at each sequence's last token
            return self.dual.last_hidden(*args)
        if kind == "greedy":  # (prompt_ids, max_new_tokens, synced) -> token ids of each finished chain
            return self._greedy(*args)
        raise ValueError(f"unknown forward kind {kind!r}")

    def _greedy(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, synced: bool) -> list[list[int]]:
        # DualHeadModel.generate with `synced_gpus`: under ZeRO-3 every rank must run the same number of forward
        # passes, so a rank whose chains finished keeps stepping until all ranks are done.
        return [c.token_ids for c in self.dual.generate(prompt_ids, max_new_tokens, synced_gpus=synced)]


def chain_positions(prompt_len: int, chain_len: int) -> slice:
    """Where a chain's tokens sit on chain_forward's (N, L) log-prob grid: position t predicts token t + 1, so chain
    token j of a prompt of length P is at t = P - 1 + j."""
    return slice(prompt_len - 1, prompt_len - 1 + chain_len)


class LearnerWorker:
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
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        # One GPU per rank: "cuda:N" is the one Ray assigned, in this process's numbering (the Ray layer resolves it:
        # driver.system.local_cuda_index); plain "cuda" is cuda:0, right when Ray narrowed CUDA_VISIBLE_DEVICES to it.
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.device.index or 0)
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=learner_cfg.timeout_s)
        if not torch.distributed.is_initialized():
            # Our own store, listening on MASTER_ADDR only (torch's env:// store would listen on every interface);
            # DeepSpeed then finds the process group initialised and uses it.
            store = bound_store(master_addr, master_port, world_size, rank == 0, timeout)
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                                 timeout=timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, rank=rank,
                                   world_size=world_size)

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
        # Backward calls of one optimiser update: the token micro-batches of one mini-batch, plus the item term.
        chains_per_update = self.chains_per_rank // learner_cfg.mini_batches
        self.backward_calls = math.ceil(chains_per_update / learner_cfg.micro_batch_size) + 1
        ds_config = build_ds_config(learner_cfg, learner_cfg.micro_batch_size, self.backward_calls, self.dtype,
                                    load_universal=load_universal)
        optimizer = torch.optim.AdamW(trainable, lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay)
        self.engine, *_ = deepspeed.initialize(model=_PolicyNet(self.dual), optimizer=optimizer, config=ds_config)
        torch.manual_seed(seed + rank)  # dropout etc. differ across ranks from here on

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.export = WeightExport(base, rank, self.zero3, model_cfg.dtype, self._gathered)
        self.item_prompt_ids: list[list[int]] = []
        self.items: ItemTable | None = None  # this rank's copy of the item table (r2ec/item_table.py)

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
        self.items = ItemTable(table.detach().to(self.device, torch.float32).clone())

    def _rewards(self, h_T: torch.Tensor, history_idx: torch.Tensor, target_idx: torch.Tensor,
                 table: torch.Tensor) -> tuple[RewardOutput, torch.Tensor]:
        """RecPO's fused reward of each chain and the (N, V) scores it came from; history_idx / target_idx already
        repeated per chain."""
        scores = self.dual.item_scores(h_T.to(self.device, torch.float32), table, history_idx.to(self.device),
                                       target_idx.to(self.device))
        target = target_idx.to(self.device)
        return fused_reward(scores, target, beta=self.recpo_cfg.beta, k_r=self.recpo_cfg.k_r), scores

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

    # ------------------------------------------------------------------------------------------ training
    def train_step(self, shard: TrainShard) -> StepResult:
        """One RecPO step on this rank's groups: ``learner.mini_batches`` optimiser updates (collective: all ranks
        call it together).

        Metrics: ``loss_token`` / ``loss_item`` are this rank's shares of the globally normalised losses (the step's
        loss is their sum over ranks; with several mini-batches, the mean over them); ``grad_norm`` is the global
        norm before clipping (equal on every rank; mean over the updates); everything else describes this rank
        (average ``*_mean`` / ``diag_*`` over ranks, take the worst ``alarm_*``)."""
        t_start = time.perf_counter()
        G, rollout = self.recpo_cfg.group_size, shard.rollout
        U, N = len(shard.prompt_ids), len(shard.rollout)
        if U == 0 or N != U * G:
            raise ValueError(f"train_step: {U} prompts and {N} chains do not form groups of G={G}")
        local_tokens = rollout.num_sampled_tokens
        if local_tokens > shard.num_tokens:
            raise ValueError(f"shard has {local_tokens} sampled tokens but the step's global num_tokens is "
                             f"{shard.num_tokens}: pass the count over all ranks")
        width = rollout.logp_mask.shape[1]
        for r, chain in enumerate(rollout.chain_ids):  # checked before the first collective, not in the middle
            if not chain or len(chain) > width or bool(rollout.logp_mask[r, len(chain):].any()):
                raise ValueError(f"rollout row {r}: logp_mask does not fit its chain of {len(chain)} tokens")

        # 1. rows re-encoded by any rank in the previous step
        self._items().apply(shard.table_updates_idx, shard.table_updates)  # the other ranks' rows of the last step
        self._set_lr(self.learner_cfg.lr)
        table_cos = table_cosine_mean(self.table)

        # 2. rewards from the rollout's h_T, group advantages, relabel mask
        target_rep = shard.target_idx.repeat_interleave(G)
        history_rep = shard.history_idx.repeat_interleave(G, dim=0)
        table_before = self.table.clone()  # the updates write re-encoded targets into this rank's table
        reward, scores = self._rewards(rollout.h_T, history_rep, target_rep, table_before)
        rewards = reward.rewards.float().cpu()
        adv = compute_advantages(rewards.view(U, G), self.recpo_cfg.advantage)  # (U, G)
        relabel = relabel_mask(adv, self.recpo_cfg.relabel_topk)  # (U, G) bool
        adv_flat, relabel_flat = adv.flatten(), relabel.flatten()
        t_reward = time.perf_counter() - t_start

        # 3. pi_old: with one update it is the current policy (ratio 1, computed inside the update); with several,
        # every update is measured against the weights that sampled the chains, computed once here.
        M = self.learner_cfg.mini_batches
        t0 = time.perf_counter()
        h_T_learner = torch.empty(N, self.hidden_size, dtype=torch.float32)
        old_logp, logp_abs_diff = None, 0.0
        if M > 1:
            old_logp = self._chain_logp(shard, h_T_learner)
            logp_abs_diff = float(((old_logp - rollout.logp.float()).abs() * rollout.logp_mask).sum())
        t_old = time.perf_counter() - t0

        # 4. the updates, each on whole groups: token term, item term, optimiser step
        parts = [list(range(U))[m * U // M:(m + 1) * U // M] for m in range(M)]
        ups = [self._update(shard, users, adv_flat, relabel_flat, old_logp, h_T_learner, single=M == 1)
               for users in parts]
        # The alarm's rewards: the learner's own h_T (before the first update) against the same table.
        reward_learner, _ = self._rewards(h_T_learner, history_rep, target_rep, table_before)

        items = torch.unique(torch.cat([u["items"] for u in ups]))
        item_updates = self.table[items.to(self.device)].float().cpu()
        t_token, t_item, t_opt = (sum(u[k] for u in ups) for k in ("t_token", "t_item", "t_opt"))
        t_train = t_old + t_token + t_item + t_opt
        metrics = {
            "loss_token": sum(u["loss_token"] for u in ups) / M,
            "loss_item": sum(u["loss_item"] for u in ups) / M,
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std()) if N > 1 else 0.0,
            "r_d_mean": float(reward.r_d.mean()),
            "r_c_mean": float(reward.r_c.mean()),
            "target_rank_mean": float(reward.rank.double().mean()),
            "adv_abs_mean": float(adv.abs().mean()),
            "clip_frac": sum(u["clipped"] for u in ups) / max(local_tokens, 1),
            "grad_norm": sum(u["grad_norm"] for u in ups) / M,
            "diag_table_cos_mean": table_cos,
            "diag_score_std": score_std_mean(scores),
            "chain_len_mean": sum(len(c) for c in rollout.chain_ids) / N,
            "num_tokens": float(local_tokens),
            "item_candidates": sum(u["candidates"] for u in ups) / M,
            "alarm_h_T_max_diff": float((h_T_learner - rollout.h_T.float()).abs().max()),
            "alarm_logp_abs_diff_mean": (logp_abs_diff + sum(u["logp_abs_diff"] for u in ups)) / max(local_tokens, 1),
            "time_reward_s": t_reward,
            "time_old_logp_s": t_old,
            "time_token_s": t_token,
            "time_item_s": t_item,
            "time_optimizer_s": t_opt,
            "time_train_s": t_train,
            "tokens_per_s_learner": local_tokens / max(t_train, 1e-9),
        }
        if self.recpo_cfg.kl_coef > 0:  # this rank's share of the step's token-mean KL, like loss_token
            metrics["loss_kl"] = sum(u["loss_kl"] for u in ups) / M
        if "grad_norm_token" in ups[0]:  # measurable at ZeRO-0 with one rank only (_grads_snapshot)
            for key in ("grad_norm_token", "grad_norm_item"):
                metrics[key] = sum(u[key] for u in ups) / M
        return StepResult(metrics=metrics, table_updates_idx=items.cpu(), table_updates=item_updates,
                          rewards=rewards, rewards_learner=reward_learner.rewards.float().cpu())

    def _update(self, shard: TrainShard, users: list[int], adv: torch.Tensor, relabel: torch.Tensor,
                old_logp: torch.Tensor | None, h_T_learner: torch.Tensor, single: bool) -> dict[str, Any]:
        """One optimiser update on the groups of ``users``: token micro-batches, the item term, the step."""
        G, rollout, W = self.recpo_cfg.group_size, shard.rollout, self.world_size
        rows_all = [u * G + j for u in users for j in range(G)]
        local_tokens = int(rollout.logp_mask[rows_all].sum()) if rows_all else 0
        # Global normalisers of this update: the shard's (one update per step) or summed over ranks.
        num_tokens = shard.num_tokens if single else self._agree_sum(local_tokens)
        num_chains = shard.num_chains if single else self._agree_sum(len(rows_all))
        num_tokens = max(num_tokens, 1)  # all chains may be appended markers only: loss 0, not NaN

        t0 = time.perf_counter()
        self.engine.train()
        mbs = self.learner_cfg.micro_batch_size
        batches = [rows_all[lo:lo + mbs] for lo in range(0, len(rows_all), mbs)]
        loss_token = loss_kl = clipped = logp_abs_diff = 0.0
        kl_coef = self.recpo_cfg.kl_coef
        for k in range(self._agree_max(len(batches))):
            self.engine.set_gradient_accumulation_boundary(False)
            if k < len(batches):
                rows = batches[k]
                prompts = [shard.prompt_ids[r // G] for r in rows]
                chains = [rollout.chain_ids[r] for r in rows]
                logp, _, h_T = self.engine("chain", prompts, chains)
                mask, logp_rollout = self._align_chain_tokens(rows, prompts, chains, tuple(logp.shape),
                                                              rollout.logp_mask, rollout.logp)
                if old_logp is None:
                    old = logp.detach()
                else:
                    old = self._align_chain_tokens(rows, prompts, chains, tuple(logp.shape), rollout.logp_mask,
                                                   old_logp)[1]
                out = token_loss(logp, old, adv[rows].to(self.device), mask, eps_low=self.recpo_cfg.eps_low,
                                 eps_high=self.recpo_cfg.eps_high, num_tokens=num_tokens)
                loss = out.loss
                loss_token += float(out.loss.detach())
                if kl_coef > 0:
                    kl = kl_penalty(logp, self._ref_logp(prompts, chains), mask, num_tokens=num_tokens)
                    loss = loss + kl_coef * kl
                    loss_kl += float(kl.detach())
                clipped += float(out.clip_frac) * num_tokens
                if old_logp is None:  # else both come from the pass that computed pi_old
                    logp_abs_diff += float(((logp.detach().float() - logp_rollout).abs() * mask).sum())
                    h_T_learner[rows] = h_T.detach().float().cpu()
            else:  # padding micro-batch: keeps ZeRO's collectives in step with ranks that have more chains
                logp, _, _ = self.engine("chain", *self._padding_chain())
                if kl_coef > 0:
                    self._ref_logp(*self._padding_chain())
                loss = logp.sum() * 0.0
            # DeepSpeed averages gradients over ranks; x W turns the average of globally normalised shares into
            # their sum. scale_wrt_gas=False: the loss is normalised already.
            self.engine.backward(loss * W, scale_wrt_gas=False)
        t_token = time.perf_counter() - t0
        token_grads = self._grads_snapshot()

        # the item term: the relabelled chains' h_T against the step's targets, both with gradient
        t0 = time.perf_counter()
        self.engine.set_gradient_accumulation_boundary(True)
        sel = [r for r in rows_all if relabel[r]]
        term = item_term(self._encode, self.item_prompt_ids, self.table,
                         [list(shard.prompt_ids[r // G]) + list(rollout.chain_ids[r]) for r in sel],
                         shard.target_idx[[r // G for r in sel]], shard.history_idx[[r // G for r in sel]],
                         adv[sel], num_chains, self.model_cfg.tau, self.recpo_cfg.item_negatives, self.rank, W,
                         items_frozen=self.model_cfg.item_table == "frozen")
        self.engine.backward(term.loss * W, scale_wrt_gas=False)
        self._items().apply(term.items, term.h_items)
        t_item = time.perf_counter() - t0

        t0 = time.perf_counter()
        norms = self._optimizer_step(token_grads)
        return {"loss_token": loss_token, "loss_kl": loss_kl, "loss_item": term.loss_local, "clipped": clipped,
                "logp_abs_diff": logp_abs_diff, "items": term.items, "candidates": term.candidates,
                "t_token": t_token, "t_item": t_item, "t_opt": time.perf_counter() - t0, **norms}

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
        term = item_term(self._encode, self.item_prompt_ids, self.table, shard.seqs, shard.target_idx,
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
        metrics = {
            "loss_item": term.loss_local,
            "target_rank_mean": float(rank.mean()) if U else float("nan"),
            "train_ndcg@10": float(ndcg_at_k(rank, 10).mean()) if U else float("nan"),
            "grad_norm": norms["grad_norm"],
            "diag_table_cos_mean": table_cos,
            "diag_score_std": score_std_mean(scores) if U else float("nan"),
            "item_candidates": float(term.candidates),
            "num_users": float(U),
            "time_item_s": t_item,
            "time_optimizer_s": t_opt,
            "time_train_s": time.perf_counter() - t_start,
        }
        return StepResult(metrics=metrics, table_updates_idx=term.items,
                          table_updates=term.h_items.float().cpu(), rewards=torch.zeros(0),
                          rewards_learner=torch.zeros(0))

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

    @torch.no_grad()
    def _ref_logp(self, prompts: list, chains: list) -> torch.Tensor:
        """Log-probs (B, L-1) under the reference policy of the KL term: the same model with its LoRA adapters
        disabled (peft's ``disable_adapter``), through the engine so ZeRO-3 gathers as for any forward."""
        with self.dual.model.disable_adapter():
            return self.engine("chain", prompts, chains)[0]

    @torch.no_grad()
    def _chain_logp(self, shard: TrainShard, h_T: torch.Tensor) -> torch.Tensor:
        """(N, L) log-prob of every sampled chain token under the current weights, on the rollout's grid (the
        pi_old of every mini-batch update); fills ``h_T`` (N, d). Train mode, as the updates; collective under
        ZeRO-3."""
        G, rollout = self.recpo_cfg.group_size, shard.rollout
        self.engine.train()
        out = torch.zeros_like(rollout.logp, dtype=torch.float32)
        mbs = self.learner_cfg.micro_batch_size
        batches = [list(range(lo, min(len(rollout), lo + mbs))) for lo in range(0, len(rollout), mbs)]
        for k in range(self._agree_max(len(batches)) if self.zero3 else len(batches)):
            if k >= len(batches):
                self.engine("chain", *self._padding_chain())
                continue
            rows = batches[k]
            prompts, chains = [shard.prompt_ids[r // G] for r in rows], [rollout.chain_ids[r] for r in rows]
            logp, _, h = self.engine("chain", prompts, chains)
            h_T[rows] = h.float().cpu()
            for i, (r, p, c) in enumerate(zip(rows, prompts, chains, strict=True)):
                out[r, :len(c)] = logp[i, chain_positions(len(p), len(c))].float().cpu()
        return out

    def _stage0_grad_norm(self) -> float | None:
        """Without ZeRO, DeepSpeed's fp32 path clips but does not report the norm; after the boundary backward the
        gradients are already averaged over ranks, so the norm (before clipping) is computed here."""
        if self.learner_cfg.zero_stage != 0 or self.dtype != "float32":
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.requires_grad and p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _align_chain_tokens(self, rows: list[int], prompts: list[list[int]], chains: list[list[int]],
                            shape: tuple[int, ...], logp_mask: torch.Tensor, logp: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss mask and a rollout-grid logp (N, L) on chain_forward's grid (``chain_positions``). Only tokens the
        rollout sampled are trained."""
        mask = torch.zeros(shape, dtype=torch.float32)
        out = torch.zeros(shape, dtype=torch.float32)
        for i, (r, p, c) in enumerate(zip(rows, prompts, chains, strict=True)):
            n, at = len(c), chain_positions(len(p), len(c))
            mask[i, at] = logp_mask[r, :n].float()
            out[i, at] = logp[r, :n].float()
        return mask.to(self.device), out.to(self.device)

    # ------------------------------------------------------------------------------------------ inference helpers
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

    def broadcast_weights(self, info: SyncGroup | None, bucket_bytes: int) -> int | None:
        """Rank 0 sends the full merged weights to every rollout engine. Call on every rank at once."""
        return self.export.broadcast(info, bucket_bytes, self.device)

    def sync_address(self) -> tuple[str, int]:
        """Address for the weight-sync group's store: MASTER_ADDR (rank 0's node) and a port free right now."""
        with socket.socket() as s:
            s.bind((self.master_addr, 0))
            return self.master_addr, int(s.getsockname()[1])

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str) -> None:
        """Write this rank's part of the learner checkpoint into ``directory`` (collective: every rank at once).

        ``directory/ds/``: DeepSpeed's sharded checkpoint (module, ZeRO partitions of the fp32 weights and AdamW
        states, step counters), without DeepSpeed's ``latest`` file and without client state (the driver keeps
        the project's state itself). ``directory/rng-rank<r>.json``: this rank's RNG states. Returns once every
        rank has finished writing."""
        from r2ec.checkpoint import DS_TAG, write_json_atomic

        path = os.fspath(directory)
        os.makedirs(path, exist_ok=True)
        self.engine.save_checkpoint(path, tag=DS_TAG, client_state={}, save_latest=False)
        state = {"world_size": self.world_size, "rank": self.rank, "global_steps": int(self.engine.global_steps),
                 **rng_state()}
        write_json_atomic(Path(path) / f"rng-rank{self.rank}.json", state)
        if self.world_size > 1:
            torch.distributed.barrier()

    def load_checkpoint(self, directory: str, universal_dir: str | None = None) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote into ``directory`` (collective: every rank at once).

        Module weights, fp32 master weights, AdamW states and DeepSpeed's step counters are restored, so the next
        ``train_step`` is the one an uninterrupted run would take. Every torch-pickle file is first opened with
        ``torch.load(weights_only=True)`` under ``r2ec.checkpoint.SAFE_GLOBALS`` (DeepSpeed itself unpickles with
        ``weights_only=False``). With ``universal_dir`` (the output of ``learner.universal.to_universal``, needed
        when the checkpoint was written by another number of ranks) the weights and optimizer states come from the
        universal checkpoint instead; the worker must have been built with ``load_universal=True``.

        Call it on a freshly built worker, before any ``train_step`` (DeepSpeed's ZeRO-3 cannot load into an
        engine whose parameters it has already partitioned and trained), with the same model / LoRA / ZeRO config.

        RNG: this rank's saved states are restored when the checkpoint has this world size; otherwise every RNG
        is seeded from (seed, saved step, rank), which is deterministic but not the uninterrupted run's stream.
        Returns ``{"global_steps", "world_size_saved", "universal", "rng_restored", "rng_seed"}``."""
        from learner.universal import needs_universal, saved_world_size
        from r2ec.checkpoint import DS_TAG, CheckpointError, check_pickles, pickle_files

        folder = Path(directory)
        if universal_dir is not None and not self.load_universal:
            raise ValueError("load_checkpoint(universal_dir=...) needs a LearnerWorker built with "
                             "load_universal=True (DeepSpeed's checkpoint.load_universal is fixed at initialisation)")
        if universal_dir is None and self.load_universal:
            raise ValueError("this LearnerWorker was built with load_universal=True and can only load a universal "
                             "checkpoint: pass universal_dir (see learner.universal.to_universal)")
        load_dir = Path(universal_dir) if universal_dir is not None else folder
        if not (load_dir / DS_TAG).is_dir():
            raise CheckpointError(f"{load_dir / DS_TAG}: no DeepSpeed checkpoint folder")
        files = pickle_files(load_dir / DS_TAG)
        if not files:
            raise CheckpointError(f"{load_dir / DS_TAG}: no checkpoint files")
        check_pickles(files)  # before DeepSpeed unpickles anything
        saved_w = saved_world_size(folder)
        if universal_dir is None and needs_universal(folder, self.world_size):  # (ZeRO-0 loads at any size)
            raise CheckpointError(f"{folder}: written by {saved_w} learner ranks, this learner has "
                                  f"{self.world_size}; convert it with learner.universal.to_universal and load it "
                                  "with load_universal=True")

        load_path, _ = self.engine.load_checkpoint(os.fspath(load_dir), tag=DS_TAG, load_module_strict=True,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"{load_dir / DS_TAG}: DeepSpeed found no checkpoint to load")
        steps = int(self.engine.global_steps)

        rng_file = folder / f"rng-rank{self.rank}.json"
        rng_seed = None
        if saved_w == self.world_size and rng_file.is_file():
            state = json.loads(rng_file.read_text())
            if state.get("world_size") != self.world_size or state.get("rank") != self.rank:
                raise CheckpointError(f"{rng_file}: belongs to rank {state.get('rank')} of "
                                      f"{state.get('world_size')}, not rank {self.rank} of {self.world_size}")
            set_rng_state(state)
        else:
            rng_seed = (self.seed * 1_000_003 + steps * 1_009 + self.rank) % 2**32
            seed_all(rng_seed)
        return {"global_steps": steps, "world_size_saved": saved_w, "universal": universal_dir is not None,
                "rng_restored": rng_seed is None, "rng_seed": rng_seed}
