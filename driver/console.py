"""What a training run prints: its own lines (set-up phases, the progress bar, per-step and validation lines) on the
console, and the libraries' chatter in the run folder.

With ``run.worker_logs: file`` (the default) every Ray actor writes its stdout and stderr to
``<output_dir>/logs/<actor>.log`` (``driver.remote.redirect_output``: vLLM's engine processes and DeepSpeed's C++
logs follow, as they inherit the file descriptors) and Ray streams nothing to the driver. ``library_logs`` does the
same for the driver process: the log records of Ray, vLLM, DeepSpeed, transformers and torch, and Python warnings,
go to ``<output_dir>/logs/driver.log`` for the duration of the run. ``run.worker_logs: console`` leaves all of it
on the console, as Ray does by default.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from r2ec.config import Config

# The libraries whose loggers are taken over for the run (each installs its own console handler on import).
LIBRARY_LOGGERS = ("ray", "vllm", "deepspeed", "DeepSpeed", "transformers", "torch", "py.warnings")


def logs_dir(cfg: Config) -> Path | None:
    """``<output_dir>/logs`` with ``run.worker_logs: file`` (absolute: actors resolve it in their own working
    directory), None with ``console``."""
    return Path(cfg.run.output_dir).absolute() / "logs" if cfg.run.worker_logs == "file" else None


@contextlib.contextmanager
def library_logs(cfg: Config) -> Iterator[Path | None]:
    """Route the driver's library logging to ``<output_dir>/logs/driver.log`` while the block runs (yields the path;
    None and nothing changed with ``run.worker_logs: console``). Every logger touched is restored afterwards."""
    folder = logs_dir(cfg)
    if folder is None:
        yield None
        return
    import ray  # noqa: F401  (Ray installs its console handler when first imported: take over after that)

    path = folder / "driver.log"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in LIBRARY_LOGGERS:  # their console handlers off; their records travel up to the root's file handler
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers[:] = []
        lg.propagate = True
    root = logging.getLogger()
    # At the root, so a library that resets its own logger's handlers (ray.init(configure_logging=False) clears
    # the "ray" logger's) still ends up here, as does any other library (instead of Python's last-resort stderr).
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield path
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        for lg, handlers, propagate in saved:
            lg.handlers[:] = handlers
            lg.propagate = propagate
        handler.close()
