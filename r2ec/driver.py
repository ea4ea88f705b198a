"""Ray wiring: the one place that applies ``ray.remote``.

:class:`System` connects to Ray (an existing cluster from ``cluster.address`` / ``RAY_ADDRESS``, else an embedded
local Ray bound to 127.0.0.1), checks that the cluster can hold what the config asks for (fail fast, never hang),
reserves placement groups, starts the rollout workers and the learner ranks, and offers the few collective
operations the training loop needs: generate, encode items, train a step, broadcast weights. Every remote call
has a timeout (``rollout.timeout_s`` / ``learner.timeout_s``) and a timeout names the worker and the call.

Work is spread across rollout workers by load: the batch is cut into chunks of ``rollout.batch_size`` prompts and
each chunk goes to whichever worker finishes first (``ray.wait``), so a slow worker takes fewer chunks.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from r2ec.config import Config
from r2ec.protocol import Rollout, StepResult, TrainShard
from r2ec.weight_sync import SyncGroup


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this config (not enough resources, a worker died or timed out)."""


def _free_port() -> tuple[str, int, int]:
    """Runs on the learner's first bundle: this node's address and two free ports (DeepSpeed, weight sync)."""
    import ray

    ports = []
    socks = []
    host = ray.util.get_node_ip_address()
    for _ in range(2):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ray.util.get_node_ip_address(), ports[0], ports[1]


