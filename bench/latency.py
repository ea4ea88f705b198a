"""Recommendation latency at batch 1: R2ec (reason, then one rec_head step) against generating the item's title.

What it measures: wall seconds per query (mean and median over the same users) for one user at a time, on the same
model (SmolLM2-135M-Instruct, float32, HF transformers, whatever device torch defaults to here: the CPU unless a
GPU is visible), the same users (the first ``--users`` test samples of MovieLens-100k) and the same history lines
(``configs/quickstart.yaml``'s prompt settings: the last 5 history items).

(a) R2ec, the way ``r2ec eval`` ranks: ``DualHeadModel.recommend`` = greedy reasoning (up to ``eval.max_new_tokens``
    = 64 new tokens, stopping at ``<answer>``), one forward over prompt + chain for h_T, cos(h_T, H_V) / tau over
    all 1,682 items with the history masked, top-10. The item table H_V is encoded once, before and outside the
    timing (``zero_shot_item_table``, cached on disk by weights + prompts), as a deployed R2ec would hold it.
(b) The usual LLM-recommender way (TIGER / BIGRec / LC-Rec style generative recommendation): the prompt shows the
    same history and asks for the next title; ``generate`` runs beam search (``--beams`` beams, 10 returned)
    constrained by a prefix trie over the tokenised catalogue titles (``prefix_allowed_tokens_fn``; EOS is allowed
    exactly where a title is complete), for at most the longest title's tokens + 1. The trie is built once, outside
    the timing. Every returned beam is a catalogue title, mapped back to its item(s). (b') the same search with
    ``--also-beams`` widths (default 1: trie-constrained greedy, a single title, a lower bound on (b)'s cost).
(c) (a) with the project's vLLM rollout engine, CPU build (``RolloutWorker.greedy``: greedy reasoning, then a
    1-token prefill for h_T that hits the prefix cache) and the same rec_head scoring in this process. Engine
    start-up is excluded. Skipped with ``--no-vllm`` or ``--quick``, or when vLLM is not installed (the JSON says why).

(a) and (b) run in the same process on the same loaded model, one after the other, each with one unmeasured
warm-up query (a user not in the measured set). Reported per method: seconds/query (mean, median), CPU seconds per
query (user + system of this process and its children, so (c) includes vLLM's engine process), new tokens decoded
per query, and for (b) the beam-tokens per query (beams x decode steps), with the ratios to (a) in wall and CPU time.

Caveats, stated plainly:
- The two methods do different work by design: (a) decodes up to 64 reasoning tokens with one sequence, (b) decodes
  a short title (at most 31 tokens here) with 10 beams. The ratio is specific to this chain budget and this beam
  width; the paper's 640-token chains would make (a) far slower, wider beams would make (b) slower.
- (a) uses the base model without LoRA (a trained LoRA would be merged into the weights for serving, so the cost
  is the same). Neither method is trained here: this measures cost, not quality.
- HF ``generate`` expands the prompt to B copies before the prefill (no shared-prefix KV cache), so (b)'s prefill
  costs B prompts; a serving engine that shares the prompt's KV across beams would make (b) cheaper. (b') shows
  the single-beam cost.
- (b) does not mask the user's history inside the beam search (generative recommenders usually filter after);
  (a) masks it in the scores, at negligible cost.
- One intra-op thread by default (``--threads``) for the timed queries (a cold item table is encoded on every
  core). On a small machine shared with other jobs, two OpenMP threads make every op wait until both threads are scheduled; we measured a 200-token forward 10-15x slower with 2 threads
  than with 1 under such load. Pass ``--threads 2`` on an idle 2-core machine. CPU seconds per query are reported
  next to wall seconds as the less load-sensitive number (under load, wall time hurts (a)'s many small
  single-sequence ops more than (b)'s batched beams); the load average is recorded. vLLM (c) picks its own threads.
- Batch 1 only; treat differences under ~10% as noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python bench/latency.py): make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RunClock, load_average, report, tree_cpu_seconds  # noqa: E402

# The zero-shot model without adapters; a config's LoRA-delta sync (the quickstart's) needs LoRA, so it goes too.
PLAIN_MODEL = ["model.lora.enabled=false", "learner.weight_sync=full"]

NAME = "latency"


# ---------------------------------------------------------------------------------------------- pure helpers
class TitleTrie:
    """Prefix trie over tokenised titles for constrained decoding.

    ``allowed(prefix)`` lists the token ids that may follow ``prefix`` (the tokens generated so far): the next token
    of every title that continues the prefix, plus ``eos_id`` where the prefix is itself a complete title. A prefix
    that left the trie, or that already holds ``eos_id``, only allows ``eos_id`` (a finished or dead beam never
    opens a new title). ``items(seq)`` maps a complete title's tokens back to its item indices (titles may repeat).
    """

    _END = -1

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int):
        if not sequences:
            raise ValueError("no titles to build a trie from")
        self.eos_id = int(eos_id)
        self.root: dict = {}
        self.max_len = 0
        for item, seq in enumerate(sequences):
            seq = [int(t) for t in seq]
            if not seq:
                raise ValueError(f"title {item} has no tokens")
            if self.eos_id in seq:
                raise ValueError(f"title {item} contains the end token {self.eos_id}")
            node = self.root
            for t in seq:
                node = node.setdefault(t, {})
            node.setdefault(self._END, []).append(item)
            self.max_len = max(self.max_len, len(seq))

    def _node(self, prefix: Sequence[int]) -> dict | None:
        node = self.root
        for t in prefix:
            node = node.get(int(t))
            if node is None:
                return None
        return node

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        prefix = [int(t) for t in prefix]
        if self.eos_id in prefix:
            return [self.eos_id]
        node = self._node(prefix)
        if node is None:
            return [self.eos_id]
        out = sorted(t for t in node if t != self._END)
        if self._END in node:
            out.append(self.eos_id)
        return out

    def items(self, seq: Sequence[int]) -> list[int]:
        """Item indices whose title is exactly ``seq`` (a trailing ``eos_id`` and anything after it are ignored)."""
        seq = [int(t) for t in seq]
        if self.eos_id in seq:
            seq = seq[: seq.index(self.eos_id)]
        node = self._node(seq)
        return list(node.get(self._END, [])) if node is not None else []


def prefix_fn(trie: TitleTrie, prompt_len: int) -> Callable:
    """``prefix_allowed_tokens_fn`` for ``generate`` on an unpadded prompt of ``prompt_len`` tokens."""

    def fn(batch_id: int, input_ids) -> list[int]:
        return trie.allowed(input_ids[prompt_len:].tolist())

    return fn


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Mean and median of per-query seconds."""
    if not seconds:
        raise ValueError("no timings")
    return {"mean_s": statistics.fmean(seconds), "median_s": statistics.median(seconds)}


