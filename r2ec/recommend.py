"""``recommend(history, k)``: greedy reasoning about one user, then the rec_head ranks the whole catalogue.

A thin layer joining the model, the prompts and a catalogue with its item table; no training state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from r2ec.evaluate import history_tensor
from r2ec.model import DualHeadModel
from r2ec.prompts import PromptBuilder, render_user


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
        self.model, self.builder, self.h_items = model, builder, h_items
        self.item_ids, self.titles = list(item_ids), list(titles)
        self._index = {item_id: i for i, item_id in enumerate(self.item_ids)}

    def recommend(self, history: Sequence[tuple[str, float | None, float]], k: int = 10,
                  now: float | None = None, max_new_tokens: int = 640) -> Recommendation:
        """history: (item_id, rating or None, unix timestamp in seconds), oldest first. ``now`` defaults to the
        last history timestamp. History items are masked to -inf, so they rank last and appear only when k exceeds
        the number of other items."""
        if not history:
            raise ValueError("recommend needs at least one history item")
        unknown = [h[0] for h in history if h[0] not in self._index]
        if unknown:
            raise ValueError(f"history item ids not in the catalogue: {unknown[:5]} ({len(unknown)} in total)")
        idx = [self._index[h[0]] for h in history]
        now = history[-1][2] if now is None else now
        messages = self.builder.user_messages([self.titles[i] for i in idx], [h[1] for h in history],
                                              [h[2] for h in history], now)
        prompt = render_user(self.model.tokenizer, messages)
        chains, scores, top = self.model.recommend([prompt], self.h_items, k, history_tensor([idx]).to(
            self.h_items.device), max_new_tokens=max_new_tokens)
        top = top[0].tolist()
        return Recommendation(chains[0].text, [self.item_ids[i] for i in top], [self.titles[i] for i in top],
                              [float(scores[0, i]) for i in top])
