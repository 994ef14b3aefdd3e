"""Models built as flat ``nn.Sequential`` so any strategy can cut them into stages."""

from mpipar.models.zoo import BasicBlock, Bottleneck, mlp, resnet, resnet18, resnet50, resnet_small

__all__ = ["BasicBlock", "Bottleneck", "resnet", "resnet_small", "resnet18", "resnet50", "mlp"]
