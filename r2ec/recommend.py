"""``recommend(history, k)``: greedy reasoning about one user, then the rec_head ranks the whole catalogue.

A thin layer joining the model, the prompts and a catalogue with its item table; no training state.
``Recommender.from_export(dir)`` loads a folder written by ``r2ec export`` (model, prompt settings, item table and
catalogue); ``r2ec recommend --model DIR --history ITEM[:RATING[:UNIX_TS]] ...`` prints one recommendation as JSON.
A history item given without a timestamp is dated at the time of the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r2ec.algo.recpo import unit_rows
from r2ec.data.sampler import history_tensor
from r2ec.model import DualHeadModel
from r2ec.prompts import PromptBuilder, render_user


class UnknownItemsError(ValueError):
    """History item ids that are not in the catalogue."""


@dataclass
class Recommendation:
    reasoning: str
    item_ids: list[str]
    titles: list[str]
    scores: list[float]  # cos / tau of each recommended item


class Recommender:
    def __init__(self, model: DualHeadModel, builder: PromptBuilder, item_ids: Sequence[str],
                 titles: Sequence[str], h_items: torch.Tensor):
        if not (len(item_ids) == len(titles) == h_items.shape[0]):
            raise ValueError("item_ids, titles and the item table must describe the same catalogue")
        # Unit rows once: the table is fixed, and cos/tau needs only them (r2ec.algo.recpo.unit_rows).
        self.model, self.builder, self.h_items_unit = model, builder, unit_rows(h_items)
        self.item_ids, self.titles = list(item_ids), list(titles)
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.max_new_tokens = 640  # the default of ``recommend``; an export sets its run's eval.max_new_tokens

    @classmethod
    def from_export(cls, path, device: str = "auto") -> Recommender:
        """Load a folder written by ``r2ec export`` (see r2ec/export.py)."""
        from r2ec.bundle import load_export

        exported = load_export(path, device)
        rec = cls(exported.model, exported.builder, exported.item_ids, exported.titles, exported.h_items)
        rec.max_new_tokens = int(exported.meta.get("max_new_tokens", rec.max_new_tokens))
        return rec

    def recommend(self, history: Sequence[tuple[str, float | None, float]], k: int = 10,
                  now: float | None = None, max_new_tokens: int | None = None) -> Recommendation:
        """history: (item_id, rating or None, unix timestamp in seconds), oldest first. ``now`` defaults to the
        last history timestamp; ``max_new_tokens`` to ``self.max_new_tokens``. History items are masked to -inf, so
        they rank last and appear only when k exceeds the number of other items."""
        if not history:
            raise ValueError("recommend needs at least one history item")
        unknown = list(dict.fromkeys(h[0] for h in history if h[0] not in self._index))
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in total)" if len(unknown) > 20 else "")
            raise UnknownItemsError(f"history item ids not in the catalogue of {len(self.item_ids)} items: {shown}")
        idx = [self._index[h[0]] for h in history]
        now = history[-1][2] if now is None else now
        messages = self.builder.user_messages([self.titles[i] for i in idx], [h[1] for h in history],
                                              [h[2] for h in history], now)
        prompt = render_user(self.model.tokenizer, messages)
        chains, scores, top = self.model.recommend([prompt], self.h_items_unit, k, history_tensor([idx]).to(
            self.h_items_unit.device), max_new_tokens=self.max_new_tokens if max_new_tokens is None else max_new_tokens, items_unit=True)
        top = top[0].tolist()
        return Recommendation(chains[0].text, [self.item_ids[i] for i in top], [self.titles[i] for i in top],
                              [float(scores[0, i]) for i in top])


def parse_history_item(text: str, now: float) -> tuple[str, float | None, float]:
    """``ITEM[:RATING[:UNIX_TS]]`` -> (item_id, rating or None, timestamp; ``now`` when not given). An empty
    RATING (``ITEM::TS``) means no rating."""
    parts = text.split(":")
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"history item {text!r}: expected ITEM[:RATING[:UNIX_TS]], e.g. 242:4.5:881250949")
    try:
        rating = float(parts[1]) if len(parts) > 1 and parts[1] else None
        ts = float(parts[2]) if len(parts) > 2 and parts[2] else now
    except ValueError:
        raise ValueError(f"history item {text!r}: RATING and UNIX_TS must be numbers (expected "
                         "ITEM[:RATING[:UNIX_TS]], e.g. 242:4.5:881250949)") from None
    return parts[0], rating, ts


def recommend_command(model_dir: str, history: list[tuple[str, float | None, float]], k: int,
                      max_new_tokens: int | None, device: str) -> int:
    """``r2ec recommend``: one recommendation from an exported model, printed as JSON (a score of an item that
    could not be ranked, i.e. a history item, is null)."""
    import json
    import math

    rec = Recommender.from_export(model_dir, device)
    out = rec.recommend(history, k=k, max_new_tokens=max_new_tokens)
    print(json.dumps({"reasoning": out.reasoning, "item_ids": out.item_ids, "titles": out.titles,
                      "scores": [s if math.isfinite(s) else None for s in out.scores]}, indent=2))
    return 0
