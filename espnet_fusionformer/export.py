"""Export a FusionFormer encoder (fused form) to TorchScript or ONNX.

The exported graph is a wrapper with the signature::

    (feats (B, T, F) float32, feats_lengths (B,) int64)
        -> (encoded (B, T', D) float32, encoded_lengths (B,) int64)

with dynamic batch and time axes. It is the encoder only: features must already be
the ASR model's frontend + normalize output (e.g. 80-dim fbank after global MVN).
The encoder is fused (BatchNorm in the weights, q/k/v merged) before tracing, and
every export is checked against PyTorch on inputs of other lengths and batch sizes than
the traced example, so a shape or branch frozen by tracing fails loudly here.
The relative-position table is traced as a constant of the encoder's current length
(``max_pos_emb_len``, 5000 subsampled frames by default, i.e. 200 s of 10 ms frames
with ``conv2d``): build the encoder with a larger ``max_pos_emb_len`` for longer
inputs.

CLI::

    python -m espnet_fusionformer.export \\
        --asr_train_config exp/asr_train/config.yaml \\
        --asr_model_file exp/asr_train/valid.acc.ave.pth \\
        --outdir exported/ [--format onnx torchscript] [--opset 17] [--int8]

writes ``encoder.onnx`` / ``encoder.pt`` and ``encoder.json`` (sizes, subsampling,
frontend/normalize of the training config); ``--int8`` also writes
``encoder.int8.onnx``, the ONNX file with int8 weight matmuls (ONNX Runtime's
dynamic quantization, see ``espnet_fusionformer.quantize``). ``--format
torchscript_stream`` (a causal model) writes ``encoder_stream.pt``, the scripted
``forward_chunk`` with explicit caches (WeNet's runtime convention, see
``espnet_fusionformer.script``), checked against the eager ``forward_chunk`` chunk by
chunk (1e-4). ``--format onnx_stream`` writes ``encoder_stream.onnx``, the chunk path
with fixed-size caches for one chunk size and left context (``--chunk_size``,
``--left_chunks``; WeNet's CPU ONNX convention, driven by :class:`OnnxStream`), checked
the same way in ONNX Runtime (1e-3); with ``--int8`` also its int8 copy.
"""

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

INPUT_NAMES = ["feats", "feats_lengths"]
OUTPUT_NAMES = ["encoded", "encoded_lengths"]
DYNAMIC_AXES = {
    "feats": {0: "batch", 1: "time"},
    "feats_lengths": {0: "batch"},
    "encoded": {0: "batch", 1: "time_out"},
    "encoded_lengths": {0: "batch"},
}
# tolerance of the self-check after export (float32 graph rewrites reorder sums)
CHECK_ATOL = 1e-3
CHECK_RTOL = 1e-3

Runner = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


class EncoderWrapper(torch.nn.Module):
    """``(feats, feats_lengths) -> (encoded, encoded_lengths)`` for export.

    Args:
        encoder: a fused ``FusionFormerEncoder`` (``call="encode"``) or any ESPnet
            ``AbsEncoder`` whose forward returns ``(ys, olens, states)``
            (``call="forward"``, used by the benchmark for ESPnet's Conformer).
        call: ``"encode"`` (no input checks, nothing data-dependent to trace) or
            ``"forward"``.
        input_size: feature size ``F``; default: ``encoder.input_size``.
        ctc: the ASR model's ``CTC``, for an encoder with
            ``interctc_use_conditioning`` or ``ctc_trim`` (exported with it).
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        call: str = "encode",
        input_size: Optional[int] = None,
        ctc: Optional[torch.nn.Module] = None,
    ) -> None:
        super().__init__()
        if call not in ("encode", "forward"):
            raise ValueError(f"call must be 'encode' or 'forward', got {call!r}")
        self.encoder = encoder
        self.call = call
        self.ctc = ctc
        if input_size is None:
            input_size = getattr(encoder, "input_size", None)
        if input_size is None:
            raise ValueError("the encoder has no input_size attribute: pass one")
        self.input_size = int(input_size)
        self.min_frames = min_input_frames(encoder)
        embed = getattr(encoder, "embed", None)
        self.tokens = bool(getattr(embed, "takes_tokens", False))  # (B, T) ids

    def forward(
        self, feats: torch.Tensor, feats_lengths: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.call == "encode" and self.ctc is not None:
            encoded, encoded_lengths = self.encoder.encode(
                feats, feats_lengths, ctc=self.ctc
            )
        elif self.call == "encode":
            encoded, encoded_lengths = self.encoder.encode(feats, feats_lengths)
        else:
            encoded, encoded_lengths, _ = self.encoder(feats, feats_lengths)
        return encoded, encoded_lengths


# -- preparing the encoder ---------------------------------------------------------
def fused_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """The fused form of ``encoder`` (fused copy unless already fused).

    Raises:
        TypeError: if ``encoder`` is not a ``FusionFormerEncoder``.
        RuntimeError: if it (or a submodule) is in training mode.
    """
    from espnet_fusionformer.encoder import FusionFormerEncoder
    from espnet_fusionformer.fusion import fuse

    if not isinstance(encoder, FusionFormerEncoder):
        raise TypeError(f"expected a FusionFormerEncoder, got {type(encoder).__name__}")
    training = [
        name or "<encoder>" for name, m in encoder.named_modules() if m.training
    ]
    if training:
        raise RuntimeError(
            "cannot export an encoder in training mode (BatchNorm would use batch "
            "statistics and dropout would be active): call encoder.eval() first "
            f"(training-mode modules: {', '.join(training[:3])}"
            f"{', ...' if len(training) > 3 else ''})"
        )
    return encoder if getattr(encoder, "fused", False) else fuse(encoder)


def min_input_frames(encoder: torch.nn.Module) -> int:
    """Shortest input the encoder's subsampling accepts (1 if unknown)."""
    embed = getattr(encoder, "embed", None)
    if embed is not None and hasattr(embed, "min_input_length"):
        return int(embed.min_input_length())
    return 1


