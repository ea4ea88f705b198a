"""The RecPO step of a learner rank (``RecPOStep.train_step``), mixed into ``learner.worker.LearnerWorker``.

Each rank receives whole groups of chains (``TrainShard``) and, per RecPO step:

1. applies the item-table rows re-encoded by every rank in the previous step;
2. scores the rollout's h_T with the rec_head, s(v) = cos(h_T, H_V[v]) / tau over the full catalogue with the
   user's history masked, and turns the scores into RecPO's fused reward R = beta R_c + (1 - beta) R_d (R_d =
   NDCG@k_r of the target, R_c = its full-catalogue softmax probability), group-relative advantages (GRPO / RLOO)
   and the relabel mask (the top-k chains of each group by advantage, the paper's i*);
3. token term: PPO-style clipped surrogate on the sampled chain tokens, micro-batch by micro-batch;
4. item term: advantage-weighted softmax of the relabelled chains' h_T against the step's target items, both
   WITH gradient (h_T from step 3's forwards, or recomputed in an extra backward), gathered over all ranks; with ``item_negatives: catalogue`` also
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
- With ``learner.pack_prompts`` the token term's forwards (and pi_old's, and the KL reference's) compute each
  group's prompt once, its G chains in one row behind a block attention mask (``chain_forward_packed``,
  r2ec/packing.py): the same log-probs, h_T and gradients within float rounding, P + G x C tokens per group instead
  of G x (P + C). The item term's target items run packed behind the prefix all item prompts share
  (``LearnerWorker._encode_items``).
- With ``learner.fuse_item_term`` (default) the item term's user side is not re-encoded: each relabelled chain's
  h_T comes from the token term's forward of that chain, its item loss joins that micro-batch's backward, and the
  targets are encoded before the token term, their gradient (summed over ranks) backpropagated once after it
  (learner/item_term.py, ``gather_candidates``). The same loss and gradients within float rounding (tests); the
  official code, like ``fuse_item_term: false``, runs the relabelled chains again. One backward then holds both
  terms, so ``grad_norm_token`` / ``grad_norm_item`` are reported only without it.
- A KL penalty (not in the paper, off by default): with ``recpo.kl_coef > 0`` the token term also gets
  kl_coef x k3(pi_ref, pi_theta) on the sampled tokens, pi_ref being the model with its LoRA adapters disabled (the
  weights the run started from, no copy): one extra no-grad forward per micro-batch. LoRA only (the config refuses
  it for full fine-tuning, which would need a frozen copy of the model).

``RecPOStep`` uses the worker's ``engine`` (DeepSpeed), ``dual`` (``DualHeadModel``), ``model_cfg``, ``learner_cfg``,
``recpo_cfg``, ``rank``, ``world_size``, ``device``, ``zero3``, ``backward_calls``, its item table (``_items``,
``table``, ``_encode``, ``_encode_items``) and its collective helpers (``_agree_max``, ``_agree_sum``,
``_padding_chain``, ``_grads_snapshot``, ``_optimizer_step``); ``learner/worker.py`` builds them and says which
calls are collective. Imports no vllm, no ray, no deepspeed.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from learner.item_term import (
    Candidates,
    candidates_loss,
    gather_candidates,
    item_term,
    table_cosine_mean,
    user_item_loss,
)
from learner.micro_batches import plan_micro_batches
from learner.policy import align_chain_tokens, chain_positions
from learner.step_metrics import Scored, step_metrics
from r2ec.algo.off_policy import off_policy_weights
from r2ec.algo.recpo import RewardOutput, compute_advantages, fused_reward, kl_penalty, relabel_mask, token_loss
from r2ec.protocol import StepResult, TrainShard


class RecPOStep:
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
        self.spans.mark("reward", t_start, t_start + t_reward)
        # 3. pi_old: with one update it is the current policy (ratio 1, computed inside the update); with several,
        # every update is measured against the weights that sampled the chains, computed once here.
        t0, M = time.perf_counter(), self.learner_cfg.mini_batches
        h_T_learner = torch.empty(len(shard.rollout), self.hidden_size, dtype=torch.float32)
        old_logp = self._chain_logp(shard, h_T_learner) if M > 1 else None
        t_old = time.perf_counter() - t0
        if old_logp is not None:
            self.spans.mark("old_logp", t0, t0 + t_old)
        # 4. the updates, each on whole groups: token term, item term, optimiser step
        U = len(shard.prompt_ids)
        ups = [self._update(shard, list(range(U))[m * U // M:(m + 1) * U // M], scored.adv.flatten(),
                            scored.relabel.flatten(), old_logp, h_T_learner, single=M == 1) for m in range(M)]
        # The alarm's rewards: the learner's own h_T (before the first update) against the same table.
        reward_learner, _ = self._rewards(h_T_learner, scored.history_rep, scored.target_rep, scored.table)
        items = torch.unique(torch.cat([u["items"] for u in ups]))
        metrics = step_metrics(shard, scored, ups, h_T_learner, old_logp, table_cos, t_reward, t_old,
                               kl=self.recpo_cfg.kl_coef > 0)
        return StepResult(metrics=metrics, table_updates_idx=items.cpu(),
                          table_updates=self.table[items.to(self.device)].float().cpu(), rewards=scored.rewards,
                          rewards_learner=reward_learner.rewards.float().cpu(), spans=self.spans.take())

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

    def _score(self, shard: TrainShard) -> Scored:
        """Step 2: RecPO's fused reward of every chain from the rollout's h_T, group advantages, the relabel mask."""
        G, U = self.recpo_cfg.group_size, len(shard.prompt_ids)
        target_rep = shard.target_idx.repeat_interleave(G)
        history_rep = shard.history_idx.repeat_interleave(G, dim=0)
        table = self.table.clone()  # the updates write re-encoded targets into this rank's table
        reward, scores = self._rewards(shard.rollout.h_T, history_rep, target_rep, table)
        rewards = reward.rewards.float().cpu()
        adv = compute_advantages(rewards.view(U, G), self.recpo_cfg.advantage)  # (U, G)
        return Scored(reward, rewards, scores, adv, relabel_mask(adv, self.recpo_cfg.relabel_topk), table,
                       history_rep, target_rep)

    def _rewards(self, h_T: torch.Tensor, history_idx: torch.Tensor, target_idx: torch.Tensor,
                 table: torch.Tensor) -> tuple[RewardOutput, torch.Tensor]:
        """RecPO's fused reward of each chain and the (N, V) scores it came from; history_idx / target_idx already
        repeated per chain."""
        scores = self.dual.item_scores(h_T.to(self.device, torch.float32), table, history_idx.to(self.device),
                                       target_idx.to(self.device))
        target = target_idx.to(self.device)
        return fused_reward(scores, target, beta=self.recpo_cfg.beta, k_r=self.recpo_cfg.k_r), scores

    def _update(self, shard: TrainShard, users: list[int], adv: torch.Tensor, relabel: torch.Tensor,
                old_logp: torch.Tensor | None, h_T_learner: torch.Tensor, single: bool) -> dict[str, Any]:
        """One optimiser update on the groups of ``users``: the token term, the item term, the optimiser step."""
        G = self.recpo_cfg.group_size
        rows_all = [u * G + j for u in users for j in range(G)]
        local_tokens = int(shard.rollout.logp_mask[rows_all].sum()) if rows_all else 0
        # Global normalisers of this update: the shard's (one update per step) or summed over ranks.
        num_tokens = shard.num_tokens if single else self._agree_sum(local_tokens)
        num_chains = shard.num_chains if single else self._agree_sum(len(rows_all))
        sel = [r for r in rows_all if relabel[r]]
        batches = self._micro_batches(shard, rows_all)
        n_batches = self._agree_max(len(batches))  # every rank runs as many token-term passes
        t0 = time.perf_counter()
        cand = self._candidates(shard, sel) if self.learner_cfg.fuse_item_term else None
        t_item = time.perf_counter() - t0
        if cand is not None:
            self.spans.mark("item", t0, t0 + t_item)
        t0 = time.perf_counter()
        # max(., 1): all chains may be appended markers only: loss 0, not NaN
        token = self._token_term(shard, (batches, n_batches), adv, old_logp, h_T_learner, max(num_tokens, 1),
                                 (cand, relabel, num_chains))
        t_token = time.perf_counter() - t0
        self.spans.mark("token", t0, t0 + t_token)
        token_grads = None if cand is not None else self._grads_snapshot()
        t0 = time.perf_counter()
        item = self._item_term(shard, sel, adv, num_chains) if cand is None else self._finish_item_term(cand)
        t_end = time.perf_counter() - t0
        t_item += t_end
        self.spans.mark("item", t0, t0 + t_end)
        t0 = time.perf_counter()
        norms = self._optimizer_step(token_grads)
        t_opt = time.perf_counter() - t0
        self.spans.mark("optimizer", t0, t0 + t_opt)
        return {**token, **item, "t_token": t_token, "t_item": t_item, "t_opt": t_opt, **norms}

    def _token_term(self, shard: TrainShard, plan: tuple[list[list[int]], int], adv: torch.Tensor,
                    old_logp: torch.Tensor | None,
                    h_T_learner: torch.Tensor, num_tokens: int,
                    fused: tuple[Candidates | None, torch.Tensor, int]) -> dict[str, float]:
        """Step 3 of an update: the clipped token loss (plus the KL term) micro-batch by micro-batch, each with its
        backward: ``plan`` = this rank's micro-batches (rows) and the most any rank has (the passes every rank
        runs). Fills ``h_T_learner`` for these rows when pi_old was not computed beforehand. With candidates
        (``learner.fuse_item_term``; ``fused`` = candidates, relabel mask, global chain count), each micro-batch's
        relabelled chains add their item loss from this forward's h_T, and the boundary falls on the last
        micro-batch when nothing else backpropagates after it (a frozen table)."""
        G, rollout, W = self.recpo_cfg.group_size, shard.rollout, self.world_size
        self.engine.train()
        batches, n_batches = plan
        out = {"loss_token": 0.0, "loss_kl": 0.0, "clipped": 0.0, "logp_abs_diff": 0.0, "tokens_forward": 0,
               "op_tokens": 0, "op_ratio_sum": 0.0, "op_corrected": 0, "op_log_ratio_max": 0.0}
        kl_coef, rc = self.recpo_cfg.kl_coef, self.recpo_cfg
        cand, relabel, num_chains = fused
        last = n_batches - 1
        for k in range(n_batches):
            self.engine.set_gradient_accumulation_boundary(k == last and cand is not None and cand.frozen)
            if k >= len(batches):  # padding micro-batch: keeps ZeRO's collectives in step with busier ranks
                logp, _, h_T = self.engine("chain", *self._padding_chain())
                if kl_coef > 0:
                    self._ref_logp("chain", self._padding_chain())
                # With fused candidates the real micro-batches backpropagate through h_T too; ZeRO-3 gathers the
                # parameters in the order autograd reaches them, so every backward must have the same shape.
                pad = logp.sum() * 0.0 + (h_T.sum() * 0.0 if cand is not None else 0.0)
                self.engine.backward(pad, scale_wrt_gas=False)
                continue
            rows = batches[k]
            prompts, chains = [shard.prompt_ids[r // G] for r in rows], [rollout.chain_ids[r] for r in rows]
            kind, args = self._chain_call(shard, rows)
            logp, _, h_T = self.engine(kind, *args)
            out["tokens_forward"] += sum(len(p) for p in args[0]) + sum(len(c) for c in chains)  # a prompt per row
            grid = tuple(logp.shape)
            mask, logp_rollout = align_chain_tokens(rows, prompts, chains, grid, rollout.logp_mask, rollout.logp,
                                                    self.device)
            old = logp.detach() if old_logp is None else align_chain_tokens(
                rows, prompts, chains, grid, rollout.logp_mask, old_logp, self.device)[1]
            # pi_old (the proximal policy) over the sampler's pi_b: the off-policy weight (rollout.async)
            weights, op = off_policy_weights(old, logp_rollout, mask, rc.off_policy, rc.tis_cap, rc.icepop_low,
                                             rc.icepop_high)
            for key, value in (("op_tokens", op.tokens), ("op_ratio_sum", op.ratio_sum),
                               ("op_corrected", op.corrected)):
                out[key] += value
            out["op_log_ratio_max"] = max(out["op_log_ratio_max"], op.log_ratio_abs_max)
            term = token_loss(logp, old, adv[rows].to(self.device), mask, eps_low=rc.eps_low, eps_high=rc.eps_high,
                              num_tokens=num_tokens, weights=None if rc.off_policy == "none" else weights)
            loss = term.loss
            out["loss_token"] += float(term.loss.detach())
            out["clipped"] += float(term.clip_frac) * num_tokens
            if kl_coef > 0:
                kl = kl_penalty(logp, self._ref_logp(kind, args), mask, num_tokens=num_tokens)
                loss = loss + kl_coef * kl
                out["loss_kl"] += float(kl.detach())
            sel = [i for i, r in enumerate(rows) if relabel[r]]
            if cand is not None:  # the item term's user side, from this forward's h_T (Step 4)
                users = torch.tensor([rows[i] // G for i in sel], dtype=torch.long)
                loss = loss + (user_item_loss(cand, h_T[sel], shard.target_idx[users], shard.history_idx[users],
                                              adv[[rows[i] for i in sel]], self.table, num_chains,
                                              self.model_cfg.tau, rc.item_negatives) if sel else h_T.sum() * 0.0)
            if old_logp is None:  # else both come from the pass that computed pi_old
                out["logp_abs_diff"] += float(((logp.detach().float() - logp_rollout).abs() * mask).sum())
                h_T_learner[rows] = h_T.detach().float().cpu()
            # DeepSpeed averages gradients over ranks; x W turns the average of globally normalised shares into
            # their sum. scale_wrt_gas=False: the loss is normalised already.
            self.engine.backward(loss * W, scale_wrt_gas=False)
        return out

    def _candidates(self, shard: TrainShard, sel: list[int]) -> Candidates:
        """Step 4's item side, before the token term (``learner.fuse_item_term``): the relabelled chains' targets
        encoded with gradient and gathered over ranks."""
        return gather_candidates(self._encode_items, self.table, shard.target_idx[[r // self.recpo_cfg.group_size
                                                                                   for r in sel]],
                                 self.rank, self.world_size, items_frozen=self.model_cfg.item_table == "frozen")

    def _finish_item_term(self, cand: Candidates) -> dict[str, Any]:
        """Step 4's end with ``learner.fuse_item_term``: the candidates' gradient, summed over ranks, backpropagated
        into this rank's target encodings (the update's last backward); their fresh rows go into this rank's table.
        Nothing to do for a frozen table (the last token micro-batch was the boundary)."""
        loss = candidates_loss(cand, self.world_size)
        if loss is not None:
            self.engine.set_gradient_accumulation_boundary(True)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self._items().apply(cand.items, cand.h_items.detach())
        items = cand.items[:0] if cand.frozen else cand.items
        candidates = len(self.table) if self.recpo_cfg.item_negatives == "catalogue" else len(cand.uniq)
        return {"loss_item": cand.loss_local, "items": items, "candidates": candidates}

    def _item_term(self, shard: TrainShard, sel: list[int], adv: torch.Tensor, num_chains: int) -> dict[str, Any]:
        """Step 4 of an update: the relabelled chains ``sel``' h_T against the step's targets, both with gradient
        (re-encoded: the update's last backward); the targets' fresh rows go into this rank's table."""
        G, rollout, W = self.recpo_cfg.group_size, shard.rollout, self.world_size
        self.engine.set_gradient_accumulation_boundary(True)
        term = item_term(self._encode, self._encode_items, self.table,
                         [list(shard.prompt_ids[r // G]) + list(rollout.chain_ids[r]) for r in sel],
                         shard.target_idx[[r // G for r in sel]], shard.history_idx[[r // G for r in sel]],
                         adv[sel], num_chains, self.model_cfg.tau, self.recpo_cfg.item_negatives, self.rank, W,
                         items_frozen=self.model_cfg.item_table == "frozen")
        self.engine.backward(term.loss * W, scale_wrt_gas=False)
        self._items().apply(term.items, term.h_items)
        return {"loss_item": term.loss_local, "items": term.items, "candidates": term.candidates}

    @torch.no_grad()
    def _ref_logp(self, kind: str, args: tuple) -> torch.Tensor:
        """Log-probs (B, L-1) of the forward ``engine(kind, *args)`` under the reference policy of the KL term: the
        same model with its LoRA adapters disabled (peft's ``disable_adapter``), through the engine so ZeRO-3
        gathers as for any forward."""
        with self.dual.model.disable_adapter():
            return self.engine(kind, *args)[0]

    @torch.no_grad()
    def _chain_logp(self, shard: TrainShard, h_T: torch.Tensor) -> torch.Tensor:
        """(N, L) log-prob of every sampled chain token under the current weights, on the rollout's grid (the
        pi_old of every mini-batch update); fills ``h_T`` (N, d). Train mode, as the updates; collective under
        ZeRO-3."""
        G, rollout = self.recpo_cfg.group_size, shard.rollout
        self.engine.train()
        out = torch.zeros_like(rollout.logp, dtype=torch.float32)
        batches = self._micro_batches(shard, list(range(len(rollout))))
        for k in range(self._agree_max(len(batches)) if self.zero3 else len(batches)):
            if k >= len(batches):
                self.engine("chain", *self._padding_chain())
                continue
            rows = batches[k]
            prompts, chains = [shard.prompt_ids[r // G] for r in rows], [rollout.chain_ids[r] for r in rows]
            kind, args = self._chain_call(shard, rows)
            logp, _, h = self.engine(kind, *args)
            h_T[rows] = h.float().cpu()
            for i, (r, p, c) in enumerate(zip(rows, prompts, chains, strict=True)):
                out[r, :len(c)] = logp[i, chain_positions(len(p), len(c))].float().cpu()
        return out

    def _micro_batches(self, shard: TrainShard, rows_all: list[int]) -> list[list[int]]:
        """The rows (chains, in order) of each token-term micro-batch: whole groups when prompts are packed
        (``rows_all`` is made of whole groups), chains otherwise; learner/micro_batches.py."""
        G, cfg, rollout = self.recpo_cfg.group_size, self.learner_cfg, shard.rollout
        if cfg.pack_prompts:
            units = [rows_all[i:i + G] for i in range(0, len(rows_all), G)]
            per_batch = max(1, cfg.micro_batch_size // G)
        else:
            units, per_batch = [[r] for r in rows_all], cfg.micro_batch_size
        lengths = [len(shard.prompt_ids[u[0] // G]) + sum(len(rollout.chain_ids[r]) for r in u) for u in units]
        return [[r for i in batch for r in units[i]]
                for batch in plan_micro_batches(lengths, per_batch, cfg.max_tokens_per_micro_batch)]

    def _chain_call(self, shard: TrainShard, rows: list[int]) -> tuple[str, tuple]:
        """The engine call giving ``chain_forward``'s outputs for ``rows``: packed, one row per group, when
        ``learner.pack_prompts`` (``rows`` are then whole groups in order), else one row per chain."""
        G, chains = self.recpo_cfg.group_size, shard.rollout.chain_ids
        if not self.learner_cfg.pack_prompts:
            return "chain", ([shard.prompt_ids[r // G] for r in rows], [chains[r] for r in rows])
        groups = [rows[i:i + G] for i in range(0, len(rows), G)]
        return "chain_packed", ([shard.prompt_ids[g[0] // G] for g in groups], [[chains[r] for r in g] for g in groups])
