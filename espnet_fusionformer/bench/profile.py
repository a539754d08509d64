"""Static cost of each encoder: parameters, FLOPs, peak tensor memory, and the
time shares of normalization and activation ops (profiler) and modules (hooks)."""

import time
import traceback
from typing import Callable, Dict

import torch

from espnet_fusionformer.bench.cases import (
    CONFORMER,
    FUSIONFORMER,
    LAYERNORM,
    UNFUSED,
    make_batch,
    parameters,
)

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
PROFILED = (CONFORMER, LAYERNORM, FUSIONFORMER, UNFUSED)


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


def profile_all(models: Dict[str, torch.nn.Module], conf: Dict, log) -> Dict:
    """Parameters, GFLOPs, peak memory and op/module shares of every encoder on
    one 10 s utterance (or the longest length), batch 1, 1 thread."""
    frames = 1000 if 1000 in conf["lengths"] else max(conf["lengths"])
    xs, ilens = make_batch(
        [frames], conf["input_size"], torch.Generator().manual_seed(7)
    )
    static: Dict = dict(frames=frames)
    static["params_m"] = {n: round(parameters(models[n]) / 1e6, 3) for n in PROFILED}
    torch.set_num_threads(1)
    for name in PROFILED:
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
            log(f"profiling {name} failed: {type(err).__name__}: {err}")
            traceback.print_exc()
    return static
