"""A process's RNG states (python, numpy, torch CPU and every CUDA generator) as JSON, for exact resume: the one
layout for the driver's state (``trainer_state.json``) and each learner rank's (``rng-rank<r>.json``).

Imports torch (numpy inside the functions) only."""

from __future__ import annotations

import base64
import random
from typing import Any

import torch


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python ``random``, numpy's global generator, torch CPU and (if present) every CUDA generator, as JSON."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return {"python": {"version": version, "state": list(internal), "gauss_next": gauss},
            "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "torch": _b64(torch.get_rng_state()), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured. Also reads the driver layout of checkpoints written before the two
    layouts became one (python and numpy states as plain lists, no CUDA entry)."""
    import numpy as np

    py, n = state["python"], state["numpy"]
    if isinstance(py, list):  # the older driver layout
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    else:
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [_unb64(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another GPU layout per process: restore the generator of the GPU this rank uses
            torch.cuda.set_rng_state(cuda[0], torch.cuda.current_device())


def seed_all(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA generator
