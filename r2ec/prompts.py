"""User and item prompts of R2ec, rendered through the model's own chat template (no system prompt of ours).

User prompt (the official code's ``prompters/prompts.py``): an instruction to analyse and recommend inside
``<answer>`` and ``</answer>``, then one line per history item, oldest first, the latest ``history_items`` items::

    3d 4.5h ago: [Some Title] (4.0)

where the time is relative to the target's timestamp. The instruction states the ratings' scale: "(out of 5)", the
official wording, for the default ``rating_scale`` [1, 5], "(out of <max>)" for another. The assistant turn is opened
(generation prompt) and the model writes its reasoning until it emits the answer marker.

Item prompt: an instruction to summarise the item, then ``Title``, ``User Rating``, ``Number of Buyers`` and the
first ``description_words`` words of the description; the assistant turn is pre-filled with the answer marker and
left open (no end-of-turn token), and the item embedding is the final hidden state there.

Deviations from the official code:
- Fields a dataset lacks are left out of the prompts instead of printing empty or placeholder values; a history item
  without a rating is shown without the ``(rating)`` suffix.
- A ``Categories:`` line is added to the item prompt when the catalogue has categories (MovieLens genres). The
  Amazon adapter leaves categories empty, so Amazon item prompts are exactly the official ones.
- The "(out of N)" follows ``data.prompt.rating_scale`` (the official prompt always says 5), and `r2ec prepare`
  rejects ratings outside that scale, so the prompt never states a scale the data does not have.
- Time deltas are computed from the timestamps' difference directly, not through local-time ``datetime`` objects,
  so the text does not depend on the machine's time zone.
- The chat template may add its own default system prompt (SmolLM2's does); we pass no system message, as the
  official code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

USER_INSTRUCTION = (
    "Analyze in depth and finally recommend next {item_singular} I might purchase inside {open} and {close}.\n"
    "For example, {open}a product{close}.\n\n"
    "Below is my historical {category} purchases and ratings (out of {rating_max}):"
)
ITEM_INSTRUCTION = "Summarize key attributes of the following {item_singular} inside {open} and {close}."


def closing_marker(marker: str) -> str:
    """``<answer>`` -> ``</answer>``."""
    return marker.replace("<", "</", 1) if marker.startswith("<") else f"/{marker}"


def format_timedelta(seconds: float) -> str:
    """Human-readable age of a history item, as the official code prints it: ``3d 4.5h``, ``2h 15.0min``,
    ``35.0min`` (sub-second parts are ignored, as there)."""
    delta = timedelta(seconds=seconds)
    hours, remainder = divmod(delta.seconds, 3600)
    minutes, secs = divmod(remainder, 60)
    minutes += secs / 60
    if delta.days > 0:
        return f"{delta.days}d {hours + minutes / 60:.1f}h ago"
    if hours > 0:
        return f"{hours}h {minutes:.1f}min ago"
    return f"{minutes:.1f}min ago"


def _rating_str(r: float | None) -> str:
    if r is None or r != r:  # None or NaN
        return ""
    return f" ({float(r)})"


@dataclass(frozen=True)
class PromptBuilder:
    """Builds chat messages for users and items; holds only the prompt words and limits it needs."""

    category: str
    item_singular: str
    history_items: int = 20
    description_words: int = 100
    marker: str = "<answer>"
    rating_max: float = 5  # the top of data.prompt.rating_scale; last, so positional callers keep working

    @classmethod
    def from_config(cls, prompt_cfg, marker: str) -> PromptBuilder:
        return cls(prompt_cfg.category, prompt_cfg.item_singular, prompt_cfg.history_items,
                   prompt_cfg.description_words, marker, prompt_cfg.rating_scale[1])

    def user_head(self) -> str:
        """The instruction that starts every user prompt (everything before the first history line)."""
        # :g so that the default 5 (a float after config validation) reads "5", as in the official prompt.
        return USER_INSTRUCTION.format(item_singular=self.item_singular, category=self.category,
                                       open=self.marker, close=closing_marker(self.marker),
                                       rating_max=f"{self.rating_max:g}")

    def user_text(self, titles: Sequence[str], ratings: Sequence[float | None], timestamps: Sequence[float],
                  target_timestamp: float) -> str:
        if not (len(titles) == len(ratings) == len(timestamps)):
            raise ValueError("titles, ratings and timestamps of a history must have the same length")
        head = self.user_head()
        start = max(0, len(titles) - self.history_items)
        lines = [
            f"{format_timedelta(target_timestamp - t)}: [{title}]{_rating_str(r)}"
            for title, r, t in zip(titles[start:], ratings[start:], timestamps[start:], strict=True)
        ]
        return head + "\n" + "\n".join(lines)

    def item_text(self, item: dict) -> str:
        head = ITEM_INSTRUCTION.format(item_singular=self.item_singular, open=self.marker,
                                       close=closing_marker(self.marker))
        fields = [f"Title: {item['title']}"]
        if item.get("average_rating") is not None:
            fields.append(f"User Rating: {item['average_rating']}")
        if item.get("rating_number") is not None:
            fields.append(f"Number of Buyers: {item['rating_number']}")
        if item.get("categories"):
            fields.append(f"Categories: {', '.join(item['categories'])}")
        description = item.get("description")
        if description:
            words = description.split()
            if len(words) > self.description_words:
                description = " ".join(words[: self.description_words]) + "..."
            fields.append(f"Description: {description}")
        return head + "\n\n" + "\n".join(fields)

    def user_messages(self, *args, **kwargs) -> list[dict]:
        return [{"role": "user", "content": self.user_text(*args, **kwargs)}]

    def item_messages(self, item: dict) -> list[dict]:
        # The assistant turn is pre-filled with the marker and left open: the embedding is read right there.
        return [{"role": "user", "content": self.item_text(item)}, {"role": "assistant", "content": self.marker}]


def render_user(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a user prompt with the assistant turn opened for generation."""
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def render_item(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of an item prompt, ending inside the assistant turn right after the marker."""
    return _ids(tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True))


def _ids(out) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def user_prompt_ids(builder: PromptBuilder, tokenizer, row: dict, titles: list[str]) -> list[int]:
    """Token ids of a sample's user prompt (``row``: a split row with history indices, ratings and timestamps)."""
    hist_titles = [titles[i] for i in row["history_item_idx"]]
    messages = builder.user_messages(hist_titles, row["history_ratings"], row["history_timestamps"],
                                     row["target_timestamp"])
    return render_user(tokenizer, messages)


def item_prompt_ids(builder: PromptBuilder, tokenizer, items) -> list[list[int]]:
    """Token ids of every item prompt, in catalogue order (``items``: the prepared item rows)."""
    return [render_item(tokenizer, builder.item_messages(item)) for item in items]
