"""The DeepSpeed config of the learner, built from ``LearnerConfig`` (a plain dict; imports nothing heavy).

Choices that are not DeepSpeed defaults, and why:
- torch AdamW is passed as the client optimizer (``zero_allow_untested_optimizer``): DeepSpeed's FusedAdam and
  CPUAdam JIT-compile for ~50 s on first use and bring nothing at our sizes.
- ``stage3_param_persistence_threshold: 0``: otherwise ZeRO-3 keeps every parameter below 100k elements whole on
  every rank, so tiny test models would never be sharded and the tests would prove nothing.
- No scheduler: the paper trains with a constant learning rate.
- Precision: fp32 on CPU whatever ``model.dtype`` says (CPU bf16 matmuls are slow and lossy); bf16/fp16 mixed
  precision on GPU when the model is loaded in that dtype (fp32 master weights in the ZeRO optimizer).
- ``checkpoint.load_universal`` only when resuming from a universal checkpoint (another learner world size, see
  learner/universal.py): DeepSpeed then reads parameters and optimizer states from the universal ``zero/`` folder
  instead of the per-rank shards, and refuses ordinary checkpoints.
"""

from __future__ import annotations

from typing import Any

from r2ec.config import LearnerConfig


def training_dtype(model_dtype: str, device: str) -> str:
    """dtype the learner holds the model in: the configured one on GPU, float32 on CPU."""
    return model_dtype if device.startswith("cuda") else "float32"


def build_ds_config(cfg: LearnerConfig, micro_batch_chains: int, backward_calls: int, dtype: str,
                    load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed config for one optimiser step made of ``backward_calls`` backward passes per rank.

    ``gradient_accumulation_steps`` equals the number of backward calls of one ``train_step`` (token micro-batches
    plus the item term), so DeepSpeed's own bookkeeping (train_batch_size, boundaries) describes the real step.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_chains,
        "gradient_accumulation_steps": backward_calls,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": bool(load_universal)},
    }
