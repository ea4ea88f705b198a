"""``run.trackers``: MetricsWriter against a real local MLflow store and a real offline W&B run (no network: W&B's
server URL points at a closed local port and no API key is visible), the missing-package error and the config checks.
"""

import glob
import json
import struct
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from driver.tracking import MetricsWriter, mlflow_name
from r2ec.config import ConfigError, RunConfig, load_config

CONFIG = {"run": {"name": "t", "trackers": ["mlflow"]}, "learner": {"lr": 1e-5, "dtype": "bfloat16"}}


@pytest.fixture(autouse=True)
def _no_mlflow_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow also skips it under pytest; never rely on that


def _record(loss: float) -> dict:
    return {"phase": "recpo", "loss": loss, "valid/ndcg@10": loss / 10, "fault/rollout:0": 1, "nan": float("nan")}


def _mlflow(tmp_path, **kw) -> MetricsWriter:
    return MetricsWriter(tmp_path, ["mlflow"], run_name="t", config=CONFIG, **kw)


def _mlflow_client(tmp_path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")


def _ids(tmp_path) -> dict:
    return json.loads((tmp_path / "trackers.json").read_text())


def test_mlflow_run_holds_each_steps_metrics_and_the_config(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'r2ec[mlflow]' (make test installs it)")
    with _mlflow(tmp_path) as m:
        for step in (1, 2, 3):
            m.log(step, _record(float(step)))
    client = _mlflow_client(tmp_path)
    run = client.get_run(_ids(tmp_path)["mlflow"]["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "t" and run.info.run_name == "t"
    assert run.info.status == "FINISHED"
    assert [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, "loss")] == [(1, 1), (2, 2), (3, 3)]
    assert [p.value for p in client.get_metric_history(run.info.run_id, "valid/ndcg_at_10")] == [0.1, 0.2, 0.3]
    assert set(run.data.metrics) == {"loss", "valid/ndcg_at_10", "fault/rollout_0"}  # no string, no NaN
    assert run.data.params["learner.lr"] == "1e-05" and run.data.params["learner.dtype"] == "bfloat16"
    assert run.data.params["run.trackers"] == '["mlflow"]'
    assert json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read()) == CONFIG
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_resumed_run_continues_the_same_mlflow_run_and_a_fresh_one_starts_another(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'r2ec[mlflow]' (make test installs it)")
    m = _mlflow(tmp_path)
    for step in (1, 2, 3):
        m.log(step, _record(float(step)))
    m.close(failed=True)  # the attempt dies after step 3; its last checkpoint is step 2
    client = _mlflow_client(tmp_path)
    run_id = _ids(tmp_path)["mlflow"]["run_id"]
    assert client.get_run(run_id).info.status == "FAILED"

    with _mlflow(tmp_path, resume_step=2) as m:
        m.log(3, _record(30.0))
        m.log(4, _record(40.0))
    assert _ids(tmp_path)["mlflow"]["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and len(client.search_runs([run.info.experiment_id])) == 1
    # MLflow cannot delete metric points: step 3 holds both attempts' values; the summary shows the newest step's
    history = sorted((p.step, p.timestamp, p.value) for p in client.get_metric_history(run_id, "loss"))
    assert [(s, v) for s, _, v in history] == [(1, 1), (2, 2), (3, 3), (3, 30), (4, 40)]
    assert run.data.metrics["loss"] == 40
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    with _mlflow(tmp_path) as m:  # a fresh run in the same folder: a run of its own
        m.log(1, {"loss": 5.0})
    assert _ids(tmp_path)["mlflow"]["run_id"] != run_id
    assert len(client.search_runs([run.info.experiment_id])) == 2
    MetricsWriter(tmp_path, []).close()  # a fresh run without MLflow: its resume must not continue an older run
    assert _ids(tmp_path) == {}


def test_metric_names_are_made_valid_for_mlflow_deterministically():
    assert mlflow_name("valid/ndcg@10") == "valid/ndcg_at_10"
    assert mlflow_name("train_ndcg@10") == "train_ndcg_at_10"
    assert mlflow_name("fault/rollout:0 (timeout)") == "fault/rollout_0 _timeout_"
    for ok in ("loss_token", "time_step_s", "valid/item_table_version", "a-b.c d"):
        assert mlflow_name(ok) == ok


@pytest.mark.parametrize("tracker,hidden,uri", [("mlflow", "mlflow", "http://127.0.0.1:9"),
                                                ("mlflow", "sqlalchemy", None), ("wandb", "wandb", None)])
def test_a_missing_tracker_package_is_one_config_error_before_anything_is_written(tmp_path, monkeypatch, tracker,
                                                                                   hidden, uri):
    monkeypatch.setitem(sys.modules, hidden, None)  # what `import hidden` meets when it is not installed
    with pytest.raises(ConfigError) as e:
        MetricsWriter(tmp_path, ["tensorboard", tracker], mlflow_tracking_uri=uri)
    assert str(e.value) == (f"run.trackers names {tracker}, but the package {hidden} is not installed: "
                            f"pip install 'r2ec[{tracker}]'")
    assert not list(tmp_path.iterdir())


def test_trackers_config_default_override_and_checks():
    assert RunConfig().trackers == ["tensorboard"]
    cfg = load_config("configs/quickstart.yaml", ["run.trackers=[tensorboard,mlflow]"])
    assert cfg.run.trackers == ["tensorboard", "mlflow"] and cfg.run.mlflow_tracking_uri is None
    assert load_config("configs/quickstart.yaml", ["run.trackers=[]"]).run.trackers == []
    with pytest.raises(ValidationError, match="names a tracker twice"):
        RunConfig(trackers=["mlflow", "mlflow"])
    with pytest.raises(ValidationError, match="'tensorboard', 'mlflow' or 'wandb'"):
        RunConfig(trackers=["comet"])


# ------------------------------------------------------------------------------------------------------ W&B
@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """wandb with no API key anywhere it looks (env, netrc, settings file) and its server URL on a closed port."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (optional extra: pip install 'r2ec[wandb]')")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / "data"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    yield wandb
    from wandb.sdk.lib import wbauth

    wbauth.unauthenticate_session()  # a test's wandb.login must not make the next test's run online


def _wandb_log(path: str, rows_expected: int = 1, wait_s: float = 30.0) -> tuple[dict, list[dict]]:
    """``_read_wandb_log`` once the file holds ``rows_expected`` history rows: wandb's service process may still be
    writing the offline file when ``finish`` returns on a loaded machine (seen once: no rows yet)."""
    deadline = time.monotonic() + wait_s
    while True:
        config, rows = _read_wandb_log(path)
        if len(rows) >= rows_expected or time.monotonic() > deadline:
            return config, rows
        time.sleep(0.2)


def _read_wandb_log(path: str) -> tuple[dict, list[dict]]:
    """The config and the history rows (``step`` and the values) of an offline run's ``run-<id>.wandb``: W&B's
    transaction log, LevelDB log blocks of protobuf ``Record``s after a 7-byte header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, config, rows = open(path, "rb").read(), 7, b"", {}, []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind not in (1, 4):  # not yet a whole record or its last fragment
            continue
        record = pb.Record()
        record.ParseFromString(buf)
        buf = b""
        if record.WhichOneof("record_type") == "run":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.run.config.update}
            config |= {k: v for k, v in items.items() if k != "_wandb"}
        elif record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            rows.append({"step": items["_step"]} | {k: v for k, v in items.items() if not k.startswith("_")})
    return config, rows


def test_wandb_offline_run_logs_each_step_and_a_resume_continues_its_id(tmp_path, wandb_offline):
    out = tmp_path / "out"
    with MetricsWriter(out, ["wandb"], run_name="t", wandb_project="p", config=CONFIG) as m:
        for step in (1, 2, 3):
            m.log(step, _record(float(step)))
        m.log(3, {"valid/hit@10": 0.5})  # a second record of a step merges into its row
    run_id = _ids(out)["wandb"]["run_id"]
    [first] = glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    config, rows = _wandb_log(first, 3)
    assert [(r["step"], r["loss"], r["valid/ndcg@10"]) for r in rows] == [(1, 1.0, 0.1), (2, 2.0, 0.2), (3, 3.0, 0.3)]
    assert rows[-1]["valid/hit@10"] == 0.5 and "phase" not in rows[0] and "nan" not in rows[0]
    assert config == CONFIG

    with MetricsWriter(out, ["wandb"], resume_step=2, run_name="t", wandb_project="p", config=CONFIG) as m:
        m.log(3, _record(30.0))
        m.log(4, _record(40.0))
    assert _ids(out)["wandb"]["run_id"] == run_id
    # offline, the resumed attempt writes a second folder of the same run id (offline-run-<time>-<id>, with a
    # suffix -1 when <time> is the same second) that holds the re-logged steps
    folders = sorted(glob.glob(str(out / "wandb" / f"offline-run-*-{run_id}*")))
    assert len(folders) == 2 and folders[0] == str(Path(first).parent)
    [second] = glob.glob(f"{folders[1]}/run-{run_id}.wandb")
    assert [(r["step"], r["loss"]) for r in _wandb_log(second, 2)[1]] == [(3, 30.0), (4, 40.0)]


def test_wandb_drops_a_record_of_a_lower_step(tmp_path, wandb_offline):
    with MetricsWriter(tmp_path, ["wandb"], run_name="t") as m:
        m.log(3, {"loss": 3.0})
        m.log(2, {"loss": 2.0})  # W&B warns and ignores it
    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert [(r["step"], r["loss"]) for r in _wandb_log(path)[1]] == [(3, 3.0)]


@pytest.mark.parametrize("env,mode", [({"WANDB_API_KEY": "k" * 40}, "online"), ({}, "offline"),
                                      ({"WANDB_MODE": "disabled", "WANDB_API_KEY": "k" * 40}, None)])
def test_wandb_goes_online_only_with_an_api_key_unless_wandb_mode_decides(tmp_path, wandb_offline, monkeypatch,
                                                                           env, mode):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    seen = {}

    class FakeRun:
        id = "abc"

        def finish(self, exit_code=0):
            seen["exit_code"] = exit_code

    monkeypatch.setattr(wandb_offline, "init", lambda **kw: seen.update(kw) or FakeRun())
    with MetricsWriter(tmp_path, ["wandb"], run_name="t", wandb_project="p", config=CONFIG):
        pass
    assert seen["mode"] == mode and seen["project"] == "p" and seen["name"] == "t" and seen["dir"] == str(tmp_path)
    assert seen["config"] == CONFIG and seen["id"] is None and seen["resume"] is None and seen["exit_code"] == 0
