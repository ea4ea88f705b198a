"""The pure pieces of the benchmark scripts: the title trie of constrained decoding, step-time bookkeeping."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import tree_cpu_seconds  # noqa: E402
from bench.latency import PLAIN_MODEL, TitleTrie, generative_text, prefix_fn, summarize  # noqa: E402
from bench.trl_grpo import StepTimer, measured_steps, step_rows  # noqa: E402

EOS = 0
# item 0: [5, 6, 7]; item 1: [5, 6] (a prefix of item 0); item 2: [5, 8]; item 3: [9]; item 4: [5, 6] (duplicate title)
TITLES = [[5, 6, 7], [5, 6], [5, 8], [9], [5, 6]]


@pytest.fixture
def trie():
    return TitleTrie(TITLES, EOS)


def test_root_allows_every_first_token_and_no_eos(trie):
    assert trie.allowed([]) == [5, 9]


def test_inner_node_lists_its_children_sorted(trie):
    assert trie.allowed([5]) == [6, 8]


def test_complete_title_that_is_also_a_prefix_allows_eos_and_continuation(trie):
    assert trie.allowed([5, 6]) == [7, EOS]


def test_leaf_allows_only_eos(trie):
    assert trie.allowed([5, 6, 7]) == [EOS]
    assert trie.allowed([9]) == [EOS]
    assert trie.allowed([5, 8]) == [EOS]


def test_off_trie_or_finished_prefix_allows_only_eos(trie):
    assert trie.allowed([7]) == [EOS]
    assert trie.allowed([5, 9]) == [EOS]
    assert trie.allowed([9, EOS]) == [EOS]
    assert trie.allowed([9, EOS, EOS]) == [EOS]


def test_items_maps_complete_titles_back_including_duplicates(trie):
    assert trie.items([5, 6]) == [1, 4]
    assert trie.items([5, 6, EOS]) == [1, 4]
    assert trie.items([5, 6, 7, EOS, EOS]) == [0]
    assert trie.items([5]) == []  # a prefix, not a title
    assert trie.items([4]) == []
    assert trie.max_len == 3


def test_every_path_the_trie_allows_ends_in_a_title(trie):
    # Walk every allowed continuation: each EOS must close a real title, and every title must be reachable.
    reached = set()

    def walk(prefix):
        for t in trie.allowed(prefix):
            if t == EOS:
                assert trie.items(prefix), prefix
                reached.update(trie.items(prefix))
            else:
                walk(prefix + [t])

    walk([])
    assert reached == set(range(len(TITLES)))


def test_rejects_bad_titles():
    with pytest.raises(ValueError):
        TitleTrie([], EOS)
    with pytest.raises(ValueError):
        TitleTrie([[1], []], EOS)
    with pytest.raises(ValueError):
        TitleTrie([[1, EOS, 2]], EOS)


def test_prefix_fn_strips_the_prompt(trie):
    fn = prefix_fn(trie, prompt_len=3)
    assert fn(0, torch.tensor([1, 2, 3])) == [5, 9]
    assert fn(0, torch.tensor([5, 6, 7, 5, 6])) == [7, EOS]  # the prompt's own 5, 6, 7 are not a prefix


def test_constrained_greedy_decoding_with_the_trie_yields_a_title(trie):
    # A toy "model" preferring token 7 then 8 everywhere: constrained decoding must still end on a title.
    prefs = [7, 8, 6, 5, 9, EOS]
    seq: list[int] = []
    while not seq or seq[-1] != EOS:
        allowed = trie.allowed(seq)
        seq.append(next(t for t in prefs if t in allowed))
    assert seq == [5, 8, EOS]
    assert trie.items(seq) == [2]


def test_summarize():
    assert summarize([1.0, 3.0, 8.0]) == {"mean_s": 4.0, "median_s": 3.0}
    with pytest.raises(ValueError):
        summarize([])


def test_generative_text_keeps_the_history_lines():
    from r2ec.prompts import PromptBuilder

    b = PromptBuilder("movies", "movie", history_items=2)
    text = b.user_text(["A (1990)", "B (1991)", "C (1992)"], [4.0, None, 3.0], [0.0, 60.0, 120.0], 180.0)
    out = generative_text(b, text)
    assert "<answer>" not in out
    assert out.endswith("Name the next movie I might purchase. Answer with its exact title only.")
    assert "[B (1991)]\n" in out and "[C (1992)] (3.0)" in out and "A (1990)" not in out
    with pytest.raises(ValueError):
        generative_text(b, "something else")


def test_step_timer_records_each_step():
    clock = iter([10.0, 12.5, 20.0, 21.0, 30.0, 34.0])
    cpu = iter([1.0, 2.0, 2.0, 5.0, 6.0, 6.5])
    timer = StepTimer(clock=lambda: next(clock), cpu_clock=lambda: next(cpu))
    for _ in range(3):
        timer.on_step_begin(None, None, None)
        timer.on_step_end(None, None, None)
    assert timer.seconds == [2.5, 1.0, 4.0]
    assert timer.cpu_seconds == [1.0, 3.0, 0.5]


def test_step_timer_ignores_an_end_without_a_begin():
    timer = StepTimer(clock=lambda: 1.0, cpu_clock=lambda: 1.0)
    timer.on_step_end(None, None, None)
    assert timer.seconds == [] and timer.cpu_seconds == []


def test_tree_cpu_seconds_counts_this_process_and_grows_with_work():
    import time

    before = tree_cpu_seconds()
    assert before >= time.process_time() - 0.5  # at least this process (psutil and time read the same counters)
    x = 0
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        x += 1
    assert tree_cpu_seconds() - before >= 0.15


def test_measured_steps_drops_the_warmup():
    assert measured_steps([9.0, 2.0, 4.0], warmup=1) == {"steps": 2, "mean_s": 3.0, "median_s": 3.0}
    with pytest.raises(ValueError):
        measured_steps([9.0], warmup=1)


def test_step_rows_follow_the_training_sampler():
    from r2ec.data.sampler import EpochSampler

    rows = step_rows(num_samples=10, seed=3, per_step=4, steps=3)
    s = EpochSampler(10, 3)
    assert rows == [s.next(4) for _ in range(3)]
    assert all(len(r) == 4 for r in rows)


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")))
def test_latency_overrides_load_every_shipped_config(config, monkeypatch):
    """bench/latency.py runs the zero-shot model on ``--config``: its overrides must validate on each shipped one
    (the quickstart's LoRA-delta sync once made them fail)."""
    from r2ec.config import load_config

    monkeypatch.chdir(ROOT)
    cfg = load_config(config, PLAIN_MODEL)
    assert not cfg.model.lora.enabled


def test_weight_sync_pair_takes_the_vllm_rows_of_one_threads_bind():
    from bench.weight_sync import delta_vs_full

    def row(case, engine, seconds, nbytes, bind=None):
        return {"case": case, "engine": engine, "receivers": 1, "seconds": seconds, "bytes": nbytes,
                **({"threads_bind": bind} if bind else {})}

    rows = [row("full", "hf", 1.0, 100), row("lora-delta", "hf", 0.2, 1),
            row("full", "vllm", 3.0, 100, "all"), row("lora-delta", "vllm", 0.3, 1, "all"),
            row("full", "vllm", 2.0, 100, "auto"), row("lora-delta", "vllm", 0.4, 1, "auto")]
    first = delta_vs_full(rows)  # the first bind's rows, never a mix of two receivers
    assert first["pair"] == "vllm, 1 receiver, cpu_threads_bind all"
    assert first["lora_delta_over_full_s"] == pytest.approx(0.1)
    assert delta_vs_full(rows, "auto")["lora_delta_over_full_s"] == pytest.approx(0.2)
    assert delta_vs_full(rows[:2])["pair"] == "hf, 1 receiver"
