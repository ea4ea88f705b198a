"""Evaluation end to end on a small dataset written by the test: popularity baseline and the zero-shot model."""

import json

import pytest
import torch

from driver.cli import main
from r2ec.config import load_config
from r2ec.evaluate import evaluate
from r2ec.testing import write_tiny_dataset

KEYS = {"hit@5", "ndcg@5", "hit@10", "ndcg@10", "hit@20", "ndcg@20", "num_samples"}


@pytest.fixture
def data_config(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("R2EC_CACHE", str(tmp_path / "cache"))
    write_tiny_dataset(tmp_path)
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": "files", "files": {"interactions": str(tmp_path / "inter.csv"),
                                               "items": str(tmp_path / "items.csv")},
                 "prompt": {"category": "movies", "item_singular": "movie"}},
        "eval": {"max_new_tokens": 8, "batch_size": 4},
        "run": {"output_dir": str(tmp_path / "out")},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _ranks(path):
    return [json.loads(line)["target_rank"] for line in path.read_text().splitlines()]


def test_popularity_baseline_writes_metrics_consistent_with_ranks(data_config, tmp_path):
    cfg = load_config(data_config)
    result = evaluate(cfg, split="test", baseline="popularity", log=lambda *_: None)
    on_disk = json.loads((tmp_path / "out" / "eval_test.json").read_text())
    assert KEYS <= set(on_disk) and on_disk == result and result["method"] == "popularity"
    assert "reasoning_distinct_frac" not in result  # no reasoning, no share of distinct chains
    ranks = _ranks(tmp_path / "out" / "eval_test_samples.jsonl")
    assert len(ranks) == result["num_samples"] == 5  # 50 samples -> 40 / 5 / 5
    # Hand-derived: test = u9's samples; its first target is i28 with i00 (earlier) masked. Train targets give
    # 14 items count 2 and 12 items count 1; i27, i28, i29 count 0, and i27 wins the tie by catalogue index.
    assert ranks[0] == 1 + 14 + 12 + 1
    assert result["hit@10"] == pytest.approx(sum(r <= 10 for r in ranks) / len(ranks))


