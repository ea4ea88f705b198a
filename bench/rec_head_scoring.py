"""Full-catalogue scoring with the rec_head: seconds per call, achieved GFLOP/s, and where the time goes.

What it measures: the cost of turning user states h_T (B, d) into a top-k recommendation over a catalogue H_V
(V, d), exactly as ``Recommender.recommend`` and evaluation do after reasoning: the table is normalised once
(``r2ec.algo.recpo.unit_rows``, timed on its own as ``table_unit_s``, not part of a call), then per call
``DualHeadModel.item_scores(..., items_unit=True)`` (that is ``r2ec.algo.recpo.cosine_scores`` followed by
``r2ec.algo.metrics.mask_history``), then ``r2ec.algo.metrics.topk_items``. Catalogues of 10k, 100k and 1M
items, d = the model's hidden size (read from the model's config; no weights are loaded), user batches of 1 and 64,
k = 20, a 20-item history per user masked as in evaluation.

How: random float32 tensors (the cost does not depend on the values). The pipeline is run stage by stage, each
stage timed on its own, ``--repeat`` times after one unmeasured warm-up (none for shapes of more than
``--warmup-limit`` scores, where one costs most and changes nothing measurable); the table gives the run whose
total (the sum of the stages) is the median, with that run's stages. The stages are:

- ``normalise``: ``unit_rows(h_user) / tau`` inside ``cosine_scores`` (B x d: the user side only);
- ``matmul``: ``u @ v.T`` inside ``cosine_scores``;
- ``mask``: ``mask_history`` (a copy of the (B, V) scores plus the scatter of -inf);
- ``topk``: ``topk_items`` (``torch.topk`` plus an exact re-ordering of ties that cross the k-th score, so the
  order equals a stable sort's).

A small check first confirms that the staged pipeline returns exactly what ``DualHeadModel.item_scores`` +
``topk_items`` return (and, to float tolerance, what scoring the un-normalised table returns).

The reference is the machine's own matmul throughput for the same shapes: plain ``torch.matmul`` of pre-normalised
(B, d) x (d, V) operands, timed alone (same repeat/warm-up rule, median), FLOPs = 2 B d V. ``scoring_gflops`` is the
same FLOP count divided by the whole pipeline's time, ``frac_of_matmul`` its ratio to the plain matmul's GFLOP/s. For
context, ``torch_topk_s`` is ``torch.topk`` on the same scores (a partial selection without the tie-breaking
guarantee; not what the project calls).

Caveats: CPU, float32, the torch thread count of the process (``OMP_NUM_THREADS`` or ``--threads``); with B = 1 the
matmul is a matrix-vector product bounded by memory bandwidth, so its GFLOP/s are far below the B = 64 ones. Peak
memory at 1M items is ~2x the catalogue (the table and its unit rows, 2.3 GB each at d = 576) plus a few (B, V)
score tensors. Timings are medians of a few runs; on a shared machine they are noisy: the load average before and
after is recorded with the results. On a GPU the same code runs on ``--device cuda`` (timings synchronised), which
was not measured here.

``--quick`` is a smoke run (catalogues of 10k and 50k, batches 1 and 8, one timed run); ``settings.quick`` is true in
the JSON (pass ``--out-dir`` to keep it away from the real results).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import RunClock, report  # noqa: E402

NAME = "rec_head_scoring"
COLUMNS = ["items", "users", "table_unit_s", "normalise_s", "matmul_s", "mask_s", "topk_s", "total_s",
           "matmul_share", "topk_share", "scoring_gflops", "plain_matmul_s", "plain_matmul_gflops", "frac_of_matmul",
           "torch_topk_s"]


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="asset://smollm2-135m-instruct", help="its config gives d (hidden size)")
    p.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000, 1_000_000], help="catalogue sizes V")
    p.add_argument("--users", type=int, nargs="+", default=[1, 64], help="user batch sizes B")
    p.add_argument("--k", type=int, default=20, help="top-k")
    p.add_argument("--history", type=int, default=20, help="history items masked per user")
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--warmup-limit", type=float, default=1e7,
                   help="one unmeasured warm-up run when users x items is at most this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = as the environment sets them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: small catalogues, 1 timed run")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.users, args.repeat = [10_000, 50_000], [1, 8], 1
    return args


def hidden_size(model: str) -> int:
    from transformers import AutoConfig

    from r2ec.assets import resolve

    cfg = AutoConfig.from_pretrained(resolve(model))
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.hidden_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device: torch.device, fn, *args, **kwargs):
    """(fn(*args, **kwargs), wall seconds), synchronised on GPUs."""
    _sync(device)
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def check_equivalence(d: int, tau: float, k: int, device: torch.device) -> None:
    """The staged pipeline below must return what DualHeadModel.item_scores + topk_items return."""
    from r2ec.algo.metrics import mask_history, topk_items
    from r2ec.algo.recpo import cosine_scores, unit_rows
    from r2ec.model import DualHeadModel

    g = torch.Generator().manual_seed(1)
    h, items = torch.randn(4, d, generator=g).to(device), torch.randn(1000, d, generator=g).to(device)
    hist = torch.randint(0, 1000, (4, 5), generator=g).to(device)
    hist[0, 3:] = -1
    v = unit_rows(items)
    ref = DualHeadModel.item_scores(SimpleNamespace(tau=tau), h, v, hist, items_unit=True)
    u = unit_rows(h) / tau
    staged = mask_history(u @ v.T, hist)
    assert torch.equal(staged, ref) and torch.equal(cosine_scores(h, v, tau, items_unit=True), u @ v.T)
    torch.testing.assert_close(cosine_scores(h, items, tau), u @ v.T)
    assert torch.equal(topk_items(staged, k), topk_items(ref, k))


def measure(h_items: torch.Tensor, users: int, args: argparse.Namespace, device: torch.device) -> dict:
    from r2ec.algo.metrics import mask_history, topk_items
    from r2ec.algo.recpo import unit_rows

    num_items, d = h_items.shape
    g = torch.Generator().manual_seed(args.seed + users)
    h_user = torch.randn(users, d, generator=g).to(device)
    hist = torch.randint(0, num_items, (users, args.history), generator=g).to(device)
    warmup = 1 if users * num_items <= args.warmup_limit else 0
    runs: list[dict[str, float]] = []

    def user_side(h_user: torch.Tensor) -> torch.Tensor:
        return unit_rows(h_user) / args.tau

    v, t_table = _timed(device, unit_rows, h_items)  # once per table, as Recommender / evaluation do
    for rep in range(args.repeat + warmup):
        u, t_norm = _timed(device, user_side, h_user)
        scores, t_mm = _timed(device, torch.matmul, u, v.T)
        del u
        masked, t_mask = _timed(device, mask_history, scores, hist)
        del scores
        top, t_top = _timed(device, topk_items, masked, args.k)
        assert top.shape == (users, args.k)
        if rep >= warmup:
            runs.append({"normalise": t_norm, "matmul": t_mm, "mask": t_mask, "topk": t_top,
                         "total": t_norm + t_mm + t_mask + t_top})

    # Reference: the plain matmul alone on pre-normalised operands, and torch.topk on the same scores.
    u = unit_rows(h_user)
    plain, topk_ref = [], []
    for rep in range(args.repeat + warmup):
        out, t = _timed(device, torch.matmul, u, v.T)
        del out
        if rep >= warmup:
            plain.append(t)
    del u, v
    for rep in range(args.repeat + warmup):
        _, t = _timed(device, torch.topk, masked, args.k, dim=-1)
        if rep >= warmup:
            topk_ref.append(t)
    del masked

    med = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    flops = 2.0 * users * d * num_items
    plain_s = _median(plain)
    return {"items": num_items, "users": users, "table_unit_s": t_table, "normalise_s": med["normalise"],
            "matmul_s": med["matmul"],
            "mask_s": med["mask"], "topk_s": med["topk"], "total_s": med["total"],
            "matmul_share": med["matmul"] / med["total"], "topk_share": med["topk"] / med["total"],
            "scoring_gflops": flops / med["total"] / 1e9, "plain_matmul_s": plain_s,
            "plain_matmul_gflops": flops / plain_s / 1e9, "frac_of_matmul": plain_s / med["total"],
            "torch_topk_s": _median(topk_ref)}


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = RunClock()
    d = hidden_size(args.model)
    check_equivalence(d, args.tau, args.k, device)
    rows = []
    for num_items in args.items:
        g = torch.Generator().manual_seed(args.seed)
        h_items = torch.randn(num_items, d, generator=g).to(device)
        for users in args.users:
            row = measure(h_items, users, args, device)
            rows.append(row)
            print(f"V={num_items} B={users}: {row['total_s']:.4f} s per call "
                  f"({row['frac_of_matmul']:.2f} of plain matmul throughput)", flush=True)
        del h_items
    settings = {"model": args.model, "hidden_size": d, "k": args.k, "history": args.history, "tau": args.tau,
                "repeat": args.repeat, "warmup_limit": args.warmup_limit, "device": args.device, "dtype": "float32",
                "quick": args.quick, "torch_threads": torch.get_num_threads(), **clock.fields()}
    notes = ("the run with the median total, with its stages; total = normalise + matmul + mask + topk "
             "(DualHeadModel.item_scores(items_unit=True) + topk_items); table_unit_s = normalising the table once "
             "(one run, not per call); frac_of_matmul = plain matmul time / total time for the same "
             "FLOPs (2 B d V); plain_matmul_s and torch_topk_s are medians; torch_topk_s is a reference only (no tie "
             "guarantee)")
    report(NAME, rows, COLUMNS, out_dir=Path(args.out_dir) if args.out_dir else None,
           settings=settings, notes=notes)


if __name__ == "__main__":
    main()
