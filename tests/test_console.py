"""What a training run prints where: the driver's library logging and the actors' output go to the run folder's
logs/ with run.worker_logs 'file' (driver.console, driver.remote.redirect_output)."""

import logging
import subprocess
import sys
import warnings

from driver.console import library_logs
from r2ec.config import RunConfig


class _Cfg:
    def __init__(self, out, mode):
        self.run = RunConfig(output_dir=str(out), worker_logs=mode)


def test_library_logs_go_to_the_run_folder_and_every_logger_is_restored(tmp_path, capfd):
    import ray  # noqa: F401  (its console handler is what the run takes over)

    ray_logger = logging.getLogger("ray")
    before = (ray_logger.handlers[:], ray_logger.propagate)
    with library_logs(_Cfg(tmp_path, "file")) as path:
        logging.getLogger("ray._private.some_module").warning("ray chatter")
        logging.getLogger("ray").handlers.clear()  # what ray.init(configure_logging=False) does
        logging.getLogger("ray._private.other").warning("more ray chatter")
        logging.getLogger("deepspeed").warning("deepspeed chatter")
        logging.getLogger("some.other.library").warning("other chatter")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    out, err = capfd.readouterr()
    assert "chatter" not in out + err and "a library warning" not in out + err
    text = path.read_text()
    assert path == tmp_path / "logs" / "driver.log"
    for line in ("ray chatter", "more ray chatter", "deepspeed chatter", "other chatter", "a library warning"):
        assert line in text
    assert (ray_logger.handlers, ray_logger.propagate) == before
    assert path.name not in str(logging.getLogger().handlers)


def test_console_mode_changes_nothing(tmp_path):
    ray_logger = logging.getLogger("ray")
    before = ray_logger.handlers[:]
    with library_logs(_Cfg(tmp_path, "console")) as path:
        assert path is None and ray_logger.handlers == before
    assert not (tmp_path / "logs").exists()


def test_an_actor_s_output_and_its_child_processes_go_to_its_file(tmp_path):
    log = tmp_path / "logs" / "rollout-0.log"
    code = ("import subprocess, sys; from driver.remote import redirect_output; "
            f"redirect_output({str(log)!r}, 'RolloutWorker'); print('from python'); "
            "print('to stderr', file=sys.stderr); sys.stdout.flush(); subprocess.run(['echo', 'from a child'])")
    for _ in range(2):  # a replaced worker appends to the same file
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and done.stderr == ""
    text = log.read_text()
    assert text.count("===== RolloutWorker: pid") == 2
    assert text.count("from python") == text.count("to stderr") == text.count("from a child") == 2