def test_zero_shot_model_writes_reasoning(data_config, tmp_path):
    cfg = load_config(data_config, ["eval.max_samples=3"])
    result = evaluate(cfg, split="valid", log=lambda *_: None)
    assert KEYS <= set(result) and result["num_samples"] == 3 and result["method"] == "zero-shot"
    lines = [json.loads(x) for x in (tmp_path / "out" / "eval_valid_samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for rec in lines:
        assert rec["reasoning"].endswith("<answer>") and len(rec["top10_item_ids"]) == 10
        assert 1 <= rec["target_rank"] <= 30
    # how many users got a chain of their own: a collapsed generator shows as 1/N
    assert result["reasoning_distinct_frac"] == len({rec["reasoning"] for rec in lines}) / 3
    # the item table is cached by weights + prompts: a second run reuses it and gives the same ranks
    again = evaluate(cfg, split="valid", log=lambda *_: None)
    assert again["ndcg@20"] == result["ndcg@20"]
    assert list((tmp_path / "cache" / "item_tables").glob("*.safetensors"))


def test_cli_eval_and_prepare(data_config, tmp_path, capsys):
    assert main(["prepare", "--config", str(data_config)]) == 0
    assert "samples" in capsys.readouterr().out
    assert main(["eval", "--config", str(data_config), "--baseline", "popularity", "--split", "valid"]) == 0
    assert (tmp_path / "out" / "eval_valid.json").is_file()


def test_cli_bad_catalogue_is_one_clear_line(data_config, tmp_path, capsys):
    text = (tmp_path / "items.csv").read_text().splitlines()
    text.append(text[3])  # duplicate item id on the last line
    (tmp_path / "items.csv").write_text("\n".join(text) + "\n")
    assert main(["prepare", "--config", str(data_config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("r2ec: error: ")
    assert "items.csv" in err and "line 32" in err and "duplicate item_id 'i02'" in err


def test_cli_bad_interactions_is_one_clear_line(data_config, tmp_path, capsys):
    with open(tmp_path / "inter.csv", "a") as f:
        f.write("u1,i03,yesterday,4\n")
    assert main(["prepare", "--config", str(data_config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inter.csv" in err and "line 62" in err and "yesterday" in err


def test_cli_bad_config_is_reported(data_config, capsys):
    assert main(["prepare", "--config", str(data_config), "--set", "recpo.group_size=1"]) == 2
    assert "recpo.group_size" in capsys.readouterr().err


def test_cli_set_takes_several_pairs_after_one_flag(data_config, capsys):
    from driver.cli import _parser

    args = _parser().parse_args(["train", "--config", "c.yaml", "--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e.f=3"]
    # both pairs of one flag reach the config: together they break a cross-field rule that neither breaks alone
    assert main(["prepare", "--config", str(data_config), "--set", "recpo.group_size=2", "recpo.relabel_topk=3"]) == 2
    assert "relabel_topk (3) cannot exceed group_size (2)" in capsys.readouterr().err


# ------------------------------------------------------------------- user-stratified subsets, intervals, compare
@pytest.fixture
def interleaved_config(tmp_path, tiny_model_dir, monkeypatch):
    """12 users whose interactions interleave in time (user u's k-th item at minute 12 k + u), 2 to 9 items each,
    and a 50/10/40 split, so that the test split holds several samples of most users."""
    monkeypatch.setenv("R2EC_CACHE", str(tmp_path / "cache"))
    items = ["item_id,title"] + [f"i{k:02d},Title {k}" for k in range(30)]
    (tmp_path / "items.csv").write_text("\n".join(items) + "\n")
    rows = ["user_id,item_id,timestamp,rating"]
    for k in range(9):
        for u in range(12):
            if k < 2 + (u * 5) % 8:
                rows.append(f"u{u:02d},i{(u * 7 + k * 3) % 30:02d},{1_000_000 + 60 * (12 * k + u)},4")
    (tmp_path / "inter.csv").write_text("\n".join(rows) + "\n")
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"source": "files", "train_frac": 0.5, "valid_frac": 0.1,
                 "files": {"interactions": str(tmp_path / "inter.csv"), "items": str(tmp_path / "items.csv")},
                 "prompt": {"category": "movies", "item_singular": "movie"}},
        "run": {"output_dir": str(tmp_path / "pop")},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return path


def _samples(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_reports_users_intervals_and_a_sample_fingerprint(interleaved_config, tmp_path):
    result = evaluate(load_config(interleaved_config), split="test", baseline="popularity", log=lambda *_: None)
    recs = _samples(tmp_path / "pop" / "eval_test_samples.jsonl")
    assert result["num_users"] == len({r["user_id"] for r in recs}) > 1 and result["num_samples"] == len(recs)
    assert result["subset"]["rule"] == "whole split" and result["subset"]["ci"]["resamples"] == 1000
    assert len(result["samples_sha256"]) == 64
    for key in KEYS - {"num_samples"}:
        lo, hi = result[f"{key}_ci95"]
        assert lo <= result[key] <= hi


def test_stratified_subset_covers_every_user_and_is_the_same_every_time(interleaved_config, tmp_path):
    full = evaluate(load_config(interleaved_config), split="test", baseline="popularity", log=lambda *_: None)
    n_users = full["num_users"]
    cfg = load_config(interleaved_config, [f"eval.max_samples={n_users}", f"run.output_dir={tmp_path / 'a'}"])
    a = evaluate(cfg, split="test", baseline="popularity", log=lambda *_: None)
    assert a["num_samples"] == a["num_users"] == n_users < full["num_samples"]
    assert a["subset"] == {**full["subset"], "rule": "user-stratified", "max_samples": n_users}
    b = evaluate(cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(tmp_path / "b")})}),
                 split="test", baseline="popularity", log=lambda *_: None)
    assert b["samples_sha256"] == a["samples_sha256"]
    other = load_config(interleaved_config, [f"eval.max_samples={n_users}", "eval.subset_seed=1",
                                             f"run.output_dir={tmp_path / 'c'}"])
    c = evaluate(other, split="test", baseline="popularity", log=lambda *_: None)
    assert c["num_users"] == n_users and c["samples_sha256"] != a["samples_sha256"]


def _reversed_popularity_eval(cfg, out_dir):
    """A second method on the same samples: the popularity order reversed (through the shared evaluation loop)."""
    from r2ec.data.prepare import prepare_from_config
    from r2ec.evaluate import EvalSubset, fixed_scorer, popularity_scores, rank_split

    prepared = prepare_from_config(cfg.data, log=lambda *_: None)
    subset = EvalSubset.of(prepared, "test", cfg.eval.max_samples, cfg.eval)
    return rank_split(prepared, subset, 8, cfg.eval.ks, out_dir, "unpopularity",
                      fixed_scorer(-popularity_scores(prepared)))


def test_compare_prints_paired_differences(interleaved_config, tmp_path, capsys):
    cfg = load_config(interleaved_config)
    pop = evaluate(cfg, split="test", baseline="popularity", log=lambda *_: None)
    unpop = _reversed_popularity_eval(cfg, tmp_path / "unpop")
    out = tmp_path / "cmp" / "compare.json"
    assert main(["compare", str(tmp_path / "pop"), str(tmp_path / "unpop" / "eval_test.json"),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| unpop - pop |" in printed and f"{pop['num_users']} users" in printed
    table = json.loads(out.read_text())
    assert [m["label"] for m in table["methods"]] == ["pop", "unpop"]
    for row, own in zip(table["methods"], (pop, unpop), strict=True):
        for name in table["metrics"]:  # the same draws as the evaluation's own intervals
            assert row[name]["mean"] == pytest.approx(own[name])
            assert row[name]["ci95"] == pytest.approx(own[f"{name}_ci95"])
    diff = table["differences"][0]
    assert diff["ndcg@20"]["mean"] == pytest.approx(unpop["ndcg@20"] - pop["ndcg@20"])
    lo, hi = diff["ndcg@20"]["ci95"]
    assert lo <= diff["ndcg@20"]["mean"] <= hi
    # a method against itself: every paired difference is exactly zero
    assert main(["compare", str(tmp_path / "pop"), str(tmp_path / "pop"), "--labels", "a,b", "--json", str(out)]) == 0
    assert all(d[n]["ci95"] == [0.0, 0.0] for d in json.loads(out.read_text())["differences"] for n in d
               if "@" in n)


def test_compare_refuses_evaluations_of_different_samples(interleaved_config, tmp_path, capsys):
    evaluate(load_config(interleaved_config), split="test", baseline="popularity", log=lambda *_: None)
    sub = load_config(interleaved_config, ["eval.max_samples=5", f"run.output_dir={tmp_path / 'sub'}"])
    evaluate(sub, split="test", baseline="popularity", log=lambda *_: None)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "pop"), str(tmp_path / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not computed on the same samples" in err and "only in pop" in err
    # the same sample ids naming other samples (a split built under another rule): refused too
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "eval_test.json").write_text((tmp_path / "pop" / "eval_test.json").read_text())
    recs = _samples(tmp_path / "pop" / "eval_test_samples.jsonl")
    recs[0]["user_id"] = "someone-else"
    (moved / "eval_test_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["compare", str(tmp_path / "pop"), str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "name other samples" in err and "someone-else" in err
    assert main(["compare", str(tmp_path / "pop"), str(tmp_path / "nowhere")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_zero_shot_eval_scores_against_the_centred_table_when_configured(data_config, tmp_path, monkeypatch):
    """A run with model.center_items starts from the centred table, so its zero-shot evaluation must rank against the
    same table: cosine scores change when the mean row is removed."""
    import r2ec.evaluate as ev

    seen = []
    real = ev._model_scorer

    def spy(model, builder, h_items, *args):
        seen.append(h_items.detach().clone())
        return real(model, builder, h_items, *args)

    monkeypatch.setattr(ev, "_model_scorer", spy)
    raw = load_config(data_config, ["eval.max_samples=3", "eval.max_new_tokens=0"])
    centred = load_config(data_config, ["eval.max_samples=3", "eval.max_new_tokens=0", "model.item_table=frozen",
                                        "model.center_items=true"])
    assert "reasoning_distinct_frac" not in evaluate(raw, split="valid", log=lambda *_: None)  # no reasoning
    evaluate(centred, split="valid", log=lambda *_: None)
    assert seen[1].mean(dim=0).abs().max() < 1e-5 < seen[0].mean(dim=0).abs().max()
    assert torch.allclose(seen[1], seen[0] - seen[0].mean(dim=0))