def example_inputs(
    size: int, lengths: Sequence[int], seed: int = 0, tokens: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A zero-padded random batch ``(B, max(lengths), size), (B,)``; with
    ``tokens``, ids in ``0..size-1`` of shape ``(B, max(lengths))``."""
    gen = torch.Generator().manual_seed(seed)
    ilens = torch.tensor(list(lengths), dtype=torch.long)
    pad = torch.arange(max(lengths))[None, :] >= ilens[:, None]
    if tokens:
        ids = torch.randint(size, (len(lengths), max(lengths)), generator=gen)
        return ids.masked_fill(pad, 0), ilens
    feats = torch.randn(len(lengths), max(lengths), size, generator=gen)
    return feats.masked_fill(pad[..., None], 0.0), ilens


def _trace_lengths(shortest: int) -> List[int]:
    # a padded batch of two, so that any "nothing is padded" fast path stays out
    # of the traced graph (tracing records only the branch the example takes)
    longest = max(4 * shortest, 120)
    return [longest, max(shortest, (3 * longest) // 4)]


def _check_lengths(shortest: int) -> List[List[int]]:
    # other time lengths and batch sizes than the traced example, padded and not
    long = max(6 * shortest, 203)
    return [[long], [max(2 * shortest, 77), max(shortest, 59)]]


def check_export(
    reference: torch.nn.Module,
    run: Runner,
    what: str,
    lengths: Optional[List[List[int]]] = None,
    atol: float = CHECK_ATOL,
    rtol: float = CHECK_RTOL,
) -> float:
    """Compare ``run`` with ``reference`` (a wrapper) on the valid frames.

    Returns:
        The largest absolute difference.

    Raises:
        RuntimeError: on a length mismatch or a difference beyond the tolerance.
    """
    worst = 0.0
    for i, lens in enumerate(lengths or _check_lengths(reference.min_frames)):
        feats, ilens = example_inputs(
            reference.input_size, lens, seed=100 + i, tokens=reference.tokens
        )
        with torch.no_grad():
            ref, ref_lens = reference(feats, ilens)
        out, out_lens = run(feats, ilens)
        out, out_lens = torch.as_tensor(out), torch.as_tensor(out_lens)
        if out.shape != ref.shape or not torch.equal(out_lens.long(), ref_lens.long()):
            raise RuntimeError(
                f"{what}: output shape {tuple(out.shape)} / lengths "
                f"{out_lens.tolist()} differ from PyTorch's {tuple(ref.shape)} / "
                f"{ref_lens.tolist()} for input lengths {lens} (a size frozen by "
                "tracing?)"
            )
        for b, n in enumerate(ref_lens.tolist()):
            diff = (out[b, :n] - ref[b, :n]).abs()
            bound = atol + rtol * ref[b, :n].abs()
            worst = max(worst, float(diff.max()) if n else 0.0)
            if bool((diff > bound).any()):
                raise RuntimeError(
                    f"{what}: output differs from PyTorch by {float(diff.max()):.3g} "
                    f"for input lengths {lens} (utterance {b}); a data-dependent "
                    "branch frozen by tracing?"
                )
    return worst


# -- TorchScript -------------------------------------------------------------------
def trace_module(wrapper: EncoderWrapper):
    """``torch.jit.trace`` of ``wrapper`` on a padded example batch."""
    wrapper.eval()
    feats, ilens = example_inputs(
        wrapper.input_size, _trace_lengths(wrapper.min_frames), tokens=wrapper.tokens
    )
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(wrapper, (feats, ilens), check_trace=False)


def export_torchscript(
    encoder: torch.nn.Module,
    path,
    verify: bool = True,
    ctc: Optional[torch.nn.Module] = None,
) -> Path:
    """Trace the fused encoder and save it with ``torch.jit.save``.

    Args:
        encoder: a ``FusionFormerEncoder`` in eval mode (fused here if it is not).
        path: output file (``.pt``).
        verify: run the saved model on other lengths and compare with PyTorch.
        ctc: the model's ``CTC`` (see :class:`EncoderWrapper`).

    Returns:
        ``path`` as a ``Path``. Load with ``torch.jit.load(path)``; call it as
        ``encoded, encoded_lengths = module(feats, feats_lengths)``.
    """
    fused = fused_encoder(encoder)
    wrapper = EncoderWrapper(fused, ctc=ctc).eval()
    traced = trace_module(wrapper)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(path))
    if verify:
        loaded = torch.jit.load(str(path))

        def run(feats, ilens):
            with torch.no_grad():
                return loaded(feats, ilens)

        check_export(wrapper, run, f"TorchScript export {path}")
    return path


# -- TorchScript, streaming -----------------------------------------------------------
# chunk settings the streaming export is checked with, beside the encoder's own
STREAM_CHECK_FRAMES = 203  # input frames of the check utterance
STREAM_CHECK_ATOL = 1e-4


def stream_windows(
    frames: int, chunk_size: int, rate: int, context: int
) -> List[Tuple[int, int]]:
    """``(start, end)`` input windows of consecutive chunks of ``chunk_size`` output
    frames (as ``streaming.encode_chunk_by_chunk``): they overlap by the
    subsampling's receptive field."""
    window, stride = (chunk_size - 1) * rate + context, chunk_size * rate
    return [
        (start, min(start + window, frames))
        for start in range(0, frames - context + 1, stride)
    ]


def compare_chunks(
    eager: torch.nn.Module,
    step: Callable,
    chunk_size: int,
    left_chunks: int,
    frames: int,
    atol: float,
    what: str,
    seed: int = 0,
) -> float:
    """Feed one random utterance window by window to the eager
    ``eager.forward_chunk`` and to ``step``, and compare outputs and caches.

    ``step(window, offset, required_cache_size, ref)`` gets the eager result
    ``ref = (output, att_cache, cnn_cache)`` of the window and returns its own
    triple (``None``: stop here).

    Returns:
        The largest absolute difference.

    Raises:
        RuntimeError: on a shape mismatch or a difference beyond ``atol``.
    """
    embed = eager.embed
    xs, _ = example_inputs(
        eager.input_size, [frames], seed=seed, tokens=bool(embed.takes_tokens)
    )
    required = chunk_size * left_chunks if left_chunks >= 0 else -1
    att = cnn = torch.zeros(0, 0, 0, 0)
    offset, worst = 0, 0.0
    windows = stream_windows(frames, chunk_size, embed.rate(), embed.min_input_length())
    for n, (start, end) in enumerate(windows):
        window = xs[:, start:end]
        with torch.no_grad():
            ref = eager.forward_chunk(window, offset, required, att, cnn)
            got = step(window, offset, required, ref)
        if got is None:
            break
        for name, a, b in zip(("output", "att_cache", "cnn_cache"), got, ref):
            if a.shape != b.shape:
                raise RuntimeError(
                    f"{what}: chunk {n}: {name} of shape {tuple(a.shape)} differs "
                    f"from eager's {tuple(b.shape)}"
                )
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            worst = max(worst, diff)
            if diff > atol:
                raise RuntimeError(
                    f"{what}: chunk {n}: {name} differs from eager forward_chunk by "
                    f"{diff:.3g} (chunk_size {chunk_size}, left_chunks {left_chunks})"
                )
        _, att, cnn = ref
        offset += ref[0].size(1)
    return worst


def check_stream(
    eager: torch.nn.Module,
    scripted: torch.nn.Module,
    chunk_size: int,
    left_chunks: int = -1,
    frames: int = STREAM_CHECK_FRAMES,
    seed: int = 0,
    atol: float = STREAM_CHECK_ATOL,
    what: str = "streaming TorchScript",
) -> float:
    """Run ``scripted.forward_chunk`` and the eager ``eager.forward_chunk`` side by
    side, chunk by chunk, on one random utterance (:func:`compare_chunks`).

    Returns:
        The largest absolute difference of outputs and caches.
    """
    att = cnn = torch.zeros(0, 0, 0, 0)  # the scripted model's own caches

    def step(window, offset, required, ref):
        nonlocal att, cnn
        out, att, cnn = scripted.forward_chunk(window, offset, required, att, cnn)
        return out, att, cnn

    return compare_chunks(
        eager, step, chunk_size, left_chunks, frames, atol, what, seed
    )


def stream_check_settings(encoder: torch.nn.Module) -> List[Tuple[int, int]]:
    """``(chunk_size, left_chunks)`` the streaming export is checked with: the
    encoder's own (16 frames if it has none), one frame, and limited left
    context."""
    chunk = encoder.chunk_size if encoder.chunk_size > 0 else 16
    settings = [(chunk, encoder.left_chunks), (1, -1), (4, 2)]
    return list(dict.fromkeys(settings))


def export_torchscript_stream(
    encoder: torch.nn.Module, path, verify: bool = True
) -> Path:
    """Script the encoder's streaming path and save it with ``torch.jit.save``.

    The saved module is a :class:`~espnet_fusionformer.script.ScriptableChunkEncoder`:
    ``ys, att_cache, cnn_cache = module.forward_chunk(xs, offset,
    required_cache_size, att_cache, cnn_cache)`` (WeNet's interface; start with
    ``torch.zeros(0, 0, 0, 0)`` caches), plus ``subsampling_rate()`` and
    ``right_context()``.

    Args:
        encoder: a causal ``FusionFormerEncoder`` in eval mode (fused here if it
            is not).
        path: output file (``.pt``).
        verify: load the saved file and compare it with the eager
            ``forward_chunk``, chunk by chunk (outputs and caches, 1e-4), for the
            settings of :func:`stream_check_settings`.

    Raises:
        ValueError: if the encoder cannot stream.
    """
    from espnet_fusionformer.script import ScriptableChunkEncoder

    fused = fused_encoder(encoder)
    scripted = torch.jit.script(ScriptableChunkEncoder(fused))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(scripted, str(path))
    if verify:
        loaded = torch.jit.load(str(path))
        for chunk, left in stream_check_settings(fused):
            check_stream(
                fused, loaded, chunk, left, what=f"streaming TorchScript {path}"
            )
    return path


# -- ONNX --------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (C++ prints too); the text is dropped."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def onnx_export_module(
    wrapper: EncoderWrapper,
    path,
    opset: int = 17,
) -> str:
    """``torch.onnx.export`` of ``wrapper`` with dynamic batch/time axes.

    Tries, in order: the legacy TorchScript-based exporter (``dynamo=False``), then
    the dynamo exporter.

    Returns:
        The exporter that worked: ``"legacy"`` or ``"dynamo"``.

    Raises:
        RuntimeError: with every exporter's error if none works.
    """
    wrapper.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example_inputs(
        wrapper.input_size, _trace_lengths(wrapper.min_frames), tokens=wrapper.tokens
    )
    errors = []
    for method in ("legacy", "dynamo"):
        try:
            # (the legacy exporter prints the whole graph to stdout on failure)
            with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapper,
                    example,
                    str(path),
                    input_names=INPUT_NAMES,
                    output_names=OUTPUT_NAMES,
                    dynamic_axes=DYNAMIC_AXES,
                    opset_version=opset,
                    dynamo=method == "dynamo",
                )
            return method
        except Exception as err:  # reported below
            message = str(err).split(" [Caused by", 1)[0][:500]
            errors.append(f"{method} exporter: {type(err).__name__}: {message}")
            logging.warning("ONNX %s export failed: %s", method, message)
        finally:
            # torch.onnx.export restores the *wrapper's* mode on every submodule
            wrapper.eval()
    raise RuntimeError("ONNX export failed:\n" + "\n".join(errors))


