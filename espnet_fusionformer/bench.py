"""CPU benchmark: ESPnet's ``ConformerEncoder`` vs ``FusionFormerEncoder``.

Both encoders are built with the same sizes and measured in one process,
interleaved (the engines alternate within every repeat, in alternating order,
after a warm-up), reporting the median and the spread over repeats::

    python -m espnet_fusionformer.bench            # full run, ~10 min on 2 cores
    python -m espnet_fusionformer.bench --quick    # small model, few repeats

A streaming section compares the causal FusionFormer (fused, ``forward_chunk``
with attention/convolution caches) with ESPnet's streaming
``ContextualBlockConformerEncoder`` (``forward_infer``) on one 10 s utterance:
per-chunk latency, real-time factor and first-token latency (``--no-streaming``
skips it).

Writes ``<out>/bench.md`` (table), ``<out>/bench.json`` and ``<out>/bench.png``.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

FRAMES_PER_SECOND = 100  # 10 ms fbank hop
FULL = dict(
    output_size=256,
    attention_heads=4,
    linear_units=2048,
    num_blocks=12,
    cnn_module_kernel=15,
    lengths=[67, 100, 260, 1000, 3000],
    batch_lengths=[600, 520, 460, 400, 340, 300, 260, 200],
    threads=[1, 2],
    repeats=15,
    min_repeats=5,
    budget=10.0,
    warmup=1,
    stream_frames=1000,
)
QUICK = dict(
    output_size=64,
    attention_heads=4,
    linear_units=256,
    num_blocks=2,
    cnn_module_kernel=15,
    lengths=[67, 260],
    batch_lengths=[200, 180, 160, 140, 120, 100, 80, 67],
    threads=[1],
    repeats=3,
    min_repeats=2,
    budget=1.0,
    warmup=1,
    stream_frames=1000,
)
# (engine, variant, frames, threads) -> target of the ratio FusionFormer/Conformer
TARGETS = {
    ("eager", "fused", 1000, 1): 0.85,
    ("eager", "fused", 260, 1): 0.85,
    ("eager", "fused", 67, 1): 0.82,
    ("onnxruntime", "fused", 1000, 1): 0.90,
    ("onnxruntime", "fused", 260, 1): 0.90,
    ("onnxruntime", "fused", 67, 1): 0.90,
    ("train", "train", None, None): 1.15,
}
NORM_OPS = {
    "aten::layer_norm",
    "aten::native_layer_norm",
    "aten::native_layer_norm_backward",
    "aten::batch_norm",
    "aten::_batch_norm_impl_index",
    "aten::native_batch_norm",
    "aten::_native_batch_norm_legit",
    "aten::_native_batch_norm_legit_no_training",
    "aten::native_batch_norm_backward",
}
ACT_OPS = {
    "aten::silu",
    "aten::silu_",
    "aten::silu_backward",
    "aten::relu",
    "aten::relu_",
    "aten::clamp_min",
    "aten::clamp_min_",
    "aten::threshold_backward",
    "aten::glu",
    "aten::glu_backward",
    "aten::sigmoid",
    "aten::sigmoid_",
    "aten::sigmoid_backward",
}
CONFORMER, FUSIONFORMER = "conformer", "fusionformer"
# Streaming: FusionFormer chunks of 16 output frames (640 ms at subsampling 4),
# 4 chunks of left context; ContextualBlockConformer blocks of 40 frames, hop 16,
# look-ahead 16 (ESPnet's usual streaming setting), fed 640 ms of features a call.
STREAMING = dict(
    chunk_size=16, left_chunks=4, block_size=40, hop_size=16, look_ahead=16
)
CBC_CLASS = "espnet2.asr.encoder.contextual_block_conformer_encoder." + (
    "ContextualBlockConformerEncoder"
)


# -- command line ------------------------------------------------------------------
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusionformer-bench",
        description="CPU latency/throughput/training benchmark of ESPnet's "
        "ConformerEncoder vs FusionFormerEncoder (same sizes, one process, "
        "interleaved repeats).",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="small model, few repeats (tests)")
    add("--out", default="bench_results", help="output directory")
    add("--repeats", type=int, help="max repeats per setting (default 15; quick 3)")
    add("--min-repeats", type=int, help="min repeats per setting (default 5)")
    add(
        "--budget",
        type=float,
        help="seconds per setting used to choose the repeats between min and max "
        "(default 12)",
    )
    add("--warmup", type=int, help="warm-up calls per engine and setting (1)")
    add("--threads", type=int, nargs="+", help="torch/ORT threads (default 1 2)")
    add("--lengths", type=int, nargs="+", help="batch-1 input frames (100 = 1 s)")
    add("--batch-lengths", type=int, nargs="+", help="frames of the mixed batch")
    add(
        "--batch-threads",
        type=int,
        help="threads of the batch throughput and training step (default: the "
        "smallest of --threads: stable on a shared machine)",
    )
    add("--input-size", type=int, default=80, help="feature size (80)")
    add("--output-size", type=int, help="model size (256)")
    add("--attention-heads", type=int, help="heads (4)")
    add("--linear-units", type=int, help="FFN units (2048)")
    add("--num-blocks", type=int, help="blocks (12)")
    add("--cnn-module-kernel", type=int, help="depthwise kernel (15)")
    add("--input-layer", default="conv2d", help="subsampling (conv2d)")
    add("--opset", type=int, default=17, help="ONNX opset (17)")
    add("--no-onnx", action="store_true", help="skip ONNX Runtime")
    add("--no-torchscript", action="store_true", help="skip TorchScript")
    add("--no-train", action="store_true", help="skip the training step")
    add("--no-profile", action="store_true", help="skip op shares/FLOPs/memory")
    add(
        "--no-streaming",
        action="store_true",
        help="skip the streaming comparison (FusionFormer forward_chunk vs "
        "ContextualBlockConformer)",
    )
    add(
        "--stream-frames",
        type=int,
        help="input frames of the streamed utterance (default 1000 = 10 s)",
    )
    add("--seed", type=int, default=0)
    return parser


def resolve(args: argparse.Namespace) -> Dict:
    """Fill unset options from the full (or ``--quick``) defaults."""
    base = QUICK if args.quick else FULL
    conf = {}
    for key, default in base.items():
        value = getattr(args, key, None)
        conf[key] = default if value is None else value
    for key in ("input_size", "input_layer", "opset", "seed", "out"):
        conf[key] = getattr(args, key)
    conf["batch_threads"] = args.batch_threads or min(conf["threads"])
    if conf["batch_threads"] not in conf["threads"]:
        conf["threads"] = sorted({*conf["threads"], conf["batch_threads"]})
    conf["quick"] = args.quick
    conf["onnx"] = not args.no_onnx
    conf["torchscript"] = not args.no_torchscript
    conf["train"] = not args.no_train
    conf["profile"] = not args.no_profile
    conf["streaming"] = not args.no_streaming
    return conf


# -- machine -----------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict:
    info = dict(
        cpu=cpu_model(),
        logical_cpus=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_default_threads=torch.get_num_threads(),
        mkldnn=torch.backends.mkldnn.is_available(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    for name in ("espnet", "onnxruntime", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # not installed
            info[name] = None
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


# -- models ------------------------------------------------------------------------


def _encoder_sizes(conf: Dict) -> Dict:
    """The sizes both encoders of a comparison share."""
    return dict(
        output_size=conf["output_size"],
        attention_heads=conf["attention_heads"],
        linear_units=conf["linear_units"],
        num_blocks=conf["num_blocks"],
        cnn_module_kernel=conf["cnn_module_kernel"],
        input_layer=conf["input_layer"],
        macaron_style=True,
    )


def build_models(conf: Dict) -> Dict[str, torch.nn.Module]:
    """ESPnet's Conformer, FusionFormer (training form), FusionFormer (fused)."""
    import inspect

    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_fusionformer import FusionFormerEncoder, fuse

    sizes = _encoder_sizes(conf)
    torch.manual_seed(conf["seed"])
    extra = {}
    if "use_flash_attn" in inspect.signature(ConformerEncoder.__init__).parameters:
        extra["use_flash_attn"] = False  # no effect on CPU; explicit
    conformer = ConformerEncoder(
        conf["input_size"],
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
        activation_type="swish",
        use_cnn_module=True,
        normalize_before=True,
        **sizes,
        **extra,
    ).eval()
    torch.manual_seed(conf["seed"])
    fusionformer = FusionFormerEncoder(conf["input_size"], **sizes)
    calibrate(fusionformer, conf)
    fusionformer.fuse_for_inference = False  # the unfused model, timed as is
    return {
        CONFORMER: conformer,
        FUSIONFORMER: fusionformer,
        "fused": fuse(fusionformer),
    }


