"""Ray wiring: the one place that applies ``ray.remote``.

:class:`System` connects to Ray (an existing cluster from ``cluster.address`` / ``RAY_ADDRESS``, else an embedded
local Ray bound to 127.0.0.1), checks that the cluster can hold what the config asks for (fail fast, never hang),
reserves placement groups, starts the rollout workers and the learner ranks, and offers the few collective
operations the training loop needs: generate, encode items, train a step (RecPO or warm-up), broadcast weights.
Every remote call has a timeout (``rollout.timeout_s`` / ``learner.timeout_s``) and a timeout names the worker and
the call.

With ``cluster.colocate`` each learner rank's actor also holds that rank's rollout engine (``driver.colocated``): the
same actor is learner rank r and rollout worker r, a weight sync is each rank handing its own engine the weights
(no broadcast group), and a death of one is a learner rank's death.

Work is spread across rollout workers by load: the batch is cut into chunks of ``rollout.batch_size`` prompts and
each chunk goes to whichever worker finishes first (``ray.wait``), so a slow worker takes fewer chunks.

Faults. A rollout worker holds no state the run cannot rebuild (its weights are the learner's, its sampling seeds
come from the driver per chunk), so when one dies during any call it is replaced: a new actor on the same
placement group (reserved for the whole run), then a new weight-sync group for every rollout worker (a fresh port;
survivors and learner rank 0 drop the old group), then the current weights at the current version, then the lost
chunks again, which give the same results since their seeds are fixed. Each replacement is an event
(:meth:`System.drain_events`); after ``cluster.rollout.max_restarts`` deaths the run fails. The learner ranks are
one DeepSpeed group and cannot be replaced mid-run: a dead rank fails the run at once (waits on several ranks are
fail-fast, so the survivors hanging in a collective with the dead rank do not hold it up), and
``r2ec train --resume auto`` continues from the last checkpoint.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from driver.remote import (
    DEATH_REPORT_S,
    ClusterError,
    WorkerDied,
    check_resources,
    check_weight_versions,
    chunk_seed,
    connect,
    first_death,
    free_ports,
    get,
    is_death,
    learner_died,
    on_assigned_gpu,
    placement_group_ready,
    reason_of,
)
from r2ec.config import Config
from r2ec.protocol import Rollout, StepResult, TrainShard, WarmupShard
from r2ec.weight_sync import SyncGroup, request_abort


class _RolloutsLost(Exception):
    """Internal: rollout workers died during a weight sync (``dead``: index -> reason); ``stuck``: survivors left
    waiting inside the broken group (index -> reason), to be replaced with them."""

    def __init__(self, dead: dict[int, str], stuck: dict[int, str] | None = None):
        super().__init__(f"rollout worker(s) {sorted(dead)} died")
        self.dead, self.stuck = dead, stuck or {}


# After a rollout worker died in a weight sync and the learner ranks are done with the broadcast, how long the other
# rollout workers get to finish receiving before they are taken for stuck in the broken group.
_SYNC_GRACE_S = 20.0


@dataclass
class _Sync:
    info: SyncGroup
    metas: list
    joins: list  # refs of the rollout workers' join calls, checked after the first broadcast


class System:
    """Rollout workers + learner ranks on placement groups. Use as a context manager."""

    def __init__(self, cfg: Config, device: str, log: Callable[[str], Any] = print, load_universal: bool = False):
        self.cfg = cfg
        self.load_universal = load_universal  # the learner ranks will load a universal (re-sharded) checkpoint
        self.device = device
        self.log = log
        self._owns_ray = False
        self._pgs: list = []
        self.rollouts: list = []
        self.learners: list = []
        self._sync: _Sync | None = None
        self._rollout_pgs: list = []  # one per rollout worker, kept for the run: a replacement lands on the same one
        self._rollout_env: dict[str, str] = {}
        self._incarnation: list[int] = []  # per rollout worker, +1 each time it is replaced
        self._rollout_deaths = 0
        self._events: list[dict] = []
        self._weight_version: int | None = None  # version of the last completed sync; None: initial weights
        self._sync_port_used = False
        self._weight_metas: list | None = None  # learner rank 0's, fixed for the run

    # ------------------------------------------------------------------------------------------ start / stop
    def __enter__(self) -> System:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for a in self.rollouts + self.learners:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        for pg in self._pgs:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:  # noqa: BLE001
                pass
        if self._owns_ray:
            ray.shutdown()

    def _start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from learner.worker import LearnerWorker

        cfg, c = self.cfg, self.cfg.cluster
        self._owns_ray = connect(cfg, self.log)
        check_resources(cfg)
        t0 = time.perf_counter()

        lr = c.learner
        learner_pg = placement_group_ready([{"CPU": lr.cpus_per_worker, "GPU": lr.gpus_per_worker}] * lr.num_workers,
                                      "PACK", c.placement_timeout_s, f"{lr.num_workers} learner rank(s)")
        self._pgs.append(learner_pg)

        def on(pg, bundle: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)

        # A cluster on 127.0.0.1 keeps gloo there too (gloo otherwise binds the address the hostname resolves to).
        net_env = {}
        if ray.util.get_node_ip_address() == "127.0.0.1" and "GLOO_SOCKET_IFNAME" not in os.environ:
            loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
            if loopback:
                net_env["GLOO_SOCKET_IFNAME"] = loopback[0]

        probe = ray.remote(num_cpus=0)(free_ports)
        master_addr, ds_port, sync_port = get(probe.options(scheduling_strategy=on(learner_pg, 0)).remote(),
                                              60, "probing the learner node for free ports")
        self._sync_addr = (master_addr, sync_port)
        learner_env = {"OMP_NUM_THREADS": str(lr.omp_threads), "TOKENIZERS_PARALLELISM": "false", **net_env}
        self._rollout_env = {"TOKENIZERS_PARALLELISM": "false", **net_env,
                             "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                             "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.vllm.cpu_kvcache_space_gib)}
        if c.colocate:
            # One actor per learner rank, holding the rank and its rollout engine (driver/colocated.py): it is learner
            # rank r and rollout worker r at once.
            from driver.colocated import ColocatedWorker

            Colocated = ray.remote(on_assigned_gpu(ColocatedWorker))
            self.learners = [
                Colocated.options(num_cpus=lr.cpus_per_worker, num_gpus=lr.gpus_per_worker,
                                  scheduling_strategy=on(learner_pg, rank),
                                  runtime_env={"env_vars": {**self._rollout_env, **learner_env}},
                                  name=f"colocated-{rank}").remote(
                    cfg.model, cfg.rollout, cfg.learner, cfg.recpo, rank, lr.num_workers, master_addr, ds_port,
                    device=self.device, seed=cfg.run.seed, load_universal=self.load_universal, warmup_cfg=cfg.warmup)
                for rank in range(lr.num_workers)
            ]
            self.rollouts = list(self.learners)
            self._incarnation = [0] * lr.num_workers
        else:
            Learner = ray.remote(on_assigned_gpu(LearnerWorker))
            self.learners = [
                Learner.options(num_cpus=lr.cpus_per_worker, num_gpus=lr.gpus_per_worker,
                                scheduling_strategy=on(learner_pg, rank), runtime_env={"env_vars": learner_env},
                                name=f"learner-{rank}").remote(
                    cfg.model, cfg.learner, cfg.recpo, rank, lr.num_workers, master_addr, ds_port, device=self.device,
                    seed=cfg.run.seed, load_universal=self.load_universal, warmup_cfg=cfg.warmup)
                for rank in range(lr.num_workers)
            ]
            for i in range(c.rollout.num_workers):
                # One group per worker: its tensor-parallel ranks must sit together, workers may spread out.
                pg = placement_group_ready([{"CPU": c.rollout.cpus_per_worker, "GPU": c.rollout.gpus_per_worker}]
                                      * c.rollout.tensor_parallel_size, "PACK", c.placement_timeout_s,
                                      f"rollout worker {i}")
                self._pgs.append(pg)
                self._rollout_pgs.append(pg)
                self._incarnation.append(0)
                self.rollouts.append(self._start_rollout(i))
        r = c.rollout
        get([a.ready.remote() for a in self.rollouts], cfg.rollout.timeout_s, "starting the rollout workers",
            [f"rollout worker {i}" for i in range(r.num_workers)])
        get([a.ready.remote() for a in self.learners], cfg.learner.timeout_s, "starting the learner ranks")
        layout = "colocated in the learner ranks" if c.colocate else "own processes"
        self.log(f"ray: {r.num_workers} rollout worker(s) ({cfg.rollout.engine}, {layout}) and {lr.num_workers} "
                 f"learner rank(s) (ZeRO-{cfg.learner.zero_stage}) up in {time.perf_counter() - t0:.1f}s")

    def _start_rollout(self, i: int):
        """Create rollout worker ``i`` on its placement group (not waited for): at start-up, and to replace a dead
        one with the same options."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from rollout.worker import RolloutWorker

        cfg, r = self.cfg, self.cfg.cluster.rollout
        gpus = r.gpus_per_worker if r.tensor_parallel_size == 1 else 0  # with TP, vLLM's own workers take them
        return ray.remote(on_assigned_gpu(RolloutWorker)).options(
            num_cpus=r.cpus_per_worker, num_gpus=gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self._rollout_pgs[i],
                                                                 placement_group_bundle_index=0),
            runtime_env={"env_vars": self._rollout_env}, name=f"rollout-{i}").remote(
            cfg.model, cfg.rollout, cfg.run.seed, device=self.device, worker_index=i,
            tensor_parallel_size=r.tensor_parallel_size)

    # ------------------------------------------------------------------------------------------ rollout faults
    @property
    def weight_version(self) -> int | None:
        """Version of the weights every rollout worker holds (the last ``sync_weights``); None before any sync,
        when they hold the initial weights. A replaced worker is brought back to it."""
        return self._weight_version

    def drain_events(self) -> list[dict]:
        """Fault events since the last call (rollout workers replaced), oldest first; each is also logged."""
        events, self._events = self._events, []
        return events

    def restart_rollout(self, i: int, call: str, reason: str) -> None:
        """Replace rollout worker ``i`` (dead, or to be treated as dead) and bring every rollout worker back to the
        current weights on a new sync group. Counts against ``cluster.rollout.max_restarts``."""
        self._recover({i: reason}, call)

    def _recover(self, dead: dict[int, str], call: str) -> None:
        if self.cfg.cluster.colocate:  # the dead rollout worker was a learner rank too: no replacing it mid-run
            i, reason = next(iter(dead.items()))
            raise learner_died(i, call, reason)
        self._replace_rollouts(dead, call)
        if self._weight_version is not None:  # before any sync, a new worker's initial weights are current
            self._sync_weights(self._weight_version)

    def _replace_rollouts(self, dead: dict[int, str], call: str, stuck: dict[int, str] | None = None) -> None:
        """New actors for the ``dead`` workers (counted) and the ``stuck`` ones (killed by us, not counted), waited
        ready; the sync group is dropped, so the next sync builds a new one for everyone."""
        import ray

        limit = self.cfg.cluster.rollout.max_restarts
        events = []
        for i, reason in dead.items():
            self._rollout_deaths += 1
            self.log(f"fault: rollout worker {i} died during {call} ({reason})")
            if self._rollout_deaths > limit:
                raise ClusterError(
                    f"rollout worker {i} died during {call} ({reason}); that is rollout-worker death "
                    f"{self._rollout_deaths} in this run, over cluster.rollout.max_restarts={limit}. Something keeps "
                    f"killing the rollout workers (out of memory? a failing node?); after fixing it, "
                    f"`r2ec train --resume auto` continues from the last checkpoint")
            events.append({"event": "rollout_restart", "worker": i, "call": call, "cause": "died", "reason": reason,
                           "time": time.time(), "deaths": self._rollout_deaths})
        for i, reason in (stuck or {}).items():
            self.log(f"fault: rollout worker {i} is replaced too: {reason}")
            events.append({"event": "rollout_restart", "worker": i, "call": call, "cause": "stuck", "reason": reason,
                           "time": time.time(), "deaths": self._rollout_deaths})
        t0 = time.perf_counter()
        which = sorted({*dead, *(stuck or {})})
        for i in which:
            try:
                ray.kill(self.rollouts[i], no_restart=True)
            except Exception:  # noqa: BLE001 - it is usually gone already
                pass
        for i in which:
            self._await_name_free(f"rollout-{i}")
            self.rollouts[i] = self._start_rollout(i)
            self._incarnation[i] += 1
        try:
            get([self.rollouts[i].ready.remote() for i in which], self.cfg.rollout.timeout_s,
                f"restarting rollout worker(s) {which}", [f"rollout worker {i}" for i in which])
        except WorkerDied as e:
            raise ClusterError(f"a replacement rollout worker died while starting ({e}); "
                               f"`r2ec train --resume auto` continues from the last checkpoint") from e
        self._sync = None  # every member, survivors included, joins a new group at the next sync
        elapsed = time.perf_counter() - t0
        for ev in events:
            ev["restart_s"] = elapsed
            self._events.append(ev)
        self.log(f"fault: rollout worker(s) {which} restarted in {elapsed:.1f}s "
                 f"({self._rollout_deaths}/{limit} deaths allowed so far)")

    def _await_name_free(self, name: str, timeout_s: float = 60.0) -> None:
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

    def _rollout_get(self, refs: list, timeout_s: float, what: str) -> list:
        """``get`` over one call per rollout worker (in worker order); a dead worker raises ``_RolloutsLost``."""
        try:
            return get(refs, timeout_s, what, [f"rollout worker {i}" for i in range(len(refs))])
        except WorkerDied as e:
            raise _RolloutsLost({e.index: e.reason}) from e

    # ------------------------------------------------------------------------------------------ rollout side
    def _spread(self, method: str, chunks: Sequence[tuple], what: str) -> tuple[list, list[int]]:
        """Run ``method(*chunk)`` for every chunk on the least-busy rollout worker; the results in chunk order and the
        index of the worker that computed each.

        A worker that dies is replaced (:meth:`_recover`) and its chunk goes back to the queue; chunks already done
        by others are kept, so every chunk is computed and counted once."""
        import ray

        timeout = self.cfg.rollout.timeout_s
        results: list = [None] * len(chunks)
        workers = [-1] * len(chunks)
        pending: dict = {}  # ref -> (worker, chunk, the worker's incarnation when the chunk was sent)
        todo = list(range(len(chunks)))
        idle = list(range(len(self.rollouts)))
        while todo or pending:
            while todo and idle:
                w, j = idle.pop(0), todo.pop(0)
                pending[getattr(self.rollouts[w], method).remote(*chunks[j])] = (w, j, self._incarnation[w])
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                stuck = sorted({w for w, _, _ in pending.values()})
                raise ClusterError(f"rollout worker(s) {stuck} did not finish {what} within {timeout:g}s")
            ref = done[0]
            w, j, incarnation = pending.pop(ref)
            try:
                results[j] = get(ref, timeout, f"rollout worker {w} ({what})", [f"rollout worker {w}"])
                workers[j] = w
            except WorkerDied as e:
                todo.insert(0, j)  # its seed is fixed by the driver: the same result wherever it runs next
                # A recovery in between (a sync finds dead workers itself) may have replaced this one already.
                if incarnation == self._incarnation[w]:
                    self._recover({w: e.reason}, what)
            idle.append(w)
        return results, workers

    def _chunks(self, n: int, size: int) -> list[slice]:
        return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def generate(self, prompt_ids: list[list[int]], group_size: int, seed: int, weight_version: int) -> Rollout:
        """G chains per prompt, every one sampled by weights of ``weight_version`` (else a ClusterError naming the
        worker). Chunk j is sampled with ``chunk_seed(seed, j)`` whichever worker takes it, so a step's rollout
        depends on the weights, the prompts and ``seed`` only."""
        chunks = self._chunks(len(prompt_ids), self.cfg.rollout.batch_size)
        parts, workers = self._spread("generate", [(prompt_ids[s], group_size, chunk_seed(seed, j))
                                                   for j, s in enumerate(chunks)], "generate")
        check_weight_versions([p.weight_version for p in parts], workers, weight_version)
        return Rollout.concat(parts)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> tuple[list, torch.Tensor]:
        chunks = self._chunks(len(prompt_ids), self.cfg.eval.batch_size)
        parts, _ = self._spread("greedy", [(prompt_ids[s], max_new_tokens) for s in chunks], "greedy generation")
        return [c for chains, _ in parts for c in chains], torch.cat([h for _, h in parts])

    def encode_items(self, item_prompt_ids: list[list[int]]) -> torch.Tensor:
        chunks = [(item_prompt_ids[s],) for s in self._chunks(len(item_prompt_ids), self.cfg.eval.item_batch_size)]
        return torch.cat(self._spread("encode_items", chunks, "item encoding")[0])

    # ------------------------------------------------------------------------------------------ learner side
    def _learner_get(self, refs: list, what: str) -> list:
        """``get`` over one call per learner rank (in rank order), fail-fast; a dead rank ends the run with a
        ClusterError that names it: the ranks are one DeepSpeed group, there is no replacing one mid-run."""
        try:
            return get(refs, self.cfg.learner.timeout_s, what, [f"learner rank {r}" for r in range(len(refs))])
        except WorkerDied as e:
            raise learner_died(e.index, what, e.reason) from e
        except ClusterError:
            raise
        except Exception as e:
            # A rank's collective can fail ("connection closed by peer") before Ray reports the peer's death: name
            # the dead rank, the cause, rather than the rank that noticed.
            died = first_death(refs, DEATH_REPORT_S)
            if died is not None:
                raise learner_died(died[0], what, died[1]) from e
            raise

    def set_items(self, item_prompt_ids: list[list[int]], table: torch.Tensor) -> None:
        import ray

        ref = ray.put(table)
        self._learner_get([a.set_items.remote(item_prompt_ids, ref) for a in self.learners],
                          "sending the item table to the learner ranks")

    def train_step(self, shards: list[TrainShard]) -> list[StepResult]:
        return self._learner_get([a.train_step.remote(s) for a, s in zip(self.learners, shards, strict=True)],
                                 "learner train_step")

    def warmup_step(self, shards: list[WarmupShard]) -> list[StepResult]:
        """One warm-up optimiser step, one shard per learner rank (collective, like ``train_step``)."""
        return self._learner_get([a.warmup_step.remote(s) for a, s in zip(self.learners, shards, strict=True)],
                                 "learner warmup_step")

    def save_checkpoint(self, learner_dir: str) -> None:
        """Every learner rank writes its DeepSpeed shards and RNG states under ``learner_dir`` (collective)."""
        self._learner_get([a.save_checkpoint.remote(learner_dir) for a in self.learners], "learner save_checkpoint")

    def load_checkpoint(self, learner_dir: str, universal_dir: str | None) -> list[dict]:
        """Every learner rank loads ``learner_dir`` (or its universal conversion) (collective)."""
        return self._learner_get([a.load_checkpoint.remote(learner_dir, universal_dir) for a in self.learners],
                                 "learner load_checkpoint")

    def sync_weights(self, version: int) -> int:
        """Broadcast learner rank 0's full weights to every rollout engine; verify the checksums agree.

        A rollout worker that dies during the sync is replaced and the sync redone for every worker on a new
        group (bounded by ``cluster.rollout.max_restarts``); a learner rank that dies fails the run at once.
        Colocated, each learner rank hands its own engine the weights instead (driver/colocated.py)."""
        if self.cfg.cluster.colocate:
            return self._sync_colocated(version)
        return self._sync_weights(version)

    def _sync_colocated(self, version: int) -> int:
        pairs = self._learner_get([a.sync_weights.remote(version) for a in self.learners],
                                  "colocated weight hand-off")
        for rank, (sent, got) in enumerate(pairs):
            if sent != got:
                raise ClusterError(f"colocated weight hand-off checksum mismatch on learner rank {rank}: the learner "
                                   f"wrote {sent!r}, its rollout engine read {got!r}")
        self._weight_version = version
        return pairs[0][0] or 0

    def _sync_weights(self, version: int) -> int:
        while True:
            try:
                sent = self._sync_once(version)
            except _RolloutsLost as lost:
                self._replace_rollouts(lost.dead, "weight sync", lost.stuck)
                continue
            self._weight_version = version
            return sent

    def _sync_once(self, version: int) -> int:
        timeout = self.cfg.learner.timeout_s
        bucket = self.cfg.learner.sync_bucket_mb * 2**20
        # A rollout worker that died since its last call is found here, before learner rank 0 enters a rendezvous
        # or a broadcast that would wait for it until the group's timeout. It also waits for calls still running
        # on the workers (a recovery in the middle of a generate), so the sync starts on idle workers.
        self._rollout_get([a.ready.remote() for a in self.rollouts], self.cfg.rollout.timeout_s,
                          "weight sync: checking the rollout workers")
        if self._sync is None:
            ranks = self._rollout_get([a.sync_ranks.remote() for a in self.rollouts], timeout,
                                      "asking rollout workers for ranks")
            if self._sync_port_used:
                # A rebuilt group gets a port of its own: nothing of the old group's store can answer on it.
                addr, port = self._learner_get([self.learners[0].sync_address.remote()],
                                               "learner rank 0 sync_address")[0]
            else:
                addr, port = self._sync_addr
                self._sync_port_used = True
            backend = "nccl" if self.device == "cuda" else "gloo"
            info = SyncGroup(addr, port, 1 + sum(ranks), backend, self.cfg.learner.sync_timeout_s)
            if self._weight_metas is None:
                self._weight_metas = self._learner_get([self.learners[0].weight_metas.remote()],
                                                       "learner rank 0 weight_metas")[0]
            firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
            # Each join completes once learner rank 0 joins too, inside its broadcast_weights call (given a new
            # SyncGroup, rank 0 drops the old group and hosts this one).
            self._sync = _Sync(info, self._weight_metas, [a.join_sync_group.remote(info, f)
                                                          for a, f in zip(self.rollouts, firsts, strict=True)])
        s = self._sync
        joins, s.joins = s.joins, []
        send = [a.broadcast_weights.remote(s.info if rank == 0 else None, bucket)
                for rank, a in enumerate(self.learners)]
        recv = [a.receive_weights.remote(s.metas, bucket, version) for a in self.rollouts]
        results = self._await_sync(s.info, send, joins, recv, timeout)
        sent, got = results[send[0]], [results[r] for r in recv]
        if any(g != sent for g in got):
            raise ClusterError(f"weight sync checksum mismatch: learner sent {sent!r}, rollout workers got {got}")
        return sent

    def _await_sync(self, info: SyncGroup, send: list, joins: list, recv: list, timeout: float) -> dict:
        """Wait for every call of one sync; results by ref. Fail-fast on a dead learner rank. A dead rollout worker
        raises ``_RolloutsLost``, once the learner ranks are done with the broadcast and the survivors had a grace
        period to finish: any still waiting then sits in a group that will not complete (gloo's broadcast leaves
        the others waiting when one member is gone) and is replaced too, rather than left hanging."""
        import ray

        labels = {**{r: ("learner", i) for i, r in enumerate(send)}, **{r: ("join", i) for i, r in enumerate(joins)},
                  **{r: ("receive", i) for i, r in enumerate(recv)}}
        results: dict = {}
        dead: dict[int, str] = {}
        errors: list[BaseException] = []
        finished_send = set()
        aborted: list = []
        send_done_at: float | None = None
        # The group's own timeout bounds every collective inside; the slack lets a timed-out member report back.
        deadline = time.monotonic() + timeout + _SYNC_GRACE_S
        pending = list(labels)
        while pending:
            now = time.monotonic()
            if (dead or errors) and send_done_at is not None and now >= send_done_at + _SYNC_GRACE_S:
                break
            wait = deadline - now
            if (dead or errors) and send_done_at is not None:
                wait = min(wait, send_done_at + _SYNC_GRACE_S - now)
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, wait))
            if not done:
                if time.monotonic() >= deadline:
                    waiting = sorted({f"{'learner rank' if k == 'learner' else 'rollout worker'} {i}"
                                      for k, i in (labels[r] for r in pending)})
                    raise ClusterError(f"weight sync did not finish within {timeout:g}s (still waiting for "
                                       f"{', '.join(waiting)})")
                continue
            ref = done[0]
            kind, i = labels[ref]
            try:
                results[ref] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))  # ready: at once
            except Exception as e:  # noqa: BLE001 - sorted below: a death here is expected, the rest re-raised
                if kind == "learner" and is_death(e):
                    raise learner_died(i, "the weight broadcast", reason_of(e)) from e
                if kind != "learner" and is_death(e):
                    call = "join_sync_group" if kind == "join" else "receive_weights"
                    dead.setdefault(i, f"{reason_of(e)} (in {call})")
                    if not aborted:
                        # Learner rank 0 and the other receivers may be waiting on the dead member (on NCCL until
                        # the sync timeout): ask every member to give up now, so the sync is redone at once.
                        aborted.append(request_abort(info))
                else:
                    # Maybe a consequence (a broadcast to a member that just died fails): decided below.
                    errors.append(e)
            if kind == "learner":
                finished_send.add(ref)
                if len(finished_send) == len(send):
                    send_done_at = time.monotonic()
        if dead:
            stuck = {i: f"left waiting in the weight-sync group after rollout worker(s) {sorted(dead)} died"
                     for k, i in (labels[r] for r in pending) if k != "learner" and i not in dead}
            raise _RolloutsLost(dead, stuck)
        if errors:
            raise errors[0]
        return results
