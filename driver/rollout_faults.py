"""Replacing dead rollout workers: the count of deaths and the restart events, and the new actors in the old places.

Faults. A rollout worker holds no state the run cannot rebuild (its weights are the learner's, its sampling seeds
come from the driver per chunk), so when one dies during any call it is replaced: a new actor on the same
placement group (reserved for the whole run), then a new weight-sync group for every rollout worker (a fresh port;
survivors and learner rank 0 drop the old group), then the current weights at the current version, then the lost
chunks again, which give the same results since their seeds are fixed. Each replacement is an event
(:meth:`driver.system.System.drain_events`); after ``cluster.rollout.max_restarts`` deaths the run fails. The
learner ranks are one DeepSpeed group and cannot be replaced mid-run: a dead rank fails the run at once (waits on
several ranks are fail-fast, so the survivors hanging in a collective with the dead rank do not hold it up), and
``r2ec train --resume auto`` continues from the last checkpoint.

The choreography (when to replace, re-syncing the weights, redoing the lost chunks) is ``System``'s, which owns the
actor lists; this module holds what needs no System.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from driver.remote import ClusterError, WorkerDied, get


class Restarts:
    """The rollout-worker deaths of the run, bounded by ``max_restarts``, and the restart events not drained yet."""

    def __init__(self, max_restarts: int, log: Callable[[str], Any]):
        self.limit = max_restarts
        self.log = log
        self.deaths = 0
        self._events: list[dict] = []

    def begin(self, dead: dict[int, str], stuck: dict[int, str], call: str) -> list[dict]:
        """Log and count the ``dead`` workers (a ClusterError once the deaths exceed ``max_restarts``) and log the
        ``stuck`` ones (replaced with them, not counted); their events, completed by :meth:`done`."""
        events = []
        for i, reason in dead.items():
            self.deaths += 1
            self.log(f"fault: rollout worker {i} died during {call} ({reason})")
            if self.deaths > self.limit:
                raise ClusterError(
                    f"rollout worker {i} died during {call} ({reason}); that is rollout-worker death "
                    f"{self.deaths} in this run, over cluster.rollout.max_restarts={self.limit}. Something keeps "
                    f"killing the rollout workers (out of memory? a failing node?); after fixing it, "
                    f"`r2ec train --resume auto` continues from the last checkpoint")
            events.append({"event": "rollout_restart", "worker": i, "call": call, "cause": "died", "reason": reason,
                           "time": time.time(), "deaths": self.deaths})
        for i, reason in stuck.items():
            self.log(f"fault: rollout worker {i} is replaced too: {reason}")
            events.append({"event": "rollout_restart", "worker": i, "call": call, "cause": "stuck", "reason": reason,
                           "time": time.time(), "deaths": self.deaths})
        return events

    def done(self, events: list[dict], which: list[int], elapsed: float) -> None:
        """The workers ``which`` are back after ``elapsed`` seconds: their ``events`` (from :meth:`begin`) are kept
        for :meth:`drain`."""
        for ev in events:
            ev["restart_s"] = elapsed
            self._events.append(ev)
        self.log(f"fault: rollout worker(s) {which} restarted in {elapsed:.1f}s "
                 f"({self.deaths}/{self.limit} deaths allowed so far)")

    def drain(self) -> list[dict]:
        """The events since the last call, oldest first."""
        events, self._events = self._events, []
        return events


def replace_actors(rollouts: list, incarnation: list[int], which: list[int], start: Callable[[int], Any],
                   timeout_s: float) -> None:
    """Kill rollout workers ``which`` and put new ones in their places in ``rollouts`` (``start(i)`` creates worker
    ``i``; its ``incarnation`` goes up by one), waited ready. A replacement that dies while starting fails the run."""
    import ray

    for i in which:
        try:
            ray.kill(rollouts[i], no_restart=True)
        except Exception:  # noqa: BLE001 - it is usually gone already
            pass
    for i in which:
        await_name_free(f"rollout-{i}")
        rollouts[i] = start(i)
        incarnation[i] += 1
    try:
        get([rollouts[i].ready.remote() for i in which], timeout_s, f"restarting rollout worker(s) {which}",
            [f"rollout worker {i}" for i in which])
    except WorkerDied as e:
        raise ClusterError(f"a replacement rollout worker died while starting ({e}); "
                           f"`r2ec train --resume auto` continues from the last checkpoint") from e


def await_name_free(name: str, timeout_s: float = 60.0) -> None:
    """Ray frees a killed actor's name a moment after the kill; the replacement reuses the name."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(name)
        except ValueError:
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"the killed rollout actor {name!r} still holds its name after {timeout_s:g}s")
        time.sleep(0.2)
