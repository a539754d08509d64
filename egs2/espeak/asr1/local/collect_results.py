#!/usr/bin/env python3
"""Write the recipe's RESULTS.md: the systems side by side, then ESPnet's tables.

For each experiment directory: encoder and normalization (config.yaml), number
of parameters, epochs and training time (train.log), final losses and
accuracies, whether training diverged (non-finite losses, skipped non-finite
gradient steps, or no averaged model), and CER/WER with the sub/del/ins
breakdown of every decoded set (<decode dir>/<set>/score_*/result.txt). The
training curves of all of them go to one PNG (local/plot_curves.py).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_curves import label_of, parse_log, plot, system_of  # noqa: E402
from show_asr_result import main as show_environment  # noqa: E402
from show_asr_result import sum_avg, tables  # noqa: E402

EPOCH_TIME = re.compile(r"(\d+)epoch results: \[train\].*?\btime=([^,]+),")


def seconds(text: str) -> float:
    """ESPnet's humanfriendly duration ("6 minutes and 59.98 seconds") in seconds."""
    units = {"hour": 3600.0, "minute": 60.0, "second": 1.0}
    found = re.findall(r"([\d.]+) (hour|minute|second)s?", text)
    if not found:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in found)


def train_time(exp: Path) -> float:
    """Seconds of training: run.pl's accounting lines, else the sum of the
    trainer's per-epoch training times (a run launched without run.pl)."""
    total, epochs = 0.0, {}
    for log in [exp / "train.log", *exp.glob("train.*.log")]:
        if log.exists():
            text = log.read_text(errors="replace")
            m = re.findall(r"# Accounting: time=(\d+)", text)
            total += sum(float(x) for x in m)
            epochs.update((int(e), seconds(t)) for e, t in EPOCH_TIME.findall(text))
    return total or sum(epochs.values())


def describe(exp: Path) -> dict:
    conf = yaml.safe_load((exp / "config.yaml").read_text())
    log = (exp / "train.log").read_text(errors="replace")
    params = re.search(r"Total Number of model parameters: ([\d.]+ ?[KMG]?)", log)
    epochs = parse_log(exp / "train.log")
    last = epochs[max(epochs)] if epochs else {}
    nonfinite = [
        e
        for e, s in epochs.items()
        for sec in ("train", "valid")
        if not math.isfinite(s.get(sec, {}).get("loss", 0.0))
    ]
    skipped = sum(
        len(re.findall(r"grad norm is (nan|inf)", p.read_text(errors="replace")))
        for p in [exp / "train.log", *exp.glob("train.*.log")]
    )
    best_acc = max(
        (s.get("valid", {}).get("acc", float("nan")) for s in epochs.values()),
        default=float("nan"),
    )
    scores = {}
    for result in sorted(exp.glob("*/*/score_*/result.txt")):
        nums = sum_avg(result)
        if nums:
            kind = result.parent.name.removeprefix("score_")
            scores[(result.parents[1].name, kind)] = [float(x) for x in nums]
    if nonfinite or skipped:
        diverged = f"yes: non-finite loss in {len(nonfinite)} epochs, {skipped} skips"
    elif not (exp / "valid.acc.ave.pth").exists():
        diverged = "no model (training did not finish)"
    else:
        diverged = "no"
    return {
        "exp": exp,
        "label": label_of(exp),
        "encoder": conf.get("encoder"),
        "normalization": (conf.get("encoder_conf") or {}).get(
            "normalization", "layernorm" if conf.get("encoder") == "conformer" else "?"
        ),
        "params": params.group(1).strip() if params else "?",
        "epochs": max(epochs) if epochs else 0,
        "time": train_time(exp),
        "train_loss": last.get("train", {}).get("loss", float("nan")),
        "valid_loss": last.get("valid", {}).get("loss", float("nan")),
        "valid_acc": last.get("valid", {}).get("acc", float("nan")),
        "best_acc": best_acc,
        "diverged": diverged,
        "scores": scores,
    }


