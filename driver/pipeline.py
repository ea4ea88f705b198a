"""The one-step-off pipeline (``rollout.async``): the rollout of step k + 1 runs while the learner trains step k.

Synchronous loop, step k: rollout_k (weights v_{k-1}) -> train_k (v_{k-1} -> v_k) -> sync v_k; the rollout workers
idle while the learner trains and the reverse (docs/performance.md section 9). One step off, step k:

1. the learner trains on rollout_k, sampled with v_{k-2} (staleness 1; the first RecPO step of a run samples its own
   rollout with v_{k-1}, staleness 0), while the rollout workers sample rollout_{k+1} with v_{k-1}, the weights they
   hold; ``System.generate`` asserts that version, ``check_staleness`` the bound;
2. once both are done, v_k is broadcast (a sync never overlaps a generate: vLLM's weights change in place);
3. rollout_{k+1} waits for step k + 1 in ``RunState.ahead`` (a ``driver.run_state.Ahead``) and goes into the
   checkpoint of step k (``driver.run_state.save_ahead``: token ids, behaviour log-probs, h_T, the prompts and their
   targets), so a run killed after step k and resumed samples nothing twice and trains step k + 1 on the very
   rollout the uninterrupted run used.

The learner corrects the token term for the staleness with the sampler's log-probs (``recpo.off_policy``,
r2ec/algo/off_policy.py) and logs the ratio statistics. Every wait keeps its own timeout (the rollout's
``rollout.timeout_s``, the learner's ``learner.timeout_s``), naming the component. A rollout worker that dies during
the overlapped generate is replaced as in the synchronous loop, but its replacement is brought to the weights while
the learner is changing them, so that rollout is discarded and step k + 1's rollout is sampled again after the sync
(on-policy, staleness 0); the record counts it (``ahead_discarded``).

Not in the paper (its trainer samples and trains in turns). Imports no ray (the System does).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from driver.run_state import rollout_seed
from driver.steps import make_shards, timed_sync
from r2ec.config import Config
from r2ec.protocol import Rollout
from r2ec.spans import SpanRecorder


def check_staleness(step: int, rollout: Rollout) -> int:
    """The learner trains step ``step`` with the weights after step - 1; the rollout must be at most one version
    older. Returns the staleness (0 or 1)."""
    staleness = (step - 1) - rollout.weight_version
    if staleness not in (0, 1):
        raise RuntimeError(f"step {step}: the rollout was sampled with the weights of version "
                           f"{rollout.weight_version}, {staleness} versions behind the learner's (the pipeline "
                           "bounds it at 1)")
    return staleness


def overlapped_step(system, cfg: Config, rollout: Rollout, inputs: tuple, updates: tuple[torch.Tensor, torch.Tensor],
                    next_prompts: list[list[int]] | None, version: int, spans: SpanRecorder
                    ) -> tuple[Rollout | None, list, dict]:
    """Train step ``version`` on ``rollout`` (its ``inputs``: prompts, earlier, target) while the rollout workers
    sample ``next_prompts`` (None: the last step) with the weights they hold (version - 1); then sync v_version.
    Returns the next rollout (None if discarded or not asked for), the ranks' StepResults and the timings."""
    prompts, earlier, target = inputs
    G, before = cfg.recpo.group_size, system.rollout_incarnations
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-ahead")
    try:
        t0 = time.perf_counter()
        future = None if next_prompts is None else pool.submit(
            _timed, system.generate, next_prompts, G, seed=rollout_seed(cfg.run.seed, version + 1),
            weight_version=version - 1)
        results = system.train_step(make_shards(prompts, rollout, earlier, target, len(system.learners), G, updates))
        t_learn = time.perf_counter() - t0
        # generate's own timeouts (rollout.timeout_s per call) bound this wait
        rollout_next, t_rollout = future.result() if future is not None else (None, 0.0)
        t_wait = time.perf_counter() - t0 - t_learn
    finally:
        pool.shutdown(wait=False)  # after a failure, the run ends: do not wait for the other side too
    discarded = system.rollout_incarnations != before and rollout_next is not None
    if discarded:  # a replacement was synced while the learner was changing the weights: sample again below
        rollout_next = None
    t_sync = timed_sync(system, version, spans)
    # time_rollout_s: the overlapped generate (the next step's rollout); time_overlap_wait_s: how long the learner's
    # side then waited for it (0 when the rollout finished first)
    return rollout_next, results, {"time_rollout_s": t_rollout, "time_learner_s": t_learn, "time_sync_s": t_sync,
                                   "time_overlap_wait_s": t_wait, "ahead_discarded": float(discarded)}


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
