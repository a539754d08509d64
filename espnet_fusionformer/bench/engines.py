"""Ways of running an encoder: eager PyTorch, TorchScript, ONNX Runtime and
ONNX Runtime int8, every encoder exported and quantized the same way."""

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from espnet_fusionformer.bench.cases import CONFORMER, MODELS, UNFUSED

# engine -> label in tables
ENGINES = {
    "eager": "eager PyTorch",
    "torchscript": "TorchScript (trace+freeze)",
    "onnxruntime": "ONNX Runtime",
    "int8": "ONNX Runtime int8 (dynamic)",
}


class Engine:
    """One encoder run one way: ``engine(args)`` with ``args = prep(xs, ilens)``.

    ``slot`` is the column the timing goes to (``conformer``, ``layernorm``,
    ``fusionformer``); ``variant`` is ``fused`` or ``unfused``.
    """

    def __init__(
        self,
        engine: str,
        slot: str,
        fn: Callable,
        prep: Optional[Callable] = None,
        variant: str = "fused",
    ):
        self.engine, self.slot, self.variant = engine, slot, variant
        self.key = f"{slot}/{engine}/{variant}"
        self.fn = fn
        self.prep = prep or (lambda xs, ilens: (xs, ilens))

    def __call__(self, args):
        return self.fn(*args)


def eager_fn(module: torch.nn.Module) -> Callable:
    def run(xs, ilens):
        with torch.inference_mode():
            return module(xs, ilens)[0]

    return run


def script_fn(module) -> Callable:
    def run(xs, ilens):
        with torch.no_grad():
            return module(xs, ilens)[0]

    return run


def ort_prep(xs, ilens):
    return ({"feats": xs.numpy(), "feats_lengths": ilens.numpy()},)


def ort_fn(session) -> Callable:
    def run(feeds):
        return session.run(["encoded"], feeds)[0]

    return run


def short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    text = text.split(" [Caused by", 1)[0].split("\n")[0]
    return text[:300]


def wrappers(models: Dict[str, torch.nn.Module], input_size: int) -> Dict:
    """Every encoder wrapped the same way: ``(feats, feats_lengths) ->
    (encoded, encoded_lengths)``; ESPnet's through ``forward``, this package's
    through ``encode`` (``export.py``'s path: no input checks in the graph)."""
    from espnet_fusionformer.export import EncoderWrapper

    return {
        name: EncoderWrapper(
            models[name],
            call="forward" if name == CONFORMER else "encode",
            input_size=input_size,
        )
        .eval()
        .requires_grad_(False)
        for name in MODELS
    }


def build_exports(
    models: Dict[str, torch.nn.Module], conf: Dict, workdir: Path, log
) -> Tuple[Dict, Dict]:
    """TorchScript modules, ONNX files and int8 ONNX files of every encoder.

    Returns:
        ``(status, artifacts)``: per encoder and kind, what was done (method,
        check against eager, seconds, error) and the module or file.
    """
    from espnet_fusionformer.export import (
        check_export,
        onnx_export_module,
        onnx_runner,
        onnx_session,
        trace_module,
    )
    from espnet_fusionformer.quantize import export_int8

    status: Dict[str, Dict] = {name: {} for name in MODELS}
    artifacts: Dict[str, Dict] = {name: {} for name in MODELS}

    def attempt(name, kind, build):
        entry = status[name].setdefault(kind, {})
        start = time.perf_counter()
        try:
            artifacts[name][kind] = build(entry)
            entry["ok"] = True
        except Exception as err:
            entry.update(ok=False, error=short_error(err))
            log(f"{kind} of {name} failed: {short_error(err)}")
        entry["seconds"] = round(time.perf_counter() - start, 1)

    for name, wrapper in wrappers(models, conf["input_size"]).items():
        if conf["torchscript"]:

            def script(entry, wrapper=wrapper, name=name):
                traced = trace_module(wrapper)
                try:
                    traced = torch.jit.freeze(traced.eval())
                    entry["method"] = "torch.jit.trace + torch.jit.freeze"
                except Exception as err:
                    entry["method"] = "torch.jit.trace (freeze failed)"
                    entry["freeze_error"] = short_error(err)

                def run(xs, ilens):
                    with torch.no_grad():
                        return traced(xs, ilens)

                entry["max_abs_diff"] = check_export(wrapper, run, f"{name} TS")
                return traced

            attempt(name, "torchscript", script)
        if conf["onnx"]:

            def export(entry, wrapper=wrapper, name=name):
                path = workdir / f"{name}.onnx"
                entry["method"] = onnx_export_module(wrapper, path, conf["opset"])
                entry["size_mb"] = round(path.stat().st_size / 1e6, 1)
                runner = onnx_runner(onnx_session(path, 1))
                entry["max_abs_diff"] = check_export(wrapper, runner, f"{name} ONNX")
                return path

            attempt(name, "onnx", export)
        if conf["int8"]:

            def int8(entry, wrapper=wrapper, name=name):
                path = export_int8(
                    lambda src: onnx_export_module(wrapper, src, conf["opset"]),
                    workdir / f"{name}.int8.onnx",
                )
                entry["method"] = (
                    "onnxruntime.quantization.quantize_dynamic (QInt8 weights, "
                    "MatMul with constant B and >= 16 inputs; Gemm rewritten as "
                    "MatMul+Add; subsampling exported as im2col, its inputs "
                    "quantized before slicing)"
                )
                entry["size_mb"] = round(path.stat().st_size / 1e6, 1)
                entry.update(int8_error(wrapper, onnx_session(path, 1)))
                return path

            attempt(name, "int8", int8)
    return status, artifacts


def int8_error(wrapper, session, frames: int = 300) -> Dict:
    """Relative error ``|int8 - float| / |float|`` of the encoder output (one
    ``frames``-long random utterance), and the largest absolute difference."""
    from espnet_fusionformer.bench.cases import make_batch

    xs, ilens = make_batch(
        [frames], wrapper.input_size, torch.Generator().manual_seed(11)
    )
    with torch.no_grad():
        ref = wrapper(xs, ilens)[0]
    out = torch.from_numpy(session.run(["encoded"], ort_prep(xs, ilens)[0])[0])
    return dict(
        rel_error=round(float((out - ref).norm() / ref.norm()), 4),
        max_abs_diff=round(float((out - ref).abs().max()), 4),
    )


def make_engines(
    models: Dict[str, torch.nn.Module],
    artifacts: Dict,
    threads: int,
    log,
    kinds: Tuple[str, ...] = ("onnx", "int8"),
) -> List[Engine]:
    """Every engine that could be built, ONNX Runtime sessions at ``threads``
    (float ONNX and int8 only for the ``kinds`` asked for)."""
    from espnet_fusionformer.export import onnx_session

    engines = [Engine("eager", name, eager_fn(models[name])) for name in MODELS]
    engines.append(
        Engine("eager", "fusionformer", eager_fn(models[UNFUSED]), variant=UNFUSED)
    )
    for name in MODELS:
        traced = artifacts[name].get("torchscript")
        if traced is not None:
            engines.append(Engine("torchscript", name, script_fn(traced)))
    for kind, engine in (("onnx", "onnxruntime"), ("int8", "int8")):
        if kind not in kinds:
            continue
        for name in MODELS:
            path = artifacts[name].get(kind)
            if path is None:
                continue
            try:
                session = onnx_session(path, threads)
            except Exception as err:
                log(f"onnxruntime session of {name} {kind} failed: {err}")
                continue
            engines.append(Engine(engine, name, ort_fn(session), ort_prep))
    return engines