def spread(values: list[float], digits: int = 1) -> str:
    """``mean ± std [min-max] (n)`` of the finite values."""
    xs = [v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "n/a"
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{mean:.{digits}f} (1 run)"
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    return (
        f"{mean:.{digits}f} ± {std:.{digits}f} "
        f"[{min(xs):.{digits}f}-{max(xs):.{digits}f}]"
    )


def error_rate(d: dict, dset: str, kind: str) -> float:
    nums = d["scores"].get((dset, kind))
    return nums[6] if nums else float("nan")


def seed_table(systems: list[dict]) -> list[str]:
    """One row per system: mean ± sample std [min-max] over its seeds."""
    groups: dict[str, list[dict]] = {}
    for s in systems:
        groups.setdefault(system_of(s["label"]), []).append(s)
    lines = [
        "|system|seeds|epochs|train time / epoch (min)|best valid acc|dev CER|"
        "test CER|dev WER|test WER|diverged?|",
        "|" + "---|" * 10,
    ]
    for name, runs in groups.items():
        cells = [
            spread([r["time"] / 60 / max(r["epochs"], 1) for r in runs], 2),
            spread([r["best_acc"] for r in runs], 3),
            *(
                spread([error_rate(r, dset, kind) for r in runs])
                for kind in ("cer", "wer")
                for dset in ("dev", "test")
            ),
        ]
        epochs = sorted({r["epochs"] for r in runs})
        diverged = sum(r["diverged"] != "no" for r in runs)
        lines.append(
            f"|{name}|{len(runs)}|{'/'.join(map(str, epochs))}|"
            + "|".join(cells)
            + f"|{diverged} of {len(runs)}|"
        )
    return lines


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def err(d: dict, dset: str, kind: str) -> str:
    nums = d["scores"].get((dset, kind))
    if not nums:
        return "n/a"
    # Snt Wrd Corr Sub Del Ins Err S.Err
    return f"{nums[6]:.1f} ({nums[3]:.1f}/{nums[4]:.1f}/{nums[5]:.1f})"


def data_summary(data: Path) -> str:
    rows = []
    for dset in ("train", "dev", "test"):
        d = data / dset
        if not (d / "wav.scp").exists():
            continue
        n = len((d / "wav.scp").read_text().splitlines())
        spk = len((d / "spk2utt").read_text().splitlines())
        rows.append(f"{dset}: {n} utterances, {spk} speakers")
    return "; ".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exps", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("RESULTS.md"))
    p.add_argument("--png", type=Path, default=Path("images/training_curves.png"))
    p.add_argument("--data", type=Path, default=Path("data"))
    p.add_argument("--notes", default="", help="Markdown text put after the summary")
    args = p.parse_args(argv)

    exps = [e for e in args.exps if (e / "config.yaml").exists()]
    systems = [describe(e) for e in exps]
    plot(exps, args.png, "espeak corpus: FusionFormer vs. Conformer and ablations")

    import contextlib
    import io

    env = io.StringIO()
    with contextlib.redirect_stdout(env):
        show_environment([str(Path("/nonexistent"))])
    lines = [env.getvalue().replace("show_asr_result.py", "collect_results.py")]
    lines.append("## Summary\n")
    lines.append(f"- data: {data_summary(args.data)}")
    lines.append(
        "- dev: training speakers (seen voices); test: unseen speakers "
        "(held-out voice variants and accents)"
    )
    lines.append(
        "- errors: Err% (Sub/Del/Ins) of the Sum/Avg line of score_*/result.txt\n"
    )
    lines.append(
        "Per system, over its seeds: mean ± sample standard deviation "
        "[min-max]; error rates in %.\n"
    )
    lines += seed_table(systems)
    lines.append("\nPer run:\n")
    lines.append(
        "|system|encoder|normalization|params|epochs|train time|final train loss"
        "|final valid loss|valid acc (last/best)|diverged?|dev CER|test CER"
        "|dev WER|test WER|"
    )
    lines.append("|" + "---|" * 14)
    for s in systems:
        lines.append(
            f"|{s['label']}|{s['encoder']}|{s['normalization']}|{s['params']}"
            f"|{s['epochs']}|{s['time'] / 60:.1f} min|{fmt(s['train_loss'])}"
            f"|{fmt(s['valid_loss'])}|{fmt(s['valid_acc'], 3)}/{fmt(s['best_acc'], 3)}"
            f"|{s['diverged']}|{err(s, 'dev', 'cer')}|{err(s, 'test', 'cer')}"
            f"|{err(s, 'dev', 'wer')}|{err(s, 'test', 'wer')}|"
        )
    lines.append("")
    if args.notes:
        lines.append(args.notes.strip() + "\n")
    rel_png = (
        args.png.relative_to(args.out.parent) if args.out.parent != Path() else args.png
    )
    lines.append(f"![training curves]({rel_png.as_posix()})\n")
    for s in systems:
        body = tables(s["exp"])
        if body:
            lines.append(f"## {s['exp'].as_posix()}\n{body}")
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
