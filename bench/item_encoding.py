"""Item-table encoding on the vLLM engine (CPU build): seconds per catalogue by KV block size and compute threads.

What it measures: ``VllmEngine.last_hidden`` over the MovieLens-100k item prompts (rendered by ``PromptBuilder``
exactly as training renders them; 1,682 items, 66-88 tokens, mean ~71, of which the first ~45 are the chat template
and the instruction that every item prompt shares) with SmolLM2-135M-Instruct in float32, once per ``--variants``
entry ``BLOCK:BIND``: ``rollout.vllm.block_size`` (``default`` = vLLM's own, 128 on the CPU build) and
``rollout.vllm.cpu_threads_bind`` (VLLM_CPU_OMP_THREADS_BIND; ``auto`` gives one compute thread on a 2-core machine).
vLLM's prefix cache serves whole KV blocks only, so at 128 tokens per block no item prompt reuses anything, and at 32
(the CPU attention backend's smallest: multiples of 32) the first 32 tokens of every prompt come from the cache. Each
engine first encodes 16 items unmeasured (start-up, and the shared prefix enters the cache as it would after the
first batch of a real encode), then the measured call encodes ``--items`` others in one call, as
``RolloutWorker.encode_items`` does.

Rows: ``block_size``, ``threads_bind``, ``items``, ``seconds``, ``items_per_s``, ``prompt_tokens_mean``,
``cached_tokens_mean`` (served from the prefix cache per prompt, vLLM's own count), ``speedup`` (the first row's
seconds over this row's) and ``max_abs_diff`` (largest element-wise difference of the encoded rows from the first
row's; the prefix cache replays the same KV, so 0 is expected at one thread count; other thread counts may sum in
another order). Engines run one after the other in this process (each sets VLLM_CPU_OMP_THREADS_BIND from its
``cpu_threads_bind`` before vLLM starts its engine-core process); the load average around the run is recorded.
Needs the offline assets (``r2ec assets``).

    python bench/item_encoding.py                 # the whole catalogue: default:auto, 32:auto, 32:0-1
    python bench/item_encoding.py --items 400     # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, report  # noqa: E402

WARMUP_ITEMS = 16


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml", help="model, data and prompt settings to use")
    p.add_argument("--items", type=int, default=0, help="items to encode per engine (0 = the whole catalogue "
                   f"after the {WARMUP_ITEMS} warm-up items)")
    p.add_argument("--variants", default="default:auto,32:auto,32:0-1",
                   help="comma-separated BLOCK:BIND pairs; BLOCK 'default' = vLLM's own")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 items, block sizes default and 32 at 'auto'")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON goes (default bench/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.quick:
        args.items, args.variants = 64, "default:auto,32:auto"
    from transformers import AutoTokenizer

    from r2ec.assets import resolve
    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.prompts import PromptBuilder, item_prompt_ids
    from rollout.vllm_engine import VllmEngine

    cfg = load_config(args.config)
    prepared = prepare_from_config(cfg.data, log=lambda *a: None)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    ids = item_prompt_ids(builder, tokenizer, prepared.items)
    warm, measured = ids[:WARMUP_ITEMS], ids[WARMUP_ITEMS:]
    if args.items:
        measured = measured[:args.items]
    load_before = load_average()
    rows, reference = [], None
    for spec in args.variants.split(","):
        block_spec, bind = spec.strip().split(":", 1)
        block = None if block_spec == "default" else int(block_spec)
        vcfg = cfg.rollout.vllm.model_copy(update={"block_size": block, "cpu_threads_bind": bind})
        engine = VllmEngine(cfg.model, cfg.rollout.model_copy(update={"vllm": vcfg}), seed=0, device="cpu")
        try:
            engine.last_hidden(warm)
            t = time.perf_counter()
            h = engine.last_hidden(measured).float()
            seconds = time.perf_counter() - t
            cached = engine.last_num_cached_tokens
        finally:
            engine.close()
        if reference is None:
            reference = (h, seconds)
        rows.append({
            "block_size": block_spec, "threads_bind": bind, "items": len(measured), "seconds": seconds,
            "items_per_s": len(measured) / seconds,
            "prompt_tokens_mean": sum(len(s) for s in measured) / len(measured),
            "cached_tokens_mean": sum(cached) / len(cached), "speedup": reference[1] / seconds,
            "max_abs_diff": float((h - reference[0]).abs().max()),
        })
        del h
    report("item_encoding", rows, out_dir=args.out_dir, load_average_before=load_before,
           load_average_after=load_average())


if __name__ == "__main__":
    main()
