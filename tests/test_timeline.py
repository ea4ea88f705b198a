"""The step timeline: spans recorded on the wall clock (r2ec.spans), written per step with the metrics and cut on
resume (driver.tracking), and `r2ec timeline` (driver.timeline): the busy shares and the PNG."""

import time

import pytest

from driver.cli import main
from driver.timeline import busy_seconds, busy_table, last_steps, load_spans
from driver.tracking import MetricsWriter
from r2ec.config import ConfigError
from r2ec.spans import SpanRecorder


def test_a_recorder_places_perf_counter_readings_on_the_wall_clock_and_hands_them_over_once():
    rec = SpanRecorder("learner-1")
    before = time.time()
    t0 = time.perf_counter()
    rec.mark("token", t0, t0 + 2.0)
    (actor, phase, start, end), = rec.take()
    assert (actor, phase) == ("learner-1", "token") and end - start == pytest.approx(2.0)
    assert before - 0.5 <= start <= time.time() + 0.5
    assert rec.take() == []


@pytest.mark.parametrize("intervals, expected", [
    ([], 0.0),
    ([(0.0, 1.0)], 1.0),
    ([(0.0, 1.0), (2.0, 3.5)], 2.5),  # disjoint: summed
    ([(0.0, 2.0), (1.0, 3.0)], 3.0),  # overlapping: once
    ([(1.0, 3.0), (0.0, 4.0), (5.0, 6.0)], 5.0),  # contained, unsorted
])
def test_busy_seconds_is_the_length_of_the_union(intervals, expected):
    assert busy_seconds(intervals) == pytest.approx(expected)


def test_busy_seconds_loop_equals_a_fine_grid():
    import random

    rng = random.Random(0)
    for _ in range(20):
        intervals = [(a, a + rng.randint(1, 5)) for a in (rng.randint(0, 40) for _ in range(6))]
        grid = sum(any(lo <= t / 10 < hi for lo, hi in intervals) for t in range(0, 500)) / 10
        assert busy_seconds(intervals) == pytest.approx(grid, abs=0.11)


def _spans(step, t):
    """A synchronous step at time t: rollout 0-4 s, learner 4-9 s, sync 9-10 s."""
    return [("rollout-0", "generate", t, t + 3), ("rollout-0", "hidden", t + 3, t + 4),
            ("learner-0", "reward", t + 4, t + 5), ("learner-0", "token", t + 5, t + 8),
            ("learner-0", "optimizer", t + 8, t + 9), ("driver", "sync", t + 9, t + 10)]


def test_spans_are_written_per_step_and_a_resume_cuts_the_interrupted_steps(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        for step in (1, 2, 3):
            m.log(step, {"loss": 1.0})
            m.log_spans(step, _spans(step, 100.0 * step))
    assert {s["step"] for s in load_spans(tmp_path)} == {1, 2, 3}
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=2) as m:  # step 3 came after the checkpoint
        m.log_spans(3, _spans(3, 1000.0))
    spans = load_spans(tmp_path)
    assert len(spans) == 18 and [s["start"] for s in spans if s["step"] == 3][0] == 1000.0


def test_busy_shares_of_a_synchronous_step_show_each_side_idling(tmp_path):
    spans = [dict(zip(("step", "actor", "phase", "start", "end"), (1, *s), strict=True)) for s in _spans(1, 0.0)]
    window, busy = busy_table(spans)
    assert window == 10.0
    assert list(busy) == ["rollout-0", "learner-0", "driver"]  # rollout side, learner side, driver
    assert busy == {"rollout-0": 0.4, "learner-0": 0.5, "driver": 0.1}


def test_timeline_command_draws_the_last_steps(tmp_path, capsys):
    with MetricsWriter(tmp_path, tensorboard=False) as m:
        for step in (1, 2, 3, 4):
            m.log_spans(step, _spans(step, 10.0 * step))
    assert sorted({s["step"] for s in last_steps(load_spans(tmp_path), 2)}) == [3, 4]
    assert main(["timeline", str(tmp_path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "steps 3-4: 20.0s" in out and "rollout-0    busy  40.0%" in out and "learner-0    busy  50.0%" in out
    png = (tmp_path / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_a_bad_timeline_line_is_one_error_naming_file_and_line(tmp_path, capsys):
    (tmp_path / "timeline.jsonl").write_text('{"step": 1, "actor": "a", "phase": "p", "start": 0, "end": 1}\n'
                                             '{"step": 2, "actor": "a"}\n')
    with pytest.raises(ConfigError, match=r"timeline.jsonl line 2: expected"):
        load_spans(tmp_path)
    assert main(["timeline", str(tmp_path / "nowhere")]) == 2
    assert "no timeline here" in capsys.readouterr().err
