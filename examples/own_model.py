"""Your own model, loss and data through mpipar's loop: a regression MLP on tabular data, MSE loss.

Usage:
    mpirun -n 2 python examples/own_model.py --epochs 3 --batch-size 32 --lr 0.05 --out runs/own
    mpirun -n 3 python examples/own_model.py --epochs 3 --batch-size 32 --lr 0.05 --out runs/own --resume
    mpipar-summary runs/own/metrics.h5

Flags: --help (the jobs' common flags). Manual: docs/usage.md#your-own-model-in-the-loop.
"""

import torch
from mpi4py import MPI

import mpipar


def mean_absolute_error(outputs, targets):  # the evaluation metric: a mean over the batch's samples
    return (outputs - targets).abs().mean()


def main(argv=None) -> None:
    comm = MPI.COMM_WORLD
    mpipar.failure.abort_on_exception(comm)
    generator = torch.Generator().manual_seed(0)  # the same data on every rank
    features = torch.randn(2400, 8, generator=generator)
    targets = features @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.5 * torch.sin(3 * features[:, :1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    data = ((features[:2000], targets[:2000]), (features[2000:], targets[2000:]))
    mpipar.fit(model, data, comm=comm, loss=torch.nn.functional.mse_loss, metric=mean_absolute_error,
               argv=argv, doc=__doc__, out="runs/own", name="regression-mlp")


if __name__ == "__main__":
    main()
