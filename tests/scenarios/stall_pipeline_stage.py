"""Run by test_watchdog.py: in a 2-stage pipeline, stage 0 sleeps in the forward of micro-batch 1
at step 1 while stage 1 waits for that activation; then every rank waits in a pickled collective
for rank 1, which sleeps before it.

Usage: stall_pipeline_stage.py SECONDS  (thresholds from MPIPAR_STALL_WARN / MPIPAR_STALL_ABORT)
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch import nn  # noqa: E402

from mpipar.diagnostics.agree import agree_on  # noqa: E402
from mpipar.diagnostics.failure import abort_on_exception  # noqa: E402
from mpipar.diagnostics.watchdog import Watchdog  # noqa: E402
from mpipar.pipeline import Pipeline  # noqa: E402


class SleepOnce(nn.Module):
    """Sleeps in the forward of the micro-batch whose first value is ``trigger``."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds, self.armed = seconds, False

    def forward(self, x):
        if self.armed and x.shape[0] and x[0, 0].item() == 1.0:
            self.armed = False
            time.sleep(self.seconds)
        return x


comm = MPI.COMM_WORLD
abort_on_exception(comm)
seconds = float(sys.argv[1])
sleepy = SleepOnce(seconds)
model = nn.Sequential(sleepy, nn.Linear(4, 4), nn.Linear(4, 2))
pipe = Pipeline(model, comm, [0, 0, 1], schedule="1f1b", microbatches=2, loss_fn=F.cross_entropy)
watchdog = Watchdog(comm).start()
inputs = torch.zeros(4, 4)
inputs[2:, 0] = 1.0  # micro-batch 1 starts with 1.0
targets = torch.zeros(4, dtype=torch.long)
for step in range(2):
    watchdog.label(step=step)
    sleepy.armed = step == 1
    pipe.step(inputs, targets)
if comm.Get_rank() == 1:
    time.sleep(seconds)
agree_on(comm, "the end", 1)
watchdog.stop()
print(f"rank {comm.Get_rank()} finished", flush=True)
