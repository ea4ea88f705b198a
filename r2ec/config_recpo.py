"""The ``recpo`` and ``warmup`` sections of the configuration (the objective); import them from ``r2ec.config``.

Defaults are the paper's (R2ec, arXiv 2505.16994 v3, §4 and Appendix) unless a description says otherwise.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from r2ec.config_base import Section


# --------------------------------------------------------------------------------------------------- recpo
class RecPOConfig(Section):
    group_size: int = Field(4, ge=2, description="G chains per user; GRPO needs at least 2")
    beta: float = Field(0.05, ge=0, le=1, description="R = beta * R_c + (1 - beta) * R_d")
    k_r: int = Field(1000, ge=1, description="R_d = NDCG@k_r of the target")
    advantage: Literal["grpo", "rloo"] = "grpo"
    eps_low: float = Field(
        0.2, ge=0, lt=1, description="token ratio clipped below at 1 - eps_low for negative advantages (paper: "
        "0.2 / 0.28 for eps_low / eps_high); binds only with learner.mini_batches > 1: with one update per rollout "
        "the ratio is exactly 1")
    eps_high: float = Field(0.28, ge=0, description="token ratio clipped above at 1 + eps_high for positive "
                            "advantages; binds only with learner.mini_batches > 1, like eps_low")
    relabel_topk: int = Field(1, ge=1, description="item term on the top-k chains per group (paper 1, code 2)")
    off_policy: Literal["none", "tis", "icepop"] = Field(
        "none", description="token-term correction for chains sampled by other weights than the learner's (rollout."
        "async): 'tis' weights each token by min(pi_learner / pi_sampler, tis_cap), 'icepop' drops tokens whose ratio "
        "leaves [icepop_low, icepop_high], 'none' ignores the ratio (r2ec/algo/off_policy.py); its statistics are "
        "logged either way")
    tis_cap: float = Field(2.0, ge=1, description="upper bound of the tis weight")
    icepop_low: float = Field(0.5, gt=0, le=1, description="icepop keeps tokens with ratio >= this")
    icepop_high: float = Field(2.0, ge=1, description="icepop keeps tokens with ratio <= this")
    kl_coef: float = Field(
        0.0, ge=0, description="weight of a KL penalty to the reference policy, added to the token term (k3 "
        "estimator, token mean); the reference is the model with its LoRA adapters disabled (one extra no-grad "
        "forward per micro-batch, no extra weights), so it needs model.lora.enabled. 0 = off (the paper)")
    item_negatives: Literal["in_batch", "catalogue"] = Field(
        "in_batch", description="negatives of the item term: 'in_batch' = the step's other targets, gathered over "
        "the learner ranks (the paper's and the official code's); 'catalogue' = that in-batch term plus the user "
        "side's softmax over every cached table row (detached), the user's history masked as in evaluation")
    refresh_every: int = Field(50, ge=1, description="steps between full item-table re-encodings (every validation "
                               "re-encodes it too); unused with model.item_table 'frozen', which never re-encodes")

    @model_validator(mode="after")
    def _topk(self) -> RecPOConfig:
        if self.relabel_topk > self.group_size:
            raise ValueError(
                f"relabel_topk ({self.relabel_topk}) cannot exceed group_size ({self.group_size})"
            )
        return self


# --------------------------------------------------------------------------------------------------- warm-up
class WarmupConfig(Section):
    """A supervised first phase (the paper's "w/o reasoning" objective): the item loss with h read at
    prompt + answer marker (no chain), advantage 1 for every user. Not in the paper; off by default."""

    steps: int = Field(0, ge=0, description="warm-up optimiser steps before the RecPO steps; 0 = off (paper)")
    prompts_per_step: int = Field(16, ge=1, description="users per warm-up step")
    lr: float = Field(1e-4, gt=0, description="learning rate of the warm-up steps (learner.lr applies after)")
    item_negatives: Literal["in_batch", "catalogue"] = Field(
        "catalogue", description="as recpo.item_negatives, for the warm-up's item loss")