def calibrate(encoder: torch.nn.Module, conf: Dict) -> None:
    """A few training-mode passes so the BatchNorms have real running statistics."""
    gen = torch.Generator().manual_seed(conf["seed"] + 1)
    encoder.train()
    with torch.no_grad():
        for _ in range(2):
            xs, ilens = make_batch([200, 150], conf["input_size"], gen)
            encoder(xs, ilens)
    encoder.eval()


def make_batch(
    lengths: Sequence[int], feats: int, gen: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded random features ``(B, max(lengths), feats)`` and lengths."""
    xs = torch.randn(len(lengths), max(lengths), feats, generator=gen)
    ilens = torch.tensor(list(lengths), dtype=torch.long)
    pad = torch.arange(max(lengths))[None, :, None] >= ilens[:, None, None]
    return xs.masked_fill(pad, 0.0), ilens


def model_info(models: Dict[str, torch.nn.Module], conf: Dict) -> Dict:
    def params(m):
        return sum(p.numel() for p in m.parameters())

    common = dict(
        d_model=conf["output_size"],
        heads=conf["attention_heads"],
        blocks=conf["num_blocks"],
        units=conf["linear_units"],
        kernel=conf["cnn_module_kernel"],
        input_size=conf["input_size"],
        input_layer=conf["input_layer"],
    )
    return {
        CONFORMER: dict(
            common,
            cls="espnet2.asr.encoder.conformer_encoder.ConformerEncoder",
            params=params(models[CONFORMER]),
        ),
        FUSIONFORMER: dict(
            common,
            cls="espnet_fusionformer.FusionFormerEncoder",
            params=params(models[FUSIONFORMER]),
            params_fused=params(models["fused"]),
        ),
    }


# -- engines -----------------------------------------------------------------------
class Engine:
    """One way of running one encoder: ``run(xs, ilens)`` after ``prepare``."""

    def __init__(self, key: str, model: str, variant: str, fn: Callable, prep=None):
        self.key, self.model, self.variant = key, model, variant
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


def build_exports(models, conf, workdir: Path, log) -> Tuple[Dict, Dict]:
    """TorchScript modules and ONNX files of both encoders, exported the same way
    (one wrapper ``(feats, feats_lengths) -> (encoded, encoded_lengths)``)."""
    from espnet_fusionformer.export import (
        EncoderWrapper,
        check_export,
        onnx_export_module,
        onnx_runner,
        onnx_session,
        trace_module,
    )

    wrappers = {
        CONFORMER: EncoderWrapper(
            models[CONFORMER], call="forward", input_size=conf["input_size"]
        ).eval(),
        FUSIONFORMER: EncoderWrapper(
            models["fused"], call="encode", input_size=conf["input_size"]
        ).eval(),
    }
    status: Dict[str, Dict] = {CONFORMER: {}, FUSIONFORMER: {}}
    artifacts: Dict[str, Dict] = {CONFORMER: {}, FUSIONFORMER: {}}
    for name, wrapper in wrappers.items():
        if conf["torchscript"]:
            entry = status[name].setdefault("torchscript", {})
            start = time.perf_counter()
            try:
                traced = trace_module(wrapper)
                try:
                    traced = torch.jit.freeze(traced.eval())
                    entry["method"] = "torch.jit.trace + torch.jit.freeze"
                except Exception as err:
                    entry["method"] = "torch.jit.trace (freeze failed)"
                    entry["freeze_error"] = short_error(err)

                def run(xs, ilens, traced=traced):
                    with torch.no_grad():
                        return traced(xs, ilens)

                entry["max_abs_diff"] = check_export(wrapper, run, f"{name} TS")
                entry["ok"] = True
                artifacts[name]["torchscript"] = traced
            except Exception as err:
                entry.update(ok=False, error=short_error(err))
                log(f"TorchScript of {name} failed: {short_error(err)}")
            entry["seconds"] = round(time.perf_counter() - start, 1)
        if conf["onnx"]:
            entry = status[name].setdefault("onnx", {})
            path = workdir / f"{name}.onnx"
            start = time.perf_counter()
            try:
                entry["method"] = onnx_export_module(wrapper, path, conf["opset"])
                entry["size_mb"] = round(path.stat().st_size / 1e6, 1)
                session = onnx_session(path, 1)
                entry["max_abs_diff"] = check_export(
                    wrapper, onnx_runner(session), f"{name} ONNX"
                )
                del session
                entry["ok"] = True
                artifacts[name]["onnx"] = path
            except Exception as err:
                entry.update(ok=False, error=short_error(err))
                log(f"ONNX export of {name} failed: {short_error(err)}")
            entry["seconds"] = round(time.perf_counter() - start, 1)
    return status, artifacts


def make_engines(models, artifacts, sessions) -> List[Engine]:
    engines = [
        Engine("conformer/eager", CONFORMER, "eager", eager_fn(models[CONFORMER])),
        Engine(
            "fusionformer/eager-unfused",
            FUSIONFORMER,
            "unfused",
            eager_fn(models[FUSIONFORMER]),
        ),
        Engine("fusionformer/eager", FUSIONFORMER, "fused", eager_fn(models["fused"])),
    ]
    for name in (CONFORMER, FUSIONFORMER):
        traced = artifacts[name].get("torchscript")
        if traced is not None:
            engines.append(
                Engine(f"{name}/torchscript", name, "fused", script_fn(traced))
            )
    for name in (CONFORMER, FUSIONFORMER):
        session = sessions.get(name)
        if session is not None:
            engines.append(
                Engine(f"{name}/onnxruntime", name, "fused", ort_fn(session), ort_prep)
            )
    return engines


# -- timing ------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times: List[float]) -> Dict:
    """Seconds -> milliseconds statistics (median, quartiles, min, max); the raw
    times stay in repeat order (``times_ms``)."""
    ms = [t * 1000 for t in times]
    return dict(
        median_ms=round(quantile(ms, 0.5), 3),
        p25_ms=round(quantile(ms, 0.25), 3),
        p75_ms=round(quantile(ms, 0.75), 3),
        min_ms=round(min(ms), 3),
        max_ms=round(max(ms), 3),
        n=len(ms),
        times_ms=[round(t, 3) for t in ms],
    )


def paired_ratio(row: Dict) -> Optional[Dict]:
    """Per-repeat ratios FusionFormer/Conformer (both timed in the same repeat,
    so a load change hits both): median and quartiles."""
    c, f = row.get(CONFORMER), row.get(FUSIONFORMER)
    if not c or not f or c["n"] != f["n"]:
        return None
    ratios = [b / a for a, b in zip(c["times_ms"], f["times_ms"]) if a > 0]
    if not ratios:
        return None
    return dict(
        median=round(quantile(ratios, 0.5), 3),
        p25=round(quantile(ratios, 0.25), 3),
        p75=round(quantile(ratios, 0.75), 3),
    )


def time_interleaved(
    calls: Dict[str, Callable[[], object]], conf: Dict, warmup_extra: Dict = None
) -> Dict[str, List[float]]:
    """Time every callable, alternating them in each repeat (order reversed every
    other repeat); the warm-up call estimates the cost that sets the repeats."""
    estimate = 0.0
    for key, call in calls.items():
        for _ in range(conf["warmup"] + (warmup_extra or {}).get(key, 0)):
            start = time.perf_counter()
            call()
            last = time.perf_counter() - start
        estimate += last
    repeats = int(conf["budget"] / max(estimate, 1e-6))
    repeats = max(conf["min_repeats"], min(conf["repeats"], repeats))
    times: Dict[str, List[float]] = {key: [] for key in calls}
    order = list(calls)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for key in order if r % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                calls[key]()
                times[key].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def seconds_label(frames: int) -> str:
    sec = frames / FRAMES_PER_SECOND
    return f"{sec:g} s" if frames != 67 else f"{sec:g} s chunk"


def comparison_rows(
    times: Dict[str, List[float]],
    engines: List[Engine],
    base: Dict,
) -> List[Dict]:
    """Rows FusionFormer vs Conformer: eager (unfused and fused), TorchScript, ORT."""
    by_key = {e.key: e for e in engines}
    pairs = [
        ("eager", "unfused", "conformer/eager", "fusionformer/eager-unfused"),
        ("eager", "fused", "conformer/eager", "fusionformer/eager"),
        ("torchscript", "fused", "conformer/torchscript", "fusionformer/torchscript"),
        ("onnxruntime", "fused", "conformer/onnxruntime", "fusionformer/onnxruntime"),
    ]
    rows = []
    for engine, variant, conf_key, ff_key in pairs:
        if conf_key not in by_key and ff_key not in by_key:
            continue
        row = dict(base, engine=engine, variant=variant)
        for name, key in ((CONFORMER, conf_key), (FUSIONFORMER, ff_key)):
            row[name] = summarize(times[key]) if key in times else None
        rows.append(finish_row(row))
    return rows


def finish_row(row: Dict) -> Dict:
    c, f = row.get(CONFORMER), row.get(FUSIONFORMER)
    row["paired_ratio"] = paired_ratio(row)
    row["ratio"] = (
        round(f["median_ms"] / c["median_ms"], 3)
        if c and f and c["median_ms"] > 0
        else None
    )
    key = (row["engine"], row["variant"], row.get("frames"), row.get("threads"))
    if row["engine"] == "train":
        key = ("train", "train", None, None)
    target = TARGETS.get(key)
    row["target"] = target
    row["met"] = (
        None if target is None or row["ratio"] is None else row["ratio"] <= target
    )
    return row


# -- profiling ---------------------------------------------------------------------
def op_shares(call: Callable[[], object], repeats: int = 2, warm: bool = True) -> Dict:
    """Self-CPU-time shares of normalization and activation ops (by op name)."""
    from torch.profiler import ProfilerActivity, profile

    if warm:
        call()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            call()
    total = norm = act = 0.0
    per_op = {}
    for item in prof.key_averages():
        t = item.self_cpu_time_total
        total += t
        per_op[item.key] = per_op.get(item.key, 0.0) + t
        if item.key in NORM_OPS:
            norm += t
        elif item.key in ACT_OPS:
            act += t
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:8]
    return dict(
        norm_share=round(norm / total, 4) if total else None,
        act_share=round(act / total, 4) if total else None,
        norm_ops={k: round(v / total, 4) for k, v in per_op.items() if k in NORM_OPS},
        act_ops={k: round(v / total, 4) for k, v in per_op.items() if k in ACT_OPS},
        top_ops=[(k, round(v / total, 4)) for k, v in top],
    )


def module_shares(model: torch.nn.Module, call: Callable[[], object]) -> Dict:
    """Wall-time shares spent inside norm / activation *modules* (forward hooks).

    Counts what op names miss: FusionFormer's ``MaskedBatchNorm`` runs as
    elementwise ops, ESPnet's ``Swish`` as ``x * sigmoid(x)``.
    """
    norms = (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    acts = (torch.nn.ReLU, torch.nn.SiLU, torch.nn.GELU, torch.nn.GLU)
    spent = {"norm": 0.0, "act": 0.0}
    handles = []
    for module in model.modules():
        kind = None
        if isinstance(module, norms):
            kind = "norm"
        elif isinstance(module, acts) or type(module).__name__ == "Swish":
            kind = "act"
        if kind is None:
            continue

        def pre(mod, inputs, kind=kind):
            mod.__dict__["_bench_start"] = time.perf_counter()

        def post(mod, inputs, output, kind=kind):
            spent[kind] += time.perf_counter() - mod.__dict__.pop("_bench_start")

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        call()
        spent.update(norm=0.0, act=0.0)
        start = time.perf_counter()
        call()
        total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return dict(
        norm_module_share=round(spent["norm"] / total, 4),
        act_module_share=round(spent["act"] / total, 4),
    )


def peak_tensor_memory(call: Callable[[], object]) -> float:
    """Peak bytes of tensors allocated during ``call`` (MB), from the allocation
    and free events of ``torch.profiler(profile_memory=True)`` (CPU allocator;
    tensors alive before the call are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return round(peak / 1e6, 2)


def flops(call: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


# -- training step -----------------------------------------------------------------
def train_step_fn(model: torch.nn.Module, xs, ilens) -> Callable[[], object]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        ys, olens, _ = model(xs, ilens)
        valid = torch.arange(ys.size(1))[None, :] < olens[:, None]
        loss = ys.square().mean(-1).masked_select(valid).mean()
        loss.backward()
        return loss

    return step


# -- streaming ---------------------------------------------------------------------
def build_streaming_models(conf: Dict) -> Dict[str, torch.nn.Module]:
    """ESPnet's ContextualBlockConformer and a causal FusionFormer (fused), same
    sizes as the full-context pair."""
    from espnet2.asr.encoder.contextual_block_conformer_encoder import (
        ContextualBlockConformerEncoder,
    )

    from espnet_fusionformer import FusionFormerEncoder, fuse

    sizes = _encoder_sizes(conf)
    torch.manual_seed(conf["seed"])
    cbc = ContextualBlockConformerEncoder(
        conf["input_size"],
        block_size=STREAMING["block_size"],
        hop_size=STREAMING["hop_size"],
        look_ahead=STREAMING["look_ahead"],
        normalize_before=True,
        activation_type="swish",
        use_cnn_module=True,
        **sizes,
    ).eval()
    torch.manual_seed(conf["seed"])
    ff = FusionFormerEncoder(
        conf["input_size"],
        causal=True,
        chunk_size=STREAMING["chunk_size"],
        left_chunks=STREAMING["left_chunks"],
        **sizes,
    )
    calibrate(ff, conf)
    return {CONFORMER: cbc, FUSIONFORMER: fuse(ff)}


def ff_stream(encoder, xs: torch.Tensor) -> List[Tuple[float, int]]:
    """Encode ``(1, T, F)`` chunk by chunk with ``forward_chunk`` and caches, as
    ``streaming.encode_chunk_by_chunk`` does: ``(seconds, output frames)`` per call."""
    chunk, left = STREAMING["chunk_size"], STREAMING["left_chunks"]
    rate, context = encoder.embed.rate(), encoder.embed.min_input_length()
    window, stride = (chunk - 1) * rate + context, chunk * rate
    required = chunk * left if left >= 0 else -1
    att = cnn = torch.zeros(0, 0, 0, 0)
    calls, offset = [], 0
    with torch.inference_mode():
        for start in range(0, xs.size(1) - context + 1, stride):
            t0 = time.perf_counter()
            ys, att, cnn = encoder.forward_chunk(
                xs[:, start : start + window], offset, required, att, cnn
            )
            calls.append((time.perf_counter() - t0, ys.size(1)))
            offset += ys.size(1)
    return calls


def cbc_feed(encoder) -> int:
    """Input frames the ContextualBlockConformer is fed per call: one hop of
    output frames (640 ms at hop 16 and subsampling 4)."""
    return STREAMING["hop_size"] * getattr(encoder, "subsample", 4)


def cbc_stream(encoder, xs: torch.Tensor) -> List[Tuple[float, int]]:
    """Feed ``(1, T, F)`` to ``forward_infer`` in pieces of ``cbc_feed`` frames,
    ``is_final`` on the last: ``(seconds, output frames)`` per call."""
    feed = cbc_feed(encoder)
    states, calls = None, []
    with torch.inference_mode():
        for start in range(0, xs.size(1), feed):
            piece = xs[:, start : start + feed]
            final = start + feed >= xs.size(1)
            t0 = time.perf_counter()
            ys, _, states = encoder.forward_infer(
                piece, torch.tensor([piece.size(1)]), states, is_final=final
            )
            calls.append((time.perf_counter() - t0, ys.size(1)))
    return calls


def cbc_first_output_frames(encoder, xs: torch.Tensor) -> int:
    """Fewest input frames after which ``forward_infer`` (not final) returns
    output: the audio the first encoder output waits for."""
    with torch.inference_mode():
        for frames in range(1, xs.size(1) + 1):
            ys, _, _ = encoder.forward_infer(
                xs[:, :frames], torch.tensor([frames]), None, is_final=False
            )
            if ys.size(1) > 0:
                return frames
    return xs.size(1)


def first_output_fns(models, xs: torch.Tensor) -> Dict[str, Tuple[int, Callable]]:
    """Per encoder: input frames the first output needs, and a call computing that
    first output from a fresh state."""
    ff, cbc = models[FUSIONFORMER], models[CONFORMER]
    chunk = STREAMING["chunk_size"]
    ff_frames = (chunk - 1) * ff.embed.rate() + ff.embed.min_input_length()
    required = chunk * STREAMING["left_chunks"]
    cbc_frames = cbc_first_output_frames(cbc, xs)

    def ff_first():
        empty = torch.zeros(0, 0, 0, 0)
        with torch.inference_mode():
            return ff.forward_chunk(xs[:, :ff_frames], 0, required, empty, empty)

    def cbc_first():
        with torch.inference_mode():
            return cbc.forward_infer(
                xs[:, :cbc_frames], torch.tensor([cbc_frames]), None, is_final=False
            )

    return {FUSIONFORMER: (ff_frames, ff_first), CONFORMER: (cbc_frames, cbc_first)}


def run_streaming(conf: Dict, threads: int, log) -> Tuple[List[Dict], Dict]:
    """Interleaved streaming runs of both encoders on one utterance: per-chunk
    latency, total compute (real-time factor) and first-token latency rows."""
    models = build_streaming_models(conf)
    frames = conf["stream_frames"]
    audio_s = frames / FRAMES_PER_SECOND
    gen = torch.Generator().manual_seed(conf["seed"] + 3)
    xs = torch.randn(1, frames, conf["input_size"], generator=gen)
    streams = {
        FUSIONFORMER: lambda: ff_stream(models[FUSIONFORMER], xs),
        CONFORMER: lambda: cbc_stream(models[CONFORMER], xs),
    }
    firsts = first_output_fns(models, xs)
    estimate = 0.0
    out_frames, n_calls = {}, {}
    for name in (CONFORMER, FUSIONFORMER):
        for _ in range(max(conf["warmup"], 1)):
            start = time.perf_counter()
            calls = streams[name]()
            firsts[name][1]()
            last = time.perf_counter() - start
        estimate += last
        out_frames[name] = sum(n for _, n in calls)
        n_calls[name] = len(calls)
    if out_frames[FUSIONFORMER] != out_frames[CONFORMER]:
        log(f"streaming: output frames differ {out_frames}")
    repeats = int(conf["budget"] / max(estimate, 1e-6))
    repeats = max(conf["min_repeats"], min(conf["repeats"], repeats))
    chunk_times: Dict[str, List[float]] = {CONFORMER: [], FUSIONFORMER: []}
    totals: Dict[str, List[float]] = {CONFORMER: [], FUSIONFORMER: []}
    first: Dict[str, List[float]] = {CONFORMER: [], FUSIONFORMER: []}
    order = [CONFORMER, FUSIONFORMER]
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            names = order if r % 2 == 0 else order[::-1]
            for name in names:
                calls = streams[name]()
                chunk_times[name] += [t for t, n in calls if n > 0]
                totals[name].append(sum(t for t, _ in calls))
            for name in names:
                start = time.perf_counter()
                firsts[name][1]()
                compute = time.perf_counter() - start
                first[name].append(firsts[name][0] / FRAMES_PER_SECOND + compute)
    finally:
        gc.enable()
    base = dict(
        section="streaming",
        engine="streaming",
        variant="fused",
        frames=frames,
        audio_s=audio_s,
        threads=threads,
        batch=1,
    )
    rows = []
    for metric, label, values in (
        ("chunk", "per-chunk latency (16 fr = 640 ms)", chunk_times),
        ("total", f"{audio_s:g} s stream, total compute", totals),
        ("first_token", "first-token latency (wait + compute)", first),
    ):
        row = dict(base, metric=metric, label=label)
        for name in (CONFORMER, FUSIONFORMER):
            stats = summarize(values[name])
            stats["p90_ms"] = round(quantile(stats["times_ms"], 0.9), 3)
            if metric == "total":
                stats["rtf"] = round(stats["median_ms"] / 1000 / audio_s, 4)
            if metric == "first_token":
                stats["wait_ms"] = round(1000 * firsts[name][0] / FRAMES_PER_SECOND, 1)
            row[name] = stats
        rows.append(finish_row(row))
    info = dict(
        threads=threads,
        audio_s=audio_s,
        repeats=repeats,
        fusionformer=dict(
            cls="espnet_fusionformer.FusionFormerEncoder (causal, fused)",
            chunk_size=STREAMING["chunk_size"],
            left_chunks=STREAMING["left_chunks"],
            first_output_input_frames=firsts[FUSIONFORMER][0],
            output_frames=out_frames[FUSIONFORMER],
            calls=n_calls[FUSIONFORMER],
            params=sum(p.numel() for p in models[FUSIONFORMER].parameters()),
        ),
        conformer=dict(
            cls=CBC_CLASS,
            block_size=STREAMING["block_size"],
            hop_size=STREAMING["hop_size"],
            look_ahead=STREAMING["look_ahead"],
            feed_frames=cbc_feed(models[CONFORMER]),
            first_output_input_frames=firsts[CONFORMER][0],
            output_frames=out_frames[CONFORMER],
            calls=n_calls[CONFORMER],
            params=sum(p.numel() for p in models[CONFORMER].parameters()),
        ),
    )
    return rows, info


# -- report ------------------------------------------------------------------------
def fmt_stats(s: Optional[Dict]) -> str:
    if not s:
        return "n/a"
    return f"{s['median_ms']:.1f} [{s['p25_ms']:.1f}–{s['p75_ms']:.1f}]"


def fmt_paired(p: Optional[Dict]) -> str:
    if not p:
        return "n/a"
    return f"{p['median']:.3f} [{p['p25']:.2f}–{p['p75']:.2f}]"


def fmt_ratio(ratio: Optional[float]) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def row_label(row: Dict) -> str:
    engine = {
        "eager": "eager",
        "torchscript": "TorchScript (trace+freeze)",
        "onnxruntime": "ONNX Runtime",
    }.get(row["engine"], row["engine"])
    variant = {"unfused": ", FF unfused", "fused": ", FF fused"}.get(row["variant"], "")
    if row["engine"] != "eager":
        variant = ""
    if row["section"] == "latency":
        return f"{engine}{variant}, {row['label']} ({row['frames']} fr)"
    return (
        f"{row['label']}{', ' + engine + variant if row['engine'] != 'train' else ''}"
    )


def status(row: Dict) -> str:
    if row["target"] is None:
        return ""
    if row["met"] is None:
        return f"≤ {row['target']:.2f}: n/a"
    return f"≤ {row['target']:.2f}: **{'met' if row['met'] else 'missed'}**"


def busy_warning(m: Dict) -> str:
    loads = [x[0] for x in (m.get("loadavg_start"), m.get("loadavg_end")) if x]
    cpus = m.get("logical_cpus") or 1
    if loads and max(loads) > cpus - 0.5:
        return (
            f". **The 1-min load average reached {max(loads):.1f} on {cpus} CPUs: "
            "other processes competed for the cores, so multi-thread timings "
            "(and their spread) are unreliable; 1-thread rows are the robust ones.**"
        )
    return ""


def markdown(result: Dict) -> str:
    m, conf, models = result["machine"], result["config"], result["models"]
    c, f = models[CONFORMER], models[FUSIONFORMER]
    lines = [
        "# FusionFormer vs ESPnet Conformer: CPU benchmark",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs; torch "
        f"{m['torch']}, onnxruntime {m.get('onnxruntime')}, espnet "
        f"{m.get('espnet')}, Python {m['python']}; {m['date']}",
        f"- Load average at start/end: {m.get('loadavg_start')} / "
        f"{m.get('loadavg_end')} (shared machine: other jobs may add noise)"
        + busy_warning(m),
        f"- Models: {c['blocks']} blocks, d_model {c['d_model']}, {c['heads']} heads, "
        f"FFN {c['units']}, kernel {c['kernel']}, {c['input_layer']} subsampling, "
        f"{c['input_size']}-dim features at {FRAMES_PER_SECOND} frames/s. "
        f"Parameters: Conformer {c['params'] / 1e6:.2f} M, FusionFormer "
        f"{f['params'] / 1e6:.2f} M (fused: {f['params_fused'] / 1e6:.2f} M)",
        f"- Timing: eval mode, `torch.inference_mode` (eager) / `no_grad` "
        f"(TorchScript); engines interleaved in every repeat (order alternating), "
        f"{conf['warmup']} warm-up call(s) each; repeats per setting between "
        f"{conf['min_repeats']} and {conf['repeats']} (budget {conf['budget']} s). "
        f"Cells: median [25th–75th percentile] in ms. Ratio = FusionFormer / "
        f"Conformer medians (lower is better; the verdict uses it); paired ratio = "
        f"median [quartiles] of the per-repeat ratios (both timed in the same "
        f"repeat). Total run: {result['wall_time_s']:.0f} s"
        + (
            " — **--quick: tiny model, numbers not meaningful**"
            if conf["quick"]
            else ""
        ),
        "",
        "| setting | threads | batch | Conformer ms | FusionFormer ms | ratio | "
        "paired ratio | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        if row["section"] == "streaming":
            continue
        lines.append(
            f"| {row_label(row)} | {row['threads']} | {row['batch']} | "
            f"{fmt_stats(row.get(CONFORMER))} | {fmt_stats(row.get(FUSIONFORMER))} | "
            f"{fmt_ratio(row['ratio'])} | {fmt_paired(row.get('paired_ratio'))} | "
            f"{status(row)} |"
        )
    lines += ["", "## Targets", ""]
    for row in result["rows"]:
        if row["target"] is not None:
            ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.3f}"
            verdict = (
                "n/a" if row["met"] is None else ("met" if row["met"] else "MISSED")
            )
            lines.append(
                f"- {row_label(row)}, {row['threads']} thread(s): {ratio} "
                f"(target ≤ {row['target']:.2f}) — {verdict}"
            )
    lines += streaming_lines(result)
    lines += static_lines(result)
    lines += ["", "## Exports", ""]
    for name, entries in result["exports"].items():
        for kind, e in entries.items():
            if e.get("ok"):
                lines.append(
                    f"- {name} {kind}: {e.get('method')}, max |diff| vs eager "
                    f"{e.get('max_abs_diff', float('nan')):.2e} on lengths/batches "
                    f"other than the traced one ({e.get('seconds')} s)"
                )
            else:
                lines.append(f"- {name} {kind}: **FAILED** — {e.get('error')}")
    if result["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in result["errors"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def streaming_notes(conf: Dict) -> List[str]:
    chunk, left = STREAMING["chunk_size"], STREAMING["left_chunks"]
    return [
        f"Streaming (1 utterance of {conf['stream_frames']} frames = "
        f"{conf['stream_frames'] / FRAMES_PER_SECOND:g} s, batch 1, "
        f"{conf['batch_threads']} thread(s), torch.inference_mode, the two "
        "encoders alternating within every repeat): FusionFormer = causal "
        f"FusionFormerEncoder, fused, forward_chunk with attention and convolution "
        f"caches, chunks of {chunk} output frames ({chunk * 40} ms at subsampling 4), "
        f"{left} chunks of left context, each call fed its chunk's input window "
        "((chunk-1)*4+7 frames); 'Conformer' in the streaming table = ESPnet's "
        f"{CBC_CLASS} (same sizes, macaron, swish; block_size "
        f"{STREAMING['block_size']}, hop_size {STREAMING['hop_size']}, look_ahead "
        f"{STREAMING['look_ahead']}), forward_infer fed {STREAMING['hop_size'] * 4} "
        "input frames (640 ms) per call, is_final on the last. Encoders only: no "
        "frontend, no decoding.",
        "Per-chunk latency: wall time of every call that returned encoder output "
        "(all repeats pooled; median and 90th percentile). Real-time factor: total "
        "compute of the whole stream / audio duration (median over repeats).",
        "First-token latency (encoder only) = the audio the first output waits for "
        "+ the processing time of the call that computes it, from a fresh state. "
        "The wait is the input the first output needs at 10 ms per frame: "
        "FusionFormer one chunk window ((chunk-1)*4+7 frames, i.e. the chunk's "
        "640 ms plus the subsampling's 30 ms); ContextualBlockConformer the fewest "
        "frames after which forward_infer returns output (a full 40-frame block "
        "with its 16-frame look-ahead). The STFT window's own look-ahead (half an "
        "FFT) is the same for both and not counted.",
    ]


def streaming_lines(result: Dict) -> List[str]:
    rows = {r["metric"]: r for r in result["rows"] if r["section"] == "streaming"}
    info = result.get("streaming") or {}
    if not rows or not info:
        return []
    ff, cbc = info[FUSIONFORMER], info[CONFORMER]

    def cell(row, name, fmt):
        stats = row.get(name)
        return fmt(stats) if stats else "n/a"

    lines = [
        "",
        f"## Streaming ({info['audio_s']:g} s utterance, batch 1, "
        f"{info['threads']} thread(s), {info['repeats']} repeats)",
        "",
        "| metric | ContextualBlockConformer (ESPnet) | FusionFormer (causal, "
        "fused, forward_chunk) | ratio FF/CBC |",
        "|---|---:|---:|---:|",
    ]
    if "chunk" in rows:
        r = rows["chunk"]
        fmt = lambda s: f"{s['median_ms']:.1f} / {s['p90_ms']:.1f}"  # noqa: E731
        lines.append(
            f"| per-chunk latency, median / p90 ms (calls with output) | "
            f"{cell(r, CONFORMER, fmt)} | {cell(r, FUSIONFORMER, fmt)} | "
            f"{fmt_ratio(r['ratio'])} |"
        )
    if "total" in rows:
        r = rows["total"]
        fmt = lambda s: f"{s['rtf']:.4f} ({s['median_ms']:.0f} ms)"  # noqa: E731
        lines.append(
            f"| real-time factor (total compute) | {cell(r, CONFORMER, fmt)} | "
            f"{cell(r, FUSIONFORMER, fmt)} | {fmt_ratio(r['ratio'])} |"
        )
    if "first_token" in rows:
        r = rows["first_token"]

        def fmt(s):
            compute = s["median_ms"] - s["wait_ms"]
            return f"{s['median_ms']:.0f} ({s['wait_ms']:.0f} wait + {compute:.1f})"

        lines.append(
            f"| first-token latency ms (audio wait + compute) | "
            f"{cell(r, CONFORMER, fmt)} | {cell(r, FUSIONFORMER, fmt)} | "
            f"{fmt_ratio(r['ratio'])} |"
        )
    lines.append(
        f"| calls / output frames | {cbc['calls']} / {cbc['output_frames']} | "
        f"{ff['calls']} / {ff['output_frames']} | |"
    )
    lines.append(
        f"| parameters (M) | {cbc['params'] / 1e6:.2f} | {ff['params'] / 1e6:.2f} "
        f"| {ff['params'] / cbc['params']:.3f} |"
    )
    return lines


def static_lines(result: Dict) -> List[str]:
    s = result.get("static") or {}
    if not s:
        return []
    names = [
        (CONFORMER, "Conformer"),
        (FUSIONFORMER, "FusionFormer unfused"),
        ("fused", "FusionFormer fused"),
    ]
    lines = [
        "",
        f"## Cost and profile ({s.get('frames')} frames = "
        f"{s.get('frames', 0) / FRAMES_PER_SECOND:g} s, batch 1, 1 thread; training: "
        f"batch {len(result['config']['batch_lengths'])}, "
        f"{result['config']['batch_threads']} thread(s))",
        "",
        "| | " + " | ".join(label for _, label in names) + " | fused/Conformer |",
        "|---|---:|---:|---:|---:|",
    ]

    def line(label, key, fmt, train=False):
        values = s.get(key, {})
        cells = [fmt(values[n]) if values.get(n) is not None else "—" for n, _ in names]
        other = FUSIONFORMER if train else "fused"
        ratio = (
            f"{values[other] / values[CONFORMER]:.3f}"
            if values.get(other) and values.get(CONFORMER)
            else "—"
        )
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")

    line("parameters (M)", "params_m", lambda v: f"{v:.2f}")
    line("GFLOPs (FlopCounterMode)", "gflops", lambda v: f"{v:.2f}")
    line("peak tensor memory, inference (MB)", "peak_mb", lambda v: f"{v:.1f}")
    line(
        "peak tensor memory, train step (MB)",
        "train_peak_mb",
        lambda v: f"{v:.1f}",
        True,
    )
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    line("norm ops share (op names)", "norm_share", pct)
    line("activation ops share (op names)", "act_share", pct)
    line("norm modules share (hooks)", "norm_module_share", pct)
    line("activation modules share (hooks)", "act_module_share", pct)
    line("train step: norm ops share", "train_norm_share", pct, True)
    line("train step: activation ops share", "train_act_share", pct, True)
    return lines


def plot(result: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get(CONFORMER) or r.get(FUSIONFORMER)]
    groups: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        if r["engine"] == "eager" and r["variant"] == "unfused":
            continue  # drawn as a third bar of the fused eager panel
        title = row_panel(r)
        groups.setdefault(title, []).append(r)
    unfused = {
        (r["frames"], r["threads"], r["section"]): r
        for r in rows
        if r["engine"] == "eager" and r["variant"] == "unfused"
    }
    n = len(groups)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False
    )
    for ax, (title, items) in zip(axes.flat, groups.items()):
        x = range(len(items))
        width = 0.27
        conf_ms = [r[CONFORMER]["median_ms"] if r[CONFORMER] else 0 for r in items]
        ff_ms = [r[FUSIONFORMER]["median_ms"] if r[FUSIONFORMER] else 0 for r in items]
        extra = [
            unfused.get((r["frames"], r["threads"], r["section"]))
            if r["engine"] == "eager"
            else None
            for r in items
        ]
        names = ("Conformer", "FusionFormer (fused)")
        if items[0]["section"] == "streaming":
            names = ("ContextualBlockConformer", "FusionFormer (causal, fused)")
        ax.bar([i - width for i in x], conf_ms, width, label=names[0], color="#888")
        ax.bar(list(x), ff_ms, width, label=names[1], color="#1f77b4")
        if any(extra):
            un_ms = [e[FUSIONFORMER]["median_ms"] if e else 0 for e in extra]
            ax.bar(
                [i + width for i in x],
                un_ms,
                width,
                label="FusionFormer (unfused)",
                color="#aec7e8",
            )
        tops = [
            max(
                conf_ms[i],
                ff_ms[i],
                extra[i][FUSIONFORMER]["median_ms"] if extra[i] else 0,
            )
            for i in range(len(items))
        ]
        for i, r in enumerate(items):
            if r["ratio"] is not None:
                color = {True: "green", False: "red"}.get(r["met"], "black")
                ax.annotate(
                    f"{r['ratio']:.2f}",
                    (i, tops[i]),
                    textcoords="offset points",
                    xytext=(0, 3),
                    ha="center",
                    fontsize=8,
                    color=color,
                    fontweight="bold" if r["met"] is not None else "normal",
                )
        positive = [v for v in conf_ms + ff_ms if v > 0]
        if positive:
            ax.set_ylim(min(positive) / 1.5, max(tops) * 2.5)
        ax.set_xticks(list(x))
        ax.set_xticklabels([short_label(r) for r in items], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    m = result["machine"]
    fig.suptitle(
        f"FusionFormer vs Conformer ({result['models'][CONFORMER]['blocks']} blocks, "
        f"d={result['models'][CONFORMER]['d_model']}) — {m['cpu']}, torch {m['torch']}"
        " — numbers above bars: ratio FF/Conformer (green: target met, red: missed)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def short_label(r: Dict) -> str:
    if r["section"] == "latency":
        return r["label"]
    if r["section"] == "train":
        return "train step"
    if r["section"] == "streaming":
        return {
            "chunk": "per chunk",
            "total": f"{r['audio_s']:g} s stream",
            "first_token": "first token",
        }[r["metric"]]
    return {"eager": "eager", "onnxruntime": "ONNX RT", "torchscript": "TS"}.get(
        r["engine"], r["engine"]
    )


def row_panel(r: Dict) -> str:
    if r["section"] == "latency":
        name = {
            "eager": "eager PyTorch",
            "torchscript": "TorchScript",
            "onnxruntime": "ONNX Runtime",
        }[r["engine"]]
        return f"{name}, batch 1, {r['threads']} thread(s)"
    if r["section"] == "streaming":
        return (
            f"streaming {r['audio_s']:g} s, chunk 640 ms, {r['threads']} thread(s); "
            "first token incl. audio wait"
        )
    return (
        f"batch {r['batch']} mixed lengths ({r['audio_s']:g} s audio), "
        f"{r['threads']} thread(s); train: FF training form"
    )


# -- main --------------------------------------------------------------------------
def run(conf: Dict, progress=None) -> Dict:
    from espnet_fusionformer.export import onnx_session

    started = time.perf_counter()
    machine = machine_info()
    errors: List[str] = []
    notes: List[str] = []

    def log(message: str) -> None:
        errors.append(message)
        if progress is not None:
            progress.write(message)

    def step(desc: str) -> None:
        if progress is not None:
            progress.set_description(desc)

    def advance() -> None:
        if progress is not None:
            progress.update(1)

    old_threads = torch.get_num_threads()
    threads = list(conf["threads"])
    step("building models")
    models = build_models(conf)
    info = model_info(models, conf)
    advance()

    workdir = Path(tempfile.mkdtemp(prefix="fusionformer-bench-"))
    torch.set_num_threads(max(threads))
    step("exporting")
    exports, artifacts = build_exports(models, conf, workdir, log)
    advance()

    rows: List[Dict] = []
    feats = conf["input_size"]
    gen = torch.Generator().manual_seed(conf["seed"] + 2)
    inputs = {frames: make_batch([frames], feats, gen) for frames in conf["lengths"]}
    mixed = make_batch(conf["batch_lengths"], feats, gen)
    audio_s = sum(conf["batch_lengths"]) / FRAMES_PER_SECOND
    try:
        for th in threads:
            torch.set_num_threads(th)
            sessions = {}
            for name in (CONFORMER, FUSIONFORMER):
                path = artifacts[name].get("onnx")
                if path is not None:
                    try:
                        sessions[name] = onnx_session(path, th)
                    except Exception as err:
                        log(f"onnxruntime session of {name} failed: {short_error(err)}")
            engines = make_engines(models, artifacts, sessions)
            jit_extra = {e.key: 2 for e in engines if e.key.endswith("torchscript")}
            for frames in conf["lengths"]:
                step(f"latency {frames} fr, {th} thr")
                xs, ilens = inputs[frames]
                calls = {}
                for e in engines:
                    args = e.prep(xs, ilens)
                    calls[e.key] = lambda e=e, args=args: e(args)
                times = time_interleaved(calls, conf, jit_extra)
                base = dict(
                    section="latency",
                    label=seconds_label(frames),
                    frames=frames,
                    audio_s=frames / FRAMES_PER_SECOND,
                    threads=th,
                    batch=1,
                )
                rows += comparison_rows(times, engines, base)
                advance()
            if th == conf["batch_threads"]:
                step(f"batch {len(conf['batch_lengths'])}, {th} thr")
                xs, ilens = mixed
                batch_engines = [e for e in engines if "torchscript" not in e.key]
                calls = {}
                for e in batch_engines:
                    args = e.prep(xs, ilens)
                    calls[e.key] = lambda e=e, args=args: e(args)
                times = time_interleaved(calls, conf)
                base = dict(
                    section="throughput",
                    label=f"batch {len(ilens)} mixed ({audio_s:g} s audio)",
                    frames=None,
                    audio_s=audio_s,
                    threads=th,
                    batch=len(ilens),
                )
                for row in comparison_rows(times, batch_engines, base):
                    for name in (CONFORMER, FUSIONFORMER):
                        if row[name]:
                            row[name]["audio_s_per_s"] = round(
                                audio_s / (row[name]["median_ms"] / 1000), 2
                            )
                    rows.append(row)
                advance()
            del sessions, engines
            gc.collect()

        streaming: Dict = {}
        if conf["streaming"]:
            th = conf["batch_threads"]
            torch.set_num_threads(th)
            step(f"streaming {conf['stream_frames']} fr, {th} thr")
            try:
                stream_rows, streaming = run_streaming(conf, th, log)
                rows += stream_rows
            except Exception as err:
                log(f"streaming benchmark failed: {short_error(err)}")
                traceback.print_exc()
            gc.collect()
            advance()

        if conf["train"]:
            th = conf["batch_threads"]
            torch.set_num_threads(th)
            step(f"training step, {th} thr")
            xs, ilens = mixed
            trainers = {
                CONFORMER: copy.deepcopy(models[CONFORMER]).train(),
                FUSIONFORMER: copy.deepcopy(models[FUSIONFORMER]).train(),
            }
            calls = {k: train_step_fn(m, xs, ilens) for k, m in trainers.items()}
            times = time_interleaved(calls, conf)
            row = dict(
                section="train",
                label=f"train step fwd+bwd, batch {len(ilens)} mixed",
                frames=None,
                audio_s=audio_s,
                threads=th,
                batch=len(ilens),
                engine="train",
                variant="train",
            )
            for name in (CONFORMER, FUSIONFORMER):
                row[name] = summarize(times[name])
            rows.append(finish_row(row))
            advance()
        else:
            trainers = {}

        static: Dict = {}
        if conf["profile"]:
            step("profiling")
            static = profile_all(models, trainers, conf, mixed, log)
            advance()
        del trainers
    finally:
        torch.set_num_threads(old_threads)
        for path in workdir.glob("*"):
            path.unlink()
        workdir.rmdir()

    with contextlib.suppress(OSError):
        machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    notes += [
        "Eager FusionFormer 'unfused' is the training-form module in eval mode with "
        "fuse_for_inference=False; 'fused' is fuse(encoder) (BN folded, q/k/v "
        "merged). The Conformer is espnet2's ConformerEncoder (rel_pos, "
        "rel_selfattn, swish, macaron, normalize_before, use_flash_attn=False).",
        "FusionFormer BatchNorm statistics come from 2 training-mode passes on "
        "random features (timing does not depend on the values).",
        f"TorchScript and ONNX: both encoders are wrapped the same way "
        "((feats, feats_lengths) -> (encoded, encoded_lengths); Conformer via "
        "forward, FusionFormer via the fused encode), traced on a padded batch of "
        "2, and checked against eager on other lengths and batch sizes. ONNX: "
        f"torch.onnx.export opset {conf['opset']}, dynamic batch/time; the "
        "Exports section says if the plain legacy exporter failed. ORT: "
        "CPUExecutionProvider, intra_op threads = threads, inter_op 1, "
        "sequential, all graph optimizations.",
        "Targets apply at 1 thread: eager fused ≤ 0.85 at 10 s and 2.6 s, "
        "≤ 0.82 for the 67-frame chunk; ONNX Runtime ≤ 0.90 at the same three "
        "lengths; training step (forward+backward, batch of the mixed lengths, "
        "loss = masked mean square of the output, FusionFormer in training form "
        f"with masked BatchNorm, {conf['batch_threads']} thread(s)) ≤ 1.15.",
        "Absolute times move with the load of other processes on a shared "
        "machine; the engines are interleaved within every repeat so both "
        "encoders see the same conditions: compare ratios and paired ratios "
        "rather than absolute times across rows or runs.",
        "Batch throughput: eager and ORT engines on one padded batch of the mixed "
        f"lengths {conf['batch_lengths']} frames; audio_s_per_s in the JSON.",
        "Peak memory: peak of the bytes allocated by tensors during one call, from "
        "torch.profiler(profile_memory=True) allocation/free events (CPU allocator; "
        "weights and inputs allocated before the call excluded; not process RSS).",
        "Op shares: self CPU time of the named ATen ops over all ops in "
        "torch.profiler key_averages (norm: layer_norm/batch_norm family; "
        "activation: silu/relu(clamp_min)/glu/sigmoid and their backward). "
        "FusionFormer's unfused MaskedBatchNorm and ESPnet's Swish (x*sigmoid(x)) "
        "run as elementwise ops, so the module shares (forward hooks, wall time "
        "inside norm/activation modules) are also given.",
        "FLOPs: torch.utils.flop_counter.FlopCounterMode (matmul/conv/attention "
        "only, elementwise ops not counted).",
    ]
    if conf["streaming"]:
        notes += streaming_notes(conf)
    wall = time.perf_counter() - started
    return dict(
        machine=machine,
        config={k: v for k, v in conf.items() if k != "out"},
        models=info,
        exports=exports,
        rows=rows,
        streaming=streaming,
        static=static,
        targets=[
            dict(
                label=row_label(r),
                threads=r["threads"],
                ratio=r["ratio"],
                target=r["target"],
                met=r["met"],
            )
            for r in rows
            if r["target"] is not None
        ],
        errors=errors,
        notes=notes,
        wall_time_s=round(wall, 1),
    )


def profile_all(models, trainers, conf, mixed, log) -> Dict:
    frames = 1000 if 1000 in conf["lengths"] else max(conf["lengths"])
    xs, ilens = make_batch(
        [frames], conf["input_size"], torch.Generator().manual_seed(7)
    )
    static: Dict = dict(frames=frames)
    names = (CONFORMER, FUSIONFORMER, "fused")
    static["params_m"] = {
        n: round(sum(p.numel() for p in models[n].parameters()) / 1e6, 3) for n in names
    }
    torch.set_num_threads(1)
    for name in names:
        model = models[name]

        def call(model=model):
            with torch.inference_mode():
                return model(xs, ilens)

        try:
            static.setdefault("gflops", {})[name] = round(flops(call) / 1e9, 3)
            static.setdefault("peak_mb", {})[name] = peak_tensor_memory(call)
            shares = op_shares(call)
            static.setdefault("norm_share", {})[name] = shares["norm_share"]
            static.setdefault("act_share", {})[name] = shares["act_share"]
            static.setdefault("top_ops", {})[name] = shares["top_ops"]
            mod = module_shares(model, call)
            static.setdefault("norm_module_share", {})[name] = mod["norm_module_share"]
            static.setdefault("act_module_share", {})[name] = mod["act_module_share"]
        except Exception as err:
            log(f"profiling {name} failed: {short_error(err)}")
            traceback.print_exc()
    torch.set_num_threads(conf["batch_threads"])
    for name, model in trainers.items():
        step = train_step_fn(model, *mixed)
        try:
            static.setdefault("train_peak_mb", {})[name] = peak_tensor_memory(step)
            shares = op_shares(step, repeats=1, warm=False)
            static.setdefault("train_norm_share", {})[name] = shares["norm_share"]
            static.setdefault("train_act_share", {})[name] = shares["act_share"]
        except Exception as err:
            log(f"profiling the training step of {name} failed: {short_error(err)}")
    return static


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    conf = resolve(args)
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    total = 2 + len(conf["lengths"]) * len(conf["threads"]) + 1
    total += int(conf["train"]) + int(conf["profile"]) + int(conf["streaming"])
    with tqdm(total=total, desc="bench", file=sys.stderr, dynamic_ncols=True) as bar:
        result = run(conf, bar)
    out = Path(conf["out"])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, out / "bench.png")
    except Exception as err:
        result["errors"].append(f"plot failed: {short_error(err)}")
        traceback.print_exc()
    print(table)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return result


if __name__ == "__main__":
    main()
