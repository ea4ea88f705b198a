"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018) on the project's own data split,
ranked with the project's own full-catalogue evaluation (``r2ec.evaluate.rank_split``), so its numbers sit in the
same table as popularity, the zero-shot dual-head model and R2ec.

Usage::

    python -m study.sasrec --config configs/quickstart.yaml --out outputs/study/sasrec [--max-minutes 10] [--seed 42]

Writes under ``--out``: ``eval_valid.json`` / ``eval_test.json`` (full splits, the key format of ``r2ec eval``, with
their ``*_samples.jsonl``), ``subset<N>/eval_test.json`` (the user-stratified subset of ``--max-samples`` test samples,
default ``eval.max_samples`` of the config: the subset the LLM methods are evaluated on), ``train_log.jsonl`` (per epoch: loss, valid Hit@10 / NDCG@10, seconds) and ``model.pt``
(the best epoch's weights).

What is faithful to the paper (and its official TensorFlow code, kang205/SASRec):

* Item embedding M (index 0 = padding, kept at zero) shared between the input and the prediction layer, scaled by
  sqrt(d) as in the code; a learned positional embedding P; dropout on their sum; padding positions zeroed.
* b = 2 blocks of ``x + Dropout(Attn(LN(x)))`` then ``x + Dropout(FFN(LN(x)))`` (the paper's residual form, pre-
  LayerNorm), causal self-attention (query i sees keys <= i only; padding keys never), dropout on the attention
  weights, a point-wise two-layer FFN (ReLU; GELU as an option), a final LayerNorm; d = 64, dropout 0.2, one head.
* Objective: at every position t the next item is the positive and ONE negative is drawn uniformly from the items
  the user never interacted with (in the training period), binary cross-entropy on r = F_t . M_i; padding
  positions carry no loss. Adam, lr 1e-3, betas (0.9, 0.98), batch 128; Xavier-normal initialisation (as the
  widely used PyTorch port pmixer/SASRec.pytorch).
* Ranking: r = F_T . M_i for the last position T against the whole catalogue (never a sampled candidate list).

Where it deviates, and why:

* Training sequences. The paper trains on one sequence per user (the last n items before the held-out ones,
  leave-one-out). Here the split is the project's global chronological 80/10/10 split of next-item samples, and
  every sample keeps only its 20 preceding items. Each train sample's ``history + target`` (<= 21 items) is one
  training sequence, with the loss at every position. Every sample is a prefix of its user's sequence, so this is
  SASRec's usual objective with prefix augmentation. A transition is seen up to 20 times per epoch, each time with
  a different left-truncated context, so an "epoch" is about 20 times the paper's. Validation and test inputs are
  the sample's own <= 20-item history, the same items the other methods see (the LLM prompt shows only the last 5
  of them in the quickstart config). Any longer earlier sequence of the user is used for history masking only.
* Max length: n = ``data.max_history`` (20) by default instead of 50/200, since inputs never exceed 20 items.
  Positions are right-aligned: the last item always gets position n-1, as in the official code (whose sequences are
  left-padded to n). RecBole right-pads and numbers positions from the left, so there the last item's position
  depends on the sequence length.
* Negatives are excluded against everything the user interacted with in the training period. The official code
  uses the user's training sequence, which is the same set. Draws are uniform over the catalogue, with rejection.
* Attention uses ``torch.nn.MultiheadAttention`` (it has an output projection; the official TF code has none, the
  PyTorch port does). The official code normalises only the queries and adds the normalised queries back as
  the residual; we follow the paper's equation (LayerNorm on the block input, residual on the un-normalised input).
* Early stopping on the project's validation split (NDCG@10 over every valid sample, full ranking, every earlier item
  masked, the same protocol as the test), patience 5, at most 200 epochs or ``--max-minutes``. The official code
  trains a fixed 201 epochs, and the paper ranks the target against 100 sampled negatives. We rank against the full
  catalogue, as the project does.