def chunk_seed(seed: int, chunk: int) -> int:
    """A sampling seed for chunk ``chunk`` of a call seeded ``seed`` (well mixed, so nearby seeds never collide)."""
    digest = hashlib.sha256(f"{seed}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def connect(cfg: Config, log: Callable[[str], Any] = print) -> bool:
    """Attach to a cluster or start an embedded local one. Returns True when this process started Ray."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if not address:
        # 127.0.0.1 only. _node_ip_address alone still leaves Ray's gRPC servers on every interface and its agents
        # on the external one; Ray's local-only mode puts every listener on 127.0.0.1. Ray reads the flag from the
        # environment when it is imported (so set it first) and its processes inherit it; if ray was imported
        # already, the module constant is set too (Ray 2.60; tests/test_train_ray.py checks the listeners).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if ray.is_initialized():
        return False
    if address:
        log(f"ray: attaching to {address}")
        ray.init(address=address, logging_level="WARNING")
        return False
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    num_cpus = cfg.cluster.local_num_cpus or os.cpu_count() or 1
    log(f"ray: starting an embedded local cluster on 127.0.0.1 ({num_cpus} logical CPUs)")
    # address="local": always a new cluster, never one that happens to run on this machine. No dashboard.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             object_store_memory=cfg.cluster.object_store_mb * 2**20, logging_level="WARNING")
    return True


def check_resources(cfg: Config) -> None:
    """Fail fast, with the arithmetic, when the cluster cannot hold the requested workers."""
    import ray

    r, lr = cfg.cluster.rollout, cfg.cluster.learner
    need = {
        "CPU": r.num_workers * r.cpus_per_worker + lr.num_workers * lr.cpus_per_worker,
        "GPU": r.num_workers * r.tensor_parallel_size * r.gpus_per_worker + lr.num_workers * lr.gpus_per_worker,
    }
    have = ray.cluster_resources()
    for res, amount in need.items():
        if amount > have.get(res, 0) + 1e-9:
            raise ClusterError(
                f"the config asks for {amount:g} {res}s but the Ray cluster has {have.get(res, 0):g}: "
                f"{r.num_workers} rollout worker(s) x {r.tensor_parallel_size} TP rank(s) x "
                f"{r.gpus_per_worker if res == 'GPU' else r.cpus_per_worker:g} {res} + {lr.num_workers} learner "
                f"rank(s) x {lr.gpus_per_worker if res == 'GPU' else lr.cpus_per_worker:g} {res}. "
                f"Lower cluster.rollout.num_workers / cluster.learner.num_workers or add nodes"
            )


def _placement_group(bundles: list[dict], strategy: str, timeout_s: float, what: str):
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(bundles, strategy=strategy)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise ClusterError(
            f"could not place the {what} ({bundles}, strategy {strategy}) within {timeout_s:g}s: the cluster has "
            f"the resources in total but not in this shape (cluster.placement_timeout_s)"
        )
    return pg


def get(refs, timeout_s: float, what: str):
    """``ray.get`` with a timeout that names what was waited for."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ClusterError(f"{what} did not finish within {timeout_s:g}s") from None
    except ray.exceptions.ActorDiedError as e:
        raise ClusterError(f"{what}: a worker died ({e})") from e


@dataclass
class _Sync:
    info: SyncGroup
    metas: list
    joins: list  # refs of the rollout workers' join calls, checked after the first broadcast


class System:
    """Rollout workers + learner ranks on placement groups. Use as a context manager."""

    def __init__(self, cfg: Config, device: str, log: Callable[[str], Any] = print):
        self.cfg = cfg
        self.device = device
        self.log = log
        self._owns_ray = False
        self._pgs: list = []
        self.rollouts: list = []
        self.learners: list = []
        self._sync: _Sync | None = None

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
        from rollout.worker import RolloutWorker

        cfg, c = self.cfg, self.cfg.cluster
        self._owns_ray = connect(cfg, self.log)
        check_resources(cfg)
        t0 = time.perf_counter()

        lr = c.learner
        learner_pg = _placement_group([{"CPU": lr.cpus_per_worker, "GPU": lr.gpus_per_worker}] * lr.num_workers,
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

        probe = ray.remote(num_cpus=0)(_free_port)
        master_addr, ds_port, sync_port = get(probe.options(scheduling_strategy=on(learner_pg, 0)).remote(),
                                              60, "probing the learner node for free ports")
        self._sync_addr = (master_addr, sync_port)
        learner_env = {"OMP_NUM_THREADS": str(lr.omp_threads), "TOKENIZERS_PARALLELISM": "false", **net_env}
        Learner = ray.remote(LearnerWorker)
        self.learners = [
            Learner.options(num_cpus=lr.cpus_per_worker, num_gpus=lr.gpus_per_worker,
                            scheduling_strategy=on(learner_pg, rank), runtime_env={"env_vars": learner_env},
                            name=f"learner-{rank}").remote(
                cfg.model, cfg.learner, cfg.recpo, rank, lr.num_workers, master_addr, ds_port, self.device,
                cfg.run.seed)
            for rank in range(lr.num_workers)
        ]

        r = c.rollout
        Rollout_ = ray.remote(RolloutWorker)
        rollout_env = {"TOKENIZERS_PARALLELISM": "false", **net_env,
                       "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                       "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.vllm.cpu_kvcache_space_gib)}
        for i in range(r.num_workers):
            # One group per worker: its tensor-parallel ranks must sit together, workers may spread out.
            pg = _placement_group([{"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}] * r.tensor_parallel_size,
                                  "PACK", c.placement_timeout_s, f"rollout worker {i}")
            self._pgs.append(pg)
            gpus = r.gpus_per_worker if r.tensor_parallel_size == 1 else 0  # with TP, vLLM's own workers take them
            self.rollouts.append(Rollout_.options(
                num_cpus=r.cpus_per_worker, num_gpus=gpus, scheduling_strategy=on(pg, 0),
                runtime_env={"env_vars": rollout_env}, name=f"rollout-{i}").remote(
                cfg.model, cfg.rollout, cfg.run.seed, self.device, i, r.tensor_parallel_size))
        get([a.ready.remote() for a in self.rollouts], cfg.rollout.timeout_s, "starting the rollout workers")
        get([a.ready.remote() for a in self.learners], cfg.learner.timeout_s, "starting the learner ranks")
        self.log(f"ray: {r.num_workers} rollout worker(s) ({cfg.rollout.engine}) and {lr.num_workers} learner "
                 f"rank(s) (ZeRO-{cfg.learner.zero_stage}) up in {time.perf_counter() - t0:.1f}s")

    # ------------------------------------------------------------------------------------------ rollout side
    def _spread(self, method: str, chunks: Sequence[tuple], what: str) -> list:
        """Run ``method(*chunk)`` for every chunk on the least-busy rollout worker; results in chunk order."""
        import ray

        timeout = self.cfg.rollout.timeout_s
        results: list = [None] * len(chunks)
        pending: dict = {}
        todo = list(range(len(chunks)))
        idle = list(range(len(self.rollouts)))
        while todo or pending:
            while todo and idle:
                w, j = idle.pop(0), todo.pop(0)
                pending[getattr(self.rollouts[w], method).remote(*chunks[j])] = (w, j)
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                stuck = sorted({w for w, _ in pending.values()})
                raise ClusterError(f"rollout worker(s) {stuck} did not finish {what} within {timeout:g}s")
            ref = done[0]
            w, j = pending.pop(ref)
            results[j] = get(ref, timeout, f"rollout worker {w} ({what})")
            idle.append(w)
        return results

    def _chunks(self, n: int, size: int) -> list[slice]:
        return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]

    def generate(self, prompt_ids: list[list[int]], group_size: int, seed: int) -> Rollout:
        """G chains per prompt. Chunk j is sampled with ``chunk_seed(seed, j)`` whichever worker takes it, so a
        step's rollout depends on the weights, the prompts and ``seed`` only."""
        chunks = self._chunks(len(prompt_ids), self.cfg.rollout.batch_size)
        parts = self._spread("generate", [(prompt_ids[s], group_size, chunk_seed(seed, j))
                                          for j, s in enumerate(chunks)], "generate")
        return Rollout.concat(parts)

    def greedy(self, prompt_ids: list[list[int]], max_new_tokens: int) -> tuple[list, torch.Tensor]:
        chunks = self._chunks(len(prompt_ids), self.cfg.eval.batch_size)
        parts = self._spread("greedy", [(prompt_ids[s], max_new_tokens) for s in chunks], "greedy generation")
        return [c for chains, _ in parts for c in chains], torch.cat([h for _, h in parts])

    def encode_items(self, item_prompt_ids: list[list[int]]) -> torch.Tensor:
        size = self.cfg.eval.item_batch_size
        chunks = [(item_prompt_ids[lo:lo + size],) for lo in range(0, len(item_prompt_ids), size)]
        return torch.cat(self._spread("encode_items", chunks, "item encoding"))

    # ------------------------------------------------------------------------------------------ learner side
    def set_items(self, item_prompt_ids: list[list[int]], table: torch.Tensor) -> None:
        import ray

        ref = ray.put(table)
        get([a.set_items.remote(item_prompt_ids, ref) for a in self.learners], self.cfg.learner.timeout_s,
            "sending the item table to the learner ranks")

    def train_step(self, shards: list[TrainShard]) -> list[StepResult]:
        return get([a.train_step.remote(s) for a, s in zip(self.learners, shards, strict=True)],
                   self.cfg.learner.timeout_s, "learner train_step")

    def sync_weights(self, version: int) -> int:
        """Broadcast learner rank 0's full weights to every rollout engine; verify the checksums agree."""
        timeout = self.cfg.learner.timeout_s
        bucket = self.cfg.learner.sync_bucket_mb * 2**20
        if self._sync is None:
            ranks = get([a.sync_ranks.remote() for a in self.rollouts], timeout, "asking rollout workers for ranks")
            backend = "nccl" if self.device == "cuda" else "gloo"
            info = SyncGroup(self._sync_addr[0], self._sync_addr[1], 1 + sum(ranks), backend, timeout)
            metas = get(self.learners[0].weight_metas.remote(), timeout, "learner rank 0 weight_metas")
            firsts = [1 + sum(ranks[:i]) for i in range(len(ranks))]
            # Each join completes once learner rank 0 joins too, inside its first broadcast_weights call.
            self._sync = _Sync(info, metas, [a.join_sync_group.remote(info, f)
                                             for a, f in zip(self.rollouts, firsts, strict=True)])
        s = self._sync
        send = [a.broadcast_weights.remote(s.info if rank == 0 else None, bucket)
                for rank, a in enumerate(self.learners)]
        recv = [a.receive_weights.remote(s.metas, bucket, version) for a in self.rollouts]
        sent = get(send, timeout, "learner weight broadcast")[0]
        got = get(recv, timeout, "rollout weight receive")
        if any(g != sent for g in got):
            raise ClusterError(f"weight sync checksum mismatch: learner sent {sent!r}, rollout workers got {got}")
        if s.joins:
            get(s.joins, timeout, "rollout workers joining the weight-sync group")
            s.joins = []
        return sent
