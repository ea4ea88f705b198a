"""Bucketed weight broadcast from learner rank 0 to every rollout engine over a dedicated process group.

The group is separate from DeepSpeed's: rank 0 is learner rank 0, ranks 1.. are the rollout engines' model
processes (one per tensor-parallel rank). It is built on its own TCPStore, so it needs no default process group
and can join processes that belong to different ``torch.distributed`` worlds (gloo on CPU, NCCL on GPU).

Protocol: the driver asks learner rank 0 for the list of ``TensorMeta`` (names are the Hugging Face checkpoint
names, LoRA merged, tied ``lm_head.weight`` listed explicitly) and hands the same list to every receiver. Both
sides cut it into the same buckets (consecutive tensors of one dtype up to ``bucket_bytes``); each bucket is one
flat broadcast. Both sides also checksum every bucket: the sum of the raw bit patterns as integers, modulo 2**64.
Integer addition is exact and order-free, so the value does not depend on thread count or device (a float sum
does), and any changed bit changes it. The driver compares the checksums after a sync, so a torn or stale update is
caught rather than trained on.

Every collective is waited for by polling (``wait_work``), never inside one blocking C++ call, so a sync can end
early: at its own deadline (``SyncGroup.timeout_s``, ``learner.sync_timeout_s``), or when the driver asks every
member to give up (``request_abort``: a flag in the group's store, which each member's poll reads) because a member
died. On NCCL this matters: ``work.wait()`` returns at once and the next host read of the buffer blocks until the
NCCL watchdog's timeout kills the process; the group is built with a backend timeout well beyond the sync's own, so
the sync gives up and aborts the group (``close_group``) first.

A group is never repaired: when a rollout worker is replaced, the driver hands every member a new ``SyncGroup`` (a
fresh port, so no old store or connection can be reached by mistake) and each member drops its old group with
:func:`close_group` before joining the new one.

Imports torch only.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    name: str  # Hugging Face parameter name, e.g. model.layers.0.self_attn.q_proj.weight
    dtype: str  # torch dtype name without the prefix, e.g. float32
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.torch_dtype.itemsize


@dataclass(frozen=True)
class SyncGroup:
    """Where and how to build the broadcast group; rank 0 (learner rank 0) hosts the store."""

    master_addr: str
    master_port: int
    world_size: int  # 1 + every rollout model process
    backend: str  # "gloo" or "nccl"
    timeout_s: float  # the deadline of one sync (joining, or sending every bucket) on each member


# The backend's own timeout (NCCL's watchdog kills the process when it fires) is kept well beyond the sync's.
def _backend_timeout(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=2 * timeout_s + 60)


ABORT_KEY = "r2ec/abort"  # set in a group's store by request_abort: every member's wait gives up
_ABORT_POLL_S = 0.25
# Each open group's store and sync timeout (by id(group)), and the groups close_group closed: those are never freed,
# because the destructor of a gloo group aborted with a collective pending waits out the backend timeout (one per
# failed sync).
_open: dict[int, tuple[dist.Store, float]] = {}
_spent: list[dist.ProcessGroup] = []


def wait_work(group: dist.ProcessGroup, work, deadline: float, what: str) -> None:
    """Wait for a collective of ``group`` until ``deadline`` (``time.monotonic``) by polling. Raises TimeoutError at
    the deadline, RuntimeError once the driver asked the group to give up (``request_abort``), and the collective's
    own error when it fails (a member died)."""
    store = _open[id(group)][0] if id(group) in _open else None
    next_check = time.monotonic() + _ABORT_POLL_S
    while not work.is_completed():
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(f"weight sync: {what} did not complete within the sync timeout")
        if store is not None and now >= next_check:
            next_check = now + _ABORT_POLL_S
            if store.check([ABORT_KEY]):
                raise RuntimeError(f"weight sync: {what} was aborted (a member of the group was lost)")
        time.sleep(0.001)
    work.wait()


def _sync_timeout(group: dist.ProcessGroup, timeout_s: float | None) -> float:
    if timeout_s is not None:
        return timeout_s
    if id(group) not in _open:
        raise ValueError("weight sync: a group not opened by open_group (or already closed) needs an explicit timeout_s")
    return _open[id(group)][1]


def request_abort(info: SyncGroup, timeout_s: float = 10.0) -> bool:
    """Ask every member of the group ``info`` to give up its current collective (their ``wait_work`` raises within
    a fraction of a second). Best effort: returns False when the group's store cannot be reached (its host, learner
    rank 0, has already dropped the group)."""
    try:
        store = dist.TCPStore(info.master_addr, info.master_port, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        store.set(ABORT_KEY, "1")
        return True
    except Exception:  # noqa: BLE001 - nothing to abort if the store is gone
        return False


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MOD = 2**64


def bits_checksum(buf: torch.Tensor, chunk: int = 1 << 24) -> int:
    """Sum of the raw bit patterns of a flat tensor, as integers modulo 2**64 (exact, order-independent)."""
    ints = buf.reshape(-1).view(_INT_OF_SIZE[buf.element_size()])
    total = 0
    for lo in range(0, ints.numel(), chunk):  # bounded int64 temporaries for large buckets
        total += int(ints[lo: lo + chunk].to(torch.int64).sum())
    return total % _MOD


def meta_of(name: str, tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def bound_store(host: str, port: int, world_size: int, is_master: bool, timeout: datetime.timedelta
                ) -> dist.TCPStore:
    """A TCPStore whose server listens on ``host`` only. TCPStore binds every interface by itself; handing it a
    socket bound to ``host`` keeps an embedded run on 127.0.0.1 (on a cluster, host is the node's address)."""
    fd = None
    if is_master:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        fd = sock.detach()  # the store owns the descriptor from here on
    return dist.TCPStore(host, port, world_size, is_master=is_master, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=fd)


def open_group(info: SyncGroup, rank: int) -> dist.ProcessGroup:
    """Join the broadcast group as ``rank``; blocks until all ``world_size`` members have joined."""
    timeout = _backend_timeout(info.timeout_s)
    store = bound_store(info.master_addr, info.master_port, info.world_size, rank == 0,
                        datetime.timedelta(seconds=info.timeout_s))
    if info.backend == "gloo":
        group = dist.ProcessGroupGloo(store, rank, info.world_size, timeout)
    elif info.backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(store, rank, info.world_size, opts)
    else:
        raise ValueError(f"weight-sync backend must be 'gloo' or 'nccl', got {info.backend!r}")
    _open[id(group)] = (store, info.timeout_s)
    return group


def close_group(group: dist.ProcessGroup | None) -> None:
    """Drop a broadcast group whose members may be gone (a rollout worker died and the group is being rebuilt).

    ``abort`` tears the communicator down without waiting on any peer (NCCL's ``ncclCommAbort``; gloo closes its
    connections); a plain destructor or ``shutdown`` may wait for members that will never answer. Best effort: a
    group that is already broken may raise here, and it is being thrown away either way."""
    if group is None:
        return
    _spent.append(group)
    _open.pop(id(group), None)
    try:
        group.abort()
    except Exception:  # noqa: BLE001 - the group is discarded whatever abort says
        pass


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of tensors with one dtype and at most ``bucket_bytes`` (a larger tensor goes alone)."""
    buckets: list[list[int]] = []
    size = 0
    for i, m in enumerate(metas):
        nbytes = m.nbytes
        if buckets and metas[buckets[-1][0]].dtype == m.dtype and size + nbytes <= bucket_bytes:
            buckets[-1].append(i)
            size += nbytes
        else:
            buckets.append([i])
            size = nbytes
    return buckets


def send(group: dist.ProcessGroup, metas: Sequence[TensorMeta], tensors: Iterable[tuple[str, torch.Tensor]],
         bucket_bytes: int, device: torch.device | str = "cpu", timeout_s: float | None = None) -> int:
    """Rank 0: broadcast ``tensors`` (yielded in ``metas`` order) bucket by bucket, all within ``timeout_s`` (None:
    the group's own sync timeout, ``SyncGroup.timeout_s``). Returns the checksum.

    ``tensors`` may be a generator that gathers ZeRO-3 shards lazily: only one bucket is held at a time."""
    deadline = time.monotonic() + _sync_timeout(group, timeout_s)
    it = iter(tensors)
    checksum = 0
    for bucket in plan_buckets(metas, bucket_bytes):
        flat = []
        for i in bucket:
            name, t = next(it)
            m = metas[i]
            if name != m.name or tuple(t.shape) != m.shape:
                raise RuntimeError(f"weight sync: expected {m.name} {m.shape}, got {name} {tuple(t.shape)}")
            flat.append(t.detach().to(device=device, dtype=m.torch_dtype).reshape(-1))
        buf = torch.cat(flat)
        wait_work(group, group.broadcast(buf, 0), deadline, "sending the weights")
        checksum = (checksum + bits_checksum(buf)) % _MOD
    if next(it, None) is not None:
        raise RuntimeError("weight sync: more tensors than metas")
    return checksum


def receive(group: dist.ProcessGroup, metas: Sequence[TensorMeta], bucket_bytes: int,
            device: torch.device | str = "cpu", checksum: list[int] | None = None, timeout_s: float | None = None
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks 1..: yield ``(name, tensor)`` as buckets arrive (feed it straight to a weight loader), every bucket
    within ``timeout_s`` of the first request (None: the group's own sync timeout).

    When ``checksum`` is a list, the running checksum is stored in ``checksum[0]``."""
    deadline = time.monotonic() + _sync_timeout(group, timeout_s)
    total = 0
    for bucket in plan_buckets(metas, bucket_bytes):
        ms = [metas[i] for i in bucket]
        buf = torch.empty(sum(m.numel for m in ms), dtype=ms[0].torch_dtype, device=device)
        wait_work(group, group.broadcast(buf, 0), deadline, "receiving the weights")
        total = (total + bits_checksum(buf)) % _MOD
        if checksum is not None:
            checksum[:] = [total]
        offset = 0
        for m in ms:
            yield m.name, buf[offset: offset + m.numel].view(m.shape)
            offset += m.numel
