"""One configuration schema for the whole system, loaded from YAML with dotted command-line overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key is an error, not a silently ignored
setting; every value is validated and the error names the field path and the reason. Nothing is rewritten behind
the user's back: cross-field checks reject inconsistent settings instead of "fixing" them.

Each component receives only its own sub-config (``cfg.data`` for the data pipeline, ``cfg.model`` for the model,
``cfg.recpo`` for the loss, ...).

Defaults are the paper's (R2ec, arXiv 2505.16994 v3, §4 and Appendix) unless a comment says otherwise.

Import ``Config``, the sections, ``ConfigError`` and ``load_config`` from here. Four parts live in modules of their
own to keep this one short: ``r2ec.config_cluster`` (the ``cluster`` section: where the workers run),
``r2ec.config_recpo`` (the ``recpo`` and ``warmup`` sections: the objective),
``r2ec.config_load`` (YAML reading, ``--set`` overrides, error formatting) and ``r2ec.config_base`` (the strict
section base and ``ConfigError``, shared by all of them).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from r2ec.config_base import ConfigError, Section
from r2ec.config_cluster import ClusterConfig
from r2ec.config_load import apply_overrides, format_validation_error, read_mapping
from r2ec.config_recpo import RecPOConfig, WarmupConfig


# --------------------------------------------------------------------------------------------------- model
class LoraConfig(Section):
    enabled: bool = False
    r: int = Field(4, ge=1, description="LoRA rank; the paper uses 4")
    alpha: float = Field(128.0, gt=0, description="LoRA alpha; the official code uses 128")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class ModelConfig(Section):
    name_or_path: str = Field(
        description="a hub id, a local folder, or asset://<name> for an asset prepared by `r2ec assets`"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tau: float = Field(0.02, gt=0, description="rec_head temperature: score = cos(h_T, h_v) / tau")
    answer_marker: str = Field("<answer>", min_length=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    item_prompt_max_tokens: int = Field(512, ge=16, description="item prompts longer than this are an error")
    item_table: Literal["trained", "frozen"] = Field(
        "trained", description="'trained' (the paper): the item rows are the current weights' encodings of the item "
        "prompts, the item term trains them through the shared weights, and the table is re-encoded every "
        "recpo.refresh_every steps, before every validation and before the test. 'frozen' (not in the paper): the "
        "table is encoded once with the initial weights and kept (checkpoints, validation, test, export); the item "
        "terms score users against its rows as constants, so training moves the user side only")
    center_items: bool = Field(
        False, description="with item_table 'frozen' (not in the paper): subtract the table's mean row from every row "
        "once, right after the initial encoding, so cosine scores compare items by what sets them apart rather than "
        "by the direction they all share (a small model's item encodings are nearly collinear)")

    @model_validator(mode="after")
    def _centring(self) -> ModelConfig:
        if self.center_items and self.item_table != "frozen":
            raise ValueError("center_items needs item_table 'frozen': a trained table is re-encoded, and the learner's "
                             "fresh item encodings would not carry the same shift")
        return self


# --------------------------------------------------------------------------------------------------- data
class PromptConfig(Section):
    category: str = Field(description="plural category words in the user prompt, e.g. 'video games'")
    item_singular: str = Field(description="one item in words, e.g. 'video game'")
    history_items: int = Field(20, ge=1, description="how many of the latest history items the user prompt shows")
    description_words: int = Field(100, ge=0, description="item prompts keep the first N description words")
    rating_scale: tuple[float, float] = Field(
        (1, 5),
        description="the ratings' scale [min, max]: the user prompt says '(out of max)', and `r2ec prepare` "
        "rejects ratings (and catalogue average ratings) outside it",
    )

    @field_validator("rating_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        low, high = v
        # Chained comparisons are False for NaN, so this also rejects NaN and infinite ends.
        if not -float("inf") < low < high < float("inf"):
            raise ValueError("rating_scale must be [min, max] with finite min < max")  # the caller adds the value
        return v


class AmazonConfig(Section):
    category: str = Field(description="Amazon Reviews 2023 category, e.g. Video_Games")
    reviews: str = Field(description="path or URL of {Category}.csv.gz (5-core, rating only)")
    meta: str = Field(description="path or URL of meta_{Category}.jsonl.gz")
    window_end: str = Field("2023-10-01", description="end of the time window (inclusive), YYYY-MM-DD")
    window_months: int = Field(12, ge=1, description="initial window length")
    widen_months: int = Field(3, ge=1, description="widen the window by this much until min_items is reached")
    min_items: int = Field(10_000, ge=0, description="widen the window until at least this many items remain")
    max_title_words: int = Field(20, ge=1)
    k_core: int = Field(0, ge=0, description="iterative k-core on users and items inside the window; 0 = off")

    @field_validator("window_end")
    @classmethod
    def _date(cls, v: str) -> str:
        from datetime import date

        try:
            date.fromisoformat(v)
        except ValueError as e:
            raise ValueError(f"expected a date like 2023-10-01, got {v!r}") from e
        return v


class FilesConfig(Section):
    interactions: str = Field(description="CSV, JSONL or Parquet with user_id, item_id, timestamp[, rating]")
    items: str = Field(description="CSV, JSONL or Parquet with item_id, title[, description, ...]")
    timestamp_unit: Literal["s", "ms"] = "s"


class DataConfig(Section):
    source: Literal["movielens100k", "amazon2023", "files"]
    movielens_dir: str | None = Field(
        None, description="folder with ml-100k.inter and ml-100k.item; default: the asset from `r2ec assets`"
    )
    amazon: AmazonConfig | None = None
    files: FilesConfig | None = None
    max_history: int = Field(20, ge=1, description="history items kept per sample")
    train_frac: float = Field(0.8, gt=0, lt=1)
    valid_frac: float = Field(0.1, gt=0, lt=1)
    cache_dir: str | None = Field(None, description="where prepared splits are cached; default <cache>/data")
    prompt: PromptConfig

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.source == "amazon2023" and self.amazon is None:
            raise ValueError("source 'amazon2023' needs an 'amazon' section (category, reviews, meta)")
        if self.source == "files" and self.files is None:
            raise ValueError("source 'files' needs a 'files' section (interactions, items)")
        if self.train_frac + self.valid_frac >= 1:
            raise ValueError(
                f"train_frac + valid_frac must be < 1 to leave a test split, got {self.train_frac + self.valid_frac}"
            )
        if self.prompt.history_items > self.max_history:
            raise ValueError(
                f"prompt.history_items ({self.prompt.history_items}) cannot exceed max_history "
                f"({self.max_history}): samples keep only max_history items"
            )
        return self


# --------------------------------------------------------------------------------------------------- rollout
class SamplingConfig(Section):
    temperature: float = Field(1.5, ge=0, description="paper 1.5; the official launch script uses 2.0")
    top_k: int = Field(200, ge=-1, description="paper 200; the official launch script uses 50; -1 = off")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(640, ge=1, description="the official code's limit")


class VllmConfig(Section):
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU only: share of GPU memory vLLM takes")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="CPU build only: KV-cache size (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads_bind: str = Field(
        "auto", min_length=1, description="CPU build only: the cores the engine computes on "
        "(VLLM_CPU_OMP_THREADS_BIND, set from this field): 'auto' = vLLM's choice (one thread per physical core, one "
        "core kept for its scheduler process: a single thread on a 2-core machine), 'all' = every core this process "
        "may run on, a list such as '0-1', or 'nobind'. Rollout and learner take turns within a step, so a "
        "one-machine CPU run may give the engine every core (docs/performance.md)")
    enforce_eager: bool = Field(
        True, description="true: no CUDA graphs (the CPU build requires it); false (GPU only): CUDA graphs for "
        "decode-only batches, while prefill, where the hidden-state capture runs, stays eager (no torch.compile)")
    in_process: bool = Field(
        False, description="each rollout worker (a Ray actor) runs vLLM's engine core and model worker inside its own "
        "process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the 'uni' executor) instead of in two processes of their own that "
        "import torch and vLLM again: an engine is up about 13 s sooner on 2 CPU cores, sampling as fast within the "
        "bench's noise (docs/performance.md, section 12); off by default, because on GPUs vLLM's own engine-core "
        "process schedules while the GPU computes (not measured here). At cluster.rollout.tensor_parallel_size 1; "
        "with tensor parallelism, and for the engines of colocated learner ranks (their process trains too: vLLM "
        "would take over its torch threads), vLLM starts its own processes whatever this says")
    enable_prefix_caching: bool = Field(True, description="makes the hidden-state prefill of prompt+chain cheap")
    max_model_len: int = Field(4096, ge=64, description="prompt + chain tokens per sequence")
    block_size: int | None = Field(
        None, ge=1, description="KV-cache block size in tokens; null = vLLM's default (128 on CPU, 16 on GPU). The "
        "prefix cache serves whole blocks only, so the ~45-token chat + instruction prefix every item prompt shares "
        "is reused at 32 (the CPU build's smallest: multiples of 32) and never at 128 (docs/performance.md)")


class RolloutConfig(Section):
    # "async" is a Python keyword: the field is async_, read and written as "async"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)
    engine: Literal["hf", "vllm"] = "hf"
    async_: bool = Field(
        False, alias="async", description="one-step-off pipeline (not in the paper): the rollout of step k + 1 runs "
        "while the learner trains step k, on weights one version older than the learner's (staleness 1, asserted); "
        "recpo.off_policy corrects the token term for it. Not with cluster.colocate")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    batch_size: int = Field(16, ge=1, description="prompts per generate call")
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    timeout_s: float = Field(900, gt=0, description="every call to a rollout worker fails after this long")


# --------------------------------------------------------------------------------------------------- learner
class LearnerConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    lr: float = Field(1e-5, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    prompts_per_step: int = Field(12, ge=1, description="users per optimiser step; x group_size chains")
    micro_batch_size: int = Field(
        4, ge=1, description="chains per forward/backward of the token term (with pack_prompts: as many whole groups "
        "as fit in this many chains, at least one); unused when max_tokens_per_micro_batch is set")
    pack_prompts: bool = Field(
        True, description="the token term's forwards run one row [prompt, chain_1, ..., chain_G] per group behind a "
        "block attention mask: P + G x C tokens instead of G x (P + C), the same results within float rounding "
        "(0.52x the learner step on the quickstart, docs/performance.md section 10); and the item term's target "
        "items run packed behind the prefix every item prompt shares (section 7). Refused at the first step for a "
        "sliding-window model whose window is shorter than prompt + chain")
    max_tokens_per_micro_batch: int | None = Field(
        None, ge=2, description="token budget of a token-term micro-batch: rows (whole groups with pack_prompts, "
        "else chains) are taken in order while rows x the longest row's length stays within it; a row longer than "
        "the budget goes alone. None = micro_batch_size chains per micro-batch")
    fuse_item_term: bool = Field(
        True, description="the item term's user side takes each relabelled chain's h_T from the token term's forward "
        "of that chain (its item loss joins that micro-batch's backward) instead of re-encoding prompt + chain in an "
        "extra forward and backward; the targets are encoded before the token term and their gradient, summed over "
        "ranks, is backpropagated once after it. The same loss and gradients within float rounding; False also "
        "reports grad_norm_token / grad_norm_item (ZeRO-0, one learner rank), which the fused backward cannot split")
    gradient_checkpointing: bool = True
    epochs: int = Field(3, ge=1)
    max_steps: int | None = Field(
        None, ge=0, description="RecPO steps (rollouts) to train; None = epochs; 0 = none (a warm-up-only run)")
    mini_batches: int = Field(
        1, ge=1, description="optimiser updates per rollout: the step's groups are split into this many mini-batches "
        "of whole groups, one update each, all against the log-probs of the weights that sampled them (so the PPO "
        "clip binds from the second update on); weights are synced once after the last")
    weight_decay: float = Field(0.0, ge=0)
    sync_bucket_mb: int = Field(256, ge=1, description="weight broadcast bucket size")
    weight_sync: Literal["full", "lora_delta"] = Field(
        "full", description="what a weight broadcast sends: 'full' = every weight, LoRA merged; 'lora_delta' = the "
        "LoRA adapters (and any other trainable tensor) only, each rollout worker merging them onto base weights it "
        "reads once from the model's safetensors files (r2ec/lora_delta.py). Needs model.lora.enabled; not with "
        "cluster.colocate (its same-host hand-off is the full weights)")
    timeout_s: float = Field(900, gt=0, description="every learner call fails after this long")
    sync_timeout_s: float = Field(
        300, gt=0, description="a weight sync (joining its group, or every bucket of one broadcast) fails on each "
        "member after this long, and a rollout worker lost in it is then replaced; NCCL's own watchdog, which kills "
        "the process, is set well beyond it. At most learner.timeout_s")


# --------------------------------------------------------------------------------------------------- eval
class EvalConfig(Section):
    split: Literal["valid", "test"] = "test"
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    max_samples: int | None = Field(
        None, ge=1, description="evaluate a user-stratified subset of N samples of the split (round-robin over the "
        "split's users in a seeded order, each user's samples in a seeded order); None = the whole split")
    batch_size: int = Field(8, ge=1, description="users per greedy-generation batch")
    max_new_tokens: int = Field(
        640, ge=0, description="greedy reasoning length limit; 0 = no reasoning: h is read at prompt + answer marker "
        "(the warm-up's representation) and nothing is generated")
    item_batch_size: int = Field(32, ge=1, description="item prompts per encoding batch")
    valid_every: int | None = Field(
        None, ge=1, description="training: validate every N steps (and at the end); with model.item_table 'trained' "
        "each validation first re-encodes the item table with the current weights, which also counts as a refresh "
        "(recpo.refresh_every)")
    valid_at_start: bool = Field(
        False, description="training: also validate the initial weights (step 0) before the first step, so the run's "
        "own log shows what training gained (a fresh run only; not repeated on resume)")
    valid_max_samples: int | None = Field(
        256, ge=1, description="training: validate on a user-stratified subset of N valid samples (chosen like "
        "max_samples); None = the whole valid split")
    subset_seed: int = Field(
        0, description="seed of the stratified subsets; separate from run.seed so that runs trained with different "
        "seeds are evaluated, and can be compared, on the same samples")
    ci_resamples: int = Field(1000, ge=100, description="user-bootstrap resamples behind every <metric>_ci95")
    ci_seed: int = Field(0, description="seed of the user-bootstrap draws")

    @field_validator("ks")
    @classmethod
    def _ks(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {v}")
        return v


# --------------------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "r2ec"
    output_dir: str = "outputs/r2ec"
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int | None = Field(
        None, ge=1, description="training: save a checkpoint every N steps (and after the last); None = never")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept (the best by valid NDCG@10 too)")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="where each step's record goes besides <output_dir>/metrics.jsonl (always written): "
        "tensorboard (<output_dir>/tensorboard), mlflow (run.mlflow_tracking_uri), wandb (run.wandb_project; offline "
        "into <output_dir>/wandb when no API key is configured). mlflow and wandb are optional extras: "
        "pip install 'r2ec[mlflow]' / 'r2ec[wandb]'")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:///abs/dir); None = a "
                          "local store in <output_dir>/mlruns. The experiment is run.name")
    wandb_project: str = Field("r2ec", description="Weights & Biases project; the run is named run.name")
    worker_logs: Literal["file", "console"] = Field(
        "file", description="training: 'file' writes each Ray actor's output (Ray, vLLM, DeepSpeed) to "
        "<output_dir>/logs/<actor>.log and the driver's library logging to <output_dir>/logs/driver.log, so the "
        "console shows the run itself; 'console' streams all of it to the console, as Ray does by default")

    @field_validator("trackers")
    @classmethod
    def _distinct_trackers(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"run.trackers {v} names a tracker twice; list each once")
        return v


class Config(Section):
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    recpo: RecPOConfig = Field(default_factory=RecPOConfig)
    warmup: WarmupConfig = Field(default_factory=WarmupConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _distributed(self) -> Config:
        ranks = self.cluster.learner.num_workers
        if self.learner.prompts_per_step % ranks:
            raise ValueError(
                f"learner.prompts_per_step ({self.learner.prompts_per_step}) must be a multiple of "
                f"cluster.learner.num_workers ({ranks}): each learner rank trains on whole groups of chains"
            )
        if (self.learner.prompts_per_step // ranks) % self.learner.mini_batches:
            raise ValueError(
                f"learner.mini_batches ({self.learner.mini_batches}) must divide the users per learner rank "
                f"({self.learner.prompts_per_step} / {ranks} ranks): each mini-batch holds whole groups")
        if self.warmup.steps and self.warmup.prompts_per_step % ranks:
            raise ValueError(
                f"warmup.prompts_per_step ({self.warmup.prompts_per_step}) must be a multiple of "
                f"cluster.learner.num_workers ({ranks})")
        if self.learner.max_steps == 0 and not self.warmup.steps:
            raise ValueError("learner.max_steps is 0 and warmup.steps is 0: nothing to train")
        if self.learner.sync_timeout_s > self.learner.timeout_s:
            raise ValueError(
                f"learner.sync_timeout_s ({self.learner.sync_timeout_s:g}) must not exceed learner.timeout_s "
                f"({self.learner.timeout_s:g}): the driver stops waiting for a sync after learner.timeout_s")
        if self.rollout.engine == "hf" and self.cluster.rollout.tensor_parallel_size > 1:
            raise ValueError("cluster.rollout.tensor_parallel_size > 1 needs rollout.engine 'vllm'")
        if self.recpo.kl_coef > 0 and not self.model.lora.enabled:
            raise ValueError(
                f"recpo.kl_coef ({self.recpo.kl_coef:g}) needs model.lora.enabled: the reference policy is the model "
                "with its adapters disabled; full fine-tuning would need a frozen copy of the whole model on every "
                "learner rank, which the learner does not build. Enable LoRA or set recpo.kl_coef to 0")
        if self.rollout.async_ and self.cluster.colocate:
            raise ValueError("rollout.async overlaps the rollout with the learner's step, which cluster.colocate runs "
                             "on the same devices in turns: use one or the other")
        if self.learner.weight_sync == "lora_delta" and (self.cluster.colocate or not self.model.lora.enabled):
            raise ValueError("learner.weight_sync 'lora_delta' sends LoRA adapters to rollout workers over the "
                             "broadcast: it needs model.lora.enabled and no cluster.colocate; use 'full'")
        if self.cluster.colocate and self.rollout.engine == "hf" and self.learner.zero_stage == 3:
            raise ValueError(
                "cluster.colocate with rollout.engine 'hf' samples with the learner's own module, which ZeRO-3 "
                "partitions across the ranks (every forward would be collective while each rank samples different "
                "prompts): use learner.zero_stage 0-2, or rollout.engine 'vllm' (its own copy of the weights)")
        return self

    def hash(self) -> str:
        """A short stable hash of the full config (used to tag caches and checkpoints)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict | None = None) -> Config:
    """Load a YAML config (or a dict), apply ``--set`` overrides and validate."""
    source = str(path) if path is not None else "<dict>"
    if data is None:
        data = read_mapping(path)
    data = apply_overrides(json.loads(json.dumps(data)), overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
