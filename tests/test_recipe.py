"""The espeak recipe (egs2/espeak/asr1): end to end on the smoke size, fast failures,
the corpus synthesizer and the Python scorer.

The end-to-end test runs ``./run.sh --smoke true`` (stages 1-15: synthesis,
formatting, token list, collect stats, FusionFormer training, decoding, scoring,
packing, Hugging Face repository) in a temporary copy of the recipe, then checks
the outputs a user relies on. It takes about two minutes on a 2-core CPU; set
SKIP_RECIPE_E2E=1 to skip it locally.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "egs2" / "espeak" / "asr1"
GENERATED = {"data", "dump", "exp", "downloads", "utils", "steps", "scripts"}
SMOKE_EXP = "exp/asr_train_smoke_fusionformer_raw_en_char"
SMOKE_DECODE = "decode_smoke_asr_model_valid.acc.ave"

sys.path.insert(0, str(RECIPE / "local"))
import check_config  # noqa: E402  (the recipe's local/check_config.py)
import score  # noqa: E402  (the recipe's local/score.py)
import synthesize  # noqa: E402  (the recipe's local/synthesize.py)

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("sox") is None,
    reason="espeak-ng and sox are needed (./install.sh installs them)",
)


def copy_recipe(dst: Path) -> Path:
    shutil.copytree(
        RECIPE,
        dst,
        symlinks=True,
        ignore=lambda d, names: (
            [n for n in names if n in GENERATED or n == "pyscripts"]
            if Path(d) == RECIPE
            else []
        ),
    )
    return dst


def run(recipe: Path, *args: str, timeout: int = 600, env=None):
    base = dict(os.environ)
    for var in ("ESPNET_ROOT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        base.pop(var, None)
    env = {**base, **(env or {})}
    return subprocess.run(
        ["./run.sh", *args],
        cwd=recipe,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sum_avg(result: Path) -> list:
    """The numbers of the 'Sum/Avg' row: Snt Wrd Corr Sub Del Ins Err S.Err."""
    for line in result.read_text().splitlines():
        if "Sum/Avg" in line:
            return [
                float(x) for x in line.replace("Sum/Avg", "").replace("|", " ").split()
            ]
    raise AssertionError(f"no Sum/Avg line in {result}")


# --------------------------------------------------------------------------
# End to end (CI): ./run.sh --smoke true
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if os.environ.get("SKIP_RECIPE_E2E"):
        pytest.skip("SKIP_RECIPE_E2E is set")
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed (./install.sh installs them)")
    recipe = copy_recipe(tmp_path_factory.mktemp("recipe") / "asr1")
    proc = run(recipe, "--smoke", "true", "--nj", "2", timeout=900)
    log = proc.stdout + proc.stderr
    (recipe / "run.log").write_text(log)
    assert proc.returncode == 0, log[-5000:]
    return recipe, log


def test_smoke_run_end_to_end(smoke_run):
    recipe, log = smoke_run
    # every stage announced itself with a banner and the elapsed time
    for n in (1, 3, 4, 5, 10, 11, 12, 13, 14, 15):
        assert re.search(rf"Stage {n}: .*\[elapsed \d+s\]", log), f"stage {n}"
        assert re.search(rf"Stage {n} done in \d+s", log), f"stage {n}"
    assert "Successfully finished" in log

    # Kaldi-style data, 16 kHz audio
    for dset in ("train", "dev", "test"):
        d = recipe / "data" / dset
        utts = [line.split()[0] for line in (d / "wav.scp").read_text().splitlines()]
        assert utts == sorted(utts) and len(utts) > 10
        for name in ("text", "utt2spk"):
            keys = [line.split()[0] for line in (d / name).read_text().splitlines()]
            assert keys == utts
        spk2utt = (d / "spk2utt").read_text().split()
        assert set(utts) <= set(spk2utt)
        wav = (d / "wav.scp").read_text().split("\n")[0].split(maxsplit=1)[1]
        info = soundfile.info(recipe / wav)
        assert info.samplerate == 16000 and info.channels == 1
    # ESPnet's dump layout
    assert (recipe / "dump/raw/org/train/wav.scp").exists()
    assert (recipe / "dump/raw/test/utt2num_samples").exists()
    assert (recipe / "dump/raw/train/feats_type").read_text().strip() == "raw"
    assert (recipe / "exp/asr_stats_raw_en_char/train/feats_stats.npz").exists()
    assert (recipe / "exp/asr_stats_raw_en_char/train/text_shape.char").exists()

    # training, decoding and scoring outputs
    exp = recipe / SMOKE_EXP
    assert (exp / "valid.acc.ave.pth").exists() and (exp / "train.log").exists()
    for dset in ("dev", "test"):
        for kind in ("cer", "wer"):
            result = exp / SMOKE_DECODE / dset / f"score_{kind}" / "result.txt"
            snt, wrd, corr, sub, dele, ins, err, serr = sum_avg(result)
            assert snt == 24 and wrd > 0
            assert abs(corr + sub + dele - 100) < 0.5
            assert err == pytest.approx(sub + dele + ins, abs=0.5)
    results = (exp / "RESULTS.md").read_text()
    assert "### CER" in results and "### WER" in results
    assert f"|{SMOKE_DECODE}/test|24|" in results

    # packed model and the Hugging Face repository directory
    zips = list(exp.glob("*.zip"))
    assert [z.name for z in zips] == [f"{exp.name}_valid.acc.ave.zip"]
    assert "loads with Speech2Text.from_pretrained and decodes" in log
    hf = recipe / "exp" / f"hf_{exp.name}"
    card = (hf / "README.md").read_text()
    assert "pip install" in card and "espnet-fusionformer" in card
    assert "fusionformer" in card and (hf / "meta.yaml").exists()
    assert "Not uploaded" in log and str(hf.relative_to(recipe)) in log


def test_smoke_packed_model_decodes(smoke_run):
    recipe, _ = smoke_run
    from espnet2.bin.asr_inference import Speech2Text

    zip_path = next((recipe / SMOKE_EXP).glob("*.zip"))
    s2t = Speech2Text.from_pretrained(str(zip_path), beam_size=2, device="cpu")
    wav = (recipe / "data/test/wav.scp").read_text().split("\n")[0].split()[1]
    speech, rate = soundfile.read(recipe / wav, dtype="float32")
    text, tokens, *_ = s2t(speech)[0]
    assert isinstance(text, str) and isinstance(tokens, list)
    assert type(s2t.asr_model.encoder).__name__ == "FusionFormerEncoder"


def test_smoke_rerun_is_safe(smoke_run):
    recipe, _ = smoke_run
    proc = run(recipe, "--smoke", "true", "--stage", "1", "--stop_stage", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already synthesized with these options: skip" in proc.stdout
    result = recipe / SMOKE_EXP / SMOKE_DECODE / "test/score_cer/result.txt"
    scored = result.read_text()
    result.unlink()  # stage 13 alone must score again, from the kept hypotheses
    proc = run(recipe, "--smoke", "true", "--stage", "13", "--stop_stage", "13")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert result.read_text() == scored and sum_avg(result)


# --------------------------------------------------------------------------
# Fast failures: nothing is prepared when the arguments are wrong
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe_copy(tmp_path_factory):
    return copy_recipe(tmp_path_factory.mktemp("recipe_fail") / "asr1")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "5", "--stop_stage", "3"], "invalid stage range"),
        (["--stage", "17"], "invalid stage range"),
        (["--stage", "x"], "must be a non-negative integer"),
        (["--asr_config", "conf/no_such.yaml"], "conf/no_such.yaml: no such file"),
        (["--inference_config", "conf/none.yaml"], "conf/none.yaml: no such file"),
        (["--no_such_option", "1"], "invalid option: --no_such_option"),
        (["--skip_train", "maybe"], "takes true or false"),
        (["--feats_type", "fbank_pitch"], "not supported by this pip-only asr.sh"),
        (["--smoke", "yes"], "--smoke takes true or false"),
    ],
)
def test_fails_early(recipe_copy, args, message):
    proc = run(recipe_copy, *args, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (recipe_copy / "data").exists() and not (recipe_copy / "exp").exists()


def test_unknown_encoder_fails_early(recipe_copy, tmp_path):
    conf = recipe_copy / "conf" / "train_bogus.yaml"
    text = (recipe_copy / "conf" / "train_smoke_fusionformer.yaml").read_text()
    conf.write_text(text.replace("encoder: fusionformer", "encoder: nosuchformer"))
    # generous: the check imports ESPnet, slow on a loaded machine; "early" is the
    # missing data dir below
    proc = run(recipe_copy, "--asr_config", "conf/train_bogus.yaml", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "unknown encoder 'nosuchformer'" in out and "fusionformer" in out
    assert not (recipe_copy / "data").exists()


def test_bad_encoder_conf_is_reported(tmp_path, capsys):
    # the same check asr.sh runs before stage 1, called in-process
    conf = tmp_path / "train_badconf.yaml"
    text = (RECIPE / "conf" / "train_smoke_fusionformer.yaml").read_text()
    conf.write_text(text.replace("normalization: fusion", "normalization: groupnorm"))
    with pytest.raises(SystemExit):
        check_config.check(str(conf))
    assert "cannot build the model" in capsys.readouterr().err
    assert "fusionformer (0.29 M" in check_config.check(
        str(RECIPE / "conf" / "train_smoke_fusionformer.yaml")
    )


def test_missing_espeak_says_how_to_install(recipe_copy, tmp_path):
    # a PATH with everything but espeak-ng
    farm = tmp_path / "bin"
    farm.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name.startswith("espeak") or (farm / name).exists():
                continue
            (farm / name).symlink_to(os.path.join(d, name))
    proc = subprocess.run(
        ["bash", "local/data.sh", "--smoke", "true"],
        cwd=recipe_copy,
        env={**os.environ, "PATH": str(farm)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "apt-get install espeak-ng" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# The synthesizer and the scorer
# --------------------------------------------------------------------------
def synth(outdir: Path, seed: int) -> str:
    subprocess.run(
        [
            sys.executable,
            str(RECIPE / "local" / "synthesize.py"),
            *("--outdir", "data", "--wavdir", "wav", "--seed", str(seed)),
            *("--num_train", "12", "--num_dev", "3", "--num_test", "6"),
            *("--num_train_spk", "4", "--num_test_spk", "3", "--nj", "2"),
        ],
        cwd=outdir,
        check=True,
        capture_output=True,
    )
    digest = hashlib.md5()
    for f in sorted((outdir / "wav").rglob("*.wav")):
        digest.update(f.read_bytes())
    for dset in ("train", "dev", "test"):
        digest.update((outdir / "data" / dset / "text").read_bytes())
    return digest.hexdigest()


@needs_espeak
def test_corpus_is_deterministic_and_test_voices_unseen(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    assert synth(a, seed=3) == synth(b, seed=3)
    assert synth(c, seed=4) != synth(a, seed=3)

    def voices(dset):
        lines = (a / "data" / dset / "spk2voice").read_text().splitlines()
        return {(v["accent"], v["variant"]) for v in map(json.loads, lines)}

    assert voices("dev") <= voices("train")
    assert voices("test") and not voices("test") & voices("train")
    test_spk = set((a / "data/test/spk2utt").read_text().split()[::2])
    train_spk = set((a / "data/train/spk2utt").read_text().split()[::2])
    assert not test_spk & train_spk
    texts = (a / "data/train/text").read_text() + (a / "data/test/text").read_text()
    assert re.fullmatch(r"([^ \n]+ [A-Z' ]+\n)+", texts)


def test_text_generator_has_variety():
    import random

    rng = random.Random(0)
    texts = [synthesize.gen_text(rng) for _ in range(400)]
    plain = [synthesize.to_transcript(t) for t in texts]
    assert len(set(plain)) > 300
    assert any("<" in t for t in texts)  # spelled letters
    assert any(w in synthesize.ONES for t in plain for w in t.split())  # numbers
    assert any(t.startswith(("TURN", "SET", "CALL")) for t in plain)  # commands
    assert synthesize.number_words(1234) == "ONE THOUSAND TWO HUNDRED AND THIRTY FOUR"
    assert synthesize.to_ssml("CODE <A B>") == (
        "<speak>code <say-as interpret-as='characters'>a b</say-as></speak>"
    )


def test_score_counts_sub_del_ins(tmp_path):
    (tmp_path / "ref").write_text("u1 THE CAT SAT ON THE MAT\nu2 HELLO WORLD\n")
    (tmp_path / "hyp").write_text("u1 THE CAT SAT THE MAT TOO\nu2 HELLO WORD\n")
    (tmp_path / "u2s").write_text("u1 spk1\nu2 spk2\n")
    err, n = score.score(
        str(tmp_path / "ref"),
        str(tmp_path / "hyp"),
        str(tmp_path / "u2s"),
        "word",
        str(tmp_path / "wer"),
    )
    assert n == 8 and err == pytest.approx(100 * 3 / 8)
    snt, wrd, corr, sub, dele, ins, e, serr = sum_avg(tmp_path / "wer" / "result.txt")
    assert (snt, wrd) == (2, 8)
    assert (sub, dele, ins) == (12.5, 12.5, 12.5) and serr == 100.0
    assert (tmp_path / "wer" / "hyp.trn").read_text().splitlines()[1] == (
        "HELLO WORD\t(spk2-u2)"
    )
    score.score(
        str(tmp_path / "ref"),
        str(tmp_path / "hyp"),
        str(tmp_path / "u2s"),
        "char",
        str(tmp_path / "cer"),
    )
    ref_trn = (tmp_path / "cer" / "ref.trn").read_text().splitlines()[1]
    assert ref_trn == "H E L L O <space> W O R L D\t(spk2-u2)"
    # 33 reference characters (spaces included); "WORLD" -> "WORD" is one deletion
    snt, wrd, corr, sub, dele, ins, e, serr = sum_avg(tmp_path / "cer" / "result.txt")
    assert wrd == 33 and e == pytest.approx(sub + dele + ins, abs=0.2)
    assert "Scores: (#C #S #D #I) 10 0 1 0" in (tmp_path / "cer/result.txt").read_text()


def test_espnet_root_runs_espnets_own_asr_sh(recipe_copy, tmp_path):
    # A stand-in ESPnet checkout whose TEMPLATE asr.sh prints what it was given;
    # it is an older asr.sh that calls the packing switch --skip_upload.
    template = tmp_path / "espnet" / "egs2" / "TEMPLATE" / "asr1"
    for d in ("utils", "steps", "scripts", "pyscripts"):
        (template / d).mkdir(parents=True)
    known = [
        "stage", "stop_stage", "skip_upload", "skip_upload_hf", "ngpu", "nj",
        "inference_nj", "lang", "token_type", "use_lm", "max_wav_duration",
        "local_data_opts", "asr_config", "inference_config", "train_set",
        "valid_set", "test_sets",
    ]  # fmt: skip
    (template / "asr.sh").write_text(
        "#!/usr/bin/env bash\n"
        + "".join(f"{k}=\n" for k in known)
        + 'printf "ARG[%s]\\n" "$@"\n'
    )
    (template / "asr.sh").chmod(0o755)
    proc = run(
        recipe_copy,
        "--stage", "3", "--train_nthreads", "1",
        env={"ESPNET_ROOT": str(tmp_path / "espnet")},
        timeout=60,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    args = re.findall(r"ARG\[(.*)\]", proc.stdout)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--stage"] == "3" and pairs["--skip_upload"] == "false"
    assert pairs["--test_sets"] == "dev test"
    assert pairs["--asr_config"] == "conf/train_fusionformer.yaml"
    assert "--skip_packing" not in pairs and "--train_nthreads" not in pairs
    assert "has no --train_nthreads; dropped" in out
    for d in ("utils", "steps", "scripts", "pyscripts"):
        assert (recipe_copy / d).resolve() == (template / d).resolve()
        (recipe_copy / d).unlink()
