"""
The random generators a step reads (Python's, numpy's, torch's CPU and CUDA ones): seeded from one
seed, captured into every checkpoint (one entry per rank) and restored on resume, so a resumed run
draws what the uninterrupted one would have.
"""
import random

import numpy as np
import torch

from console import say


def seed_rngs(seed):
    """torch's, Python's and numpy's generators from one seed, so that two runs of the same command
    agree in all three (and a resume restores all three, capture_rng)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng():
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        # (see checkpoint.python_rng)
        "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(rng):
    random.setstate(python_rng(rng["python"]))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        if len(rng["cuda"]) != torch.cuda.device_count():
            say(f"warning: checkpoint has CUDA RNG for {len(rng['cuda'])} devices, this machine "
                f"has {torch.cuda.device_count()}; CUDA RNG restored where it can be")
        for i, state in enumerate(rng["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, i)


def python_rng(entry):
    """The state random.setstate takes, from a checkpoint's rng[rank]["python"]: [version, the 625
    words as an int64 tensor (one pickled object rather than 625: a save pickles faster), gauss];
    older files hold the words as a list."""
    version, state, gauss = entry
    return version, tuple(state.tolist() if isinstance(state, torch.Tensor) else state), gauss
