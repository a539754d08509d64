"""CPU benchmark: FusionFormer against ESPnet's ``ConformerEncoder`` and the same
code with ``normalization: layernorm``, side by side in every row::

    python -m espnet_fusionformer.bench            # full run
    python -m espnet_fusionformer.bench --quick    # small models, few repeats
    python -m espnet_fusionformer.bench --train-only   # the recipe training step

Modules: ``cases`` (the encoders and inputs), ``engines`` (eager, TorchScript,
ONNX Runtime, int8), ``timing`` (interleaved timing, paired ratios, targets),
``stream`` (chunk-by-chunk rows), ``train`` (the full ASR model's training step
on a recipe's batches), ``profile`` (FLOPs, memory, op shares), ``report``
(Markdown), ``plot`` (PNG), ``cli`` (command line). Writes ``<out>/bench.md``,
``<out>/bench.json`` and ``<out>/bench.png``. The core modules never import it.
"""

from espnet_fusionformer.bench.cli import get_parser, main, resolve

__all__ = ["get_parser", "main", "resolve"]
