"""The ResNets of ``zoo.py`` as long ``SkipSequential`` s of small layers, so a pipeline can cut inside blocks.

Every residual block ``relu(body(x) + shortcut(x))`` becomes ``SaveSkip``, the layers of
its body (convolution, normalisation, activation), ``AddSkip(shortcut)`` and ``ReLU``;
the stem and the head are flattened into their layers. The fine model computes exactly
what the block model computes (same layer objects in the same order), so
:func:`fine_state_dict` maps one's checkpoint onto the other.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Tuple

from torch import nn

from mpipar.models.skip import AddSkip, SaveSkip, SkipSequential
from mpipar.models.zoo import BasicBlock, Bottleneck, resnet

__all__ = ["split_blocks", "fine_state_dict", "block_state_dict", "resnet_fine", "resnet_small_fine",
           "resnet18_fine", "resnet50_fine"]


def _plain(layer: nn.Module) -> nn.Module:
    """In-place ReLUs become ordinary ones: a stage may begin with one, and its input is a leaf."""
    return nn.ReLU() if isinstance(layer, nn.ReLU) else layer


def _fine_layers(model: nn.Sequential) -> List[Tuple[str, nn.Module]]:
    named: List[Tuple[str, nn.Module]] = []
    blocks = 0
    for index, part in enumerate(model):
        if isinstance(part, (BasicBlock, Bottleneck)):
            blocks += 1
            name = f"block{blocks}"
            named.append((f"{name}_save", SaveSkip(name)))
            convs = norms = acts = 0
            for layer in part.body:
                if isinstance(layer, nn.Conv2d):
                    convs += 1
                    named.append((f"{name}_conv{convs}", layer))
                elif isinstance(layer, nn.BatchNorm2d):
                    norms += 1
                    named.append((f"{name}_bn{norms}", layer))
                else:
                    acts += 1
                    named.append((f"{name}_relu{acts}", _plain(layer)))
            shortcut = None if isinstance(part.shortcut, nn.Identity) else part.shortcut
            named.append((f"{name}_add", AddSkip(name, shortcut)))
            named.append((f"{name}_relu", _plain(part.relu)))
        elif isinstance(part, nn.Sequential):
            prefix = "stem" if index == 0 else "head"
            named += [(f"{prefix}{position}_{type(layer).__name__.lower()}", _plain(layer))
                      for position, layer in enumerate(part)]
        else:
            raise TypeError(f"layer {index} of the block model is a {type(part).__name__}; split_blocks knows "
                            f"Sequential stems and heads, BasicBlock and Bottleneck")
    return named


def split_blocks(model: nn.Sequential) -> SkipSequential:
    """The fine-grained form of a ResNet built by :func:`mpipar.models.zoo.resnet`.

    The result shares its parameters and buffers with ``model`` (``copy.deepcopy``
    the model first to keep both apart); layer names say where each came from
    (``stem0_conv2d``, ``block2_conv1``, ``block2_add``, ``head2_linear``).
    """
    return SkipSequential(OrderedDict(_fine_layers(model)))


def _key_map(model: nn.Sequential) -> Dict[str, str]:
    """Block-model state-dict key -> fine-model key, by tensor identity."""
    fine = split_blocks(model)
    by_tensor = {id(tensor): name for name, tensor in fine.state_dict(keep_vars=True).items()}
    return {name: by_tensor[id(tensor)] for name, tensor in model.state_dict(keep_vars=True).items()}


def fine_state_dict(model: nn.Sequential) -> Dict[str, object]:
    """``model.state_dict()`` (a block ResNet) under the keys of its :func:`split_blocks` form."""
    mapping = _key_map(model)
    return {mapping[key]: value for key, value in model.state_dict().items()}


def block_state_dict(fine_state: Dict[str, object], model: nn.Sequential) -> Dict[str, object]:
    """The inverse of :func:`fine_state_dict`: a fine model's state (or any dict under its keys, such as
    its parameters' gradients) under the keys of the block ``model``.

    Raises:
        KeyError: a key that is not one of the fine model's.
    """
    mapping = _key_map(model)
    unknown = sorted(set(fine_state) - set(mapping.values()))
    if unknown:
        raise KeyError(f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not keys of the fine form of this "
                       f"model; was it built with other blocks or widths?")
    return {block: fine_state[fine] for block, fine in mapping.items() if fine in fine_state}


def resnet_fine(*args, **kwargs) -> SkipSequential:
    """:func:`mpipar.models.zoo.resnet` (same arguments, same initial parameters for the same seed),
    fine-grained."""
    return split_blocks(resnet(*args, **kwargs))


def resnet_small_fine(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> SkipSequential:
    """``resnet-small`` as 30 layers (stem 3, three blocks of 8, head 3)."""
    return resnet_fine((1, 1, 1), (16, 32, 64), in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size)


def resnet18_fine(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224) -> SkipSequential:
    return resnet_fine((2, 2, 2, 2), (64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size)


def resnet50_fine(in_channels: int = 3, num_classes: int = 1000, image_size: int = 224) -> SkipSequential:
    return resnet_fine((3, 4, 6, 3), (64, 128, 256, 512), in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size, bottleneck=True)
