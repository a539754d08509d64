"""``fuse()``: the fused form of a FusionFormer encoder or of a whole ESPnet model."""

import copy

import torch

from espnet_fusionformer.fusable import Fusable, check_eval


def fuse(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Fold every BatchNorm of the FusionFormer layers into the layer before it.

    Works on a ``FusionFormerEncoder`` or on any model containing one (e.g. an
    ``ESPnetASRModel``); other modules are left as they are. Calling it on an
    already fused model is harmless.

    Args:
        module: a model in eval mode.
        inplace: fold ``module`` itself instead of a deep copy. (Default: ``False``)

    Returns:
        The fused model: same outputs (eval mode), no BatchNorm in the
        FusionFormer layers, q/k/v merged into one matmul.

    Raises:
        RuntimeError: if ``module`` or a submodule is in training mode.
    """
    check_eval(module)
    model = module if inplace else copy.deepcopy(module)
    # children before parents, so a parent sees its fused children
    for m in reversed(list(model.modules())):
        if isinstance(m, Fusable):
            m.fuse_()
    return model
