"""Where the actors go and the environment they start with: the placement groups (reserved for the whole run, so a
replaced rollout worker lands where the dead one was), the scheduling strategy onto one bundle, and the worker
processes' environment variables and CPU pinning. ``driver.system`` creates the actors on them.
"""

from __future__ import annotations

import os
import socket

from driver.remote import placement_group_ready
from r2ec.config import Config


def on_bundle(pg, bundle: int):
    """The scheduling strategy that puts an actor on bundle ``bundle`` of placement group ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)


def learner_group(cfg: Config):
    """One placement group for all learner ranks, a bundle per rank, packed; waited ready (else a ClusterError)."""
    c = cfg.cluster
    lr = c.learner
    return placement_group_ready([{"CPU": lr.cpus_per_worker, "GPU": lr.gpus_per_worker}] * lr.num_workers,
                                 "PACK", c.placement_timeout_s, f"{lr.num_workers} learner rank(s)")


def rollout_group(cfg: Config, i: int):
    """The placement group of rollout worker ``i``, waited ready. One group per worker: its tensor-parallel ranks must
    sit together, workers may spread out."""
    c = cfg.cluster
    return placement_group_ready([{"CPU": c.rollout.cpus_per_worker, "GPU": c.rollout.gpus_per_worker}]
                                 * c.rollout.tensor_parallel_size, "PACK", c.placement_timeout_s,
                                 f"rollout worker {i}")


def pinned(section, side: str, index: int) -> tuple[list[int], str] | None:
    """The ``cpu_affinity`` argument of worker ``index`` of ``cluster.<side>``: its cores and the field naming them
    (for the error a core missing on its node raises), or None when not pinned."""
    field = f"cluster.{side}.cpu_affinity"
    cores = section.cores_of(index, field)
    return None if cores is None else (cores, field)


def worker_env(cfg: Config) -> tuple[dict[str, str], dict[str, str]]:
    """The environment variables of the learner ranks and of the rollout workers (Ray must be connected)."""
    import ray

    # A cluster on 127.0.0.1 keeps gloo there too (gloo otherwise binds the address the hostname resolves to).
    net_env = {}
    if ray.util.get_node_ip_address() == "127.0.0.1" and "GLOO_SOCKET_IFNAME" not in os.environ:
        loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
        if loopback:
            net_env["GLOO_SOCKET_IFNAME"] = loopback[0]
    learner_env = {"OMP_NUM_THREADS": str(cfg.cluster.learner.omp_threads), "TOKENIZERS_PARALLELISM": "false",
                   **net_env}
    rollout_env = {"TOKENIZERS_PARALLELISM": "false", **net_env,
                   "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
                   "VLLM_CPU_KVCACHE_SPACE": str(cfg.rollout.vllm.cpu_kvcache_space_gib)}
    return learner_env, rollout_env
