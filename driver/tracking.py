"""Per-step metrics to ``metrics.jsonl`` (always) and to the trackers of ``run.trackers`` (TensorBoard, MLflow, W&B),
one record per optimiser step or evaluation. Only finite numbers go to the trackers; strings (``phase``) go only to
``metrics.jsonl``. MLflow and W&B are optional packages, imported when named; a missing one is a ``ConfigError`` when
the writer is built, at the start of the run.

MLflow: the experiment is ``run.name``; without ``run.mlflow_tracking_uri`` the store is the SQLite database
``<output_dir>/mlruns/mlflow.db`` with artifacts in ``<output_dir>/mlruns/artifacts`` (MLflow 3 refuses its older
file store unless ``MLFLOW_ALLOW_FILE_STORE`` is set). The run gets the flattened config as params and the whole config
as the artifact ``config.json``. MLflow names allow no ``@``: ``valid/ndcg@10`` is logged as ``valid/ndcg_at_10``.
W&B: the run is ``run.name`` in ``run.wandb_project``, written under ``<output_dir>/wandb``; online when an API key is
configured (``WANDB_API_KEY``, ``wandb login``), else offline (``wandb sync`` uploads it later); ``WANDB_MODE``, when
set, decides instead.

Each step's phases per actor go to ``timeline.jsonl`` (``log_spans``; ``r2ec timeline`` draws them).

Resume: a resumed run passes ``resume_step``. Records of later steps (written by the attempt that was interrupted
after its last checkpoint) are removed from ``metrics.jsonl`` and ``timeline.jsonl`` and purged from TensorBoard,
so every step appears once.
MLflow and W&B continue the interrupted attempt's run (ids in ``<output_dir>/trackers.json``) but cannot unlog:
- MLflow has no API that deletes metric points: the history of a step after the checkpoint holds both attempts'
  values (the resumed attempt's with the later timestamp, which the run's latest-value summary shows);
- W&B drops, with a warning, a record of a step below the run's step counter; online, a resumed run's counter
  continues from the server's, so those steps keep the interrupted attempt's values. Offline, the resumed attempt
  writes a second ``wandb/offline-run-*`` folder with the same run id that holds the re-logged steps.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from r2ec.checkpoint import write_json_atomic, write_text_atomic
from r2ec.config import ConfigError
from r2ec.spans import Span

TIMELINE = "timeline.jsonl"

_MLFLOW_BAD = re.compile(r"[^/\w.\- ]")  # MLflow's allowed set (mlflow.utils.validation), without ':' (not on Windows)
_PARAM_LEN = 500  # the smallest param value limit of MLflow servers still in use (3.x allows 6000)


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts: ``@`` becomes ``_at_``, any other character it refuses ``_``."""
    return _MLFLOW_BAD.sub("_", key.replace("@", "_at_"))


