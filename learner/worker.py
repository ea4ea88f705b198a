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
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

from learner.checkpointing import load_rank, save_rank
from learner.ds_config import build_ds_config, training_dtype
from learner.item_term import item_term, score_std_mean, table_cosine_mean
from learner.policy import PolicyNet, chain_positions
from learner.probes import Probes
from learner.weights import WeightExport
from r2ec.algo.metrics import ndcg_at_k
from r2ec.algo.recpo import RewardOutput, compute_advantages, fused_reward, kl_penalty, relabel_mask, token_loss
from r2ec.config import LearnerConfig, ModelConfig, RecPOConfig, WarmupConfig
from r2ec.item_table import ItemTable
from r2ec.model import DualHeadModel
from r2ec.protocol import StepMetrics, StepResult, TrainShard, WarmupMetrics, WarmupShard
from r2ec.weight_sync import SyncGroup, TensorMeta, bound_store


@dataclass
class _Scored:
    """Step 2 of a RecPO step on one rank: the rewards and advantages of its chains (N = U users x G)."""

    reward: RewardOutput  # per chain: rewards (N,), r_d (N,), r_c (N,), rank (N,)
    rewards: torch.Tensor  # (N,) float32 on CPU
    scores: torch.Tensor  # (N, V) the item scores the rewards came from
    adv: torch.Tensor  # (U, G) group-relative advantages
    relabel: torch.Tensor  # (U, G) bool: the chains the item term trains on
    table: torch.Tensor  # (V, d) the table they were scored against (before this step's row writes)
    history_rep: torch.Tensor  # (N, H) long: each chain's user history, -1 padded
    target_rep: torch.Tensor  # (N,) long: each chain's target item


class LearnerWorker(Probes):
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
        # driver.remote.local_cuda_index); plain "cuda" is cuda:0, right when Ray narrowed CUDA_VISIBLE_DEVICES to it.
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
        self.engine, *_ = deepspeed.initialize(model=PolicyNet(self.dual), optimizer=optimizer, config=ds_config)
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
        self._check_shard(shard)
        # 1. rows re-encoded by any rank in the previous step
        self._items().apply(shard.table_updates_idx, shard.table_updates)
        self._set_lr(self.learner_cfg.lr)
        table_cos = table_cosine_mean(self.table)
        # 2. rewards from the rollout's h_T, group advantages, relabel mask
        scored = self._score(shard)
        t_reward = time.perf_counter() - t_start
        # 3. pi_old: with one update it is the current policy (ratio 1, computed inside the update); with several,
        # every update is measured against the weights that sampled the chains, computed once here.
        t0, M = time.perf_counter(), self.learner_cfg.mini_batches
        h_T_learner = torch.empty(len(shard.rollout), self.hidden_size, dtype=torch.float32)
        old_logp = self._chain_logp(shard, h_T_learner) if M > 1 else None
        t_old = time.perf_counter() - t0
        # 4. the updates, each on whole groups: token term, item term, optimiser step
        U = len(shard.prompt_ids)
        ups = [self._update(shard, list(range(U))[m * U // M:(m + 1) * U // M], scored.adv.flatten(),
                            scored.relabel.flatten(), old_logp, h_T_learner, single=M == 1) for m in range(M)]
        # The alarm's rewards: the learner's own h_T (before the first update) against the same table.
        reward_learner, _ = self._rewards(h_T_learner, scored.history_rep, scored.target_rep, scored.table)
        items = torch.unique(torch.cat([u["items"] for u in ups]))
        metrics = self._step_metrics(shard, scored, ups, h_T_learner, old_logp, table_cos, t_reward, t_old)
        return StepResult(metrics=metrics, table_updates_idx=items.cpu(),
                          table_updates=self.table[items.to(self.device)].float().cpu(), rewards=scored.rewards,
                          rewards_learner=reward_learner.rewards.float().cpu())

    def _check_shard(self, shard: TrainShard) -> None:
        """Refuse a malformed shard before the first collective (not in the middle of one)."""
        G, rollout = self.recpo_cfg.group_size, shard.rollout
        U, N = len(shard.prompt_ids), len(rollout)
        if U == 0 or N != U * G:
            raise ValueError(f"train_step: {U} prompts and {N} chains do not form groups of G={G}")
        if rollout.num_sampled_tokens > shard.num_tokens:
            raise ValueError(f"shard has {rollout.num_sampled_tokens} sampled tokens but the step's global num_tokens "
                             f"is {shard.num_tokens}: pass the count over all ranks")
        width = rollout.logp_mask.shape[1]
        for r, chain in enumerate(rollout.chain_ids):
            if not chain or len(chain) > width or bool(rollout.logp_mask[r, len(chain):].any()):
                raise ValueError(f"rollout row {r}: logp_mask does not fit its chain of {len(chain)} tokens")

    def _score(self, shard: TrainShard) -> _Scored:
        """Step 2: RecPO's fused reward of every chain from the rollout's h_T, group advantages, the relabel mask."""
        G, U = self.recpo_cfg.group_size, len(shard.prompt_ids)
        target_rep = shard.target_idx.repeat_interleave(G)
        history_rep = shard.history_idx.repeat_interleave(G, dim=0)
        table = self.table.clone()  # the updates write re-encoded targets into this rank's table
        reward, scores = self._rewards(shard.rollout.h_T, history_rep, target_rep, table)
        rewards = reward.rewards.float().cpu()
        adv = compute_advantages(rewards.view(U, G), self.recpo_cfg.advantage)  # (U, G)
        return _Scored(reward, rewards, scores, adv, relabel_mask(adv, self.recpo_cfg.relabel_topk), table,
                       history_rep, target_rep)

    def _update(self, shard: TrainShard, users: list[int], adv: torch.Tensor, relabel: torch.Tensor,
                old_logp: torch.Tensor | None, h_T_learner: torch.Tensor, single: bool) -> dict[str, Any]:
        """One optimiser update on the groups of ``users``: the token term, the item term, the optimiser step."""
        G = self.recpo_cfg.group_size
        rows_all = [u * G + j for u in users for j in range(G)]
        local_tokens = int(shard.rollout.logp_mask[rows_all].sum()) if rows_all else 0
        # Global normalisers of this update: the shard's (one update per step) or summed over ranks.
        num_tokens = shard.num_tokens if single else self._agree_sum(local_tokens)
        num_chains = shard.num_chains if single else self._agree_sum(len(rows_all))
        t0 = time.perf_counter()
        # max(., 1): all chains may be appended markers only: loss 0, not NaN
        token = self._token_term(shard, rows_all, adv, old_logp, h_T_learner, max(num_tokens, 1))
        t_token = time.perf_counter() - t0
        token_grads = self._grads_snapshot()
        t0 = time.perf_counter()
        term = self._item_term(shard, rows_all, adv, relabel, num_chains)
        t_item = time.perf_counter() - t0
        t0 = time.perf_counter()
        norms = self._optimizer_step(token_grads)
        return {**token, "loss_item": term.loss_local, "items": term.items, "candidates": term.candidates,
                "t_token": t_token, "t_item": t_item, "t_opt": time.perf_counter() - t0, **norms}

    def _token_term(self, shard: TrainShard, rows_all: list[int], adv: torch.Tensor, old_logp: torch.Tensor | None,
                    h_T_learner: torch.Tensor, num_tokens: int) -> dict[str, float]:
        """Step 3 of an update: the clipped token loss (plus the KL term) micro-batch by micro-batch, each with its
        backward. Fills ``h_T_learner`` for these rows when pi_old was not computed beforehand."""
        G, rollout, W = self.recpo_cfg.group_size, shard.rollout, self.world_size
        self.engine.train()
        mbs = self.learner_cfg.micro_batch_size
        batches = [rows_all[lo:lo + mbs] for lo in range(0, len(rows_all), mbs)]
        out = {"loss_token": 0.0, "loss_kl": 0.0, "clipped": 0.0, "logp_abs_diff": 0.0}
        kl_coef = self.recpo_cfg.kl_coef
        for k in range(self._agree_max(len(batches))):
            self.engine.set_gradient_accumulation_boundary(False)
            if k >= len(batches):  # padding micro-batch: keeps ZeRO's collectives in step with busier ranks
                logp, _, _ = self.engine("chain", *self._padding_chain())
                if kl_coef > 0:
                    self._ref_logp(*self._padding_chain())
                self.engine.backward(logp.sum() * 0.0, scale_wrt_gas=False)
                continue
            rows = batches[k]
            prompts, chains = [shard.prompt_ids[r // G] for r in rows], [rollout.chain_ids[r] for r in rows]
            logp, _, h_T = self.engine("chain", prompts, chains)
            grid = tuple(logp.shape)
            mask, logp_rollout = self._align_chain_tokens(rows, prompts, chains, grid, rollout.logp_mask, rollout.logp)
            old = logp.detach() if old_logp is None else self._align_chain_tokens(
                rows, prompts, chains, grid, rollout.logp_mask, old_logp)[1]
            term = token_loss(logp, old, adv[rows].to(self.device), mask, eps_low=self.recpo_cfg.eps_low,
                              eps_high=self.recpo_cfg.eps_high, num_tokens=num_tokens)
            loss = term.loss
            out["loss_token"] += float(term.loss.detach())
            out["clipped"] += float(term.clip_frac) * num_tokens
            if kl_coef > 0:
                kl = kl_penalty(logp, self._ref_logp(prompts, chains), mask, num_tokens=num_tokens)
                loss = loss + kl_coef * kl
                out["loss_kl"] += float(kl.detach())
            if old_logp is None:  # else both come from the pass that computed pi_old
                out["logp_abs_diff"] += float(((logp.detach().float() - logp_rollout).abs() * mask).sum())
                h_T_learner[rows] = h_T.detach().float().cpu()
            # DeepSpeed averages gradients over ranks; x W turns the average of globally normalised shares into
            # their sum. scale_wrt_gas=False: the loss is normalised already.
            self.engine.backward(loss * W, scale_wrt_gas=False)
        return out

    def _item_term(self, shard: TrainShard, rows_all: list[int], adv: torch.Tensor, relabel: torch.Tensor,
                   num_chains: int):
        """Step 4 of an update: the relabelled chains' h_T against the step's targets, both with gradient (the
        update's last backward); the targets' fresh rows go into this rank's table."""
        G, rollout, W = self.recpo_cfg.group_size, shard.rollout, self.world_size
        self.engine.set_gradient_accumulation_boundary(True)
        sel = [r for r in rows_all if relabel[r]]
        term = item_term(self._encode, self.item_prompt_ids, self.table,
                         [list(shard.prompt_ids[r // G]) + list(rollout.chain_ids[r]) for r in sel],
                         shard.target_idx[[r // G for r in sel]], shard.history_idx[[r // G for r in sel]],
                         adv[sel], num_chains, self.model_cfg.tau, self.recpo_cfg.item_negatives, self.rank, W,
                         items_frozen=self.model_cfg.item_table == "frozen")
        self.engine.backward(term.loss * W, scale_wrt_gas=False)
        self._items().apply(term.items, term.h_items)
        return term

    def _step_metrics(self, shard: TrainShard, scored: _Scored, ups: list[dict], h_T_learner: torch.Tensor,
                      old_logp: torch.Tensor | None, table_cos: float, t_reward: float, t_old: float
                      ) -> StepMetrics:
        """The step's metrics on this rank (each field says how it combines over ranks)."""
        rollout, M, N = shard.rollout, len(ups), len(shard.rollout)
        local_tokens = rollout.num_sampled_tokens
        logp_abs_diff = sum(u["logp_abs_diff"] for u in ups)
        if old_logp is not None:  # measured once, in the pass that computed pi_old
            logp_abs_diff += float(((old_logp - rollout.logp.float()).abs() * rollout.logp_mask).sum())
        t_token, t_item, t_opt = (sum(u[k] for u in ups) for k in ("t_token", "t_item", "t_opt"))
        t_train = t_old + t_token + t_item + t_opt
        reward, rewards = scored.reward, scored.rewards
        optional = {}
        if self.recpo_cfg.kl_coef > 0:  # this rank's share of the step's token-mean KL, like loss_token
            optional["loss_kl"] = sum(u["loss_kl"] for u in ups) / M
        if "grad_norm_token" in ups[0]:  # measurable at ZeRO-0 with one rank only (_grads_snapshot)
            for key in ("grad_norm_token", "grad_norm_item"):
                optional[key] = sum(u[key] for u in ups) / M
        return StepMetrics(
            loss_token=sum(u["loss_token"] for u in ups) / M,
            loss_item=sum(u["loss_item"] for u in ups) / M,
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std()) if N > 1 else 0.0,
            r_d_mean=float(reward.r_d.mean()),
            r_c_mean=float(reward.r_c.mean()),
            target_rank_mean=float(reward.rank.double().mean()),
            adv_abs_mean=float(scored.adv.abs().mean()),
            clip_frac=sum(u["clipped"] for u in ups) / max(local_tokens, 1),
            grad_norm=sum(u["grad_norm"] for u in ups) / M,
            diag_table_cos_mean=table_cos,
            diag_score_std=score_std_mean(scored.scores),
            chain_len_mean=sum(len(c) for c in rollout.chain_ids) / N,
            num_tokens=float(local_tokens),
            item_candidates=sum(u["candidates"] for u in ups) / M,
            alarm_h_T_max_diff=float((h_T_learner - rollout.h_T.float()).abs().max()),
            alarm_logp_abs_diff_mean=logp_abs_diff / max(local_tokens, 1),
            time_reward_s=t_reward,
            time_old_logp_s=t_old,
            time_token_s=t_token,
            time_item_s=t_item,
            time_optimizer_s=t_opt,
            time_train_s=t_train,
            tokens_per_s_learner=local_tokens / max(t_train, 1e-9),
            **optional,
        )

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
        """This rank's part of the learner checkpoint (learner/checkpointing.py). Collective: every rank at once."""
        save_rank(self.engine, self.rank, self.world_size, directory)

    def load_checkpoint(self, directory: str, universal_dir: str | None = None) -> dict[str, Any]:
        """Restore what ``save_checkpoint`` wrote (learner/checkpointing.py). Collective: every rank at once."""
        return load_rank(self.engine, self.rank, self.world_size, self.seed, self.load_universal, directory,
                         universal_dir)