def generative_text(builder, r2ec_text: str) -> str:
    """The generative recommender's prompt: R2ec's history lines, asking for the next title instead of reasoning."""
    head = builder.user_head()
    if not r2ec_text.startswith(head):
        raise ValueError("the user prompt does not start with R2ec's instruction")
    history = r2ec_text[len(head):]
    scale = f"(out of {builder.rating_max:g})"
    return (f"Below is my historical {builder.category} purchases and ratings {scale}:{history}\n\n"
            f"Name the next {builder.item_singular} I might purchase. Answer with its exact title only.")


# ---------------------------------------------------------------------------------------------- benchmark
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--users", type=int, default=5, help="measured users (the first N test samples)")
    p.add_argument("--beams", type=int, default=10, help="beam width of the constrained title search")
    p.add_argument("--also-beams", default="1",
                   help="comma-separated extra beam widths for (b), e.g. 1 (trie-constrained greedy: one title, a "
                        "lower bound on (b)'s cost); empty for none")
    p.add_argument("--topk", type=int, default=10, help="items recommended per query")
    p.add_argument("--max-new-tokens", type=int, default=None, help="R2ec chain budget; default eval.max_new_tokens")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see the caveats)")
    p.add_argument("--no-vllm", action="store_true", help="skip (c), R2ec with the vLLM rollout engine")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 measured user, 4 beams, 16 chain tokens, no (b') and no (c)")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.users, args.beams, args.max_new_tokens, args.no_vllm = 1, 4, 16, True

    import torch

    from r2ec.assets import cache_root
    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import history_tensor
    from r2ec.evaluate import zero_shot_item_table
    from r2ec.model import DualHeadModel, resolve_device
    from r2ec.prompts import PromptBuilder, item_prompt_ids, render_user, user_prompt_ids

    torch.set_num_threads(args.threads)
    clock = RunClock()
    cfg = load_config(args.config, PLAIN_MODEL)
    max_new = args.max_new_tokens or cfg.eval.max_new_tokens
    torch.manual_seed(cfg.run.seed)
    prepared = prepare_from_config(cfg.data)
    titles = list(prepared.items["title"])
    test = prepared.splits["test"]
    rows = [test[i] for i in range(args.users + 1)]  # row 0: warm-up only
    model = DualHeadModel.from_config(cfg.model, resolve_device(cfg.run.device))
    tok = model.tokenizer
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)

    # Outside the timing: the item table (a), the title trie (b). The table's one-time encode (when not cached)
    # may use every core this process has; the timed queries run at --threads.
    t0 = time.perf_counter()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    h_items = zero_shot_item_table(model, cfg.model, item_prompt_ids(builder, tok, prepared.items),
                                   cfg.eval.item_batch_size, cache_root() / "item_tables")
    torch.set_num_threads(args.threads)
    t_table = time.perf_counter() - t0
    title_ids = [tok.encode(t, add_special_tokens=False) for t in titles]
    eos = min(model.eos_ids)
    trie = TitleTrie(title_ids, eos)
    title_budget = trie.max_len + 1

    r2ec_prompts = [user_prompt_ids(builder, tok, r, titles) for r in rows]
    gen_prompts = []
    for r in rows:
        text = builder.user_text([titles[i] for i in r["history_item_idx"]], r["history_ratings"],
                                 r["history_timestamps"], r["target_timestamp"])
        gen_prompts.append(render_user(tok, [{"role": "user", "content": generative_text(builder, text)}]))
    earlier = [history_tensor([prepared.earlier_items_of(r["user_id"], r["position"])]) for r in rows]

    # (a) R2ec: greedy reasoning + one rec_head step.
    def r2ec_query(i: int) -> dict:
        chains, _, top = model.recommend([r2ec_prompts[i]], h_items, args.topk, earlier[i].to(h_items.device),
                                         max_new_tokens=max_new)
        c = chains[0]
        new = len(c.token_ids) - (len(model.marker_ids) if c.appended_marker else 0)
        return {"new_tokens": new, "top": top[0].tolist()}

    # (b) constrained beam search over the catalogue's titles.
    def beam_query(i: int, beams: int) -> dict:
        ids = torch.as_tensor([gen_prompts[i]], device=model.device)
        n_ret = min(args.topk, beams)
        with torch.no_grad():
            out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams,
                                       num_return_sequences=n_ret, do_sample=False, max_new_tokens=title_budget,
                                       prefix_allowed_tokens_fn=prefix_fn(trie, ids.shape[1]),
                                       pad_token_id=model.pad_id, eos_token_id=eos, temperature=None, top_k=None,
                                       top_p=None)
        gen = out[:, ids.shape[1]:].tolist()
        items = []
        for seq in gen:
            for it in trie.items(seq):
                if it not in items:
                    items.append(it)
        steps = out.shape[1] - ids.shape[1]
        best = gen[0][: gen[0].index(eos)] if eos in gen[0] else gen[0]
        return {"new_tokens": len(best), "steps": steps, "beam_tokens": beams * steps,
                "valid": all(trie.items(s) for s in gen), "top": items[: args.topk]}

    def run(query: Callable[[int], dict]) -> tuple[list[float], list[dict]]:
        query(0)  # warm-up, unmeasured
        secs, outs = [], []
        for i in range(1, len(rows)):
            t, c = time.perf_counter(), tree_cpu_seconds()
            out = query(i)
            secs.append(time.perf_counter() - t)
            out["cpu_s"] = tree_cpu_seconds() - c
            outs.append(out)
        return secs, outs

    res: dict[str, tuple[list[float], list[dict]]] = {}
    res["r2ec"] = run(r2ec_query)
    res["beam"] = run(lambda i: beam_query(i, args.beams))
    also = [int(b) for b in args.also_beams.split(",") if b.strip()] if args.also_beams and not args.quick else []
    for b in also:
        res[f"beam{b}"] = run(lambda i, b=b: beam_query(i, b))
    invalid = sum(not o["valid"] for k, v in res.items() if k.startswith("beam") for o in v[1])
    if invalid:
        print(f"warning: {invalid} beam-search queries returned a sequence that is not a catalogue title")

    vllm_note = None
    if not args.no_vllm:
        try:
            from r2ec.algo.metrics import topk_items
            from rollout.worker import RolloutWorker

            cfg_v = cfg.model_copy(deep=True)
            cfg_v.rollout.engine = "vllm"
            t0 = time.perf_counter()
            worker = RolloutWorker(cfg_v.model, cfg_v.rollout, cfg.run.seed, "cpu")
            vllm_start = time.perf_counter() - t0

            def vllm_query(i: int) -> dict:
                chains, h_T = worker.greedy([r2ec_prompts[i]], max_new)
                scores = model.item_scores(h_T.to(h_items.device), h_items, earlier[i].to(h_items.device))
                c = chains[0]
                return {"new_tokens": len(c.token_ids) - (len(model.marker_ids) if c.appended_marker else 0),
                        "top": topk_items(scores, args.topk)[0].tolist()}

            res["r2ec_vllm"] = run(vllm_query)
            vllm_note = f"vLLM engine started in {vllm_start:.1f}s (excluded)"
            worker.engine.close()
        except Exception as e:  # noqa: BLE001 - optional part: report why it is missing, keep (a) and (b)
            vllm_note = f"(c) skipped: {type(e).__name__}: {e}"
            print(vllm_note)

    labels = {
        "r2ec": f"(a) R2ec: greedy reasoning <= {max_new} tok + rec_head (HF)",
        "beam": f"(b) title beam search, {args.beams} beams, trie-constrained (HF)",
        "r2ec_vllm": f"(c) R2ec: greedy reasoning <= {max_new} tok + rec_head (vLLM engine)",
        **{f"beam{b}": f"(b') title search, {b} beam(s), trie-constrained (HF)" for b in also},
    }
    base = summarize(res["r2ec"][0])["mean_s"]
    base_cpu = statistics.fmean(o["cpu_s"] for o in res["r2ec"][1])
    table_rows = []
    for key, (secs, outs) in res.items():
        s = summarize(secs)
        table_rows.append({
            "method": labels[key], "queries": len(secs), "mean_s": s["mean_s"], "median_s": s["median_s"],
            "cpu_s_mean": statistics.fmean(o["cpu_s"] for o in outs),
            "new_tokens_per_query": statistics.fmean(o["new_tokens"] for o in outs),
            "beam_tokens_per_query": (statistics.fmean(o["beam_tokens"] for o in outs) if key.startswith("beam")
                                      else statistics.fmean(o["new_tokens"] for o in outs)),
            "ratio_vs_a": s["mean_s"] / base,
            "cpu_ratio_vs_a": statistics.fmean(o["cpu_s"] for o in outs) / base_cpu,
        })
    report(NAME, table_rows,
           ["method", "queries", "mean_s", "median_s", "cpu_s_mean", "new_tokens_per_query", "beam_tokens_per_query",
            "ratio_vs_a", "cpu_ratio_vs_a"],
           out_dir=Path(args.out_dir) if args.out_dir else None,
           settings={"config": args.config, "model": cfg.model.name_or_path, "dtype": cfg.model.dtype,
                     "device": str(model.device), "users": args.users, "split": "test (first samples)",
                     "history_items": cfg.data.prompt.history_items, "r2ec_max_new_tokens": max_new,
                     "beams": args.beams, "also_beams": also, "topk": args.topk, "title_budget_tokens": title_budget,
                     "catalogue": len(titles), "distinct_titles": len(set(titles)), "quick": args.quick,
                     "warmup_queries": 1, "threads": args.threads},
           ratio_beam_over_r2ec_mean=summarize(res["beam"][0])["mean_s"] / base,
           ratio_beam_over_r2ec_median=summarize(res["beam"][0])["median_s"] / summarize(res["r2ec"][0])["median_s"],
           ratio_beam_over_r2ec_cpu=statistics.fmean(o["cpu_s"] for o in res["beam"][1]) / base_cpu,
           item_table_seconds_excluded=round(t_table, 2), beam_invalid_queries=invalid, vllm=vllm_note,
           per_query={k: {"seconds": v[0], "new_tokens": [o["new_tokens"] for o in v[1]],
                          "top": [o["top"] for o in v[1]]} for k, v in res.items()},
           load_average_before=clock.load_before, load_average_after=load_average(), wall_seconds=clock.seconds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