def onnx_session(path, threads: Optional[int] = None):
    """An onnxruntime CPU session (``threads`` intra-op threads, 1 inter-op)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"]
    )


def verify_in_onnxruntime(path, check: Callable) -> None:
    """``check(session)`` on an onnxruntime session of ``path``; only a warning
    if onnxruntime is not installed."""
    try:
        session = onnx_session(path)
    except ImportError:
        logging.warning("onnxruntime is not installed: %s is not verified", path)
        return
    check(session)


def onnx_runner(session) -> Runner:
    def run(feats, ilens):
        out = session.run(
            OUTPUT_NAMES,
            {"feats": feats.numpy(), "feats_lengths": ilens.numpy().astype("int64")},
        )
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])

    return run


def export_onnx(
    encoder: torch.nn.Module,
    path,
    opset: int = 17,
    verify: bool = True,
    ctc: Optional[torch.nn.Module] = None,
) -> Path:
    """Export the fused encoder to ONNX (dynamic batch and time axes).

    Args:
        encoder: a ``FusionFormerEncoder`` in eval mode (fused here if it is not).
        path: output file (``.onnx``).
        opset: ONNX opset. (Default: ``17``)
        verify: run the file with onnxruntime (if installed) on other lengths and
            batch sizes and compare with PyTorch.
        ctc: the model's ``CTC`` (see :class:`EncoderWrapper`).

    Returns:
        ``path`` as a ``Path``; inputs ``feats`` (float32 ``(B, T, F)``),
        ``feats_lengths`` (int64 ``(B,)``); outputs ``encoded``, ``encoded_lengths``.
    """
    fused = fused_encoder(encoder)
    wrapper = EncoderWrapper(fused, ctc=ctc).eval()
    path = Path(path)
    method = onnx_export_module(wrapper, path, opset)
    if method != "legacy":
        logging.warning("ONNX: the plain legacy exporter failed, used %s", method)
    if verify:
        verify_in_onnxruntime(
            path, lambda s: check_export(wrapper, onnx_runner(s), f"ONNX export {path}")
        )
    return path


STREAM_INPUT_NAMES = ["chunk", "offset", "att_cache", "cnn_cache"]
STREAM_OUTPUT_NAMES = ["output", "new_att_cache", "new_cnn_cache"]


class OnnxStream:
    """Runs an exported fixed-cache chunk graph (:func:`export_onnx_stream`) in
    ONNX Runtime, keeping its caches and offset between calls.

    ``stream(window)`` takes ``(1, W, F)`` input frames (the next window, stride
    ``C * rate``) and returns ``(1, C, D)``; ``encode(xs)`` runs a whole ``(1, T, F)``
    utterance and returns ``(1, T', D)``: its last, shorter window is zero-padded to
    ``W`` and only the output frames of real input are kept (they also attend to the
    padded frames of that chunk, unlike the eager ``forward_chunk``, which gets a
    shorter chunk). ``reset()`` starts a new utterance.
    """

    def __init__(self, session, rate: int, context: int):
        import numpy as np

        self.session, self.rate, self.context = session, rate, context
        shapes = {i.name: i.shape for i in session.get_inputs()}
        self.window = int(shapes["chunk"][1])
        self.chunk_size = (self.window - context) // rate + 1
        self.att_shape = [int(v) for v in shapes["att_cache"]]
        self.cnn_shape = [int(v) for v in shapes["cnn_cache"]]
        self._np = np
        self.reset()

    def reset(self) -> None:
        np = self._np
        self.offset = 0
        self.att_cache = np.zeros(self.att_shape, dtype=np.float32)
        self.cnn_cache = np.zeros(self.cnn_shape, dtype=np.float32)

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        if window.size(1) != self.window:
            raise ValueError(
                f"the graph takes windows of {self.window} input frames, got "
                f"{window.size(1)}"
            )
        feeds = {
            "chunk": window.numpy(),
            "offset": self._np.array([self.offset], dtype=self._np.int64),
            "att_cache": self.att_cache,
            "cnn_cache": self.cnn_cache,
        }
        out, self.att_cache, self.cnn_cache = self.session.run(
            STREAM_OUTPUT_NAMES, feeds
        )
        self.offset += out.shape[1]
        return torch.from_numpy(out)

    def encode(self, xs: torch.Tensor) -> torch.Tensor:
        self.reset()
        frames, outputs = xs.size(1), []
        for start, end in stream_windows(
            frames, self.chunk_size, self.rate, self.context
        ):
            window = xs[:, start:end]
            valid = (window.size(1) - self.context) // self.rate + 1
            if window.size(1) < self.window:
                pad = xs.new_zeros(1, self.window - window.size(1), *xs.shape[2:])
                window = torch.cat([window, pad], dim=1)
            outputs.append(self(window)[:, :valid])
        return torch.cat(outputs, dim=1)


def export_onnx_stream(
    encoder: torch.nn.Module,
    path,
    chunk_size: int = 16,
    left_chunks: int = 4,
    opset: int = 17,
    verify: bool = True,
) -> Path:
    """Export the streaming path with fixed-size caches to ONNX (WeNet's CPU ONNX
    convention): one graph per chunk size and left context.

    The graph is :class:`~espnet_fusionformer.script.FixedCacheChunkEncoder`:
    inputs ``chunk`` ``(1, W, F)``, ``offset`` ``(1,)`` int64 (output frames so
    far), ``att_cache`` ``(L, H, R, 2 d_k)``, ``cnn_cache`` ``(L, 1, K-1, D)``;
    outputs ``output`` ``(1, C, D)``, ``new_att_cache``, ``new_cnn_cache``; start
    from zero caches. :class:`OnnxStream` drives it.

    Args:
        encoder: a causal ``FusionFormerEncoder`` in eval mode.
        path: output file (``.onnx``).
        chunk_size: output frames per chunk ``C``. (Default: ``16``, 640 ms)
        left_chunks: chunks of left context, ``R = C * left_chunks``. (Default: ``4``)
        opset: ONNX opset. (Default: ``17``)
        verify: run the file in ONNX Runtime (if installed) chunk by chunk against
            the eager ``forward_chunk`` (outputs and the filled cache slots,
            1e-3).

    Raises:
        ValueError: if the encoder cannot stream or ``left_chunks < 1``.
    """
    from espnet_fusionformer.script import FixedCacheChunkEncoder

    fused = fused_encoder(encoder)
    module = FixedCacheChunkEncoder(fused, chunk_size, left_chunks).eval()
    shapes = module.shapes()
    xs, _ = example_inputs(
        fused.input_size, [module.window], tokens=bool(fused.embed.takes_tokens)
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad(), _quiet_stdout():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            module.initial_inputs(xs[:, : shapes["chunk"][1]]),
            str(path),
            input_names=STREAM_INPUT_NAMES,
            output_names=STREAM_OUTPUT_NAMES,
            opset_version=opset,
            dynamo=False,
        )
    if verify:
        verify_in_onnxruntime(
            path,
            lambda s: check_onnx_stream(
                fused, s, chunk_size, left_chunks, what=str(path)
            ),
        )
    return path


def check_onnx_stream(
    eager: torch.nn.Module,
    session,
    chunk_size: int,
    left_chunks: int,
    frames: int = STREAM_CHECK_FRAMES,
    atol: float = CHECK_ATOL,
    what: str = "streaming ONNX",
) -> float:
    """Compare the ONNX chunk graph with the eager ``forward_chunk``
    (``required_cache_size = C * left_chunks``), window by window, on one random
    utterance: outputs and the filled slots of both caches (:func:`compare_chunks`).

    Returns:
        The largest absolute difference.
    """
    embed = eager.embed
    stream = OnnxStream(session, embed.rate(), embed.min_input_length())

    def step(window, offset, required, ref):
        if window.size(1) < stream.window:  # the graph takes whole windows only
            return None
        filled = ref[1].size(2)
        return (
            stream(window),
            torch.from_numpy(
                stream.att_cache[:, :, stream.att_cache.shape[2] - filled :]
            ),
            torch.from_numpy(stream.cnn_cache),
        )

    return compare_chunks(eager, step, chunk_size, left_chunks, frames, atol, what)


# -- description -------------------------------------------------------------------
def describe(encoder: torch.nn.Module) -> Dict:
    """Sizes and subsampling of a FusionFormer encoder, for ``encoder.json``."""
    info = dict(input_size=int(encoder.input_size), output_size=encoder.output_size())
    embed = getattr(encoder, "embed", None)
    specs = getattr(embed, "specs", None)
    if specs is not None:
        specs = [tuple(s) for s in specs]
        info["subsampling"] = dict(
            input_layer=getattr(embed, "input_layer", None),
            factor=math.prod(stride for _, stride in specs),
            convolutions=[dict(kernel=k, stride=s) for k, s in specs],
            min_input_frames=min_input_frames(encoder),
            output_length="for each conv: (L - kernel) // stride + 1",
        )
    pos_enc = getattr(embed, "pos_enc", None)
    if getattr(pos_enc, "max_length", lambda: None)() is not None:
        info["max_output_frames"] = pos_enc.max_length()  # a constant when traced
    for key in ("normalization", "activation"):
        if hasattr(encoder, key):
            info[key] = getattr(encoder, key)
    info["num_blocks"] = len(getattr(encoder, "encoders", []))
    return info


def describe_stream(encoder: torch.nn.Module) -> Dict:
    """How to drive ``encoder_stream.pt``, for ``encoder.json``."""
    embed = encoder.embed
    conv = encoder.encoders[0].conv_module
    rate, context = embed.rate(), embed.min_input_length()
    return dict(
        call="ys, att_cache, cnn_cache = module.forward_chunk(xs, offset, "
        "required_cache_size, att_cache, cnn_cache)",
        chunk_size=encoder.chunk_size,
        left_chunks=encoder.left_chunks,
        subsampling_rate=rate,
        right_context=context - 1,
        window="(chunk_size - 1) * subsampling_rate + right_context + 1 input frames, "
        "stride chunk_size * subsampling_rate",
        required_cache_size="chunk_size * left_chunks (-1: all)",
        att_cache=[len(encoder.encoders), encoder.heads(), "frames", 2 * encoder.d_k()],
        cnn_cache=[len(encoder.encoders), 1, conv.lorder, encoder.output_size()]
        if conv is not None
        else [0, 0, 0, 0],
        initial_caches="torch.zeros(0, 0, 0, 0)",
        max_output_frames=embed.pos_enc.max_length(),
    )


def describe_onnx_stream(
    encoder: torch.nn.Module, chunk_size: int, left_chunks: int
) -> Dict:
    """How to drive ``encoder_stream.onnx``, for ``encoder.json``."""
    embed, conv = encoder.embed, encoder.encoders[0].conv_module
    rate, context = embed.rate(), embed.min_input_length()
    cache, blocks = chunk_size * left_chunks, len(encoder.encoders)
    return dict(
        inputs=dict(
            chunk=[1, (chunk_size - 1) * rate + context, encoder.input_size],
            offset="int64 (1,): output frames so far",
            att_cache=[blocks, encoder.heads(), cache, 2 * encoder.d_k()],
            cnn_cache=[blocks, 1, conv.lorder, encoder.output_size()],
        ),
        outputs=dict(
            output=[1, chunk_size, encoder.output_size()],
            new_att_cache="as att_cache",
            new_cnn_cache="as cnn_cache",
        ),
        chunk_size=chunk_size,
        left_chunks=left_chunks,
        stride=chunk_size * rate,
        initial_caches="zeros",
    )


# -- CLI ---------------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionformer-export",
        description="Export the FusionFormer encoder of an ESPnet ASR model "
        "(fused fused form) to ONNX and/or TorchScript.",
    )
    parser.add_argument("--asr_train_config", required=True, help="config.yaml")
    parser.add_argument("--asr_model_file", required=True, help="model .pth")
    parser.add_argument("--outdir", required=True, help="output directory")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=["onnx", "torchscript", "torchscript_stream", "onnx_stream"],
        default=["onnx", "torchscript"],
        help="what to write (default: onnx and torchscript); torchscript_stream: "
        "encoder_stream.pt, the scripted forward_chunk of a causal model; "
        "onnx_stream: encoder_stream.onnx, its chunk path with fixed-size caches "
        "(--chunk_size, --left_chunks)",
    )
    parser.add_argument(
        "--chunk_size",
        type=int,
        default=None,
        help="onnx_stream: output frames per chunk (default: the model's "
        "chunk_size, or 16 if it has none)",
    )
    parser.add_argument(
        "--left_chunks",
        type=int,
        default=None,
        help="onnx_stream: chunks of left context, >= 1 (default: the model's "
        "left_chunks, or 4 if it has none or -1)",
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write the int8 copy (ONNX Runtime dynamic int8 quantization) of "
        "each ONNX file: encoder.int8.onnx, encoder_stream.int8.onnx (with "
        "onnx_stream); encoder.int8.onnx only if no ONNX is written",
    )
    parser.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip comparing the exported files with PyTorch",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """CLI entry point; returns the written ``encoder.json`` content."""
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")

    from espnet2.tasks.asr import ASRTask

    import espnet_fusionformer
    from espnet_fusionformer.encoder import FusionFormerEncoder

    espnet_fusionformer.register()
    model, train_args = ASRTask.build_model_from_file(
        args.asr_train_config, args.asr_model_file, "cpu"
    )
    model.eval()
    encoder = model.encoder
    if not isinstance(encoder, FusionFormerEncoder):
        raise SystemExit(
            f"the model's encoder is {type(encoder).__name__}, not fusionformer"
        )
    for extra in ("preencoder", "postencoder"):
        if getattr(model, extra, None) is not None:
            logging.warning("the model has a %s: it is NOT part of the export", extra)

    streams = [f for f in args.format if f.endswith("_stream")]
    if streams:
        obstacle = encoder.streaming_obstacle()
        if obstacle is None and encoder.interctc_use_conditioning:
            obstacle = "interctc_use_conditioning needs the CTC inside the encoder"
        if obstacle is not None:
            raise SystemExit(f"--format {' '.join(streams)}: {obstacle}")
    chunk_size = args.chunk_size
    if chunk_size is None:
        chunk_size = encoder.chunk_size if encoder.chunk_size > 0 else 16
    left_chunks = args.left_chunks
    if left_chunks is None:
        left_chunks = encoder.left_chunks if encoder.left_chunks > 0 else 4
    if "onnx_stream" in args.format and (chunk_size < 1 or left_chunks < 1):
        raise SystemExit(
            f"--format onnx_stream: --chunk_size ({chunk_size}) and --left_chunks "
            f"({left_chunks}) must be >= 1 (a fixed-size cache cannot hold all left "
            "context)"
        )

    # as ESPnetASRModel.encode: the encoder reads the CTC for these options
    ctc = None
    if encoder.interctc_use_conditioning or encoder.ctc_trim:
        ctc = model.ctc
    outdir = Path(args.outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = {}
    if "onnx" in args.format:
        files["onnx"] = export_onnx(
            encoder, outdir / "encoder.onnx", args.opset, args.verify, ctc
        ).name
        logging.info("wrote %s", outdir / files["onnx"])
    if args.int8 and ("onnx" in args.format or "onnx_stream" not in args.format):
        from espnet_fusionformer.quantize import export_int8

        int8 = export_int8(
            lambda src: export_onnx(encoder, src, args.opset, args.verify, ctc),
            outdir / "encoder.int8.onnx",
        )
        files["int8"] = int8.name
        logging.info("wrote %s", int8)
    if "torchscript" in args.format:
        files["torchscript"] = export_torchscript(
            encoder, outdir / "encoder.pt", args.verify, ctc
        ).name
        logging.info("wrote %s", outdir / files["torchscript"])
    if "torchscript_stream" in args.format:
        files["torchscript_stream"] = export_torchscript_stream(
            encoder, outdir / "encoder_stream.pt", args.verify
        ).name
        logging.info("wrote %s", outdir / files["torchscript_stream"])
    if "onnx_stream" in args.format:
        stream = export_onnx_stream(
            encoder,
            outdir / "encoder_stream.onnx",
            chunk_size,
            left_chunks,
            args.opset,
            args.verify,
        )
        files["onnx_stream"] = stream.name
        logging.info("wrote %s", stream)
        if args.int8:
            from espnet_fusionformer.quantize import export_int8

            int8 = export_int8(
                lambda src: export_onnx_stream(
                    encoder, src, chunk_size, left_chunks, args.opset, args.verify
                ),
                outdir / "encoder_stream.int8.onnx",
            )
            files["onnx_stream_int8"] = int8.name
            logging.info("wrote %s", int8)

    info = describe(encoder)
    if "torchscript_stream" in args.format:
        info["streaming"] = describe_stream(encoder)
    if "onnx_stream" in args.format:
        info["onnx_streaming"] = describe_onnx_stream(encoder, chunk_size, left_chunks)
    conf = vars(train_args)
    info.update(
        inputs=dict(
            feats="float32 (batch, time, input_size): frontend + normalize output",
            feats_lengths="int64 (batch,)",
        ),
        outputs=dict(
            encoded="float32 (batch, time_out, output_size)",
            encoded_lengths="int64 (batch,)",
        ),
        files=files,
        opset=args.opset if "onnx" in args.format or args.int8 else None,
        frontend=conf.get("frontend"),
        frontend_conf=conf.get("frontend_conf"),
        normalize=conf.get("normalize"),
        normalize_conf=conf.get("normalize_conf"),
        asr_train_config=str(args.asr_train_config),
        asr_model_file=str(args.asr_model_file),
        torch_version=torch.__version__,
        espnet_fusionformer_version=espnet_fusionformer.__version__,
    )
    (outdir / "encoder.json").write_text(json.dumps(info, indent=2, default=str))
    logging.info("wrote %s", outdir / "encoder.json")
    return info


if __name__ == "__main__":
    main()
