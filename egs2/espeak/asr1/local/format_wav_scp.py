#!/usr/bin/env python3
"""Kaldi-free stand-in for ESPnet's scripts/audio/format_wav_scp.sh.

Reads a Kaldi wav.scp (file paths or "command |" pipes, e.g. the sox pipes of
speed perturbation), writes every utterance as a real audio file
(<outdir>/data/<utt>.<audio_format>) at the requested sampling rate, and writes
<outdir>/wav.scp and <outdir>/utt2num_samples.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile


def parse_fs(fs: str) -> int:
    fs = fs.strip().lower()
    if fs.endswith("k"):
        return int(float(fs[:-1]) * 1000)
    return int(float(fs))


def load(spec: str) -> tuple[np.ndarray, int]:
    if spec.endswith("|"):
        raw = subprocess.run(
            spec[:-1], shell=True, check=True, stdout=subprocess.PIPE
        ).stdout
        return soundfile.read(io.BytesIO(raw), dtype="int16", always_2d=True)
    return soundfile.read(spec, dtype="int16", always_2d=True)


def resample(x: np.ndarray, fs_in: int, fs_out: int) -> np.ndarray:
    """Resample int16 (time, channel) audio with sox."""
    buf = io.BytesIO()
    soundfile.write(buf, x, fs_in, format="WAV", subtype="PCM_16")
    out = subprocess.run(
        ["sox", "-V1", "-D", "-t", "wav", "-", "-t", "wav", "-r", str(fs_out), "-"],
        input=buf.getvalue(),
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    y, _ = soundfile.read(io.BytesIO(out), dtype="int16", always_2d=True)
    return y


def convert(job: tuple[str, str, str, int, str]) -> tuple[str, str, int]:
    utt, spec, outdir, fs, fmt = job
    x, rate = load(spec)
    if rate != fs:
        x = resample(x, rate, fs)
    if x.shape[1] == 1:
        x = x[:, 0]
    path = Path(outdir) / "data" / f"{utt}.{fmt}"
    soundfile.write(path, x, fs, format=fmt.upper(), subtype="PCM_16")
    return utt, str(path), len(x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nj", type=int, default=1)
    p.add_argument("--fs", default="16k")
    p.add_argument("--audio_format", default="flac", choices=["wav", "flac"])
    p.add_argument("scp")
    p.add_argument("outdir")
    args = p.parse_args(argv)

    outdir = Path(args.outdir)
    (outdir / "data").mkdir(parents=True, exist_ok=True)
    fs = parse_fs(args.fs)
    jobs = []
    with open(args.scp, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                utt, spec = line.rstrip("\n").split(maxsplit=1)
                jobs.append((utt, spec, str(outdir), fs, args.audio_format))
    with multiprocessing.Pool(max(1, args.nj)) as pool:
        results = sorted(pool.imap_unordered(convert, jobs, chunksize=16))
    with (
        open(outdir / "wav.scp", "w", encoding="utf-8") as fw,
        open(outdir / "utt2num_samples", "w", encoding="utf-8") as fn,
    ):
        for utt, path, n in results:
            fw.write(f"{utt} {path}\n")
            fn.write(f"{utt} {n}\n")
    (outdir / "audio_format").write_text(args.audio_format + "\n")
    print(f"format_wav_scp: {len(results)} utterances -> {outdir}", file=sys.stderr)


if __name__ == "__main__":
    main()
