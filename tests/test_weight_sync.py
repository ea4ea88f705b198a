"""Bucketed weight broadcast over a dedicated gloo group between real processes."""

import multiprocessing as mp
import socket

import pytest
import torch

from r2ec.weight_sync import SyncGroup, TensorMeta, meta_of, open_group, plan_buckets, receive, send


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(5, 3, generator=g), "b.bias": torch.randn(7, generator=g),
            "c.weight": torch.randn(2, 2, generator=g).to(torch.bfloat16), "d.weight": torch.randn(40, generator=g)}


def _receiver(info, rank, metas, queue):
    group = open_group(info, rank)
    box: list[float] = []
    got = {name: t.clone() for name, t in receive(group, metas, bucket_bytes=64, checksum=box)}
    queue.put((rank, got, box[0]))


def test_plan_buckets_respects_dtype_and_size():
    metas = [TensorMeta("a", "float32", (4,)), TensorMeta("b", "float32", (4,)), TensorMeta("c", "bfloat16", (2,)),
             TensorMeta("d", "float32", (100,)), TensorMeta("e", "float32", (1,))]
    assert plan_buckets(metas, bucket_bytes=32) == [[0, 1], [2], [3], [4]]
    assert plan_buckets(metas, bucket_bytes=10_000) == [[0, 1], [2], [3, 4]]


def test_broadcast_reaches_every_receiver_exactly():
    weights = _weights()
    metas = [meta_of(n, t) for n, t in weights.items()]
    info = SyncGroup("127.0.0.1", _free_port(), world_size=3, backend="gloo", timeout_s=60)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(info, r, metas, queue)) for r in (1, 2)]
    for p in procs:
        p.start()
    group = open_group(info, 0)
    sent = send(group, metas, iter(weights.items()), bucket_bytes=64)
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    for _rank, got, checksum in results:
        assert checksum == pytest.approx(sent, abs=0, rel=0)
        assert got.keys() == weights.keys()
        for name, t in weights.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_send_rejects_a_tensor_out_of_order():
    weights = _weights()
    metas = [meta_of(n, t) for n, t in weights.items()]
    info = SyncGroup("127.0.0.1", _free_port(), world_size=1, backend="gloo", timeout_s=30)
    group = open_group(info, 0)
    with pytest.raises(RuntimeError, match="expected a.weight"):
        send(group, metas, iter(reversed(list(weights.items()))), bucket_bytes=64)


def test_bits_checksum_is_exact_and_order_free():
    from r2ec.weight_sync import bits_checksum

    t = torch.randn(10_000, dtype=torch.float32)
    assert bits_checksum(t) == bits_checksum(t[torch.randperm(t.numel())])  # any summation order
    assert bits_checksum(t, chunk=7) == bits_checksum(t)
    u = t.clone()
    u[1234] = torch.nextafter(u[1234], torch.tensor(float("inf")))  # one ulp anywhere changes it
    assert bits_checksum(u) != bits_checksum(t)
    assert bits_checksum(t.to(torch.bfloat16)) != bits_checksum(t.to(torch.bfloat16) * 2)


def _stalled_group(timeout_s: float):
    """A 2-member gloo group whose receiver (joined from a thread of this process) never receives."""
    import threading

    info = SyncGroup("127.0.0.1", _free_port(), world_size=2, backend="gloo", timeout_s=timeout_s)
    joined: list = []
    t = threading.Thread(target=lambda: joined.append(open_group(info, 1)), daemon=True)
    t.start()
    group = open_group(info, 0)
    t.join(timeout=30)
    assert joined
    return info, group, joined[0]  # the caller keeps the peer: a freed peer closes its connections


BIG = 16 * 2**20  # 64 MB of float32: more than the sockets buffer, so the send blocks until the peer receives


def test_a_sync_that_cannot_finish_fails_at_its_own_timeout():
    """A receiver that stops taking buckets (a rollout worker stuck or dead on NCCL) must not block the learner until
    the backend's timeout: the sender polls and gives up at the sync's own deadline."""
    import time

    from r2ec.weight_sync import close_group

    _info, group, _peer = _stalled_group(timeout_s=60)
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="sending the weights did not complete within the sync timeout"):
        send(group, [TensorMeta("w", "float32", (BIG,))], iter([("w", torch.zeros(BIG))]), bucket_bytes=2**30,
             timeout_s=2)
    assert time.monotonic() - t < 30
    t = time.monotonic()
    close_group(group)  # as the learner does after a failed sync; the spent group is kept, not destroyed
    assert time.monotonic() - t < 10


def test_a_blocked_sync_gives_up_when_the_driver_requests_an_abort():
    import threading
    import time

    from r2ec.weight_sync import close_group, request_abort

    info, group, _peer = _stalled_group(timeout_s=600)
    outcome: list = []

    def sender():
        try:
            send(group, [TensorMeta("w", "float32", (BIG,))], iter([("w", torch.zeros(BIG))]), bucket_bytes=2**30,
                 timeout_s=600)
            outcome.append("sent")
        except Exception as e:  # noqa: BLE001 - the abort's error is the expected outcome
            outcome.append(e)

    th = threading.Thread(target=sender, daemon=True)
    th.start()
    time.sleep(1.0)
    assert not outcome  # still waiting in the broadcast
    t = time.monotonic()
    assert request_abort(info)  # what the driver does when a rollout worker dies mid-sync
    th.join(timeout=60)
    assert outcome and isinstance(outcome[0], RuntimeError) and "aborted" in str(outcome[0]), outcome
    assert time.monotonic() - t < 10
    close_group(group)
