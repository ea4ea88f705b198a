"""Which GPU a worker uses: the one Ray assigned, in the worker process's own CUDA numbering (pure; no GPU needed)."""

import pytest

from driver.remote import ClusterError, local_cuda_index, on_assigned_gpu


@pytest.mark.parametrize("gpu_ids, visible, expected", [
    ([3], "3", 0),             # Ray's default: CUDA_VISIBLE_DEVICES narrowed to the assigned GPU
    (["5"], "5,6", 0),
    ([2], "0,1,2,3", 2),       # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES with the user's own list
    ([6], "7, 6", 1),
    ([2], None, 2),            # nothing set: every GPU visible in its own numbering
    ([1], "", 1),
])
def test_local_cuda_index(gpu_ids, visible, expected):
    assert local_cuda_index(gpu_ids, visible) == expected


def test_local_cuda_index_refuses_what_it_cannot_place():
    with pytest.raises(ClusterError, match="without a GPU assigned by Ray"):
        local_cuda_index([], "0")
    with pytest.raises(ClusterError, match="Ray assigned GPU 4, which CUDA_VISIBLE_DEVICES='0,1' hides"):
        local_cuda_index([4], "0,1")


def test_actor_class_resolves_cuda_to_the_assigned_gpu(monkeypatch):
    import ray

    class Worker:
        def __init__(self, a, device: str = "cpu"):
            self.a, self.device = a, device

    Actor = on_assigned_gpu(Worker)
    assert Actor.__name__ == "Worker"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [2])
    assert Actor(1, device="cuda").device == "cuda:2"
    assert Actor(1, device="cpu").device == "cpu"
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])  # a vLLM worker with tensor parallelism holds no GPU itself
    assert Actor(1, device="cuda").device == "cuda"
