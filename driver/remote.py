"""Ray primitives the System is built from: connecting (an embedded cluster on 127.0.0.1, or an existing one),
checking and reserving resources, placing a worker on the GPU Ray assigned, waiting for remote calls with a timeout
that names what was waited for, and telling a worker's death from an error raised inside a call.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from driver.console import logs_dir
from r2ec.config import Config


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this config (not enough resources, a worker died or timed out)."""


def free_ports() -> tuple[str, int, int]:
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


def check_weight_versions(versions: Sequence[int], workers: Sequence[int], expected: int) -> None:
    """Every chunk of a step's rollout must come from the weights the step is defined on (RecPO's old policy is the
    sampler's; a chunk from other weights would be trained on with the wrong ratio). ``versions[j]`` is the weight
    version worker ``workers[j]`` reported with chunk j."""
    for v, w in zip(versions, workers, strict=True):
        if v != expected:
            raise ClusterError(f"rollout worker {w} sampled with the weights of version {v}, expected version "
                               f"{expected} (the weights after step {expected}): its weight sync was lost")


def local_cuda_index(gpu_ids: Sequence, visible: str | None) -> int:
    """This process's CUDA index of the first GPU Ray assigned it (``ray.get_gpu_ids()``). Ray normally narrows
    CUDA_VISIBLE_DEVICES to the assigned GPUs (index 0); with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 every GPU
    stays visible and the assigned one is wherever its id sits in that list (its id itself when the list is unset)."""
    if not gpu_ids:
        raise ClusterError("a GPU worker started without a GPU assigned by Ray (ray.get_gpu_ids() is empty)")
    gpu = str(gpu_ids[0])
    if not visible:
        return int(gpu)
    shown = [v.strip() for v in visible.split(",")]
    if gpu not in shown:
        raise ClusterError(f"Ray assigned GPU {gpu}, which CUDA_VISIBLE_DEVICES={visible!r} hides from this process")
    return shown.index(gpu)


def redirect_output(path: str, name: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ logs and the child processes it
    starts, vLLM's engine core included, follow) to ``path``, appended: a replaced worker continues its file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"===== {name}: pid {os.getpid()} on {socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M:%S')} =====",
          flush=True)


def actor_log(cfg: Config, name: str) -> str | None:
    """The file actor ``name`` writes its output to with ``run.worker_logs: file`` (in ``driver.console.logs_dir``,
    resolved on the driver), or None to leave it to Ray's own log streaming."""
    folder = logs_dir(cfg)
    return None if folder is None else str(folder / f"{name}.log")


def pin_to_cores(cores: Sequence[int], field: str) -> None:
    """Pin every thread of this process to ``cores`` (``cluster.*.cpu_affinity``); threads and processes started
    afterwards inherit the mask. Linux's sched_setaffinity(0) pins the calling thread only, hence each task id."""
    allowed = os.sched_getaffinity(0)
    missing = sorted(set(cores) - allowed)
    if missing:
        raise ClusterError(f"{field}: core(s) {missing} are not available to this process on "
                           f"{socket.gethostname()} (it may run on {sorted(allowed)})")
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), set(cores))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def on_assigned_gpu(cls: type) -> type:
    """``cls`` (a plain worker class taking ``device``) as a Ray actor class whose device "cuda" becomes "cuda:N",
    the GPU Ray assigned to the actor, resolved inside the actor's process; given ``log_file``, the actor's output
    goes there first (``redirect_output``); given ``cpu_affinity`` (cores and the field that named them), the process
    is pinned to them before the worker starts (``pin_to_cores``)."""

    class Actor(cls):
        def __init__(self, *args, device: str, log_file: str | None = None,
                     cpu_affinity: tuple[list[int], str] | None = None, **kwargs):
            import ray

            if log_file is not None:
                redirect_output(log_file, type(self).__name__)
            if cpu_affinity is not None:
                pin_to_cores(*cpu_affinity)
            gpu_ids = ray.get_gpu_ids()  # none for a vLLM worker with tensor parallelism: vLLM places its own ranks
            if device == "cuda" and gpu_ids:
                device = f"cuda:{local_cuda_index(gpu_ids, os.environ.get('CUDA_VISIBLE_DEVICES'))}"
            super().__init__(*args, device=device, **kwargs)

    Actor.__name__ = Actor.__qualname__ = cls.__name__
    return Actor


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
    # run.worker_logs "file": each actor writes its own log in the run folder (actor_log), so nothing streams here,
    # and Ray leaves the driver's logging to driver.console.library_logs
    to_driver = cfg.run.worker_logs == "console"
    if address:
        log(f"ray: attaching to {address}")
        ray.init(address=address, logging_level="WARNING", log_to_driver=to_driver, configure_logging=to_driver)
        return False
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    num_cpus = cfg.cluster.local_num_cpus or os.cpu_count() or 1
    log(f"ray: starting an embedded local cluster on 127.0.0.1 ({num_cpus} logical CPUs)")
    # address="local": always a new cluster, never one that happens to run on this machine. No dashboard.
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus,
             object_store_memory=cfg.cluster.object_store_mb * 2**20, logging_level="WARNING",
             log_to_driver=to_driver, configure_logging=to_driver)
    return True


