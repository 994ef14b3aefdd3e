"""Helpers for the cost model's tests: links, profiles and machines built from literal numbers (pure)."""

from mpipar.cost import Band, LayerCost, Link, Machine, ModelProfile

MiB = 2**20


def linear_link(alpha: float, beta: float, description: str = "test link") -> Link:
    """A link whose messages take ``alpha + beta * bytes`` seconds, point to point and in an allreduce of 2."""
    band = (Band(None, alpha, beta),)
    return Link(band, band, 2, description)


def profile_of(layers, name="toy", sizes=(8,)) -> ModelProfile:
    """Layers (forward, backward, param bytes, activation bytes, saved bytes[, shapes]), the same at every size
    (seconds per micro-batch regardless of its size)."""
    costs = tuple(LayerCost(f"l{i}", layer[0], layer[1], tuple(layer[2]), layer[3], layer[4],
                            tuple(layer[5]) if len(layer) > 5 else ()) for i, layer in enumerate(layers))
    return ModelProfile(name, {size: costs for size in sizes})


def machine_of(profile, within=None, across=None, **kwargs) -> Machine:
    """4 ranks on nodes of 4 holding ``profile``; ``within`` defaults to a free link."""
    return Machine(within or linear_link(0.0, 0.0, "shared memory"), across, {profile.name: profile}, 4, 4, **kwargs)


def vit_like(name: str, block_seconds: float, param_bytes: int, activation: int = MiB, depth: int = 2,
             sizes=(8,)) -> ModelProfile:
    """embed, ``depth`` blocks and head; each block forward ``block_seconds``, backward twice that."""
    layers = ((LayerCost("embed", 1.0, 1.0, (1000,), activation, 0),)
              + tuple(LayerCost(f"block{i}", block_seconds, 2 * block_seconds, (param_bytes,), activation, 10)
                      for i in range(depth))
              + (LayerCost("head", 1.0, 1.0, (1000,), 40, 0),))
    return ModelProfile(name, {size: layers for size in sizes}, {size: sum(lay.forward + lay.backward for lay in
                                                                           layers) + 0.5 for size in sizes})
