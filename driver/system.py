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

Work is spread across rollout workers by load (driver/spread.py): the batch is cut into chunks of
``rollout.batch_size`` prompts and each chunk goes to whichever worker finishes first, so a slow worker takes fewer.

Faults (driver/rollout_faults.py): a rollout worker that dies is replaced and its lost work redone, within
``cluster.rollout.max_restarts``; a learner rank that dies fails the run at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from driver.placement import learner_group, on_bundle, pinned, rollout_group, worker_env
from driver.remote import (
    DEATH_REPORT_S,
    ClusterError,
    WorkerDied,
    actor_log,
    check_resources,
    check_weight_versions,
    chunk_seed,
    connect,
    first_death,
    free_ports,
    get,
    learner_died,
    on_assigned_gpu,
)
from driver.rollout_faults import Restarts, replace_actors
from driver.spread import chunk_slices, spread
from driver.sync_wait import RolloutsLost, SyncState, await_sync
from r2ec.config import Config
from r2ec.lora_delta import DeltaPlan
from r2ec.protocol import Rollout, StepResult, TrainShard, WarmupShard
from r2ec.weight_sync import SyncGroup


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
        self._sync: SyncState | None = None
        self._rollout_pgs: list = []  # one per rollout worker, kept for the run: a replacement lands on the same one
        self._rollout_env: dict[str, str] = {}
        self._incarnation: list[int] = []  # per rollout worker, +1 each time it is replaced
        self._restarts = Restarts(cfg.cluster.rollout.max_restarts, log)  # rollout-worker deaths and their events
        self._weight_version: int | None = None  # version of the last completed sync; None: initial weights
        self._sync_port_used = False
        self._weight_metas: list | None = None  # learner rank 0's, fixed for the run
        self._delta: DeltaPlan | None = None  # learner.weight_sync 'lora_delta': what a sync sends, fixed too

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
        """Connect, place and start every actor, and wait until all are ready."""
        cfg = self.cfg
        self._owns_ray = connect(cfg, self.log)
        check_resources(cfg)
        t0 = time.perf_counter()
        learner_pg = learner_group(cfg)
        self._pgs.append(learner_pg)
        master_addr, ds_port = self._probe_ports(learner_pg)
        learner_env, self._rollout_env = worker_env(cfg)
        if cfg.cluster.colocate:
            self._start_colocated(learner_pg, learner_env, master_addr, ds_port)
        else:
            self._start_learners(learner_pg, learner_env, master_addr, ds_port)
            self._start_rollouts()
        self._await_ready(t0)

    def _probe_ports(self, learner_pg) -> tuple[str, int]:
        """The learner node's address and a free port for DeepSpeed; a second free port is kept for the first
        weight-sync group."""
        import ray

        probe = ray.remote(num_cpus=0)(free_ports)
        master_addr, ds_port, sync_port = get(probe.options(scheduling_strategy=on_bundle(learner_pg, 0)).remote(),
                                              60, "probing the learner node for free ports")
        self._sync_addr = (master_addr, sync_port)
        return master_addr, ds_port

    def _start_colocated(self, learner_pg, learner_env: dict[str, str], master_addr: str, ds_port: int) -> None:
        """One actor per learner rank, holding the rank and its rollout engine (driver/colocated.py): it is learner
        rank r and rollout worker r at once. Not waited for."""
        import ray

        from driver.colocated import ColocatedWorker

        cfg, lr = self.cfg, self.cfg.cluster.learner
        Colocated = ray.remote(on_assigned_gpu(ColocatedWorker))
        self.learners = [
            Colocated.options(num_cpus=lr.cpus_per_worker, num_gpus=lr.gpus_per_worker,
                              scheduling_strategy=on_bundle(learner_pg, rank),
                              runtime_env={"env_vars": {**self._rollout_env, **learner_env}},
                              name=f"colocated-{rank}").remote(
                cfg.model, cfg.rollout, cfg.learner, cfg.recpo, rank, lr.num_workers, master_addr, ds_port,
                device=self.device, seed=cfg.run.seed, load_universal=self.load_universal, warmup_cfg=cfg.warmup,
                log_file=actor_log(cfg, f"colocated-{rank}"), cpu_affinity=pinned(lr, "learner", rank))
            for rank in range(lr.num_workers)
        ]
        self.rollouts = list(self.learners)
        self._incarnation = [0] * lr.num_workers

    def _start_learners(self, learner_pg, learner_env: dict[str, str], master_addr: str, ds_port: int) -> None:
        """The learner ranks, one per bundle of ``learner_pg``. Not waited for."""
        import ray

        from learner.worker import LearnerWorker

        cfg, lr = self.cfg, self.cfg.cluster.learner
        Learner = ray.remote(on_assigned_gpu(LearnerWorker))
        self.learners = [
            Learner.options(num_cpus=lr.cpus_per_worker, num_gpus=lr.gpus_per_worker,
                            scheduling_strategy=on_bundle(learner_pg, rank), runtime_env={"env_vars": learner_env},
                            name=f"learner-{rank}").remote(
                cfg.model, cfg.learner, cfg.recpo, rank, lr.num_workers, master_addr, ds_port, device=self.device,
                seed=cfg.run.seed, load_universal=self.load_universal, warmup_cfg=cfg.warmup,
                log_file=actor_log(cfg, f"learner-{rank}"), cpu_affinity=pinned(lr, "learner", rank))
            for rank in range(lr.num_workers)
        ]

    def _start_rollouts(self) -> None:
        """The rollout workers, each on a placement group of its own (kept for the run). Not waited for."""
        for i in range(self.cfg.cluster.rollout.num_workers):
            pg = rollout_group(self.cfg, i)
            self._pgs.append(pg)
            self._rollout_pgs.append(pg)
            self._incarnation.append(0)
            self.rollouts.append(self._start_rollout(i))

    def _await_ready(self, t0: float) -> None:
        """Wait until every actor is up (each wait bounded by its side's ``timeout_s``); log the layout."""
        cfg, c = self.cfg, self.cfg.cluster
        r, lr = c.rollout, c.learner
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

        from rollout.worker import RolloutWorker

        cfg, r = self.cfg, self.cfg.cluster.rollout
        gpus = r.gpus_per_worker if r.tensor_parallel_size == 1 else 0  # with TP, vLLM's own workers take them
        return ray.remote(on_assigned_gpu(RolloutWorker)).options(
            num_cpus=r.cpus_per_worker, num_gpus=gpus, scheduling_strategy=on_bundle(self._rollout_pgs[i], 0),
            runtime_env={"env_vars": self._rollout_env}, name=f"rollout-{i}").remote(
            cfg.model, cfg.rollout, cfg.run.seed, device=self.device, worker_index=i,
            tensor_parallel_size=r.tensor_parallel_size, own_process=True, log_file=actor_log(cfg, f"rollout-{i}"),
            cpu_affinity=pinned(r, "rollout", i))

    # ------------------------------------------------------------------------------------------ rollout faults
    @property
    def weight_version(self) -> int | None:
        """Version of the weights every rollout worker holds (the last ``sync_weights``); None before any sync,
        when they hold the initial weights. A replaced worker is brought back to it."""
        return self._weight_version

    @property
    def rollout_incarnations(self) -> int:
        """How many rollout workers have been started so far, replacements included: a change means one was
        replaced in between."""
        return sum(self._incarnation) + len(self._incarnation)

    def drain_events(self) -> list[dict]:
        """Fault events since the last call (rollout workers replaced), oldest first; each is also logged."""
        return self._restarts.drain()

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
        events = self._restarts.begin(dead, stuck or {}, call)
        t0 = time.perf_counter()
        which = sorted({*dead, *(stuck or {})})
        replace_actors(self.rollouts, self._incarnation, which, self._start_rollout, self.cfg.rollout.timeout_s)
        self._sync = None  # every member, survivors included, joins a new group at the next sync
        self._restarts.done(events, which, time.perf_counter() - t0)

    def _rollout_get(self, refs: list, timeout_s: float, what: str) -> list:
        """``get`` over one call per rollout worker (in worker order); a dead worker raises ``RolloutsLost``."""
        try:
            return get(refs, timeout_s, what, [f"rollout worker {i}" for i in range(len(refs))])
        except WorkerDied as e:
            raise RolloutsLost({e.index: e.reason}) from e

    # ------------------------------------------------------------------------------------------ rollout side
    def _spread(self, method: str, chunks: Sequence[tuple], what: str) -> tuple[list, list[int]]:
        """Run ``method(*chunk)`` for every chunk on the least-busy rollout worker (driver/spread.py); a worker that
        dies is replaced (:meth:`_recover`) and its chunk computed again elsewhere."""
        return spread(self.rollouts, self._incarnation, method, chunks, what, self.cfg.rollout.timeout_s,
                      self._recover)

    def generate(self, prompt_ids: list[list[int]], group_size: int, seed: int, weight_version: int) -> Rollout:
        """G chains per prompt, every one sampled by weights of ``weight_version`` (else a ClusterError naming the
        worker). Chunk j is sampled with ``chunk_seed(seed, j)`` whichever worker takes it, so a step's rollout
        depends on the weights, the prompts and ``seed`` only."""
        chunks = chunk_slices(len(prompt_ids), self.cfg.rollout.batch_size)
        parts, workers = self._spread("generate", [(prompt_ids[s], group_size, chunk_seed(seed, j))
                                                   for j, s in enumerate(chunks)], "generate")
        check_weight_versions([p.weight_version for p in parts], workers, weight_version)
        return Rollout.concat(parts)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> tuple[list, torch.Tensor]:
        chunks = chunk_slices(len(prompt_ids), self.cfg.eval.batch_size)
        parts, _ = self._spread("greedy", [(prompt_ids[s], max_new_tokens) for s in chunks], "greedy generation")
        return [c for chains, _ in parts for c in chains], torch.cat([h for _, h in parts])

    def encode_items(self, item_prompt_ids: list[list[int]]) -> torch.Tensor:
        chunks = [(item_prompt_ids[s],) for s in chunk_slices(len(item_prompt_ids), self.cfg.eval.item_batch_size)]
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
            except RolloutsLost as lost:
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
            if self._weight_metas is None and self.cfg.learner.weight_sync == "lora_delta":
                self._delta = self._learner_get([self.learners[0].delta_plan.remote()], "learner rank 0 delta_plan")[0]
                self._weight_metas = list(self._delta.metas)
            elif self._weight_metas is None:
                self._weight_metas = self._learner_get([self.learners[0].weight_metas.remote()],
                                                       "learner rank 0 weight_metas")[0]
            firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
            # Each join completes once learner rank 0 joins too, inside its broadcast_weights call (given a new
            # SyncGroup, rank 0 drops the old group and hosts this one).
            self._sync = SyncState(info, self._weight_metas, [a.join_sync_group.remote(info, f)
                                                              for a, f in zip(self.rollouts, firsts, strict=True)])
        s = self._sync
        joins, s.joins = s.joins, []
        send = [a.broadcast_weights.remote(s.info if rank == 0 else None, bucket)
                for rank, a in enumerate(self.learners)]
        recv = [a.receive_weights.remote(s.metas, bucket, version, self._delta) for a in self.rollouts]
        results = await_sync(s.info, send, joins, recv, timeout)
        sent, got = results[send[0]], [results[r] for r in recv]
        if any(g != sent for g in got):
            raise ClusterError(f"weight sync checksum mismatch: learner sent {sent!r}, rollout workers got {got}")
        return sent
