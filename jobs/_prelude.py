"""What every job does first, before torch is imported (which takes seconds): catch Slurm's
warning signal, which can come in that time, and find mpipar in a checkout that was not installed.

A job imports it as its first import (``from _prelude import EARLY_SIGNALS``; the job's own folder
is on ``sys.path`` when it runs as ``python jobs/NAME.py``) and hands ``EARLY_SIGNALS`` to its
``Session``, which acts on the signals caught here.
"""

import signal
import sys
from pathlib import Path

EARLY_SIGNALS = []
for _name in ("SIGUSR1", "SIGTERM"):
    signal.signal(getattr(signal, _name), lambda signum, frame: EARLY_SIGNALS.append(signum))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
