"""The acceptance path on the real offline assets (MovieLens-100k, SmolLM2-135M-Instruct) through the CLI.

Needs `r2ec assets` (`make test` runs it first). The zero-shot run here uses the tiny model on the real data, to keep
the suite short; README.md gives the SmolLM2 run and its numbers.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2ec import assets

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "ml100k-smollm2.yaml")


@pytest.fixture(scope="module", autouse=True)
def _assets_ready():
    missing = [n for n in ("ml-100k", "smollm2-135m-instruct") if not assets.is_ready(n)]
    if missing:
        pytest.fail(f"offline assets {missing} are not prepared in {assets.cache_root()}: run `make assets`")


def _r2ec(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "driver", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_prepare_movielens_summary():
    out = _r2ec("prepare", "--config", CONFIG)
    assert "users            943" in out and "items            1,682" in out
    assert "train 79,245 | valid 9,905 | test 9,907 (total 99,057)" in out
    assert "dropped          nothing" in out


def test_popularity_and_zero_shot_eval_on_movielens(tmp_path, tiny_model_dir):
    _r2ec("eval", "--config", CONFIG, "--split", "test", "--baseline", "popularity",
          "--set", f"run.output_dir={tmp_path / 'pop'}")
    pop = json.loads((tmp_path / "pop" / "eval_test.json").read_text())
    assert pop["num_samples"] == 9907 and 0 < pop["hit@5"] <= pop["hit@10"] <= pop["hit@20"] < 1

    _r2ec("eval", "--config", CONFIG, "--split", "test", "--set", f"model.name_or_path={tiny_model_dir}",
          "--set", "eval.max_samples=4", "--set", "eval.max_new_tokens=8", "--set", f"run.output_dir={tmp_path / 'zs'}")
    zs = json.loads((tmp_path / "zs" / "eval_test.json").read_text())
    assert zs["num_samples"] == 4 and zs["num_items"] == 1682
    lines = (tmp_path / "zs" / "eval_test_samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["reasoning"].endswith("<answer>") for x in lines)


def test_smollm2_dual_head_basics():
    from r2ec.config import ModelConfig
    from r2ec.model import DualHeadModel
    from r2ec.prompts import PromptBuilder, render_item, render_user

    model = DualHeadModel.from_config(ModelConfig(name_or_path="asset://smollm2-135m-instruct"))
    builder = PromptBuilder("movies", "movie")
    tok = model.tokenizer
    items = [render_item(tok, builder.item_messages({"title": t, "categories": ["Drama"]}))
             for t in ("Fargo (1996)", "Star Wars (1977)", "Contact (1997)")]
    with torch.no_grad():
        alone = torch.cat([model.last_hidden([s]) for s in items])
        torch.testing.assert_close(model.last_hidden(items, "left"), alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.last_hidden(items, "right"), alone, atol=1e-4, rtol=1e-4)
    user = render_user(tok, builder.user_messages(["Fargo (1996)"], [5.0], [0.0], 3600.0))
    chain = model.generate([user], max_new_tokens=12)[0]
    assert chain.text.endswith("<answer>") and len(chain.token_ids) <= 12 + len(model.marker_ids)
