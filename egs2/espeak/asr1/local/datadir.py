#!/usr/bin/env python3
"""Kaldi-free stand-ins for the data-directory tools asr.sh uses.

Each subcommand does what its Kaldi/ESPnet namesake does for the files this
recipe has (wav.scp, text, utt2spk, spk2utt, utt2num_samples):

    split_scp IN OUT...              utils/split_scp.pl (contiguous, equal parts)
    copy_data_dir SRC DST            utils/copy_data_dir.sh (without wav.scp)
    fix_data_dir DIR                 utils/fix_data_dir.sh (common utts, sorted)
    filter_length ORG DST MIN MAX    stage 4: keep MIN < samples < MAX, non-empty text
    perturb_speed FACTOR SRC DST     scripts/utils/perturb_data_dir_speed.sh (sox)
    combine_data DST SRC...          utils/combine_data.sh
    spm_train --input=... ...        sentencepiece's spm_train command line

Only the Python standard library (and sentencepiece for spm_train) is imported,
so each call costs a few tens of milliseconds.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PER_UTT = ["wav.scp", "text", "utt2spk", "utt2num_samples", "utt2dur"]


def read_scp(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            key, _, value = line.partition(" ")
            out[key] = value
    return out


def write_scp(path: Path, table: dict[str, str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for key in sorted(table):
            f.write(f"{key} {table[key]}\n" if table[key] != "" else f"{key}\n")


def write_spk2utt(d: Path) -> None:
    spk2utt: dict[str, list[str]] = {}
    for utt, spk in sorted(read_scp(d / "utt2spk").items()):
        spk2utt.setdefault(spk, []).append(utt)
    with open(d / "spk2utt", "w", encoding="utf-8") as f:
        for spk in sorted(spk2utt):
            f.write(f"{spk} {' '.join(spk2utt[spk])}\n")


def split_scp(src: str, *outs: str) -> None:
    lines = Path(src).read_text(encoding="utf-8").splitlines(keepends=True)
    n = len(outs)
    if len(lines) < n:
        sys.exit(f"split_scp: {src} has {len(lines)} lines, fewer than {n} parts")
    base, extra = divmod(len(lines), n)
    start = 0
    for i, out in enumerate(outs):
        size = base + (1 if i < extra else 0)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text("".join(lines[start : start + size]), encoding="utf-8")
        start += size


def copy_data_dir(src: str, dst: str) -> None:
    s, d = Path(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    for name in ["text", "utt2spk", "spk2utt", "spk2voice", "spk2gender"]:
        if (s / name).exists():
            shutil.copyfile(s / name, d / name)


def fix_data_dir(dst: str) -> None:
    d = Path(dst)
    tables = {n: read_scp(d / n) for n in PER_UTT if (d / n).exists()}
    if not tables:
        sys.exit(f"fix_data_dir: nothing to fix in {d}")
    keys = set.intersection(*(set(t) for t in tables.values()))
    for name, table in tables.items():
        dropped = len(table) - len(keys)
        write_scp(d / name, {k: v for k, v in table.items() if k in keys})
        if dropped:
            print(f"fix_data_dir: {d}/{name}: dropped {dropped} utterances")
    if (d / "utt2spk").exists():
        write_spk2utt(d)


def filter_length(org: str, dst: str, min_len: str, max_len: str) -> None:
    o, d = Path(org), Path(dst)
    lo, hi = int(float(min_len)), int(float(max_len))
    n2s = read_scp(o / "utt2num_samples")
    keep = {k: v for k, v in n2s.items() if lo < int(v.split()[0]) < hi}
    write_scp(d / "utt2num_samples", keep)
    write_scp(
        d / "wav.scp", {k: v for k, v in read_scp(o / "wav.scp").items() if k in keep}
    )
    # Remove empty text
    write_scp(d / "text", {k: v for k, v in read_scp(o / "text").items() if v.strip()})
    fix_data_dir(dst)
    kept = len(read_scp(d / "wav.scp"))
    print(f"filter_length: {d}: kept {kept} / {len(n2s)} utterances")


def perturb_speed(factor: str, src: str, dst: str) -> None:
    s, d = Path(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    p = f"sp{factor}-"
    utt2spk = read_scp(s / "utt2spk")
    write_scp(d / "utt2spk", {p + u: p + spk for u, spk in utt2spk.items()})
    write_scp(d / "text", {p + u: t for u, t in read_scp(s / "text").items()})
    wavs = {}
    for u, w in read_scp(s / "wav.scp").items():
        if w.endswith("|"):
            wavs[p + u] = f"{w} sox -V1 -t wav - -t wav - speed {factor} |"
        else:
            wavs[p + u] = f"sox -V1 -t wav {w} -t wav - speed {factor} |"
    write_scp(d / "wav.scp", wavs)
    write_spk2utt(d)


def combine_data(dst: str, *srcs: str) -> None:
    d = Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    for name in ["wav.scp", "text", "utt2spk"]:
        table: dict[str, str] = {}
        for s in srcs:
            table.update(read_scp(Path(s) / name))
        write_scp(d / name, table)
    write_spk2utt(d)


def spm_train(*flags: str) -> None:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(" ".join(flags))


COMMANDS = {
    "split_scp": split_scp,
    "copy_data_dir": copy_data_dir,
    "fix_data_dir": fix_data_dir,
    "filter_length": filter_length,
    "perturb_speed": perturb_speed,
    "combine_data": combine_data,
    "spm_train": spm_train,
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        sys.exit(__doc__)
    COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
