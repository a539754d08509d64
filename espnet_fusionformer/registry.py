"""Registration of ``encoder: fusionformer`` into ESPnet's task encoder choices.

Two ways in:

* ``register()``: explicit and idempotent; adds the encoder to every task module in
  :data:`TASK_MODULES` that is already imported (importing ``espnet2.tasks.asr`` if
  none is).
* ``install_import_hook()``: what the ``espnet_fusionformer_hook.pth`` file in
  site-packages runs at interpreter start. It adds a meta-path finder that registers
  the encoder right after one of the task modules executes, so ESPnet's unchanged
  scripts (``python -m espnet2.bin.asr_train``, ``Speech2Text``) know the encoder.
  It imports nothing heavy and does nothing when ESPnet is absent.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Optional, Sequence

NAME = "fusionformer"

# espnet2 tasks whose ``encoder_choices`` take an AbsEncoder on speech features.
TASK_MODULES = (
    "espnet2.tasks.asr",
    "espnet2.tasks.st",
    "espnet2.tasks.s2t",
    "espnet2.tasks.slu",
)


def register_into(task_module: ModuleType) -> None:
    """Add ``fusionformer`` to ``task_module.encoder_choices`` (idempotent)."""
    from espnet_fusionformer.encoder import FusionFormerEncoder

    choices = task_module.encoder_choices
    if not issubclass(FusionFormerEncoder, choices.base_type):
        raise TypeError(
            f"{task_module.__name__}.encoder_choices takes {choices.base_type}, "
            "not an AbsEncoder"
        )
    choices.classes[NAME] = FusionFormerEncoder


def register(tasks: Optional[Sequence[str]] = None) -> None:
    """Register the encoder into ESPnet's tasks.

    Args:
        tasks: task module names, e.g. ``["espnet2.tasks.asr"]``. (Default: every
            module of :data:`TASK_MODULES` already imported, and ``espnet2.tasks.asr``.)
    """
    if tasks is None:
        tasks = [m for m in TASK_MODULES if m in sys.modules] or [TASK_MODULES[0]]
    for name in tasks:
        register_into(importlib.import_module(name))


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps a task module's loader: execute it, then register the encoder."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        try:
            register_into(module)
        except Exception as e:  # never break ESPnet itself because of the plugin
            warnings.warn(
                f"espnet_fusionformer: could not register encoder: {e!r}", stacklevel=2
            )


class _TaskImportHook(importlib.abc.MetaPathFinder):
    """Meta-path finder that only intercepts the modules of :data:`TASK_MODULES`."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in TASK_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Install the meta-path hook once; register into task modules already loaded."""
    if any(isinstance(f, _TaskImportHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TaskImportHook())
    for name in TASK_MODULES:
        if name in sys.modules:
            register_into(sys.modules[name])
