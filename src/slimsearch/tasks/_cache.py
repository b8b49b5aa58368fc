"""Where trained teachers are kept, so a second run does not retrain them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from slimsearch._io import atomic_path


def cache_dir() -> Path:
    """slimsearch's cache (teachers, data, MLflow's empty store): ``$SLIMSEARCH_CACHE`` or
    ``~/.cache/slimsearch``."""
    root = os.environ.get("SLIMSEARCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "slimsearch"
    )
    return Path(root)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_or_train(path: Path, model, train_fn) -> str:
    """Load ``model``'s weights from ``path``, or train and save them there first.

    Weights load only through ``torch.load(weights_only=True)``. The file is written
    to a temporary name and renamed, so a reader (another worker, a crashed run)
    never sees half a file. Returns the file's sha256.

    Training uses all the machine's cores, whatever torch thread count the caller set (a
    job sets its threads per worker before it loads its task, and nothing else runs
    meanwhile): the MNIST teacher trains in 32 s at 2 threads instead of 56 s at 1 on a
    2-core machine, and a cached teacher no longer depends on the worker count of the job
    that trained it (the thread count changes float rounding).
    """
    import torch

    from slimsearch.exceptions import SlimSearchError

    if not path.exists():
        from slimsearch._threads import torch_threads

        with torch_threads(os.cpu_count() or 1):
            train_fn(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a truncated or foreign file: say which, and how to fix it
        raise SlimSearchError(
            f"teacher cache {path} is unreadable ({type(exc).__name__}); delete it (rm '{path}') "
            "and the next run retrains the teacher"
        ) from exc
    model.eval()
    return file_sha256(path)
