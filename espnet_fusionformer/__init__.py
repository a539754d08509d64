"""FusionFormer for ESPnet: a Conformer whose normalization folds into its weights.

Public names are imported lazily, so the ``.pth`` import hook that imports this
package at interpreter start costs nothing until ESPnet builds a model.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["FusionFormerEncoder", "fuse", "register"]

_LAZY = {
    "FusionFormerEncoder": "espnet_fusionformer.encoder",
    "fuse": "espnet_fusionformer.fusion",
    "register": "espnet_fusionformer.registry",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'espnet_fusionformer' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
