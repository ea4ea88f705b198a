"""Rollout throughput: generated tokens per second of the vLLM engine vs the HF engine, and the cost of h_T.

What it measures: for each engine (``rollout.vllm_engine.VllmEngine``, CPU build, and ``rollout.hf_engine.HFEngine``)
serving the same model (SmolLM2-135M-Instruct, float32, by default), the same prompts and the same sampling
(temperature 1.0, top-k 200, top-p 1, 32 new tokens, stop at the answer marker as the rollout worker does, one
completion per prompt), at batches of 1, 16 and 32 prompts (n = 1, so batch = prompts = completions):

- ``gen_s``: one ``Engine.sample`` call over the batch (prefill + decode), and ``tok_s`` = generated tokens /
  ``gen_s``; ``all_tok_s`` counts prompt tokens too. ``vllm_over_hf`` (on the vLLM rows) is vLLM's ``tok_s`` over
  HF's at the same batch.
- ``hidden_s``: what ``RolloutWorker.generate`` does after sampling to get h_T: the HF engine gives no behaviour
  log-probs, so the worker calls ``chain_states`` (one forward over prompt + chain with the LM head on every
  position); vLLM gives them, so the worker calls ``last_hidden`` (a 1-token prefill of prompt + chain with the
  final-norm hook; the prompt's full KV blocks come from vLLM's prefix cache). ``hidden_frac`` = ``hidden_s`` /
  ``gen_s``.

How: both engines are built by ``RolloutWorker`` (engine ``hf``, then ``vllm``; one alive at a time), in this
process (vLLM adds its own engine-core process). Prompts are real user prompts by default: MovieLens-100k training
samples rendered by ``PromptBuilder`` exactly as training does, with the latest ``--history-items`` (default 5)
history items instead of 20 so prompts are ~120-225 tokens (mean ~195) and the run fits its budget;
``--prompts synthetic`` uses random token ids of 150-300 tokens instead. Every batch gets its own prompts (no
prefix-cache hits across measurements), and each engine does one small unmeasured warm-up call first. Each
(engine, batch) is measured ``--repeat`` times (default 1) on fresh prompts; the table gives medians. Batching is
each engine's own: vLLM takes the whole call and schedules it (``max_num_batched_tokens`` 4096 on CPU); the HF engine
cuts it into ``generate`` / forward calls of ``rollout.batch_size`` prompts (``--hf-batch-size``, default 16, the
configured default), so HF at batch 32 is two batch-16 calls (``--hf-batch-size 0``: one call of the whole batch,
which on a 2-core machine was slower per token and needs several GB for the float32 logits of ``chain_states``).

Caveats: neither engine's ``sample`` can ignore EOS or the answer marker, so completions may end early: tokens are
counted per completion up to and including the first EOS/pad token (what was really generated), and
``stopped_early`` counts completions shorter than ``max_new_tokens``. HF keeps computing finished rows until the
whole batch is done (padding), vLLM drops them; that is part of each engine's real cost. Samples differ between
engines (different RNGs), so stopped-early counts can differ. Threads: by default each engine computes on one
thread (``--threads 1``): HF with one torch thread, vLLM's worker bound to core 0. That is what vLLM's automatic
binding gives on a 2-core machine anyway (it keeps one core for its scheduler process), so the comparison is per
compute thread; vLLM's scheduler/front-end process runs besides it, HF has no such helper. ``--threads 0`` leaves
both to the environment (``OMP_NUM_THREADS``, vLLM's auto binding). One measurement per point by default. On a
machine shared with other jobs the numbers are noisy (with more OpenMP threads than free cores every small op
waits for descheduled threads; 10x slowdowns of the HF engine were seen with 2 threads on a loaded 2-core
machine): the load average before and after is recorded with the results.

``--quick`` is a smoke run of the same code (a tiny random model built on the fly, synthetic prompts, batches 1 and 4,
8 new tokens); its numbers mean nothing (``settings.quick`` is true in the JSON; pass ``--out-dir`` to keep it away
from the real results).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RunClock, report, run_with_quick_model  # noqa: E402

NAME = "rollout_throughput"
COLUMNS = ["engine", "batch", "prompt_tokens", "gen_tokens", "stopped_early", "gen_s", "tok_s", "all_tok_s",
           "vllm_over_hf", "hidden_call", "hidden_s", "hidden_frac"]
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "asset://smollm2-135m-instruct"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--engines", default="hf,vllm", help="comma-separated, measured in this order")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32],
                   help="prompts per call (n = 1); the earlier rows at 64 came from --batches 1 16 64")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--prompts", choices=["movielens", "synthetic"], default="movielens")
    p.add_argument("--config", default=str(ROOT / "configs" / "ml100k-smollm2.yaml"),
                   help="data section used for the MovieLens prompts")
    p.add_argument("--history-items", type=int, default=5, help="history items shown in each user prompt")
    p.add_argument("--hf-batch-size", type=int, default=16,
                   help="rollout.batch_size of the HF engine (prompts per generate call); 0 = the measured batch")
    p.add_argument("--repeat", type=int, default=1, help="measurements per point (median), each on fresh prompts")
    p.add_argument("--max-model-len", type=int, default=4096, help="rollout.vllm.max_model_len")
    p.add_argument("--kv-cache-gib", type=int, default=2,
                   help="rollout.vllm.cpu_kvcache_space_gib (1 GiB holds ~23k tokens of this model)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads of each engine: torch threads for HF, VLLM_CPU_OMP_THREADS_BIND=0-(N-1) for "
                        "vLLM (unless already set); 0 = leave both to the environment")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny random model built on the fly (unless --model is given), synthetic "
                        "prompts, batches 1 and 4, 8 new tokens")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.max_new_tokens, args.prompts, args.repeat, args.kv_cache_gib = [1, 4], 8, "synthetic", 1, 1
        args.max_model_len = 1024  # the tiny model has 2048 positions
    return args


def build_prompts(args: argparse.Namespace, tokenizer, count: int) -> tuple[list[list[int]], str]:
    rng = random.Random(args.seed)
    if args.prompts == "synthetic":
        vocab = len(tokenizer)
        return ([[rng.randrange(min(100, vocab // 2), vocab) for _ in range(rng.randint(150, 300))]
                 for _ in range(count)], "synthetic: random token ids, 150-300 tokens")
    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.prompts import PromptBuilder, user_prompt_ids

    cfg = load_config(args.config)
    prepared = prepare_from_config(cfg.data, log=lambda *a, **k: None)
    builder = dataclasses.replace(PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker),
                                  history_items=args.history_items)
    ds, titles = prepared.splits["train"], list(prepared.items["title"])
    rows = [ds[i] for i in rng.sample(range(len(ds)), count)]
    return ([user_prompt_ids(builder, tokenizer, r, titles) for r in rows],
            f"MovieLens-100k train samples via PromptBuilder, latest {args.history_items} history items")


def _generated(ids: list[int], stop_ids: set[int]) -> int:
    """Tokens really generated: up to and including the first EOS/pad (HF pads finished rows with it)."""
    for j, t in enumerate(ids):
        if t in stop_ids:
            return j + 1
    return len(ids)


def measure_engine(engine_name: str, args: argparse.Namespace, prompt_sets: list[list[list[int]]],
                   warmup_prompt: list[int]) -> tuple[list[dict], dict]:
    from r2ec.config import ModelConfig, RolloutConfig, SamplingConfig, VllmConfig
    from rollout.engine import Sampling
    from rollout.worker import RolloutWorker

    model_cfg = ModelConfig(name_or_path=args.model)
    rollout_cfg = RolloutConfig(
        engine=engine_name, batch_size=args.hf_batch_size or max(args.batches),
        sampling=SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=1.0,
                                max_new_tokens=args.max_new_tokens),
        vllm=VllmConfig(cpu_kvcache_space_gib=args.kv_cache_gib, max_model_len=args.max_model_len))
    t = time.perf_counter()
    worker = RolloutWorker(model_cfg, rollout_cfg, seed=args.seed, device="cpu")
    info = {"start_s": round(time.perf_counter() - t, 2)}
    if engine_name == "vllm":
        info["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    engine, finisher = worker.engine, worker.finisher
    s = rollout_cfg.sampling

    def measure_once(prompts: list[list[int]], max_new_tokens: int, seed: int) -> dict:
        if hasattr(engine, "batch_size") and not args.hf_batch_size:  # HF: one call per measured batch
            engine.batch_size = len(prompts)
        sampling = Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=max_new_tokens,
                            stop=(finisher.marker,), seed=seed)
        t0 = time.perf_counter()
        completions = engine.sample(prompts, 1, sampling)
        gen_s = time.perf_counter() - t0
        # What RolloutWorker.generate does next: finish the chains, then h_T (and log-probs where the sampler had
        # none) from the engine itself.
        chains, logps = worker._finish(completions)
        chain_ids = [c.token_ids for c in chains]
        t0 = time.perf_counter()
        if any(lp is None for lp in logps):
            call = "chain_states"
            h_T, _ = engine.chain_states(prompts, chain_ids)
        else:
            call = "last_hidden"
            h_T = engine.last_hidden([p + c for p, c in zip(prompts, chain_ids, strict=True)])
        hidden_s = time.perf_counter() - t0
        assert h_T.shape[0] == len(prompts)
        counts = [_generated(c.token_ids, finisher.stop_ids) for c in completions]
        return {"gen_tokens": sum(counts), "stopped_early": sum(n < max_new_tokens for n in counts),
                "prompt_tokens": sum(map(len, prompts)), "gen_s": gen_s, "hidden_call": call, "hidden_s": hidden_s}

    measure_once([warmup_prompt], min(4, args.max_new_tokens), args.seed)
    rows = []
    for bi, batch in enumerate(args.batches):
        runs = [measure_once(prompt_sets[r * len(args.batches) + bi], args.max_new_tokens, args.seed + 1000 * r + bi)
                for r in range(args.repeat)]
        runs.sort(key=lambda m: m["gen_tokens"] / m["gen_s"])
        m = runs[len(runs) // 2]
        row = {"engine": engine_name, "batch": batch, **m, "tok_s": m["gen_tokens"] / m["gen_s"],
               "all_tok_s": (m["gen_tokens"] + m["prompt_tokens"]) / m["gen_s"],
               "hidden_frac": m["hidden_s"] / m["gen_s"]}
        rows.append(row)
        print(f"{engine_name} batch {batch}: {row['gen_tokens']} tokens in {row['gen_s']:.2f} s = "
              f"{row['tok_s']:.1f} tok/s; {row['hidden_call']} {row['hidden_s']:.2f} s "
              f"({row['hidden_frac']:.2f} of generation)", flush=True)
    if hasattr(engine, "close"):
        engine.close()
    return rows, info


def main(argv: list[str] | None = None) -> None:
    run_with_quick_model(_parse(argv), run, DEFAULT_MODEL)


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    from transformers import AutoTokenizer

    from r2ec.assets import resolve

    clock = RunClock()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    skipped = {}
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:  # imported only when its engine starts
        skipped["vllm"] = "vLLM is not installed"
        engines.remove("vllm")
        print("vllm skipped: not installed", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve(args.model))
    count = 1 + args.repeat * sum(args.batches)
    prompts, source = build_prompts(args, tokenizer, count)
    warmup, sets, lo = prompts[0], [], 1
    for _ in range(args.repeat):
        for b in args.batches:
            sets.append(prompts[lo: lo + b])
            lo += b
    rows, infos = [], {}
    for name in engines:
        got, infos[name] = measure_engine(name, args, sets, warmup)
        rows += got
        gc.collect()  # the engine is gone before the next one starts
    hf = {r["batch"]: r for r in rows if r["engine"] == "hf"}
    for r in rows:
        base = hf.get(r["batch"])
        if r["engine"] == "vllm" and base is not None:
            r["vllm_over_hf"] = r["tok_s"] / base["tok_s"]
    lengths = [len(p) for p in prompts]
    model = "tiny random model (r2ec.testing.build_tiny_model)" if getattr(args, "tiny_model", False) else args.model
    settings = {"model": model, "dtype": "float32", "batches": args.batches, "n_per_prompt": 1,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
                "top_p": 1.0, "stop": "answer marker + EOS (as the rollout worker)", "prompts": source,
                "prompt_tokens_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 1), max(lengths)],
                "hf_batch_size": args.hf_batch_size or "measured batch", "repeat": args.repeat, "quick": args.quick,
                "engines": infos, "skipped": skipped, "torch_threads": torch.get_num_threads(),
                "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                **clock.fields()}
    notes = ("batch = prompts per call, one completion each; tok_s = generated tokens (up to the first EOS) / "
             "sample() seconds; hidden = the h_T call RolloutWorker.generate makes after sampling")
    report(NAME, rows, COLUMNS, out_dir=Path(args.out_dir) if args.out_dir else None,
           settings=settings, notes=notes)


if __name__ == "__main__":
    main()
