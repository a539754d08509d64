"""Interleaved timing, statistics, paired ratios and the targets they are held to.

Every engine of a setting runs once per repeat, in alternating order, so a change
of machine load hits all of them; the per-repeat ratios (paired ratios) are the
robust numbers on a shared machine. Single-threaded settings are timed in CPU time
of the calling thread (``now``), which leaves out the time other processes take.
"""

import gc
import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from espnet_fusionformer.bench.cases import CONFORMER, FUSIONFORMER, LAYERNORM

# the three comparisons of a row: (key, numerator, denominator)
RATIOS = (
    ("ff_vs_conformer", FUSIONFORMER, CONFORMER),  # the whole speed-up
    ("ff_vs_layernorm", FUSIONFORMER, LAYERNORM),  # architecture
    ("layernorm_vs_conformer", LAYERNORM, CONFORMER),  # implementation
)
# (engine, frames, threads) -> {baseline: target of FusionFormer / baseline}
TARGETS: Dict[tuple, Dict[str, float]] = {
    ("eager", 1000, 1): {CONFORMER: 0.85},
    ("eager", 260, 1): {CONFORMER: 0.85},
    ("eager", 67, 1): {CONFORMER: 0.82},
    ("onnxruntime", 1000, 1): {CONFORMER: 0.90},
    ("onnxruntime", 260, 1): {CONFORMER: 0.90},
    ("onnxruntime", 67, 1): {CONFORMER: 0.90},
    ("int8", 1000, 1): {CONFORMER: 0.70, LAYERNORM: 0.90},
    ("int8", 260, 1): {CONFORMER: 0.70, LAYERNORM: 0.90},
    ("train", None, None): {CONFORMER: 1.10},
}


def now() -> float:
    """Seconds on the benchmark's clock: with one torch thread (the ONNX Runtime
    sessions get the same count) every engine computes in the calling thread, so
    its CPU time (``time.thread_time``) is the call's cost without the time the
    host's other processes take; with more threads, wall time."""
    if torch.get_num_threads() == 1:
        return time.thread_time()
    return time.perf_counter()


def clock_name(threads: int) -> str:
    """How ``now`` measures at ``threads`` threads, for reports."""
    return "CPU time of the calling thread" if threads == 1 else "wall time"


def quantile(values: Sequence[float], q: float) -> float:
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times: List[float]) -> Dict:
    """Seconds -> milliseconds statistics (median, quartiles, min, max, p90); the
    raw times stay in repeat order (``times_ms``)."""
    ms = [t * 1000 for t in times]
    return dict(
        median_ms=round(quantile(ms, 0.5), 3),
        p25_ms=round(quantile(ms, 0.25), 3),
        p75_ms=round(quantile(ms, 0.75), 3),
        p90_ms=round(quantile(ms, 0.9), 3),
        min_ms=round(min(ms), 3),
        max_ms=round(max(ms), 3),
        n=len(ms),
        times_ms=[round(t, 3) for t in ms],
    )


def paired_ratio(num: Optional[Dict], den: Optional[Dict]) -> Optional[Dict]:
    """Median and quartiles of the per-repeat ratios ``num / den`` (both timed in
    the same repeat); ``None`` unless both have the same repeats."""
    if not num or not den or num["n"] != den["n"]:
        return None
    ratios = [b / a for a, b in zip(den["times_ms"], num["times_ms"]) if a > 0]
    if not ratios:
        return None
    return dict(
        median=round(quantile(ratios, 0.5), 3),
        p25=round(quantile(ratios, 0.25), 3),
        p75=round(quantile(ratios, 0.75), 3),
    )


def repeats_for(estimate: float, conf: Dict) -> int:
    """Repeats that fit the budget, between ``min_repeats`` and ``repeats``."""
    repeats = int(conf["budget"] / max(estimate, 1e-6))
    return max(conf["min_repeats"], min(conf["repeats"], repeats))


def time_interleaved(
    calls: Dict[str, Callable[[], object]],
    conf: Dict,
    warmup_extra: Optional[Dict[str, int]] = None,
) -> Dict[str, List[float]]:
    """Seconds per call of every callable, alternating them in each repeat (order
    reversed every other repeat); the last warm-up call sets the repeats."""
    estimate = 0.0
    for key, call in calls.items():
        last = 0.0
        for _ in range(max(1, conf["warmup"] + (warmup_extra or {}).get(key, 0))):
            start = now()
            call()
            last = now() - start
        estimate += last
    repeats = repeats_for(estimate, conf)
    times: Dict[str, List[float]] = {key: [] for key in calls}
    order = list(calls)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for key in order if r % 2 == 0 else order[::-1]:
                start = now()
                calls[key]()
                times[key].append(now() - start)
    finally:
        gc.enable()
    return times


def finish_row(row: Dict) -> Dict:
    """Add the ratios of medians, the paired ratios and the targets to a row whose
    ``conformer``/``layernorm``/``fusionformer`` hold ``summarize`` statistics."""
    ratios, paired = {}, {}
    for key, num, den in RATIOS:
        a, b = row.get(num), row.get(den)
        ratios[key] = (
            round(a["median_ms"] / b["median_ms"], 3)
            if a and b and b["median_ms"] > 0
            else None
        )
        paired[key] = paired_ratio(a, b)
    row["ratios"], row["paired"] = ratios, paired
    row["share"] = speedup_shares(ratios)
    key = (row["engine"], row.get("frames"), row.get("threads"))
    if row["engine"] == "train":
        key = ("train", None, None)
    wanted = TARGETS.get(key, {}) if row.get("variant") == "fused" else {}
    row["targets"] = []
    for baseline, target in wanted.items():
        ratio = ratios[f"ff_vs_{baseline}"]
        row["targets"].append(
            dict(
                vs=baseline,
                target=target,
                ratio=ratio,
                met=None if ratio is None else bool(ratio <= target),
            )
        )
    return row


def speedup_shares(ratios: Dict) -> Optional[Dict]:
    """Split FusionFormer's speed-up over ESPnet's Conformer into the architecture's
    share (FusionFormer vs the same code with LayerNorm) and the implementation's
    (same-code LayerNorm vs ESPnet), on a log scale, so the shares add up to 1:
    ``log(ff/conformer) = log(ff/layernorm) + log(layernorm/conformer)``."""
    total, arch, impl = (
        ratios.get("ff_vs_conformer"),
        ratios.get("ff_vs_layernorm"),
        ratios.get("layernorm_vs_conformer"),
    )
    if not total or not arch or not impl or abs(math.log(total)) < 0.02:
        return None  # no speed-up (or slow-down) worth splitting
    if (arch < 1) != (total < 1) or (impl < 1) != (total < 1):
        return None  # one part speeds up, the other slows down: see the ratios
    whole = math.log(arch) + math.log(impl)
    return dict(
        architecture=round(math.log(arch) / whole, 2),
        implementation=round(math.log(impl) / whole, 2),
    )
