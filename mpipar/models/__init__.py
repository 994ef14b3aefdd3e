"""Models built as flat ``nn.Sequential`` so any strategy can cut them into stages, and a vision transformer
and a GPT whose blocks tensor parallelism splits."""

from mpipar.models.fine import (
    block_state_dict,
    fine_state_dict,
    resnet18_fine,
    resnet50_fine,
    resnet_fine,
    resnet_small_fine,
    split_blocks,
)
from mpipar.models.gpt import BYTE_VOCAB, TiedHead, TokenEmbedding, gpt, gpt_name
from mpipar.models.vit import VIT_MODELS, TransformerBlock, VisionTransformer, vit_small, vit_tiny
from mpipar.models.zoo import (
    MLP_SIZES,
    BasicBlock,
    Bottleneck,
    image_mlp,
    mlp,
    resnet,
    resnet18,
    resnet50,
    resnet_small,
)

__all__ = ["BasicBlock", "Bottleneck", "resnet", "resnet_small", "resnet18", "resnet50", "mlp", "image_mlp",
           "MLP_SIZES", "IMAGE_MODELS", "VisionTransformer", "TransformerBlock", "vit_tiny", "vit_small",
           "VIT_MODELS", "split_blocks", "fine_state_dict", "block_state_dict", "resnet_fine", "resnet_small_fine",
           "resnet18_fine", "resnet50_fine", "gpt", "gpt_name", "TokenEmbedding", "TiedHead", "BYTE_VOCAB"]

IMAGE_MODELS = {
    "resnet-small": resnet_small,  # 8 layers, 78k parameters: CPUs
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet-small-fine": resnet_small_fine,  # the same network as 30 small layers (pipelines cut inside blocks)
    "resnet18-fine": resnet18_fine,
    "resnet50-fine": resnet50_fine,
}
"""The image classifiers the jobs offer as ``--model``: ``name -> f(in_channels, num_classes, image_size)``."""
