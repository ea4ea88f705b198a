"""Checkpoint folders (r2ec/checkpoint.py) and the driver's run state (driver/run_state.py), without Ray or DeepSpeed:
atomic commit, integrity checks that name the bad file, ``auto`` falling back past a damaged checkpoint, a process
killed while writing, pruning that keeps the best, safe pickles, compatibility, RNG / sampler / metrics resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from driver.tracking import MetricsWriter
from r2ec import checkpoint as ck
from r2ec.data.sampler import EpochSampler
from r2ec.rng import rng_state, set_rng_state


def _write(out: Path, step: int, payload: bytes = b"shard") -> Path:
    tmp = ck.stage(out, step)
    (tmp / "learner" / "ds").mkdir(parents=True)
    (tmp / "learner" / "ds" / "rank0.bin").write_bytes(payload * 100)
    (tmp / ck.TRAINER_STATE).write_text(json.dumps({"step": step}))
    return ck.commit(tmp, step)


def test_commit_publishes_a_verified_folder_and_latest(tmp_path):
    final = _write(tmp_path, 3)
    assert final.name == "step-00000003" and (final / ck.MANIFEST).is_file()
    assert (ck.checkpoint_root(tmp_path) / ck.LATEST).read_text().strip() == "step-00000003"
    manifest = ck.verify(final)
    assert set(manifest["files"]) == {"learner/ds/rank0.bin", ck.TRAINER_STATE}
    assert ck.find_resume(tmp_path, "auto") == final
    assert ck.find_resume(tmp_path, "none") is None
    assert ck.find_resume(tmp_path, str(final)) == final


def test_explicit_missing_path_is_an_error(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no such checkpoint folder"):
        ck.find_resume(tmp_path, str(tmp_path / "step-00000009"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_latest_is_named_and_auto_falls_back(tmp_path, damage):
    older = _write(tmp_path, 1)
    newest = _write(tmp_path, 2)
    shard = newest / "learner" / "ds" / "rank0.bin"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:10])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[7] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(ck.CheckpointError, match="rank0.bin"):
        ck.verify(newest)
    with pytest.raises(ck.CheckpointError, match="rank0.bin"):
        ck.find_resume(tmp_path, str(newest))  # an explicit path is never silently replaced
    logged = []
    assert ck.find_resume(tmp_path, "auto", logged.append) == older
    assert any("step-00000002" in m and "rank0.bin" in m for m in logged)


_WRITER = """
import sys, time
from pathlib import Path
from r2ec import checkpoint as ck
tmp = ck.stage(sys.argv[1], 2)
(tmp / "learner").mkdir()
with open(tmp / "learner" / "big.bin", "wb") as f:
    f.write(b"x" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(60)  # killed here, mid-write
ck.commit(tmp, 2)
"""


def test_a_process_killed_while_writing_leaves_the_previous_latest(tmp_path):
    first = _write(tmp_path, 1)
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    root = ck.checkpoint_root(tmp_path)
    assert (root / ck.LATEST).read_text().strip() == first.name
    assert [p.name for p in ck.list_checkpoints(root)] == [first.name]  # the half-written folder is not listed
    assert ck.find_resume(tmp_path, "auto") == first
    # The next checkpoint clears the stale temporary folder.
    assert (root / ".tmp-step-00000002").is_dir()
    _write(tmp_path, 3)
    assert not (root / ".tmp-step-00000002").exists()


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step in range(1, 6):
        _write(tmp_path, step)
        if step == 2:
            ck.mark_best(tmp_path, 2)
    removed = ck.prune(tmp_path, keep=2, log=lambda _: None)
    root = ck.checkpoint_root(tmp_path)
    assert sorted(removed) == ["step-00000001", "step-00000003"]
    assert [p.name for p in ck.list_checkpoints(root)] == ["step-00000002", "step-00000004", "step-00000005"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_check_pickles_refuses_code_and_accepts_tensors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3), "step": 4, "name": "x", "betas": (0.9, 0.99)}, good)
    ck.check_pickles([good])
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(3), "payload": _Evil()}, evil)
    with pytest.raises(ck.CheckpointError, match="evil.pt"):
        ck.check_pickles([good, evil])


def test_compat_lists_every_difference():
    a = ck.Compat("base-a", "aaa", 10, None, 64)
    b = ck.Compat("base-b", "bbb", 11, {"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]}, 64)
    diff = " ".join(a.differences(b))
    for field in ("base_model", "num_items", "catalogue_sha256", "lora"):
        assert field in diff
    assert a.differences(a) == []


def test_compat_refuses_another_train_split_and_checkpoints_that_did_not_record_it():
    new = ck.Compat("base", "aaa", 10, None, 64, train_split_sha256="1" * 64)
    other = ck.Compat("base", "aaa", 10, None, 64, train_split_sha256="2" * 64)
    old = ck.Compat("base", "aaa", 10, None, 64)  # written before the split was recorded (older rule)
    assert new.differences(new) == []
    assert "train split: checkpoint 222222222222, this run 111111111111" in " ".join(new.differences(other))
    assert "not recorded" in " ".join(new.differences(old))


def test_compat_refuses_another_item_table_rule_and_older_checkpoints_hold_a_trained_table():
    frozen = ck.Compat("base", "aaa", 10, None, 64, item_table="frozen-centred")
    old = ck.Compat(**{k: v for k, v in ck.Compat("base", "aaa", 10, None, 64).__dict__.items() if k != "item_table"})
    assert old.item_table == "trained"
    assert "item_table: checkpoint 'trained', this run 'frozen-centred'" in " ".join(frozen.differences(old))
    assert frozen.differences(frozen) == []


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rng_states_of_older_driver_checkpoints_still_restore():
    # The driver's trainer_state.json kept python and numpy states as plain lists before the layouts became one.
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    new = rng_state()
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    old = json.loads(json.dumps({"python": [version, list(internal), gauss],
                                 "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                                 "torch": new["torch"]}))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(old)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_sampler_continues_exactly_and_refuses_another_split():
    a = EpochSampler(10, seed=5)
    a.next(7)
    b = EpochSampler(10, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next(4) for _ in range(5)] == [b.next(4) for _ in range(5)]
    with pytest.raises(ValueError, match="num_samples"):
        EpochSampler(11, seed=5).load_state_dict(a.state_dict())


def test_metrics_of_steps_after_the_checkpoint_are_dropped_on_resume(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        for step in (1, 2, 3):
            m.log(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "los')  # a line cut by the crash
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=2) as m:
        assert m.dropped == 2
        m.log(3, {"loss": 30.0})
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_fresh_run_keeps_an_old_metrics_log_aside(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        m.log(1, {"loss": 1.0})
    time.sleep(0.01)
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        m.log(1, {"loss": 2.0})
    assert len(list(tmp_path.glob("metrics.jsonl.*"))) == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0
