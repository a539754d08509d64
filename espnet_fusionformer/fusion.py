"""``fuse()``: the fused form of a FusionFormer encoder or of a whole ESPnet model."""

import copy

import torch

from espnet_fusionformer.fusable import Fusable, check_eval


def fuse(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Fuse every BatchNorm of the FusionFormer layers into the layer before it.

    Works on a ``FusionFormerEncoder`` or on any model containing one (e.g. an
    ``ESPnetASRModel``); other modules are left as they are. Calling it on an
    already fused model is harmless.

    Args:
        module: a model in eval mode.
        inplace: fuse ``module`` itself instead of a deep copy. (Default: ``False``)

    Returns:
        The fused model: same outputs (eval mode), no BatchNorm in the
        FusionFormer layers, q/k/v merged into one matmul.

    Raises:
        RuntimeError: if ``module`` or a submodule is in training mode.
        ValueError: if a parameter or statistic is NaN or infinite (it would
            spread into every weight it is fused into).
    """
    check_eval(module)
    for key, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"cannot fuse: {key} is not finite")
    model = module if inplace else copy.deepcopy(module)
    # children before parents, so a parent sees its fused children
    for m in reversed(list(model.modules())):
        if isinstance(m, Fusable):
            m.fuse_()
    return model
