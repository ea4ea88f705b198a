"""Same-host weight hand-off for the colocated mode (``cluster.colocate``): the learner writes the full model into one
flat buffer, the rollout engine's model process reads views of it, nothing goes through a process group.

Layout: the tensors of a ``TensorMeta`` list (Hugging Face names, LoRA merged, the engine's dtype) one after the
other in one ``uint8`` buffer, each starting at a multiple of ``ALIGN`` bytes so a view of any dtype is aligned. The
buffer lives where the reader can map it:

- CPU: a file in shared memory (``/dev/shm`` where it exists), mapped by both processes (``torch.from_file``); the
  engine reads the learner's pages, no copy in between.
- GPU: device memory of the learner's process, shared by a CUDA IPC handle (``torch.multiprocessing``'s reduction,
  flattened to plain values so it crosses vLLM's msgpack RPC without pickling); the engine rebuilds the tensor on
  the same GPU and copies from it into its own weights.

Both sides checksum the whole buffer (``weight_sync.bits_checksum``: exact integer sum of the bytes), so a reader that
mapped the wrong memory, or read it before the writer finished, is caught by the driver. The whole model is held once
more while a hand-off is in flight (the price of one copy instead of a bucketed broadcast).

Imports torch only.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from r2ec.weight_sync import TensorMeta, bits_checksum

ALIGN = 64  # bytes: a cache line, and a multiple of every dtype's size


def layout(metas: Sequence[TensorMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the buffer, and the buffer's size."""
    offsets, end = [], 0
    for m in metas:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + m.nbytes
    return offsets, end


def views(buf: torch.Tensor, metas: Sequence[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) views of ``buf`` (uint8, flat) in ``metas`` order: what a weight loader consumes."""
    offsets, total = layout(metas)
    if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < total:
        raise ValueError(f"weight share: expected a flat uint8 buffer of at least {total} bytes, got "
                         f"{buf.dtype} {tuple(buf.shape)}")
    for m, lo in zip(metas, offsets, strict=True):
        nbytes = m.nbytes
        yield m.name, buf[lo: lo + nbytes].view(m.torch_dtype).view(m.shape)


def pack(buf: torch.Tensor, metas: Sequence[TensorMeta], tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy ``tensors`` (yielded in ``metas`` order, any dtype: cast to the meta's) into ``buf``; the checksum of the
    whole buffer. ``tensors`` may be a generator that gathers ZeRO-3 shards one module at a time."""
    buf.zero_()  # the alignment gaps too: the checksum covers every byte
    it = iter(tensors)
    for name, view in views(buf, metas):
        got = next(it, None)
        if got is None:
            raise RuntimeError(f"weight share: the model ended before {name}")
        got_name, t = got
        if got_name != name or tuple(t.shape) != tuple(view.shape):
            raise RuntimeError(f"weight share: expected {name} {tuple(view.shape)}, got {got_name} {tuple(t.shape)}")
        view.copy_(t.detach())
    if next(it, None) is not None:
        raise RuntimeError("weight share: more tensors than metas")
    return checksum(buf)


def checksum(buf: torch.Tensor) -> int:
    return bits_checksum(buf)


# ------------------------------------------------------------------------------------------------ CPU: a shared file
def shm_dir() -> str:
    """Where hand-off files go: /dev/shm (memory, never a disk) when the system has it, else the temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def file_buffer(nbytes: int, directory: str | None = None) -> tuple[torch.Tensor, str]:
    """A new flat uint8 buffer of ``nbytes`` backed by a file that another process can map; (buffer, path). The
    caller removes the file (``os.remove``) once the reader is done."""
    path = os.path.join(directory or shm_dir(), f"r2ec-weights-{os.getpid()}-{uuid.uuid4().hex}.bin")
    with open(path, "wb") as f:
        f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8), path


def open_file_buffer(path: str, nbytes: int) -> torch.Tensor:
    """Map a buffer written by ``file_buffer`` (copy-on-write: the reader never changes the file)."""
    size = os.path.getsize(path)
    if size != nbytes:
        raise ValueError(f"weight share: {path} holds {size} bytes, expected {nbytes}")
    return torch.from_file(path, shared=False, size=nbytes, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ GPU: CUDA IPC
def cuda_handle(buf: torch.Tensor) -> dict[str, Any]:
    """A CUDA IPC handle of ``buf`` as plain values (bytes, ints, strings). Keep ``buf`` alive until the reader is
    done: the handle does not own the memory."""
    from torch.multiprocessing.reductions import reduce_tensor

    if not buf.is_cuda:
        raise ValueError("weight share: a CUDA IPC handle needs a CUDA tensor")
    _, args = reduce_tensor(buf)
    # rebuild_cuda_tensor's arguments: (tensor_cls, size, stride, offset, storage_cls, dtype, device, handle,
    # storage_size_bytes, storage_offset_bytes, requires_grad, ref_counter_handle, ref_counter_offset, event_handle,
    # event_sync_required); the two classes and the dtype are fixed here, the rest is plain data.
    (_, size, stride, offset, _, dtype, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    if dtype != torch.uint8:
        raise ValueError("weight share: the hand-off buffer is uint8")
    return {"size": list(size), "stride": list(stride), "offset": int(offset), "device": int(device),
            "handle": bytes(handle), "storage_bytes": int(storage_bytes), "storage_offset": int(storage_offset),
            "ref_handle": bytes(ref_handle), "ref_offset": int(ref_offset), "event_handle": bytes(event_handle),
            "event_sync": bool(event_sync)}


def from_cuda_handle(h: dict[str, Any], device_index: int | None = None) -> torch.Tensor:
    """The tensor behind ``cuda_handle``'s output, in this process. ``device_index``: this process's index of the same
    GPU (None: the writer's index, right when both processes see the same CUDA_VISIBLE_DEVICES)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = h["device"] if device_index is None else device_index
    return rebuild_cuda_tensor(torch.Tensor, torch.Size(h["size"]), tuple(h["stride"]), h["offset"],
                               torch.UntypedStorage, torch.uint8, device, h["handle"], h["storage_bytes"],
                               h["storage_offset"], False, h["ref_handle"], h["ref_offset"], h["event_handle"],
                               h["event_sync"])
