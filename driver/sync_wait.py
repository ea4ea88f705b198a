"""Waiting for one weight sync: learner rank 0's broadcast, the rollout workers' joins and receives, as Ray refs.

The choreography (which calls to make, when to build a new group, what to do when rollout workers are lost) is
:class:`driver.system.System`'s; this module only waits for the calls of one sync and sorts how each one ended:
a result, a learner rank's death (the run fails at once), a rollout worker's death (:class:`RolloutsLost`, after a
grace period for the survivors), or an error raised inside a call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from driver.remote import ClusterError, is_death, learner_died, reason_of
from r2ec.weight_sync import SyncGroup, request_abort


class RolloutsLost(Exception):
    """Rollout workers died during a weight sync (``dead``: index -> reason); ``stuck``: survivors left waiting
    inside the broken group (index -> reason), to be replaced with them."""

    def __init__(self, dead: dict[int, str], stuck: dict[int, str] | None = None):
        super().__init__(f"rollout worker(s) {sorted(dead)} died")
        self.dead, self.stuck = dead, stuck or {}


# After a rollout worker died in a weight sync and the learner ranks are done with the broadcast, how long the other
# rollout workers get to finish receiving before they are taken for stuck in the broken group.
_SYNC_GRACE_S = 20.0


@dataclass
class SyncState:
    """The current weight-sync group, kept between syncs until a rollout worker is replaced."""

    info: SyncGroup
    metas: list
    joins: list  # refs of the rollout workers' join calls, checked after the first broadcast


@dataclass
class _Finished:
    """What the calls of one sync that have finished so far said."""

    results: dict = field(default_factory=dict)  # ref -> the call's result
    dead: dict[int, str] = field(default_factory=dict)  # rollout worker -> reason
    errors: list[BaseException] = field(default_factory=list)
    aborted: bool = False  # the group's members were asked to give up (once, on the first death)


def await_sync(info: SyncGroup, send: list, joins: list, recv: list, timeout: float) -> dict:
    """Wait for every call of one sync (learner ranks' ``send``, rollout workers' ``joins`` and ``recv``); results by
    ref. Fail-fast on a dead learner rank. A dead rollout worker raises :class:`RolloutsLost`, once the learner ranks
    are done with the broadcast and the survivors had a grace period to finish: any still waiting then sits in a group
    that will not complete (gloo's broadcast leaves the others waiting when one member is gone) and is replaced too,
    rather than left hanging."""
    import ray

    labels = {**{r: ("learner", i) for i, r in enumerate(send)}, **{r: ("join", i) for i, r in enumerate(joins)},
              **{r: ("receive", i) for i, r in enumerate(recv)}}
    out = _Finished()
    sends_finished = 0
    send_done_at: float | None = None
    # The group's own timeout bounds every collective inside; the slack lets a timed-out member report back.
    deadline = time.monotonic() + timeout + _SYNC_GRACE_S
    pending = list(labels)
    while pending:
        now = time.monotonic()
        failed = bool(out.dead or out.errors) and send_done_at is not None
        if failed and now >= send_done_at + _SYNC_GRACE_S:
            break
        wait = deadline - now
        if failed:
            wait = min(wait, send_done_at + _SYNC_GRACE_S - now)
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, wait))
        if not done:
            if time.monotonic() >= deadline:
                waiting = sorted({f"{'learner rank' if k == 'learner' else 'rollout worker'} {i}"
                                  for k, i in (labels[r] for r in pending)})
                raise ClusterError(f"weight sync did not finish within {timeout:g}s (still waiting for "
                                   f"{', '.join(waiting)})")
            continue
        _collect(info, done[0], labels[done[0]], out, deadline)
        if labels[done[0]][0] == "learner":
            sends_finished += 1
            if sends_finished == len(send):
                send_done_at = time.monotonic()
    if out.dead:
        stuck = {i: f"left waiting in the weight-sync group after rollout worker(s) {sorted(out.dead)} died"
                 for k, i in (labels[r] for r in pending) if k != "learner" and i not in out.dead}
        raise RolloutsLost(out.dead, stuck)
    if out.errors:
        raise out.errors[0]
    return out.results


def _collect(info: SyncGroup, ref, label: tuple[str, int], out: _Finished, deadline: float) -> None:
    """Record how the finished call ``ref`` (``label``: its kind and the learner rank or rollout worker) ended: its
    result, a rollout worker's death (the first one asks the group to abort), or an error, sorted out once every call
    is in. A learner rank's death raises at once."""
    import ray

    kind, i = label
    try:
        out.results[ref] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))  # ready: at once
    except Exception as e:  # noqa: BLE001 - sorted below: a death here is expected, the rest re-raised
        if kind == "learner" and is_death(e):
            raise learner_died(i, "the weight broadcast", reason_of(e)) from e
        if kind != "learner" and is_death(e):
            call = "join_sync_group" if kind == "join" else "receive_weights"
            out.dead.setdefault(i, f"{reason_of(e)} (in {call})")
            if not out.aborted:
                # Learner rank 0 and the other receivers may be waiting on the dead member (on NCCL until the sync
                # timeout): ask every member to give up now, so the sync is redone at once.
                request_abort(info)
                out.aborted = True
        else:
            # Maybe a consequence (a broadcast to a member that just died fails): decided by await_sync.
            out.errors.append(e)