* No L2 on the embeddings (the official code's ``l2_emb`` defaults to 0 as well).
* ``--loss ce`` (softmax cross-entropy over the full catalogue at every position) is offered as an option. It is not
  the paper's objective and is not the default.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from r2ec.algo.metrics import RankingAccumulator, mask_history, target_rank
from r2ec.data.sampler import history_tensor
from r2ec.evaluate import EvalSubset, format_metrics, rank_split


# ------------------------------------------------------------------------------------------------------ model
class PointWiseFFN(nn.Module):
    def __init__(self, hidden: int, dropout: float, activation: str = "relu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class SASRec(nn.Module):
    """Item ids 1..num_items (0 = padding). Input sequences are LEFT-padded with 0: (B, L), L <= max_len."""

    def __init__(self, num_items: int, max_len: int = 20, hidden: int = 64, num_blocks: int = 2, num_heads: int = 1,
                 dropout: float = 0.2, activation: str = "relu"):
        super().__init__()
        self.num_items, self.max_len, self.hidden = num_items, max_len, hidden
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(num_blocks))
        self.attns = nn.ModuleList(nn.MultiheadAttention(hidden, num_heads, dropout=dropout, batch_first=True)
                                   for _ in range(num_blocks))
        self.attn_dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(num_blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(hidden, eps=1e-8) for _ in range(num_blocks))
        self.ffns = nn.ModuleList(PointWiseFFN(hidden, dropout, activation) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.num_heads = num_heads
        for name, p in self.named_parameters():  # Xavier-normal on every matrix, as the PyTorch port
            if p.dim() > 1 and "norm" not in name:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq (B, L) long, left-padded with 0 -> F (B, L, d); rows at padding positions are 0."""
        B, L = seq.shape
        if L > self.max_len:
            raise ValueError(f"sequence width {L} exceeds max_len {self.max_len}")
        keep = (seq != 0).unsqueeze(-1).to(self.item_emb.weight.dtype)  # (B, L, 1)
        positions = torch.arange(self.max_len - L, self.max_len, device=seq.device)  # right-aligned
        x = self.item_emb(seq) * math.sqrt(self.hidden) + self.pos_emb(positions)
        x = self.emb_dropout(x) * keep
        # True = may NOT attend: later keys (causality) and padding keys. A padding query would have no key left
        # (NaN softmax), so it may see itself; its output is zeroed below anyway.
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool, device=seq.device), diagonal=1)
        blocked = causal.unsqueeze(0) | (seq == 0).unsqueeze(1)  # (B, L, L)
        blocked = blocked & ~torch.eye(L, dtype=torch.bool, device=seq.device).unsqueeze(0)
        blocked = blocked.repeat_interleave(self.num_heads, dim=0)  # (B * heads, L, L)
        for norm, attn, drop, fnorm, ffn in zip(self.attn_norms, self.attns, self.attn_dropouts, self.ffn_norms,
                                                self.ffns, strict=True):
            h = norm(x)
            a, _ = attn(h, h, h, attn_mask=blocked, need_weights=False)
            x = (x + drop(a)) * keep
            x = (x + ffn(fnorm(x))) * keep
        return self.final_norm(x) * keep

    def catalogue_scores(self, seq: torch.Tensor) -> torch.Tensor:
        """F_T . M_i of the last position against every item: (B, num_items), column j = catalogue index j."""
        h = self.forward(seq)[:, -1]
        return h @ self.item_emb.weight[1:].T


# ------------------------------------------------------------------------------------------------------ data
def left_pad(rows: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Left-pad lists of item ids (>= 1) with 0, keeping the LAST ``width`` items of longer rows: (B, width)."""
    width = width or max(1, max(len(r) for r in rows))
    out = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[-width:]
        if r:
            out[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
    return out


@dataclass
class TrainData:
    inputs: torch.Tensor  # (N, n) long, left-padded item ids (catalogue index + 1)
    positives: torch.Tensor  # (N, n) long, the next item at every position (0 = padding)
    user: torch.Tensor  # (N,) long, row of the user in ``exclude``
    exclude: torch.Tensor  # (U, num_items + 1) bool, items each user interacted with (column 0 = padding: True)


def build_train_data(sequences: list[list[int]], users: list[int], num_users: int, num_items: int,
                     max_len: int) -> TrainData:
    """``sequences``: per training sequence the catalogue indices (0-based) of history + target, oldest first;
    ``users``: the user row of each. Inputs are the first len-1 items, positives the last len-1 (shifted by one)."""
    exclude = torch.zeros((num_users, num_items + 1), dtype=torch.bool)
    exclude[:, 0] = True
    ins, outs = [], []
    for seq, u in zip(sequences, users, strict=True):
        ids = [i + 1 for i in seq][-(max_len + 1):]
        exclude[u, ids] = True
        ins.append(ids[:-1])
        outs.append(ids[1:])
    return TrainData(left_pad(ins, max_len), left_pad(outs, max_len), torch.as_tensor(users, dtype=torch.long),
                     exclude)


def sample_negatives(positives: torch.Tensor, exclude_rows: torch.Tensor, num_items: int,
                     generator: torch.Generator) -> torch.Tensor:
    """One uniform negative per non-padding position, never an item whose ``exclude_rows`` entry is True.

    positives (B, L) long (0 = padding); exclude_rows (B, num_items + 1) bool. Returns (B, L) long, 0 at padding.
    Rejection sampling: redraw every collision until none is left."""
    if bool(exclude_rows[:, 1:].all(dim=1).any()):
        raise ValueError("a user interacted with every item: no negative can be drawn")
    neg = torch.randint(1, num_items + 1, positives.shape, generator=generator)
    rows = torch.arange(positives.shape[0]).unsqueeze(1).expand_as(neg)
    while True:
        bad = exclude_rows[rows, neg]
        n_bad = int(bad.sum())
        if n_bad == 0:
            break
        neg[bad] = torch.randint(1, num_items + 1, (n_bad,), generator=generator)
    return torch.where(positives != 0, neg, torch.zeros_like(neg))


def sequence_loss(model: SASRec, inputs: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
                  kind: str = "bce") -> torch.Tensor:
    """Mean over non-padding positions. ``bce``: -log s(r_pos) - log(1 - s(r_neg)) (the paper's); ``ce``: softmax
    cross-entropy over the whole catalogue."""
    h = model(inputs)  # (B, L, d)
    valid = positives != 0
    if kind == "bce":
        pos_logit = (h * model.item_emb(positives)).sum(-1)[valid]
        neg_logit = (h * model.item_emb(negatives)).sum(-1)[valid]
        return (F.softplus(-pos_logit) + F.softplus(neg_logit)).mean()
    if kind == "ce":
        logits = h[valid] @ model.item_emb.weight[1:].T
        return F.cross_entropy(logits, positives[valid] - 1)
    raise ValueError(f"unknown loss {kind!r}; expected 'bce' or 'ce'")


def train_epoch(model: SASRec, data: TrainData, optimizer: torch.optim.Optimizer, batch_size: int,
                generator: torch.Generator, loss: str = "bce") -> float:
    """One pass over the training sequences in a seeded random order; returns the mean batch loss."""
    model.train()
    order = torch.randperm(data.inputs.shape[0], generator=generator)
    total, batches = 0.0, 0
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        inputs, positives = data.inputs[idx], data.positives[idx]
        # Drop the all-padding columns on the left of this batch (positions stay right-aligned).
        first = int((inputs != 0).any(0).float().argmax())
        inputs, positives = inputs[:, first:], positives[:, first:]
        negatives = (sample_negatives(positives, data.exclude[data.user[idx]], model.num_items, generator)
                     if loss == "bce" else None)
        value = sequence_loss(model, inputs, positives, negatives, loss)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            model.item_emb.weight[0].zero_()  # Adam's moments could otherwise move the padding row
        total += float(value.detach())
        batches += 1
    return total / max(batches, 1)


# ------------------------------------------------------------------------------------------------------ eval
def history_inputs(rows: list[dict], max_len: int) -> torch.Tensor:
    return left_pad([[i + 1 for i in r["history_item_idx"]] for r in rows], max_len)


def sasrec_scorer(model: SASRec, max_len: int):
    """``score_batch`` for ``rank_split``: the sample's history as input, full-catalogue scores, history masked."""
    @torch.no_grad()
    def score_batch(rows, earlier, target):
        model.eval()
        scores = model.catalogue_scores(history_inputs(rows, max_len))
        return mask_history(scores, earlier, target), [None] * len(rows)

    return score_batch


def split_metrics(prepared, rows: list[dict], score_batch, ks, batch_size: int = 512) -> dict:
    """The metrics ``rank_split`` computes over ``rows`` (same masking, tie-breaking and metric functions), in
    memory and without writing files: for the periodic early-stopping check. ``rows``: samples of a split as dicts
    (``split_rows``), in split order."""
    acc = RankingAccumulator(ks)
    for lo in range(0, len(rows), batch_size):
        batch = rows[lo:lo + batch_size]
        earlier = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in batch])
        target = torch.as_tensor([r["target_item_idx"] for r in batch], dtype=torch.long)
        scores, _ = score_batch(batch, earlier, target)
        acc.add(target_rank(scores, target))
    return acc.compute()


def split_rows(prepared, split: str, indices: list[int] | None = None) -> list[dict]:
    """The samples of a split at ``indices`` (all for None) as dicts, read once (``datasets`` row access is slow in a
    loop)."""
    ds = prepared.splits[split]
    return ds.select(range(len(ds)) if indices is None else indices).to_list()


# ------------------------------------------------------------------------------------------------------ main
def train_data_from(prepared, max_len: int) -> TrainData:
    train = prepared.splits["train"]
    users = sorted(set(prepared.user_sequences["user_id"]))
    row_of = {u: i for i, u in enumerate(users)}
    seqs = [h + [t] for h, t in zip(train["history_item_idx"], train["target_item_idx"], strict=True)]
    return build_train_data(seqs, [row_of[u] for u in train["user_id"]], len(users), len(prepared.items), max_len)


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--out", default="outputs/study/sasrec")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-minutes", type=float, default=10.0, help="wall-time cap of the training loop")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=5, help="epochs without a better valid NDCG@10 before stopping")
    p.add_argument("--max-samples", type=int, default=None,
                   help="also report the user-stratified subset of N test samples (default: eval.max_samples)")
    p.add_argument("--max-len", type=int, default=None, help="default: data.max_history")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--activation", choices=["relu", "gelu"], default="relu")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loss", choices=["bce", "ce"], default="bce", help="bce: the paper's (1 sampled negative)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; a model this small is fastest on one (OpenMP waits dominate on a busy machine)")
    args = p.parse_args(argv)

    from r2ec.config import load_config
    from r2ec.data.prepare import prepare_from_config

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = seed_everything(args.seed)
    prepared = prepare_from_config(cfg.data)
    max_len = args.max_len or cfg.data.max_history
    ks = cfg.eval.ks
    data = train_data_from(prepared, max_len)
    num_items = len(prepared.items)
    model = SASRec(num_items, max_len, args.hidden, args.blocks, args.heads, args.dropout, args.activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    valid = split_rows(prepared, "valid")
    print(f"sasrec: {data.inputs.shape[0]} training sequences, {num_items} items, max_len {max_len}, "
          f"{sum(p.numel() for p in model.parameters())} parameters, loss {args.loss}")

    log_path = out / "train_log.jsonl"
    best, best_epoch, best_state, epochs_run, stop = -1.0, 0, None, 0, "max_epochs"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        for epoch in range(1, args.max_epochs + 1):
            t0 = time.perf_counter()
            loss = train_epoch(model, data, optimizer, args.batch_size, gen, args.loss)
            metrics = split_metrics(prepared, valid, sasrec_scorer(model, max_len), ks)
            epochs_run = epoch
            improved = metrics["ndcg@10"] > best
            if improved:
                best, best_epoch, best_state = metrics["ndcg@10"], epoch, copy.deepcopy(model.state_dict())
            rec = {"epoch": epoch, "loss": loss, "valid_ndcg@10": metrics["ndcg@10"],
                   "valid_hit@10": metrics["hit@10"], "epoch_s": round(time.perf_counter() - t0, 2),
                   "elapsed_s": round(time.perf_counter() - start, 2)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(f"epoch {epoch:3d}  loss {loss:.4f}  valid ndcg@10 {metrics['ndcg@10']:.4f}  "
                  f"hit@10 {metrics['hit@10']:.4f}  {rec['epoch_s']:.1f}s{'  *' if improved else ''}", flush=True)
            if epoch - best_epoch >= args.patience:
                stop = "early_stopping"
                break
            if time.perf_counter() - start > args.max_minutes * 60:
                stop = "max_minutes"
                break
    train_seconds = round(time.perf_counter() - start, 2)
    model.load_state_dict(best_state)
    torch.save({"state_dict": best_state, "args": vars(args), "num_items": num_items, "max_len": max_len},
               out / "model.pt")

    extra = {"seed": args.seed, "loss": args.loss, "best_epoch": best_epoch, "epochs": epochs_run, "stop": stop,
             "train_seconds": train_seconds}
    score = sasrec_scorer(model, max_len)
    results = {}
    for split in ("valid", "test"):
        results[split] = rank_split(prepared, EvalSubset.of(prepared, split, None, cfg.eval), 512, ks, out, "sasrec",
                                    score, extra)
    n_sub = args.max_samples or cfg.eval.max_samples
    if n_sub is not None:
        subset = EvalSubset.of(prepared, "test", n_sub, cfg.eval)
        results[f"test_subset{n_sub}"] = rank_split(prepared, subset, 512, ks, out / f"subset{n_sub}", "sasrec",
                                                    score, extra)
    if abs(results["valid"]["ndcg@10"] - best) > 1e-9:
        raise RuntimeError(f"valid NDCG@10 of the best weights ({results['valid']['ndcg@10']}) differs from the one "
                           f"seen in training ({best}): evaluation is not deterministic")
    for name, r in results.items():
        print(f"{name:>16}: {format_metrics(r)}  (n={r['num_samples']}, users {r['num_users']})")
    return results


if __name__ == "__main__":
    main()
