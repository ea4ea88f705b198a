from pathlib import Path

import pytest
import yaml

from r2ec.config import Config, ConfigError, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))
MINIMAL = {
    "model": {"name_or_path": "some/model"},
    "data": {"source": "movielens100k", "prompt": {"category": "movies", "item_singular": "movie"}},
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configs_exist():
    assert any(p.name == "ml100k-smollm2.yaml" for p in CONFIGS)


def test_defaults_are_the_papers():
    cfg = load_config(data=MINIMAL)
    assert (cfg.recpo.group_size, cfg.recpo.beta, cfg.recpo.k_r) == (4, 0.05, 1000)
    assert (cfg.recpo.eps_low, cfg.recpo.eps_high, cfg.recpo.kl_coef) == (0.2, 0.28, 0.0)
    assert cfg.model.tau == 0.02 and cfg.model.lora.r == 4 and cfg.model.lora.alpha == 128
    assert cfg.learner.lr == 1e-5 and cfg.learner.prompts_per_step == 12 and cfg.data.max_history == 20
    assert cfg.model.item_table == "trained"  # the item side is trained through the shared weights, as in the paper
    assert load_config(data=MINIMAL, overrides=["model.item_table=frozen"]).recpo.refresh_every == 50  # unused


def test_rating_scale_default_and_override():
    assert tuple(load_config(data=MINIMAL).data.prompt.rating_scale) == (1, 5)
    cfg = load_config(data=MINIMAL, overrides=["data.prompt.rating_scale=[0.5, 10]"])
    assert cfg.data.prompt.rating_scale == (0.5, 10.0)
    assert cfg.hash() != load_config(data=MINIMAL).hash()


def test_dotted_overrides_have_yaml_types():
    cfg = load_config(data=MINIMAL, overrides=["recpo.group_size=8", "eval.ks=[1, 50]", "run.output_dir=x/y",
                                              "model.lora.enabled=true", "eval.max_samples=null"])
    assert cfg.recpo.group_size == 8 and cfg.eval.ks == [1, 50] and cfg.run.output_dir == "x/y"
    assert cfg.model.lora.enabled is True and cfg.eval.max_samples is None


def test_overrides_from_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(p, ["recpo.beta=0.5"]).recpo.beta == 0.5


@pytest.mark.parametrize(
    "override, expected",
    [
        ("recpo.group_sise=8", "recpo.group_sise: unknown key"),
        ("recpo.group_size=1", "recpo.group_size: Input should be greater than or equal to 2 (got 1)"),
        ("recpo.advantage=ppo", "recpo.advantage: Input should be 'grpo' or 'rloo'"),
        ("recpo.relabel_topk=5", "relabel_topk (5) cannot exceed group_size (4)"),
        ("data.train_frac=0.95", "train_frac + valid_frac must be < 1"),
        ("data.source=amazon2023", "needs an 'amazon' section"),
        ("data.prompt.history_items=30", "cannot exceed max_history"),
        ("eval.ks=[0]", "ks must be a non-empty list of positive cut-offs"),
        ("model.tau=0", "model.tau: Input should be greater than 0"),
        ("learner.max_tokens_per_micro_batch=1",
         "learner.max_tokens_per_micro_batch: Input should be greater than or equal to 2 (got 1)"),
        ("data.prompt.rating_scale=[5, 1]", "data.prompt.rating_scale: Value error, rating_scale must be [min, max] "
         "with finite min < max (got [5, 1])"),
        ("data.prompt.rating_scale=[1, 1]", "rating_scale must be [min, max] with finite min < max (got [1, 1])"),
        ("data.prompt.rating_scale=[1, .inf]", "rating_scale must be [min, max] with finite min < max"),
        ("data.prompt.rating_scale=[1, 5, 10]", "data.prompt.rating_scale"),
    ],
)
def test_invalid_values_name_the_field_and_reason(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(data=MINIMAL, overrides=[override])
    assert expected in str(e.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"model.name_or_path: required key is missing"):
        load_config(data={**MINIMAL, "model": {}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(data=MINIMAL, overrides=["recpo.group_size"])
    with pytest.raises(ConfigError, match="is a value"):
        load_config(data=MINIMAL, overrides=["model.name_or_path.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(p)
    p.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_hash_is_stable_and_sensitive():
    a, b = load_config(data=MINIMAL), load_config(data=MINIMAL)
    assert a.hash() == b.hash()
    assert a.hash() != load_config(data=MINIMAL, overrides=["recpo.beta=0.1"]).hash()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["learner.max_steps=0"], "learner.max_steps is 0 and warmup.steps is 0: nothing to train"),
        (["learner.prompts_per_step=12", "cluster.learner.num_workers=2", "learner.mini_batches=4"],
         "learner.mini_batches (4) must divide the users per learner rank (12 / 2 ranks)"),
        (["warmup.steps=2", "warmup.prompts_per_step=5", "cluster.learner.num_workers=2",
          "learner.prompts_per_step=4"], "warmup.prompts_per_step (5) must be a multiple of cluster.learner.num_workers"),
        (["warmup.steps=-1"], "warmup.steps: Input should be greater than or equal to 0"),
        (["eval.max_new_tokens=-1"], "eval.max_new_tokens: Input should be greater than or equal to 0"),
        (["model.item_table=fixed"], "model.item_table: Input should be 'trained' or 'frozen'"),
        (["model.center_items=true"], "center_items needs item_table 'frozen'"),
    ],
)
def test_warmup_and_step_settings_are_checked(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(data=MINIMAL, overrides=overrides)
    assert expected in str(e.value)


def test_warmup_only_run_and_no_reasoning_eval_are_valid():
    cfg = load_config(data=MINIMAL, overrides=["learner.max_steps=0", "warmup.steps=3", "eval.max_new_tokens=0",
                                               "learner.prompts_per_step=12", "learner.mini_batches=3"])
    assert (cfg.learner.max_steps, cfg.warmup.steps, cfg.eval.max_new_tokens) == (0, 3, 0)
    assert load_config(data=MINIMAL).warmup.steps == 0  # off by default (the paper has no warm-up)


@pytest.mark.parametrize("section", ["rollout", "learner"])
@pytest.mark.parametrize("gpus", [0.5, 2])
def test_a_rank_owns_exactly_one_gpu(section, gpus):
    """Fractional GPUs would put two NCCL ranks on one GPU, which NCCL refuses at the first weight sync."""
    with pytest.raises(ConfigError, match=rf"cluster.{section}.gpus_per_worker is {gpus:g}; it must be 0 \(CPU\) or 1"):
        load_config(data=MINIMAL, overrides=[f"cluster.{section}.gpus_per_worker={gpus}"])
    assert load_config(data=MINIMAL, overrides=[f"cluster.{section}.gpus_per_worker=1"])


def test_kl_coef_needs_lora():
    with pytest.raises(ConfigError, match=r"recpo.kl_coef \(0.1\) needs model.lora.enabled"):
        load_config(data=MINIMAL, overrides=["recpo.kl_coef=0.1"])
    assert load_config(data=MINIMAL, overrides=["recpo.kl_coef=0.1", "model.lora.enabled=true"]).recpo.kl_coef == 0.1


@pytest.mark.parametrize("spec, groups", [("0", [[0]]), ("0-3", [[0, 1, 2, 3]]), ("0,2|1, 3", [[0, 2], [1, 3]]),
                                          ("4-5,1", [[1, 4, 5]])])
def test_cpu_affinity_specs(spec, groups):
    from r2ec.config_cluster import parse_cores

    assert parse_cores(spec, "f") == groups


def test_cpu_affinity_per_worker_or_shared():
    cfg = load_config(data=MINIMAL, overrides=["cluster.learner.num_workers=2", "cluster.learner.cpu_affinity='0|1'",
                                               "cluster.rollout.cpu_affinity=1"])
    assert [cfg.cluster.learner.cores_of(i, "f") for i in (0, 1)] == [[0], [1]]
    assert cfg.cluster.rollout.cpu_affinity == "1" and cfg.cluster.rollout.cores_of(0, "f") == [1]
    assert load_config(data=MINIMAL).cluster.learner.cores_of(0, "f") is None


@pytest.mark.parametrize("overrides, expected", [
    (["cluster.learner.cpu_affinity='0|1'"], "cluster.learner.cpu_affinity '0|1' has 2 groups for 1 workers"),
    (["cluster.rollout.cpu_affinity='0||1'"], "cluster.rollout.cpu_affinity: '' in '0||1' is not a core id"),
    (["cluster.rollout.cpu_affinity='3-1'"], "'3-1' in '3-1' is not a core id or range"),
    (["cluster.colocate=true", "cluster.rollout.cpu_affinity=0"], "cluster.rollout.cpu_affinity is not used with "
     "cluster.colocate"),
])
def test_cpu_affinity_errors_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(data=MINIMAL, overrides=overrides)
    assert expected in str(e.value)


def test_pin_to_cores_refuses_a_core_this_process_cannot_use():
    from driver.remote import ClusterError, pin_to_cores

    with pytest.raises(ClusterError, match=r"cluster.learner.cpu_affinity: core\(s\) \[4096\] are not available"):
        pin_to_cores([4096], "cluster.learner.cpu_affinity")
