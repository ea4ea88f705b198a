"""The ``cluster`` config section: where the rollout workers and learner ranks run (Ray placement), apart from
what they compute. Part of the one schema in ``r2ec.config``, which imports it (``from r2ec.config import
ClusterConfig`` works as before).
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from r2ec.config_base import Section

AFFINITY_HELP = ("CPU pinning: the cores each {what} process (and every process it starts) is pinned to, "
                 "os.sched_setaffinity on every thread; one group for all {what}s or one per {what} separated by "
                 "'|' ('0', '0-3', '0,2|1,3'), node-local core ids. null = not pinned (the OS schedules). {more}")


def parse_cores(spec: str, field: str) -> list[list[int]]:
    """A ``cpu_affinity`` spec as core groups: '0-1,4|2-3' -> [[0, 1, 4], [2, 3]]; a one-line error naming ``field``
    for anything else."""
    groups = []
    for group in spec.split("|"):
        cores: set[int] = set()
        for part in group.split(","):
            lo, sep, hi = part.strip().partition("-")
            if not (lo.isdigit() and (hi.isdigit() if sep else True)) or (sep and int(hi) < int(lo)):
                raise ValueError(f"{field}: {part.strip()!r} in {spec!r} is not a core id or range; expected groups "
                                 "of core ids and ranges separated by '|', such as '0', '0-3' or '0,2|1,3'")
            cores.update(range(int(lo), int(hi if sep else lo) + 1))
        groups.append(sorted(cores))
    return groups


class _Pinned(Section):
    """The ``cpu_affinity`` field of a side's workers (``num_workers`` of them)."""

    @field_validator("cpu_affinity", mode="before", check_fields=False)
    @classmethod
    def _as_text(cls, value):
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML's `1`

    def cores_of(self, index: int, field: str) -> list[int] | None:
        """The cores worker ``index`` is pinned to, or None."""
        if self.cpu_affinity is None:
            return None
        groups = parse_cores(self.cpu_affinity, field)
        return groups[index if len(groups) > 1 else 0]

    def _check_affinity(self, field: str) -> None:
        if self.cpu_affinity is not None:
            n = len(parse_cores(self.cpu_affinity, field))
            if n not in (1, self.num_workers):
                raise ValueError(f"{field} {self.cpu_affinity!r} has {n} groups for {self.num_workers} workers: give "
                                 "one group for all of them or one per worker")


class RolloutWorkersConfig(_Pinned):
    num_workers: int = Field(1, ge=1, description="rollout engines; with cluster.colocate, one inside each learner "
                             "rank, so it must equal cluster.learner.num_workers")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker, 0 or 1; with tensor parallelism, per TP "
                                   "rank. Not used with cluster.colocate (the engine runs on its learner rank's GPU)")
    cpus_per_worker: float = Field(1, ge=0, description="CPUs per worker. Not used with cluster.colocate (the engine "
                                   "runs in its learner rank's process, on that rank's CPUs)")
    tensor_parallel_size: int = Field(1, ge=1)
    max_restarts: int = Field(3, ge=0, description="rollout workers restarted after dying, per run, before failing")
    cpu_affinity: str | None = Field(None, description=AFFINITY_HELP.format(
        what="rollout worker", more="vLLM's engine processes inherit it (not the Ray workers of vLLM tensor "
        "parallelism), and rollout.vllm.cpu_threads_bind 'all' then means these cores. Not used with "
        "cluster.colocate (use cluster.learner.cpu_affinity)"))


class LearnerWorkersConfig(_Pinned):
    num_workers: int = Field(1, ge=1, description="DeepSpeed data-parallel ranks")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per rank, 0 or 1")
    cpus_per_worker: float = Field(1, ge=0)
    omp_threads: int = Field(1, ge=1, description="OMP_NUM_THREADS of each learner rank (CPU training)")
    cpu_affinity: str | None = Field(None, description=AFFINITY_HELP.format(
        what="learner rank", more="With rollout.async on one machine, pinning each side to cores of its own keeps "
        "vLLM's scheduler process off the learner's core (docs/performance.md)"))


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; None = RAY_ADDRESS or an embedded local Ray")
    rollout: RolloutWorkersConfig = Field(default_factory=RolloutWorkersConfig)
    learner: LearnerWorkersConfig = Field(default_factory=LearnerWorkersConfig)
    local_num_cpus: int | None = Field(
        None, ge=1, description="embedded local Ray only: logical CPUs it advertises (None = the machine's cores)")
    object_store_mb: int = Field(1024, ge=64, description="embedded local Ray only: object store size")
    placement_timeout_s: float = Field(60, gt=0, description="fail when the workers cannot be placed this fast")
    colocate: bool = Field(
        False, description="run each rollout engine inside a learner rank's process, on that rank's GPU (one GPU "
        "trains and samples in turn, TRL's default). The hf engine uses the learner's own module (no copy, no "
        "broadcast); a vLLM engine sleeps (KV cache freed, weights offloaded) while the learner trains and takes "
        "new weights through CUDA IPC (GPU) or a shared-memory file (CPU) instead of the broadcast group")

    @model_validator(mode="after")
    def _affinity_groups(self) -> ClusterConfig:
        self.rollout._check_affinity("cluster.rollout.cpu_affinity")
        self.learner._check_affinity("cluster.learner.cpu_affinity")
        if self.colocate and self.rollout.cpu_affinity is not None:
            raise ValueError("cluster.rollout.cpu_affinity is not used with cluster.colocate: each rollout engine "
                             "runs in its learner rank's process; pin that with cluster.learner.cpu_affinity")
        return self

    @model_validator(mode="after")
    def _whole_gpus(self) -> ClusterConfig:
        if self.colocate:
            if self.rollout.num_workers != self.learner.num_workers:
                raise ValueError(
                    f"cluster.colocate puts one rollout engine inside each learner rank: cluster.rollout.num_workers "
                    f"({self.rollout.num_workers}) must equal cluster.learner.num_workers ({self.learner.num_workers})"
                    f". On one GPU: --set cluster.learner.num_workers=1 cluster.rollout.num_workers=1")
            if self.rollout.tensor_parallel_size != 1:
                raise ValueError("cluster.colocate runs each rollout engine on its learner rank's one GPU: "
                                 "cluster.rollout.tensor_parallel_size must be 1")
        for name, section in (("rollout", self.rollout), ("learner", self.learner)):
            if self.colocate and name == "rollout":
                continue  # the engines run on the learner ranks' resources
            if section.gpus_per_worker not in (0, 1):
                raise ValueError(
                    f"cluster.{name}.gpus_per_worker is {section.gpus_per_worker:g}; it must be 0 (CPU) or 1: every "
                    "rollout worker (with vLLM tensor parallelism, every TP rank) and every learner rank joins the "
                    "NCCL weight-sync group on a GPU of its own. NCCL refuses two ranks on one GPU ('Duplicate GPU "
                    "detected'), vLLM's tensor parallelism needs exactly one GPU per bundle, and a rank uses only "
                    "one GPU. To share one GPU between sampling and training, set cluster.colocate=true")
        return self