def check_resources(cfg: Config) -> None:
    """Fail fast, with the arithmetic, when the cluster cannot hold the requested workers."""
    import ray

    r, lr = cfg.cluster.rollout, cfg.cluster.learner
    rollout_share = 0 if cfg.cluster.colocate else 1  # colocated engines run on the learner ranks' resources
    need = {
        "CPU": rollout_share * r.num_workers * r.cpus_per_worker + lr.num_workers * lr.cpus_per_worker,
        "GPU": rollout_share * r.num_workers * r.tensor_parallel_size * r.gpus_per_worker
        + lr.num_workers * lr.gpus_per_worker,
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


def placement_group_ready(bundles: list[dict], strategy: str, timeout_s: float, what: str):
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


class WorkerDied(ClusterError):
    """A worker died (or became unreachable) while a call on it was awaited; ``index`` is its ref's position."""

    def __init__(self, message: str, index: int, name: str, reason: str):
        super().__init__(message)
        self.index, self.name, self.reason = index, name, reason


def is_death(e: BaseException) -> bool:
    """Whether a failed call means its worker is gone (as opposed to an exception raised by the call itself)."""
    import ray

    if isinstance(e, ray.exceptions.RayActorError):  # ActorDiedError, ActorUnavailableError
        return True
    # vLLM's engine process died under a live actor: the worker can serve nothing more, as if it had died.
    return any(c.__name__ == "EngineDeadError" for c in type(e).__mro__)


def reason_of(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def get(refs, timeout_s: float, what: str, names: Sequence[str] | None = None):
    """``ray.get`` with a timeout that names what was waited for.

    A list is waited for fail-fast (a ``ray.wait`` loop): the first call that fails raises at once, even while
    others still run, e.g. learner ranks stuck in a collective with a rank that just died (``ray.get`` on the list
    would wait for them, up to the collective's timeout). A dead or unreachable worker raises :class:`WorkerDied`;
    an exception raised inside a call propagates as Ray raises it. ``names`` (one per ref) label the workers."""
    import ray

    single = not isinstance(refs, (list, tuple))
    refs_ = [refs] if single else list(refs)
    labels = list(names) if names is not None else (["a worker"] if single else [f"call {i}" for i in
                                                                                  range(len(refs_))])
    position = {ref: i for i, ref in enumerate(refs_)}
    results: list = [None] * len(refs_)
    pending = list(refs_)
    deadline = time.monotonic() + timeout_s
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            waiting = f" (still waiting for {', '.join(labels[position[r]] for r in pending)})" if names else ""
            raise ClusterError(f"{what} did not finish within {timeout_s:g}s{waiting}")
        for ref in done:
            i = position[ref]
            try:
                results[i] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))  # ready: returns at once
            except ray.exceptions.GetTimeoutError:
                raise ClusterError(f"{what} did not finish within {timeout_s:g}s") from None
            except Exception as e:
                if is_death(e):
                    raise WorkerDied(f"{what}: {labels[i]} died ({reason_of(e)})", i, labels[i], reason_of(e)) from e
                raise
    return results[0] if single else results


# How long to look for a dead worker behind a call that failed with an ordinary exception (Ray reports a killed
# actor within about a second; its peers in a collective may notice first).
DEATH_REPORT_S = 5.0


def first_death(refs: list, timeout_s: float) -> tuple[int, str] | None:
    """(index, reason) of a ref among ``refs`` whose call ended with its worker's death within ``timeout_s``."""
    import ray

    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    for i, ref in enumerate(refs):
        if ref in ready:
            try:
                ray.get(ref, timeout=1)
            except Exception as e:  # noqa: BLE001 - only deaths matter here
                if is_death(e):
                    return i, reason_of(e)
    return None


def learner_died(rank: int, what: str, reason: str) -> ClusterError:
    return ClusterError(
        f"learner rank {rank} died during {what} ({reason}). The learner ranks train as one DeepSpeed group and "
        f"cannot be replaced mid-run: `r2ec train --resume auto` continues from the last checkpoint")
