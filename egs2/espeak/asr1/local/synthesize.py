#!/usr/bin/env python3
"""Synthesize an offline English speech corpus with espeak-ng and sox.

Writes Kaldi-style data directories (wav.scp, text, utt2spk, spk2utt, plus
spk2voice describing each speaker) for train, dev and test:

* every speaker is an espeak-ng accent + voice variant with its own base pitch
  and speaking rate; each utterance jitters rate, pitch and loudness and gets a
  little background noise;
* dev uses the training speakers (seen voices), test uses speakers that never
  occur in training: their voice variants (and one accent) are held out;
* the text mixes numbers, dates and times, digit strings, spelled letters,
  device commands and generated sentences; transcripts are upper-case words
  (A-Z, apostrophe), exactly what the synthesizer was asked to say.

The output depends only on the options (and the espeak-ng/sox versions): the
same --seed gives the same corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile

FS = 16000

# espeak-ng accents (all ship with espeak-ng, no mbrola needed).
TRAIN_ACCENTS = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-us-nyc",
]
TEST_ACCENTS = ["en-gb-x-gbcwmd", "en-029"]
# Voice variants: timbre, gender, formant settings.
TRAIN_VARIANTS = [
    "m1", "m2", "m3", "m5", "m7", "f1", "f2", "f4", "klatt", "klatt3",
    "Andy", "Annie", "david", "linda", "robert", "steph", "edward", "aunty",
]  # fmt: skip
TEST_VARIANTS = ["m4", "m6", "f3", "f5", "klatt2", "Alicia", "john", "belinda"]


# --------------------------------------------------------------------------
# Text generator
# --------------------------------------------------------------------------
def _words(s: str) -> list[str]:
    return s.split()


ONES = _words(
    "ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE "
    "THIRTEEN FOURTEEN FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN"
)
TENS = _words("_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY")
ORDINALS = _words(
    "FIRST SECOND THIRD FOURTH FIFTH SIXTH SEVENTH EIGHTH NINTH TENTH ELEVENTH "
    "TWELFTH THIRTEENTH FOURTEENTH FIFTEENTH SIXTEENTH SEVENTEENTH EIGHTEENTH "
    "NINETEENTH TWENTIETH"
)
MONTHS = _words(
    "JANUARY FEBRUARY MARCH APRIL MAY JUNE JULY AUGUST SEPTEMBER OCTOBER "
    "NOVEMBER DECEMBER"
)
DAYS = _words("MONDAY TUESDAY WEDNESDAY THURSDAY FRIDAY SATURDAY SUNDAY")
NAMES = _words(
    "ALICE BOB CAROL DAVID EMMA FRANK GRACE HENRY IRENE JACK KATE LUCAS MARIA "
    "NOAH OLIVIA PETER QUINN RACHEL SAM TINA VICTOR WENDY"
)
CITIES = _words(
    "LONDON PARIS BOSTON CHICAGO DENVER MADRID BERLIN TOKYO SYDNEY DUBLIN "
    "OSLO VIENNA LIMA CAIRO SEATTLE TORONTO"
)
ROOMS = [*_words("KITCHEN BEDROOM GARAGE OFFICE HALLWAY BATHROOM"), "LIVING ROOM"]
DEVICES = _words("LIGHTS FAN HEATER RADIO TELEVISION OVEN PRINTER ALARM")
ADJ = _words(
    "OLD YOUNG RED BLUE GREEN SMALL LARGE QUIET LOUD BRIGHT DARK HAPPY SLEEPY "
    "CLEVER HEAVY WARM COLD BUSY GENTLE STRANGE"
)
NOUNS = _words(
    "DOG CAT BIRD FARMER TEACHER DOCTOR CHILD SAILOR BAKER PILOT ROBOT HORSE "
    "FOX DRIVER PAINTER STUDENT NEIGHBOR SINGER"
)
THINGS = _words(
    "BOOK BOX LETTER APPLE CAKE BALL KEY MAP LAMP CHAIR TABLE WINDOW DOOR "
    "BRIDGE RIVER GARDEN HOUSE TRAIN BOAT CLOCK BASKET TICKET"
)
VERBS_PAST = _words(
    "FOUND CARRIED PAINTED OPENED CLOSED WATCHED MOVED CLEANED BUILT SOLD "
    "BOUGHT DROPPED CHECKED FIXED PACKED"
)
PREPS = _words("NEAR UNDER BEHIND BESIDE ABOVE INSIDE ACROSS")
ADVERBS = _words("SLOWLY QUICKLY CAREFULLY QUIETLY SUDDENLY PROUDLY")
TIMES = [
    "YESTERDAY",
    "TODAY",
    "TOMORROW",
    "TONIGHT",
    "THIS MORNING",
    "LAST WEEK",
    "EVERY DAY",
    "AT NOON",
]
SENTENCES = [
    "PLEASE CALL ME BACK WHEN YOU GET HOME",
    "THE MEETING HAS BEEN MOVED TO NEXT WEEK",
    "I DON'T THINK IT WILL RAIN THIS AFTERNOON",
    "CAN YOU TELL ME THE WAY TO THE STATION",
    "WE NEED MORE MILK AND SOME FRESH BREAD",
    "SHE'S GOING TO THE LIBRARY AFTER LUNCH",
    "THE TRAIN WAS LATE BECAUSE OF THE SNOW",
    "IT'S TOO COLD TO SWIM IN THE LAKE",
    "HE LEFT HIS KEYS ON THE KITCHEN TABLE",
    "THEY PLANTED TREES ALONG THE NEW ROAD",
    "MY PHONE BATTERY IS ALMOST EMPTY",
    "THE SHOP CLOSES EARLY ON SUNDAYS",
    "WE'LL MEET AT THE CORNER OF THE PARK",
    "THE SOUP TASTES BETTER WITH A LITTLE SALT",
    "PLEASE SPEAK A LITTLE MORE SLOWLY",
    "THE CHILDREN PLAYED IN THE GARDEN ALL DAY",
]
COMMAND_TEMPLATES = [
    "TURN {onoff} THE {room} {device}",
    "TURN THE {device} {onoff}",
    "SET A TIMER FOR {num_small} {unit}",
    "SET THE ALARM FOR {clock}",
    "CALL {name} ON {day}",
    "SEND A MESSAGE TO {name}",
    "WHAT IS THE WEATHER IN {city}",
    "WHAT TIME IS IT IN {city}",
    "PLAY THE NEXT SONG",
    "MOVE {dir} {num_small} STEPS",
    "SET THE TEMPERATURE TO {num} DEGREES",
    "REMIND ME TO CALL {name} AT {clock}",
    "OPEN THE {room} DOOR",
    "{stopgo} THE MUSIC",
    "VOLUME UP BY {num_small}",
    "NAVIGATE TO {city}",
]


def number_words(n: int) -> str:
    """Spoken English for 0 <= n < 1,000,000."""
    if n < 20:
        return ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return TENS[t] + ("" if o == 0 else " " + ONES[o])
    if n < 1000:
        h, r = divmod(n, 100)
        return ONES[h] + " HUNDRED" + ("" if r == 0 else " AND " + number_words(r))
    th, r = divmod(n, 1000)
    rest = ""
    if r:
        rest = (" AND " if r < 100 else " ") + number_words(r)
    return number_words(th) + " THOUSAND" + rest


def ordinal_words(n: int) -> str:
    if n <= 20:
        return ORDINALS[n - 1]
    t, o = divmod(n, 10)
    if o == 0:
        return TENS[t][:-1] + "IETH"
    return TENS[t] + " " + ORDINALS[o - 1]


def clock_words(rng: random.Random) -> str:
    h = rng.randint(1, 12)
    m = rng.choice([0, 5, 10, 15, 20, 30, 40, 45, 50, rng.randint(1, 59)])
    if m == 0:
        words = ONES[h] + " O'CLOCK"
    elif m < 10:
        words = f"{ONES[h]} OH {ONES[m]}"
    else:
        words = f"{ONES[h]} {number_words(m)}"
    if rng.random() < 0.4:
        # spelled as letters by espeak: "A M", "P M"
        words += " " + rng.choice(["<A M>", "<P M>"])
    return words


def gen_number(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        n = rng.choice(
            [rng.randint(0, 99), rng.randint(100, 999), rng.randint(1000, 99999)]
        )
        return number_words(n)
    if kind < 0.55:
        digits = " ".join(ONES[rng.randint(0, 9)] for _ in range(rng.randint(3, 7)))
        return rng.choice(["MY NUMBER IS ", "THE CODE IS ", "", "DIAL "]) + digits
    if kind < 0.75:
        return (
            f"{rng.choice(DAYS)} THE {ordinal_words(rng.randint(1, 31))} OF "
            f"{rng.choice(MONTHS)}"
        )
    if kind < 0.9:
        return f"IT COSTS {number_words(rng.randint(2, 999))} DOLLARS"
    return f"THE MEETING IS AT {clock_words(rng)}"


def gen_spelled(rng: random.Random) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if rng.random() < 0.5:
        word = rng.choice(NAMES + CITIES + THINGS)
        return f"{word} IS SPELLED <{' '.join(word[:8])}>"
    seq = " ".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
    return rng.choice(["", "CODE ", "FLIGHT ", "ROOM "]) + f"<{seq}>"


def gen_command(rng: random.Random) -> str:
    tpl = rng.choice(COMMAND_TEMPLATES)
    return tpl.format(
        onoff=rng.choice(["ON", "OFF"]),
        room=rng.choice(ROOMS),
        device=rng.choice(DEVICES),
        num_small=number_words(rng.randint(2, 30)),
        num=number_words(rng.randint(10, 90)),
        unit=rng.choice(["MINUTES", "SECONDS", "HOURS"]),
        clock=clock_words(rng),
        name=rng.choice(NAMES),
        day=rng.choice(DAYS),
        city=rng.choice(CITIES),
        dir=rng.choice(["LEFT", "RIGHT", "FORWARD", "BACK"]),
        stopgo=rng.choice(["STOP", "PAUSE", "RESUME"]),
    )


def gen_sentence(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return rng.choice(SENTENCES)
    if kind < 0.6:
        s = f"THE {rng.choice(ADJ)} {rng.choice(NOUNS)} {rng.choice(VERBS_PAST)} "
        s += f"THE {rng.choice(THINGS)}"
        if rng.random() < 0.5:
            s += f" {rng.choice(PREPS)} THE {rng.choice(THINGS)}"
        if rng.random() < 0.3:
            s += f" {rng.choice(TIMES)}"
        return s
    if kind < 0.8:
        return (
            f"{rng.choice(NAMES)} {rng.choice(VERBS_PAST)} A {rng.choice(ADJ)} "
            f"{rng.choice(THINGS)} {rng.choice(ADVERBS)}"
        )
    return (
        f"{rng.choice(['WHERE', 'WHY', 'WHEN'])} DID {rng.choice(NAMES)} PUT THE "
        f"{rng.choice(THINGS)}"
    )


GENERATORS = [
    (gen_number, 0.25),
    (gen_spelled, 0.15),
    (gen_command, 0.3),
    (gen_sentence, 0.3),
]


def gen_text(rng: random.Random) -> str:
    """Return marked-up text: <...> spans are spoken letter by letter."""
    r = rng.random()
    for fn, w in GENERATORS:
        if r < w:
            return fn(rng)
        r -= w
    return gen_sentence(rng)


def to_transcript(marked: str) -> str:
    return " ".join(marked.replace("<", " ").replace(">", " ").split())


def to_ssml(marked: str) -> str:
    """<...> spans become SSML say-as characters (spelled letter by letter)."""
    say_as = "<say-as interpret-as='characters'>\\1</say-as>"
    return "<speak>" + re.sub(r"<([^<>]*)>", say_as, marked.lower()) + "</speak>"


# --------------------------------------------------------------------------
# Speakers
# --------------------------------------------------------------------------
@dataclass
class Speaker:
    spk: str
    accent: str
    variant: str
    pitch: int  # espeak -p (0-99)
    rate: int  # espeak -s (words per minute)


def make_speakers(
    rng: random.Random, n: int, accents, variants, prefix: str
) -> list[Speaker]:
    combos = [(a, v) for a in accents for v in variants]
    rng.shuffle(combos)
    if n > len(combos):
        raise SystemExit(
            f"at most {len(combos)} distinct {prefix} speakers are available"
        )
    speakers = []
    for i, (acc, var) in enumerate(combos[:n]):
        speakers.append(
            Speaker(
                spk=f"{prefix}{i:03d}",
                accent=acc,
                variant=var,
                pitch=rng.randint(25, 75),
                rate=rng.randint(135, 185),
            )
        )
    return speakers


# --------------------------------------------------------------------------
# Synthesis
# --------------------------------------------------------------------------
@dataclass
class Job:
    utt: str
    spk: Speaker
    ssml: str
    wav: str
    seed: int


def synth_one(job: Job) -> tuple[str, float]:
    rng = random.Random(job.seed)
    rate = max(80, int(job.spk.rate * rng.uniform(0.88, 1.12)))
    pitch = min(99, max(0, job.spk.pitch + rng.randint(-8, 8)))
    gain = rng.uniform(-9.0, -2.0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "espeak.wav")
        subprocess.run(
            [
                "espeak-ng", "-m", "-v", f"{job.spk.accent}+{job.spk.variant}",
                "-s", str(rate), "-p", str(pitch), "-w", raw, job.ssml,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        # Resample to 16 kHz mono 16 bit; -D: no dither (keeps output repeatable).
        res = os.path.join(tmp, "16k.wav")
        subprocess.run(
            [
                "sox", "-V1", "-D", raw, "-r", str(FS), "-c", "1", "-b", "16", res,
                "norm", f"{gain:.2f}", "pad", f"{rng.uniform(0.05, 0.3):.2f}",
                f"{rng.uniform(0.05, 0.3):.2f}",
            ],
            check=True,
        )  # fmt: skip
        x, fs = soundfile.read(res, dtype="float64")
    assert fs == FS, fs
    # Background noise at a random SNR (20-45 dB), seeded per utterance.
    nrng = np.random.default_rng(job.seed)
    snr_db = rng.uniform(20.0, 45.0)
    power = float(np.mean(x**2)) + 1e-12
    noise = nrng.standard_normal(len(x))
    if rng.random() < 0.5:  # brown-ish noise for half of the utterances
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
    noise *= np.sqrt(power / (10 ** (snr_db / 10)) / (np.mean(noise**2) + 1e-12))
    y = np.clip(x + noise, -1.0, 1.0)
    Path(job.wav).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(job.wav, y, FS, subtype="PCM_16")
    return job.utt, len(y) / FS


def check_tools() -> None:
    missing = [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]
    if missing:
        sys.stderr.write(
            f"Error: {' and '.join(missing)} not found on PATH; local/data.sh needs "
            "both to synthesize the corpus.\n"
            "  Debian/Ubuntu: sudo apt-get install espeak-ng sox\n"
            "  Fedora:        sudo dnf install espeak-ng sox\n"
            "  macOS:         brew install espeak-ng sox\n"
        )
        sys.exit(1)


def unique_texts(rng: random.Random, n: int, seen: set[str]) -> list[str]:
    out = []
    tries = 0
    while len(out) < n:
        t = gen_text(rng)
        tries += 1
        key = to_transcript(t)
        if key in seen and tries < 50 * n:
            continue
        seen.add(key)
        out.append(t)
    return out


def write_datadir(d: Path, rows: list[tuple[str, str, str, str]]) -> None:
    """rows: (utt, spk, wav path, transcript)."""
    d.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows)
    with open(d / "wav.scp", "w") as f:
        f.writelines(f"{u} {w}\n" for u, _, w, _ in rows)
    with open(d / "text", "w") as f:
        f.writelines(f"{u} {t}\n" for u, _, _, t in rows)
    with open(d / "utt2spk", "w") as f:
        f.writelines(f"{u} {s}\n" for u, s, _, _ in rows)
    spk2utt: dict[str, list[str]] = {}
    for u, s, _, _ in rows:
        spk2utt.setdefault(s, []).append(u)
    with open(d / "spk2utt", "w") as f:
        f.writelines(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outdir", default="data", help="where train/dev/test go")
    p.add_argument("--wavdir", default="downloads/espeak", help="where wavs go")
    p.add_argument("--num_train", type=int, default=2000)
    p.add_argument("--num_dev", type=int, default=200)
    p.add_argument("--num_test", type=int, default=200)
    p.add_argument("--num_train_spk", type=int, default=40)
    p.add_argument("--num_test_spk", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nj", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--train_set", default="train")
    p.add_argument("--dev_set", default="dev")
    p.add_argument("--test_set", default="test")
    args = p.parse_args(argv)
    check_tools()

    from tqdm import tqdm

    rng = random.Random(args.seed)
    train_spk = make_speakers(
        rng, args.num_train_spk, TRAIN_ACCENTS, TRAIN_VARIANTS, "tr"
    )
    # Test speakers never occur in training: most have a held-out voice variant
    # (with any accent), a few a held-out accent with a training variant.
    n_accent_only = min(2, args.num_test_spk // 3)
    test_spk = make_speakers(
        rng,
        args.num_test_spk - n_accent_only,
        TRAIN_ACCENTS + TEST_ACCENTS,
        TEST_VARIANTS,
        "te",
    )
    test_spk += make_speakers(rng, n_accent_only, TEST_ACCENTS, TRAIN_VARIANTS, "tx")

    wavdir = Path(args.wavdir)
    seen: set[str] = set()
    plan = {
        args.train_set: (train_spk, unique_texts(rng, args.num_train, seen)),
        args.dev_set: (train_spk, unique_texts(rng, args.num_dev, seen)),
        args.test_set: (test_spk, unique_texts(rng, args.num_test, seen)),
    }
    jobs: list[Job] = []
    rows: dict[str, list] = {}
    for dset, (speakers, texts) in plan.items():
        rows[dset] = []
        for i, marked in enumerate(texts):
            spk = (
                speakers[i % len(speakers)]
                if dset != args.train_set
                else rng.choice(speakers)
            )
            utt = f"{spk.spk}-{dset}{i:05d}"
            wav = str(wavdir / dset / f"{utt}.wav")
            jobs.append(Job(utt, spk, to_ssml(marked), wav, rng.getrandbits(32)))
            rows[dset].append((utt, spk.spk, wav, to_transcript(marked)))

    total = 0.0
    with multiprocessing.Pool(max(1, args.nj)) as pool:
        for _, dur in tqdm(
            pool.imap_unordered(synth_one, jobs, chunksize=8),
            total=len(jobs),
            desc="espeak-ng",
            unit="utt",
        ):
            total += dur

    out = Path(args.outdir)
    for dset, r in rows.items():
        write_datadir(out / dset, r)
        spks = plan[dset][0]
        used = {x[1] for x in r}
        with open(out / dset / "spk2voice", "w") as f:
            for s in spks:
                if s.spk in used:
                    f.write(json.dumps(asdict(s)) + "\n")
    digest = hashlib.md5(
        b"".join((out / d / "text").read_bytes() for d in rows)
    ).hexdigest()
    print(
        f"Synthesized {len(jobs)} utterances ({total / 3600:.2f} h, "
        f"{len(train_spk)} training and {len(test_spk)} unseen test speakers) "
        f"into {out}/{{{','.join(rows)}}}; text md5 {digest}"
    )


if __name__ == "__main__":
    main()
