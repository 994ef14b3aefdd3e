"""The oldest torch mpipar runs on, checked at import without importing torch."""

import importlib.metadata
import re

__all__ = ["MIN_TORCH", "check_torch"]

MIN_TORCH = (2, 5)
"""``torch.serialization.safe_globals``, which loads checkpoints safely, is from torch 2.5."""


def check_torch() -> None:
    """Raise ImportError when the installed torch is older than :data:`MIN_TORCH`; nothing when
    torch is absent (``mpipar-report`` and ``mpipar-summary`` do not need it) or its version unreadable."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and (int(found.group(1)), int(found.group(2))) < MIN_TORCH:
        wanted = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"mpipar needs torch >= {wanted} (checkpoints load with torch.serialization."
                          f"safe_globals); torch {version} is installed: pip install 'torch>={wanted}'")
