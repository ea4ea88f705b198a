"""``r2ec timeline RUN_DIR``: a Gantt chart of every actor's phases over a run's last few steps, drawn from
``<RUN_DIR>/timeline.jsonl`` (``r2ec.spans``), and how busy each actor was, so a user sees where each side idles
before changing the rollout:learner ratio.

Rows: each rollout worker (``generate``, ``hidden``), each learner rank (``reward``, ``old_logp``, ``token``,
``item``, ``optimizer``; a warm-up step has ``item`` and ``optimizer`` only) and the driver (``sync``, ``refresh``,
``validate``, ``checkpoint``). Busy is the union of an actor's spans over the window from the first span's start to
the last span's end: in the default synchronous loop the rollout side idles while the learner trains and the
reverse. matplotlib draws the PNG (the ``plot`` extra); the busy table needs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from driver.tracking import TIMELINE
from r2ec.config import ConfigError

PHASE_COLOURS = {
    "generate": "#1f77b4", "hidden": "#aec7e8",
    "reward": "#ffbb78", "old_logp": "#c5b0d5", "token": "#ff7f0e", "item": "#2ca02c", "optimizer": "#d62728",
    "sync": "#9467bd", "refresh": "#8c564b", "validate": "#7f7f7f", "checkpoint": "#bcbd22",
}
_KIND_ORDER = {"rollout": 0, "learner": 1, "driver": 2}


def load_spans(run_dir: str | Path) -> list[dict]:
    """Every span of ``<run_dir>/timeline.jsonl``; a malformed line is an error naming the file and the line."""
    path = Path(run_dir) / TIMELINE
    if not path.is_file():
        raise ConfigError(f"{path}: no timeline here (a training run writes one record per actor phase per step)")
    spans = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
            span = {"step": int(rec["step"]), "actor": str(rec["actor"]), "phase": str(rec["phase"]),
                    "start": float(rec["start"]), "end": float(rec["end"])}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path} line {n}: expected {{step, actor, phase, start, end}} ({e})") from None
        if span["end"] < span["start"]:
            raise ConfigError(f"{path} line {n}: the span ends before it starts")
        spans.append(span)
    if not spans:
        raise ConfigError(f"{path}: empty (no step has finished yet)")
    return spans


def last_steps(spans: Sequence[dict], steps: int) -> list[dict]:
    """The spans of the last ``steps`` steps."""
    keep = set(sorted({s["step"] for s in spans})[-steps:])
    return [s for s in spans if s["step"] in keep]


def busy_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of ``intervals`` (an actor's overlapping spans count once)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def actor_order(actor: str) -> tuple[int, int, str]:
    kind, _, index = actor.partition("-")
    return _KIND_ORDER.get(kind, 3), int(index) if index.isdigit() else 0, actor


def busy_table(spans: Sequence[dict]) -> tuple[float, dict[str, float]]:
    """The window's length (seconds) and each actor's busy share of it."""
    t0, t1 = min(s["start"] for s in spans), max(s["end"] for s in spans)
    window = max(t1 - t0, 1e-9)
    actors = sorted({s["actor"] for s in spans}, key=actor_order)
    return window, {a: busy_seconds([(s["start"], s["end"]) for s in spans if s["actor"] == a]) / window
                    for a in actors}


def draw(spans: Sequence[dict], out: Path) -> Path:
    """The Gantt chart of ``spans`` as a PNG at ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("r2ec timeline draws with matplotlib, which is not installed: "
                          "pip install 'r2ec[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(s["start"] for s in spans)
    actors = sorted({s["actor"] for s in spans}, key=actor_order)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.45 * len(actors)))
    for row, actor in enumerate(actors):
        for s in (s for s in spans if s["actor"] == actor):
            ax.broken_barh([(s["start"] - t0, s["end"] - s["start"])], (row - 0.4, 0.8),
                           facecolors=PHASE_COLOURS.get(s["phase"], "#17becf"))
    for step in sorted({s["step"] for s in spans}):
        first = min(s["start"] for s in spans if s["step"] == step) - t0
        ax.axvline(first, color="black", linestyle=":", linewidth=0.8)
        ax.text(first, len(actors) - 0.4, f" step {step}", fontsize=8, va="bottom")
    phases = [p for p in PHASE_COLOURS if any(s["phase"] == p for s in spans)]
    ax.legend(handles=[Patch(color=PHASE_COLOURS[p], label=p) for p in phases], loc="upper center",
              bbox_to_anchor=(0.5, -0.35 if len(actors) < 4 else -0.15), ncol=min(len(phases), 6), fontsize=8)
    ax.set_yticks(range(len(actors)), actors)
    ax.set_ylim(-0.6, len(actors) + 0.2)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def timeline_command(run_dir: str, steps: int, out: str | None) -> int:
    spans = last_steps(load_spans(run_dir), steps)
    window, busy = busy_table(spans)
    path = draw(spans, Path(out) if out else Path(run_dir) / "timeline.png")
    first, last = min(s["step"] for s in spans), max(s["step"] for s in spans)
    print(f"steps {first}-{last}: {window:.1f}s from the first phase's start to the last one's end")
    for actor, share in busy.items():
        print(f"  {actor:<12} busy {100 * share:5.1f}%  idle {100 * (1 - share):5.1f}%")
    print(f"wrote {path}")
    return 0
