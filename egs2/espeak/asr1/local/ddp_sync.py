#!/usr/bin/env python3
"""Cross-rank BatchNorm statistics on and off in a real DDP run.

Trains ``--config`` with ESPnet's own trainer under ``torchrun`` (2 CPU processes,
gloo) once with ``encoder_conf.sync_batchnorm=true`` and once with ``false``; the two
runs go one after the other, repeated ``--repeats`` times in alternating order
(the machine's load changes less between neighbours). Writes
the time per step and the validation accuracy of each run to ``--md``.

Needs stages 1-10 of run.sh (the dump and the stats).

    python3 local/ddp_sync.py [--iters 20] [--epochs 1] [--repeats 2]
"""

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_curves import parse_log  # noqa: E402


def train_args(out: Path, config: str) -> list:
    stats = "exp/asr_stats_raw_en_char"
    args = ["--ngpu", "0", "--use_preprocessor", "true", "--token_type", "char"]
    args += ["--token_list", "data/en_token_list/char/tokens.txt"]
    args += ["--config", config, "--output_dir", str(out)]
    args += ["--frontend_conf", "fs=16k", "--normalize", "global_mvn"]
    args += ["--normalize_conf", f"stats_file={stats}/train/feats_stats.npz"]
    for split, data in (("train", "train"), ("valid", "dev")):
        key = f"--{split}_data_path_and_name_and_type"
        args += [key, f"dump/raw/{data}/wav.scp,speech,sound"]
        args += [key, f"dump/raw/{data}/text,text,text"]
        args += [f"--{split}_shape_file", f"{stats}/{split}/speech_shape"]
        args += [f"--{split}_shape_file", f"{stats}/{split}/text_shape.char"]
    return args


def summary(log: Path) -> dict:
    """Mean ``train_time`` (s per step, rank 0) and last validation accuracy."""
    epochs = parse_log(log)
    if not epochs:
        raise ValueError(f"{log}: the run ended without an epoch summary")
    steps = [epochs[e]["train"]["train_time"] for e in sorted(epochs)]
    last = epochs[max(epochs)]["valid"]["acc"]
    return dict(step=sum(steps) / len(steps), acc=last, epochs=len(epochs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="conf/train_fusionformer.yaml")
    parser.add_argument("--iters", type=int, default=20, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="per process")
    parser.add_argument("--md", default="DDP_SYNC.md")
    args = parser.parse_args()
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        sys.exit("torchrun is not on PATH (it comes with torch)")
    start, results = time.time(), {"true": [], "false": []}
    for repeat in range(args.repeats):
        order = ("true", "false") if repeat % 2 == 0 else ("false", "true")
        for sync in order:
            out = Path(f"exp/asr_ddp_sync_{sync}_{repeat}")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            print(
                f"=== repeat {repeat + 1}/{args.repeats} sync_batchnorm={sync} -> {out}"
                f" [{time.time() - start:.0f} s]",
                flush=True,
            )
            cmd = [torchrun, "--nproc_per_node", "2", "-m", "espnet2.bin.asr_train"]
            cmd += train_args(out, args.config)
            cmd += ["--dist_backend", "gloo", "--multiprocessing_distributed", "false"]
            cmd += ["--encoder_conf", f"sync_batchnorm={sync}", "--seed", "1"]
            cmd += ["--num_iters_per_epoch", str(args.iters)]
            cmd += ["--max_epoch", str(args.epochs), "--num_att_plot", "0"]
            env = {"OMP_NUM_THREADS": str(args.threads)}
            with open(out / "train.log", "w") as log:
                subprocess.run(
                    cmd, check=True, stdout=log, stderr=log, env={**os.environ, **env}
                )
            results[sync].append(summary(out / "train.log"))
    on, off = results["true"], results["false"]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    lines = [
        "# Cross-rank BatchNorm statistics in DDP (torchrun, 2 CPU processes, gloo)",
        "",
        f"`{args.config}`, {args.epochs} epoch(s) of {args.iters} steps per run, "
        f"{args.threads} thread(s) per process, {args.repeats} runs each, "
        "alternating order; time per step is rank 0's ESPnet `train_time`.",
        "",
        "| sync_batchnorm | s / step (runs) | mean | valid acc (last run) |",
        "|---|---|---|---|",
    ]
    for name, rows in (("true", on), ("false", off)):
        steps = ", ".join(f"{r['step']:.2f}" for r in rows)
        lines.append(
            f"| {name} | {steps} | {mean(rows, 'step'):.2f} | {rows[-1]['acc']:.3f} |"
        )
    lines += ["", f"on / off time per step: {mean(on, 'step') / mean(off, 'step'):.3f}"]
    Path(args.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
