"""Seconds per RL step: TRL's GRPOTrainer with a rec_head reward against this project's RecPO step, same settings.

What it measures: wall seconds per optimiser step, trajectories per second (prompts_per_step x G / step seconds)
and CPU seconds per step (user + system, summed over every process of the system: TRL's one process; our driver,
Ray's daemons, the rollout actor with vLLM's processes and the learner actor) over ``--steps`` measured steps after
``--warmup`` unmeasured ones, for both systems in the same script run; ``speedup_vs_trl`` is TRL's seconds per step
over the row's (``cpu_speedup_vs_trl`` the same in CPU seconds). Same model, data, users and sampling settings,
taken from ``configs/quickstart.yaml``:
SmolLM2-135M-Instruct + LoRA (r=4, alpha=128, the quickstart's target modules, via peft), float32 on the CPU,
MovieLens-100k train samples rendered with the quickstart's user prompts, prompts_per_step=4 users x G=4 chains,
temperature 1.5, top-k 200, at most 64 new tokens, lr 1e-5, grad clip 1.0, 4 chains per forward/backward. Both
sides train on the same users in the same order: the first steps of the seeded permutation ``r2ec train`` draws.

TRL side: ``trl.GRPOTrainer`` (no vLLM, ``use_cpu=True``, ``beta=0`` so no reference model and no KL, as RecPO;
``loss_type="dapo"``: token-level loss normalised by the step's number of completion tokens, as RecPO's token term;
clip 0.2 / 0.28 as RecPO; one optimiser step per generation batch, so it is on-policy like RecPO). Its reward function
takes TRL's completion token ids, finishes each chain with the project's ``ChainFinisher`` (cut after ``<answer>``
or append it), runs prompt + chain through the trainer's current (LoRA) model for h_T (final hidden state after the
final norm at the last token, ``DualHeadModel.user_hidden``), scores the full catalogue with the same rec_head
(``DualHeadModel.item_scores``: cos(h_T, H_V) / tau with the user's earlier items masked, against the precomputed
item table) and returns RecPO's fused reward (``r2ec.algo.recpo.fused_reward``, beta 0.05, k_r 1000). A
``TrainerCallback`` times ``on_step_begin`` -> ``on_step_end`` (generation, reward, 4 micro-batches of
forward/backward, optimiser step).

Our side: the body of ``driver.loop.train``'s loop on ``driver.system.System`` (embedded local Ray, 1 rollout worker +
1 DeepSpeed ZeRO-2 learner rank, as the quickstart): ``batch_inputs`` + ``rl_step`` (rollout: sample G chains and
h_T; learner: fused reward, GRPO advantages, token term, item term, optimiser step; weight broadcast to the rollout
engine) + the item-table write-back, timed as ``train`` times ``time_step_s``. Run for each engine in ``--engines``
(vLLM CPU build, the quickstart's default, and/or the HF engine).

What differs, plainly:
- Not the same work per step. Ours also computes RecPO's item term (a forward/backward of the step's target item
  prompts) and sends the weights to a separate rollout engine each step (the quickstart's LoRA-delta sync: the
  adapters, merged there); it packs each group's prompt once (``learner.pack_prompts``); TRL has no item term (its
  reward uses the fixed table) and generates with the training model in-process. TRL's reward pass (one no-grad
  forward over prompt + completion, nothing reused from generation) is the counterpart of our rollout's h_T pass
  (with vLLM, a 1-token prefill served from the prefix cache; with the HF engine, one forward that also gives the
  behaviour log-probs).
- TRL stops a completion only at EOS or the length limit (``generate`` gets no stop string), ours also at
  ``<answer>``; the untrained model rarely writes it within 64 tokens, so chain lengths are similar; the mean
  lengths are reported.
- Ours runs in Ray actors (rollout and learner in separate processes, DeepSpeed engine); TRL in one process.
- Set-up is excluded on both sides: TRL's trainer construction, our Ray start, vLLM engine start and DeepSpeed
  init, and the item table (loaded once from the zero-shot cache and given to both; ``r2ec train`` would encode it
  with its rollout engine, 1,682 prompts, which costs minutes here and is not part of a step).
- ``train``'s validation, checkpoints and final test evaluation are not run.
- Threads: ``--threads`` (default 1) intra-op threads for TRL's process, our learner rank (``omp_threads``) and the
  HF rollout engine; the vLLM CPU build picks its own. On a small machine shared with other jobs, 2 OpenMP threads
  per process slowed a forward 10-15x; pass ``--threads 2`` on an idle 2-core machine.
- On a machine shared with other jobs, wall time favours the side with more processes (ours: rollout and learner
  actors, vLLM's engine processes), which take a larger share of the contended cores than TRL's single process. CPU
  seconds per step do not have that bias (they have others: idle polling of Ray's daemons counts against ours,
  threads spinning at barriers count against whichever side runs more threads), so read both; on an idle machine
  wall time is the number that matters. The load average is recorded; few steps are measured.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from transformers import TrainerCallback

if __package__ in (None, ""):  # run as a script (python bench/trl_grpo.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RunClock, load_average, report, tree_cpu_seconds  # noqa: E402

NAME = "trl_grpo"


# ---------------------------------------------------------------------------------------------- pure helpers
class StepTimer(TrainerCallback):
    """Wall seconds and CPU seconds of every optimiser step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = tree_cpu_seconds):
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start: tuple[float, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = (self.clock(), self.cpu_clock())

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.seconds.append(self.clock() - self._start[0])
            self.cpu_seconds.append(self.cpu_clock() - self._start[1])
            self._start = None


def measured_steps(seconds: Sequence[float], warmup: int) -> dict:
    """Mean and median step seconds after dropping the first ``warmup`` steps."""
    kept = list(seconds)[warmup:]
    if not kept:
        raise ValueError(f"no measured steps: {len(seconds)} steps, {warmup} warm-up")
    return {"steps": len(kept), "mean_s": statistics.fmean(kept), "median_s": statistics.median(kept)}


def step_rows(num_samples: int, seed: int, per_step: int, steps: int) -> list[list[int]]:
    """Train-sample indices of the first ``steps`` steps, as ``r2ec train`` draws them (``EpochSampler``)."""
    from r2ec.data.sampler import EpochSampler

    sampler = EpochSampler(num_samples, seed)
    return [sampler.next(per_step) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------- TRL side
def run_trl(cfg, rows: list[dict], prompt_ids: list[list[int]], earlier: list[list[int]], h_items, warmup: int,
            steps: int, out_dir: str, log=print) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from r2ec.algo.recpo import fused_reward
    from r2ec.assets import resolve
    from r2ec.data.sampler import history_tensor
    from r2ec.model import ChainFinisher, DualHeadModel

    path = resolve(cfg.model.name_or_path)
    G, U = cfg.recpo.group_size, cfg.learner.prompts_per_step
    chains_per_step = U * G
    micro = cfg.learner.micro_batch_size
    if chains_per_step % micro:
        raise ValueError("prompts_per_step x group_size must be a multiple of micro_batch_size")
    tokenizer = AutoTokenizer.from_pretrained(path)
    finisher = ChainFinisher.from_pretrained(path, cfg.model.answer_marker)
    ds = datasets.Dataset.from_list([
        {"prompt": r["messages"], "user_prompt_ids": p, "target_idx": r["target_item_idx"], "earlier": e}
        for r, p, e in zip(rows, prompt_ids, earlier, strict=True)])

    holder: dict = {}
    stats: dict[str, list[float]] = {"chain_len": [], "reward": [], "reward_s": []}

    def recpo_fused_reward(prompts, completions, completion_ids, user_prompt_ids, target_idx, earlier, **kwargs):
        t0 = time.perf_counter()
        trainer = holder["trainer"]
        dual = holder.get("dual")
        if dual is None:
            dual = holder["dual"] = DualHeadModel(trainer.model, tokenizer, cfg.model.tau, cfg.model.answer_marker)
        chains = [finisher(list(c)) for c in completion_ids]
        target = torch.as_tensor(target_idx, dtype=torch.long)
        with torch.no_grad():
            h_T = dual.user_hidden(user_prompt_ids, [c.token_ids for c in chains]).float()
            scores = dual.item_scores(h_T, h_items.to(h_T.device), history_tensor(list(earlier)).to(h_T.device),
                                      target.to(h_T.device))
            out = fused_reward(scores, target.to(h_T.device), beta=cfg.recpo.beta, k_r=cfg.recpo.k_r)
        stats["chain_len"].extend(len(c) for c in completion_ids)
        stats["reward"].extend(out.rewards.tolist())
        stats["reward_s"].append(time.perf_counter() - t0)
        return out.rewards.tolist()

    lora = cfg.model.lora
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=cfg.run.seed,
        learning_rate=cfg.learner.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=cfg.learner.grad_clip, optim="adamw_torch",
        per_device_train_batch_size=micro, gradient_accumulation_steps=chains_per_step // micro,
        num_generations=G, max_completion_length=cfg.rollout.sampling.max_new_tokens,
        temperature=cfg.rollout.sampling.temperature, top_k=cfg.rollout.sampling.top_k,
        top_p=cfg.rollout.sampling.top_p, beta=0.0, num_iterations=1, loss_type="dapo",
        epsilon=cfg.recpo.eps_low, epsilon_high=cfg.recpo.eps_high, scale_rewards="group",
        gradient_checkpointing=cfg.learner.gradient_checkpointing, max_steps=warmup + steps,
        shuffle_dataset=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, remove_unused_columns=False,
    )
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model, reward_funcs=recpo_fused_reward, args=args, train_dataset=ds, processing_class=tokenizer,
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM"),
        callbacks=[timer])
    holder["trainer"] = trainer
    setup_s = time.perf_counter() - t0
    try:  # TRL renders the conversational prompt itself: check it gives the ids the reward function is handed
        trl_ids = trainer._tokenize_prompts([ds[0]["prompt"]])[0][0]
        prompt_ids_match = [int(t) for t in trl_ids] == list(ds[0]["user_prompt_ids"])
    except Exception as e:  # noqa: BLE001 - a private helper; report instead of failing the benchmark
        prompt_ids_match = f"not checked: {type(e).__name__}: {e}"
    if prompt_ids_match is False:
        log("trl: WARNING: TRL's prompt ids differ from render_user's; h_T would be computed on other tokens")
    log(f"trl: trainer ready in {setup_s:.1f}s; {warmup}+{steps} steps of {U} prompts x G={G}")
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu_seconds, "setup_s": setup_s,
        "prompt_ids_match": prompt_ids_match,
        "chain_len_mean": statistics.fmean(stats["chain_len"]) if stats["chain_len"] else None,
        "reward_mean": statistics.fmean(stats["reward"]) if stats["reward"] else None,
        "reward_fn_s_mean": statistics.fmean(stats["reward_s"]) if stats["reward_s"] else None,
        "trainable_params": trainable,
        "trl_step_time": [h.get("step_time") for h in history],
        "trl_mean_length": [h.get("completions/mean_length") for h in history],
    }
    del trainer, holder["trainer"], model
    holder.clear()
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- our side
def run_ours(cfg, engine: str, rows_per_step: list[list[int]], prepared, builder, tokenizer, titles: list[str],
             item_prompts: list[list[int]], table, log=print) -> dict:
    import torch

    from driver.steps import batch_inputs, rl_step
    from driver.system import System
    from r2ec.model import resolve_device

    cfg = cfg.model_copy(deep=True)
    cfg.rollout.engine = engine
    train_ds = prepared.splits["train"]
    t0 = time.perf_counter()
    seconds, cpu_seconds, detail = [], [], []
    with System(cfg, str(resolve_device(cfg.run.device)), log) as system:
        system.set_items(item_prompts, table)
        setup_s = time.perf_counter() - t0
        run_table = table.clone()
        updates = (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
        for step, idx in enumerate(rows_per_step, start=1):
            t_step, c_step = time.perf_counter(), tree_cpu_seconds()  # wall: as train() times time_step_s
            rows = [train_ds[i] for i in idx]
            prompts, earlier, target = batch_inputs(rows, prepared, builder, tokenizer, titles)
            rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, updates, version=step)
            updates = (torch.cat([r.table_updates_idx for r in results]),
                       torch.cat([r.table_updates for r in results]))
            run_table[updates[0]] = updates[1]
            seconds.append(time.perf_counter() - t_step)
            cpu_seconds.append(tree_cpu_seconds() - c_step)  # this process + Ray daemons + actors + vLLM's
            detail.append({**timings, "sampled_tokens_mean": rollout.num_sampled_tokens / len(rollout),
                           "reward_mean": statistics.fmean(float(r.rewards.mean()) for r in results),
                           "time_token_s": results[0].metrics.get("time_token_s"),
                           "time_item_s": results[0].metrics.get("time_item_s")})
            log(f"ours ({engine}): step {step} {seconds[-1]:.1f}s")
    return {"step_seconds": seconds, "step_cpu_seconds": cpu_seconds, "setup_s": setup_s, "detail": detail}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first, on each side")
    p.add_argument("--steps", type=int, default=5,
                   help="measured steps on each side (the rows report their median); a TRL step costs about a "
                        "CPU-minute here, so the default run takes ~10 min on an idle 2-core machine")
    p.add_argument("--engines", default="vllm", help="our rollout engines, comma-separated: vllm, hf")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (see the docstring)")
    p.add_argument("--skip-trl", action="store_true", help="only our side")
    p.add_argument("--skip-ours", action="store_true", help="only the TRL side")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 user x G=4, 4 new tokens, no warm-up, 1 measured step, HF engine")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    overrides = ["run.checkpoint_every=null", "eval.valid_every=null", f"cluster.learner.omp_threads={args.threads}"]
    if args.quick:
        args.warmup, args.steps, args.engines = 0, 1, "hf"
        overrides += ["learner.prompts_per_step=1", "rollout.sampling.max_new_tokens=4"]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if any(e not in ("vllm", "hf") for e in engines):
        p.error(f"--engines: expected vllm and/or hf, got {args.engines!r}")
    # Worker processes (Ray actors, the HF rollout engine) inherit this; the learner rank gets omp_threads.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from r2ec.assets import cache_root, resolve
    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.evaluate import zero_shot_item_table
    from r2ec.model import DualHeadModel
    from r2ec.prompts import PromptBuilder, item_prompt_ids, render_user

    clock = RunClock()
    tmp = tempfile.mkdtemp(prefix="r2ec-bench-trl-")
    cfg = load_config(args.config, overrides + [f"run.output_dir={tmp}/ours"])
    prepared = prepare_from_config(cfg.data)
    titles = list(prepared.items["title"])
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)

    # The zero-shot item table (LoRA starts as the identity, so the base model's table is the LoRA model's).
    base_cfg = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})})
    base = DualHeadModel.from_config(base_cfg)
    table = zero_shot_item_table(base, base_cfg, item_prompts, cfg.eval.item_batch_size, cache_root() / "item_tables")
    del base
    gc.collect()

    U, G = cfg.learner.prompts_per_step, cfg.recpo.group_size
    total = args.warmup + args.steps
    rows_per_step = step_rows(len(prepared.splits["train"]), cfg.run.seed, U, total)
    train_ds = prepared.splits["train"]

    # Ours first, while this process is still small (its Ray workers need the memory), then TRL in this process.
    out: dict[str, dict] = {}
    failed: dict[str, str] = {}
    if not args.skip_ours:
        for engine in engines:
            try:
                out[engine] = run_ours(cfg, engine, rows_per_step, prepared, builder, tokenizer, titles,
                                       item_prompts, table)
            except Exception as e:  # noqa: BLE001 - report the other side anyway, and say why this one is missing
                failed[engine] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"ours ({engine}) failed: {failed[engine]}")
    if not args.skip_trl:
        flat = [train_ds[i] for idx in rows_per_step for i in idx]
        msgs, pids, earlier = [], [], []
        for r in flat:
            m = builder.user_messages([titles[i] for i in r["history_item_idx"]], r["history_ratings"],
                                      r["history_timestamps"], r["target_timestamp"])
            msgs.append({"messages": m, "target_item_idx": r["target_item_idx"]})
            pids.append(render_user(tokenizer, m))
            earlier.append(prepared.earlier_items_of(r["user_id"], r["position"]))
        out["trl"] = run_trl(cfg, msgs, pids, earlier, table, args.warmup, args.steps, f"{tmp}/trl")

    labels = {"trl": "TRL GRPOTrainer (HF generate in-process) + rec_head reward",
              "vllm": "r2ec RecPO step (vLLM rollout worker + DeepSpeed learner)",
              "hf": "r2ec RecPO step (HF rollout worker + DeepSpeed learner)"}
    ref = measured_steps(out["trl"]["step_seconds"], args.warmup)["mean_s"] if "trl" in out else None
    ref_cpu = statistics.fmean(out["trl"]["step_cpu_seconds"][args.warmup:]) if "trl" in out else None
    rows = []
    # chain_len: sampled tokens per chain (ours: without an appended marker); TRL's row first
    for key, res in sorted(out.items(), key=lambda kv: kv[0] != "trl"):
        m = measured_steps(res["step_seconds"], args.warmup)
        cpu = statistics.fmean(res["step_cpu_seconds"][args.warmup:])
        if key == "trl":
            chain_len = res["chain_len_mean"]
        else:
            chain_len = statistics.fmean(d["sampled_tokens_mean"] for d in res["detail"])
        rows.append({"system": labels[key], "measured_steps": m["steps"], "sec_per_step": m["mean_s"],
                     "median_s": m["median_s"],
                     "cpu_s_per_step": cpu,
                     "traj_per_s": U * G / m["mean_s"], "sampled_tok_per_chain": chain_len,
                     "setup_s_excluded": res["setup_s"],
                     "speedup_vs_trl": (ref / m["mean_s"]) if ref is not None else None,
                     "cpu_speedup_vs_trl": (ref_cpu / cpu) if ref_cpu is not None else None})
    ratios = {f"trl_sec_per_step_over_{k}": ref / measured_steps(out[k]["step_seconds"], args.warmup)["mean_s"]
              for k in out if k != "trl" and ref is not None}
    ratios.update({f"trl_cpu_per_step_over_{k}": ref_cpu / statistics.fmean(out[k]["step_cpu_seconds"][args.warmup:])
                   for k in out if k != "trl" and ref_cpu is not None})
    report(NAME, rows, ["system", "measured_steps", "sec_per_step", "median_s", "cpu_s_per_step", "traj_per_s",
                        "sampled_tok_per_chain", "setup_s_excluded", "speedup_vs_trl", "cpu_speedup_vs_trl"],
           out_dir=Path(args.out_dir) if args.out_dir else None,
           settings={"config": args.config, "model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
                     "lora": cfg.model.lora.model_dump(), "prompts_per_step": U, "group_size": G,
                     "trajectories_per_step": U * G, "micro_batch_size": cfg.learner.micro_batch_size,
                     "sampling": cfg.rollout.sampling.model_dump(), "lr": cfg.learner.lr,
                     "history_items": cfg.data.prompt.history_items, "warmup_steps": args.warmup,
                     "measured_steps": args.steps, "engines": engines, "threads": args.threads,
                     "zero_stage": cfg.learner.zero_stage, "quick": args.quick,
                     "reward": f"fused beta={cfg.recpo.beta} k_r={cfg.recpo.k_r}", "train_rows": rows_per_step},
           **ratios, failed=failed or None, per_side=out, load_average_before=clock.load_before,
           load_average_after=load_average(), wall_seconds=clock.seconds())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