class MetricsWriter:
    def __init__(self, out_dir: Path, trackers: Sequence[str] = ("tensorboard",), resume_step: int | None = None, *,
                 tensorboard: bool | None = None, run_name: str = "r2ec", mlflow_tracking_uri: str | None = None,
                 wandb_project: str = "r2ec", config: dict | None = None):
        """``tensorboard`` True/False adds or removes TensorBoard from ``trackers``; ``config`` is what the MLflow
        and W&B runs record (``cfg.model_dump(mode="json")``)."""
        trackers = [t for t in trackers if t != "tensorboard" or tensorboard is not False]
        if tensorboard and "tensorboard" not in trackers:
            trackers.append("tensorboard")
        if "mlflow" in trackers:  # a database store (the local one is SQLite) needs SQLAlchemy and Alembic too
            db = (mlflow_tracking_uri or "sqlite:").startswith(("sqlite:", "postgresql", "mysql", "mssql"))
            _require("mlflow", ["mlflow"] + (["sqlalchemy", "alembic"] if db else []))
        if "wandb" in trackers:
            _require("wandb", ["wandb"])
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.timeline_path = out_dir / TIMELINE  # every actor's phases per step (r2ec.spans, driver.timeline)
        self.dropped = 0
        if resume_step is not None:
            self.dropped = _truncate_after(self.path, resume_step)
            _truncate_after(self.timeline_path, resume_step)
        else:  # a fresh run in a used folder: keep the old logs aside, never mix two runs
            for path in (self.path, self.timeline_path):
                if path.exists():
                    path.rename(path.with_suffix(f".jsonl.{int(path.stat().st_mtime)}"))
        self._file = open(self.path, "a", buffering=1)
        self._timeline = open(self.timeline_path, "a", buffering=1)
        ids_path = out_dir / "trackers.json"
        ids = json.loads(ids_path.read_text()) if resume_step is not None and ids_path.exists() else {}
        config = config or {}
        self._trackers: list[_TensorBoard | _MLflow | _Wandb] = []
        if "tensorboard" in trackers:
            self._trackers.append(_TensorBoard(out_dir, resume_step))
        if "mlflow" in trackers:
            old = ids.get("mlflow", {})
            reuse = old.get("run_id") if old.get("tracking_uri") == mlflow_tracking_uri else None
            self._trackers.append(_MLflow(out_dir, mlflow_tracking_uri, run_name, reuse, config))
            ids["mlflow"] = {"tracking_uri": mlflow_tracking_uri, "run_id": self._trackers[-1].run_id}
        if "wandb" in trackers:
            old = ids.get("wandb", {})
            reuse = old.get("run_id") if old.get("project") == wandb_project else None
            self._trackers.append(_Wandb(out_dir, wandb_project, run_name, reuse, config))
            ids["wandb"] = {"project": wandb_project, "run_id": self._trackers[-1].run.id}
        if ids or ids_path.exists():  # a fresh run without MLflow and W&B clears an older run's ids
            write_json_atomic(ids_path, ids)

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}
        if scalars:
            for tracker in self._trackers:
                tracker.log(step, scalars)

    def log_spans(self, step: int, spans: Sequence[Span]) -> None:
        """The step's phases, one line each: {step, actor, phase, start, end} (wall-clock seconds)."""
        for actor, phase, start, end in spans:
            self._timeline.write(json.dumps({"step": step, "actor": actor, "phase": phase, "start": start,
                                             "end": end}) + "\n")

    def close(self, failed: bool = False) -> None:
        self._file.close()
        self._timeline.close()
        for tracker in self._trackers:
            tracker.close(failed)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)


def _require(tracker: str, modules: list[str]) -> None:
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"run.trackers names {tracker}, but the package {module} is not installed: "
                              f"pip install 'r2ec[{tracker}]'") from None


class _TensorBoard:
    def __init__(self, out_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out_dir: Path, uri: str | None, name: str, run_id: str | None, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        store = (out_dir / "mlruns").resolve()
        if uri is None:
            store.mkdir(exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri or f"sqlite:///{store / 'mlflow.db'}")
        if run_id is None:
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                name, artifact_location=(store / "artifacts").as_uri() if uri is None else None)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:_PARAM_LEN]) for k, v in _flatten(config)]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:  # a resumed run continues the interrupted attempt's MLflow run
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.client.log_dict(run_id, config, "config.json")  # this attempt's, as <output_dir>/config.json

    def log(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_name(k), float(v), now, step)
                                                    for k, v in scalars.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _Wandb:
    def __init__(self, out_dir: Path, project: str, name: str, run_id: str | None, config: dict):
        import wandb

        mode = None if os.environ.get("WANDB_MODE") else \
            "online" if wandb.login(prompt=False, verify=False) else "offline"
        self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config, mode=mode, id=run_id,
                              resume="allow" if run_id else None)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)  # records of one step merge into one row

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _truncate_after(path: Path, step: int) -> int:
    """Keep the records of steps <= ``step`` (an unreadable last line, cut by a crash, goes too). Atomic."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped

