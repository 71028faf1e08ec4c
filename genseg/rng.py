"""Seeds and random-number-generator state, for training that resumes bit for bit.

* :func:`derive_seed` turns ``(seed, rank, ...)`` into independent seeds through NumPy's
  ``SeedSequence`` (a hash), so distinct tuples never share a stream.  ``seed + 1000 * rank``
  or ``seed + rank`` collide: (seed=1000, rank=0) and (seed=0, rank=1) would train alike.
* :func:`capture` / :func:`restore` save the global generators (``random``, NumPy, torch CPU and
  CUDA) and a loop's own ``random.Random`` / ``torch.Generator`` objects as tensors and plain
  Python values, which ``torch.load(weights_only=True)`` accepts.
* :func:`epoch_permutation` is the order in which an epoch visits the training set: a new order
  every epoch, the same one for the same ``(seed, epoch)`` in a straight and in a resumed run.
"""
from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch

# stream ids: one independent stream per use, so adding a use never shifts another's numbers
STREAMS = {"python": 1, "numpy": 2, "torch": 3, "augment": 4, "noise": 5, "shuffle": 6}


def derive_seed(*keys: int, bits: int = 63) -> int:
    """A seed of ``bits`` bits from the integers ``keys`` (e.g. ``seed, rank, STREAMS["noise"]``).

    Negative keys are folded into 64 bits first (``SeedSequence`` takes non-negative entropy)."""
    words = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(2, np.uint64)
    value = (int(words[0]) << 64) | int(words[1])
    return value >> (128 - bits)


def seed_globals(seed: int, rank: int = 0) -> None:
    """Seed ``random``, NumPy's global generator and torch (CPU and CUDA) for one worker."""
    random.seed(derive_seed(seed, rank, STREAMS["python"]))
    np.random.seed(derive_seed(seed, rank, STREAMS["numpy"], bits=32))
    torch.manual_seed(derive_seed(seed, rank, STREAMS["torch"]))


def python_rng(seed: int, rank: int, stream: str) -> random.Random:
    return random.Random(derive_seed(seed, rank, STREAMS[stream]))


def torch_generator(seed: int, rank: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, rank, STREAMS[stream]))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of ``range(n)`` that depends only on ``(seed, epoch)``."""
    return np.random.default_rng(derive_seed(seed, epoch, STREAMS["shuffle"])).permutation(n)


# ------------------------------------------------------------------ state as tensors + plain values

def _python_state(r: random.Random | None = None) -> dict:
    version, words, gauss = (r.getstate() if r is not None else random.getstate())
    return {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss}


def _set_python_state(state: Mapping, r: random.Random | None = None) -> None:
    value = (int(state["version"]), tuple(int(w) for w in state["words"].tolist()), state["gauss"])
    (r.setstate if r is not None else random.setstate)(value)


def _numpy_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: Mapping) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["gauss"]))


def capture(named: Mapping[str, random.Random | torch.Generator] | None = None) -> dict:
    """The state of the global generators and of ``named`` ones, as tensors and plain values."""
    state = {"python": _python_state(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    own = {}
    for name, g in (named or {}).items():
        if isinstance(g, random.Random):
            own[name] = {"python": _python_state(g)}
        elif isinstance(g, torch.Generator):
            own[name] = {"torch": g.get_state()}
        else:
            raise TypeError(f"cannot capture the state of {name!r} ({type(g).__name__})")
    state["named"] = own
    return state


def restore(state: Mapping, named: Mapping[str, random.Random | torch.Generator] | None = None) -> list[str]:
    """Put back what :func:`capture` saved; returns the names of ``named`` generators that the
    state did not hold (they keep their fresh seeds)."""
    _set_python_state(state["python"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    missing = []
    saved = state.get("named", {})
    for name, g in (named or {}).items():
        if name not in saved:
            missing.append(name)
        elif isinstance(g, random.Random):
            _set_python_state(saved[name]["python"], g)
        else:
            g.set_state(saved[name]["torch"])
    return missing
