"""The benchmark: --quick end to end with real models (one in-process run), the
timing arithmetic, and the training step on a recipe dump read by ESPnet's
iterator.

Set SKIP_BENCH=1 to skip the quick run (CI runs it in one set of versions only).
"""

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import asr_config

pytest.importorskip("matplotlib")
pytest.importorskip("onnxruntime")

from espnet_fusionformer.bench import get_parser, main, resolve  # noqa: E402
from espnet_fusionformer.bench.timing import (  # noqa: E402
    finish_row,
    now,
    summarize,
    time_interleaved,
)

MODELS = ("conformer", "layernorm", "fusionformer")
ONNX_STREAM_METRICS = ("chunk_onnx", "chunk_int8")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick`` in this process (ESPnet's slow imports are paid once per test
    session); the console entry point is checked by ``test_module_entry_point``."""
    if os.environ.get("SKIP_BENCH"):
        pytest.skip("SKIP_BENCH is set")
    out = tmp_path_factory.mktemp("bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), warnings.catch_warnings():
        main(["--quick", "--out", str(out)])
    return out, stdout.getvalue(), json.loads((out / "bench.json").read_text())


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "espnet_fusionformer.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--train-only" in proc.stdout and "--no-int8" in proc.stdout


def test_every_row_times_both_baselines_and_fusionformer(quick_run):
    _, _, result = quick_run
    assert not result["errors"], result["errors"]
    seen = set()
    for row in result["rows"]:
        if row.get("metric") in ONNX_STREAM_METRICS:  # ESPnet's CBC has no ONNX path
            assert row.get("conformer") is None
            assert row["ratios"]["ff_vs_layernorm"] == pytest.approx(
                row["fusionformer"]["median_ms"] / row["layernorm"]["median_ms"],
                abs=1e-3,
            )
            continue
        for name in MODELS:
            stats = row[name]
            assert stats["n"] >= 2 and len(stats["times_ms"]) == stats["n"]
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        c, ln, ff = (row[name]["median_ms"] for name in MODELS)
        assert row["ratios"]["ff_vs_conformer"] == pytest.approx(ff / c, abs=1e-3)
        assert row["ratios"]["ff_vs_layernorm"] == pytest.approx(ff / ln, abs=1e-3)
        assert row["ratios"]["layernorm_vs_conformer"] == pytest.approx(
            ln / c, abs=1e-3
        )
        seen.add((row["section"], row["engine"], row["variant"]))
    for engine in ("eager", "torchscript", "onnxruntime", "int8"):
        assert ("latency", engine, "fused") in seen, engine
    assert ("latency", "eager", "unfused") in seen
    assert {
        ("throughput", e, "fused") for e in ("eager", "onnxruntime", "int8")
    } <= seen
    assert ("train", "train", "fused") in seen
    assert ("streaming", "streaming", "fused") in seen


def test_verdicts_follow_the_ratios(quick_run):
    _, _, result = quick_run
    wanted = {
        ("eager", 67): {"conformer"},
        ("eager", 260): {"conformer"},
        ("onnxruntime", 67): {"conformer"},
        ("onnxruntime", 260): {"conformer"},
        ("int8", 260): {"conformer", "layernorm"},
        ("train", None): {"conformer"},
    }
    found = {}
    for row in result["rows"]:
        for t in row["targets"]:
            assert t["ratio"] == row["ratios"][f"ff_vs_{t['vs']}"]
            assert t["met"] == (t["ratio"] <= t["target"])
            found.setdefault((row["engine"], row["frames"]), set()).add(t["vs"])
    assert found == wanted
    assert [(t["engine"], t["vs"]) for t in result["targets"]].count(
        ("int8", "layernorm")
    ) == 1


def test_parameters_are_counted_on_the_built_modules(quick_run):
    _, _, result = quick_run
    params, d, blocks = (
        result["models"]["params"],
        result["models"]["d_model"],
        result["models"]["blocks"],
    )
    # the same-code LayerNorm twin is ESPnet's Conformer less the depthwise
    # BatchNorm's gamma and beta that fusing folds away
    assert params["conformer"] - params["layernorm"] == 2 * d * blocks
    # FusionFormer drops GLU's doubled pointwise conv: fewer parameters
    assert params["fusionformer"] < params["unfused"] < params["layernorm"]
    train = result["train"]
    assert train["encoder_params"]["conformer"] == train["encoder_params"]["layernorm"]
    assert train["params"]["conformer"] == train["params"]["layernorm"]
    assert train["params"]["fusionformer"] < train["params"]["layernorm"]


def test_training_step_is_built_from_the_recipe_configs(quick_run):
    _, _, result = quick_run
    train = result["train"]
    assert train["source"] == "synthetic"  # --quick without --dump
    assert train["batch_bins"] == 120000 and train["batch_type"] == "numel"
    assert train["configs"]["conformer"].endswith("train_smoke_conformer.yaml")
    assert train["configs"]["fusionformer"].endswith("train_smoke_fusionformer.yaml")
    assert "normalization=layernorm" in train["configs"]["layernorm"]
    smoke = yaml.safe_load(Path(train["configs"]["fusionformer"]).read_text())
    for name in ("layernorm", "fusionformer"):
        conf = train["encoder_conf"][name]
        for key, value in smoke["encoder_conf"].items():
            if key != "normalization":
                assert conf[key] == value, key
    assert train["encoder_conf"]["layernorm"]["normalization"] == "layernorm"
    assert train["encoder_conf"]["fusionformer"]["normalization"] == "fusion"
    assert all(0 < size for size in train["batch_sizes"])


def test_speedup_shares_add_up(quick_run):
    _, _, result = quick_run
    for row in result["rows"]:
        share, r = row["share"], row["ratios"]
        if share is None:
            continue
        assert share["architecture"] + share["implementation"] == pytest.approx(
            1, abs=0.011
        )
        expected = math.log(r["ff_vs_layernorm"]) / (
            math.log(r["ff_vs_layernorm"]) + math.log(r["layernorm_vs_conformer"])
        )
        assert share["architecture"] == pytest.approx(expected, abs=0.011)


def test_streaming_rows(quick_run):
    _, _, result = quick_run
    rows = {r["metric"]: r for r in result["rows"] if r["section"] == "streaming"}
    assert set(rows) == {"chunk", "total", "first_token", *ONNX_STREAM_METRICS}
    for metric in ONNX_STREAM_METRICS:  # 16 chunks, every one timed
        for name in ("layernorm", "fusionformer"):
            assert rows[metric][name]["n"] >= 2 * 16
    info = result["streaming"]
    assert "ContextualBlockConformerEncoder" in info["conformer"]["cls"]
    for name in MODELS:
        assert info[name]["output_frames"] == 249  # 10 s at subsampling 4
    for name in ("layernorm", "fusionformer"):
        assert info[name]["first_output_input_frames"] == 67  # one chunk's window
        assert info[name]["calls"] == 16
    assert info["conformer"]["first_output_input_frames"] > 4 * (40 - 1)
    for name in MODELS:
        first = rows["first_token"][name]
        assert first["median_ms"] > first["wait_ms"] > 0  # wait + compute
        assert 0 < rows["total"][name]["rtf"] < 1


def test_table_and_chart_are_written(quick_run):
    out, stdout, _ = quick_run
    table = (out / "bench.md").read_text()
    assert "ESPnet Conformer ms" in table and "same code, LayerNorm ms" in table
    assert "## Where the speed-up comes from" in table
    assert "## Training step (full ESPnet ASR model)" in table
    assert "per-chunk latency, ONNX Runtime int8" in table
    assert table.strip() in stdout  # printed too
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_other_processes_cpu_is_measured_and_reported(quick_run):
    from espnet_fusionformer.bench.cli import OtherLoad
    from espnet_fusionformer.bench.report import busy_warning

    _, _, result = quick_run
    assert result["machine"]["other_busy_cores"] is not None
    # a busy process that is not this one shows up as about one core
    load = OtherLoad()
    spin = "import time\nt = time.time()\nwhile time.time() - t < 2: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    time.sleep(2.5)
    others = load.stop()  # before wait(): the child's CPU is not ours yet
    child.wait()
    assert 0.5 < others < 2.5
    quiet = busy_warning({"logical_cpus": 2, "other_busy_cores": 0.05})
    assert "(quiet)" in quiet and "noisy" not in quiet
    # the measured load wins over a trailing load average
    loaded = busy_warning({"logical_cpus": 2, "other_busy_cores": 1.2})
    assert "1.20 of 2 cores" in loaded and "noisy" in loaded
    stale = {"logical_cpus": 2, "other_busy_cores": 0.0, "loadavg_start": [3.0]}
    assert "noisy" not in busy_warning(stale)
    assert "noisy" in busy_warning({"logical_cpus": 2, "loadavg_start": [3.0]})


# -- arithmetic ---------------------------------------------------------------------
def stats(*ms):
    return summarize([m / 1000 for m in ms])


def test_finish_row_verdicts_paired_ratios_and_shares():
    row = dict(engine="int8", variant="fused", frames=1000, threads=1)
    row.update(
        conformer=stats(100, 200, 100),
        layernorm=stats(80, 160, 80),
        fusionformer=stats(60, 160, 60),
    )
    finish_row(row)
    assert row["ratios"]["ff_vs_conformer"] == 0.6
    assert row["paired"]["ff_vs_conformer"]["median"] == 0.6
    assert row["paired"]["ff_vs_layernorm"]["p75"] == pytest.approx(0.875)
    verdicts = {t["vs"]: t["met"] for t in row["targets"]}
    assert verdicts == {"conformer": True, "layernorm": True}  # 0.6, 0.75
    arch = math.log(0.75) / math.log(0.6)
    assert row["share"]["architecture"] == pytest.approx(arch, abs=0.01)
    row["fusionformer"] = stats(75, 160, 75)
    finish_row(row)
    assert {t["vs"]: t["met"] for t in row["targets"]} == {
        "conformer": False,  # 0.75 > 0.70
        "layernorm": False,  # 0.9375 > 0.90
    }
    row["layernorm"] = stats(70, 160, 70)  # the architecture slows down
    assert finish_row(row)["share"] is None
    unfused = dict(row, variant="unfused")
    assert finish_row(unfused)["targets"] == []  # targets are for the fused form


def test_interleaving_alternates_the_order():
    calls = []
    conf = dict(warmup=0, budget=0.0, min_repeats=4, repeats=4)
    times = time_interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, conf)
    assert calls[3:] == list("abccbaabccba")  # after one warm-up call each
    assert all(len(t) == 4 for t in times.values())


def test_one_thread_settings_are_timed_in_cpu_time():
    # with one thread the clock leaves out time the process does not compute (the
    # host's other processes); with more threads it is wall time
    import torch

    threads = torch.get_num_threads()

    def slept(n):
        torch.set_num_threads(n)
        start = now()
        time.sleep(0.3)
        return now() - start

    try:
        assert slept(1) < 0.1
        assert slept(2) >= 0.3
    finally:
        torch.set_num_threads(threads)


def test_options():
    conf = resolve(get_parser().parse_args(["--quick"]))
    assert conf["streaming"] and conf["int8"] and conf["train"]
    assert conf["use_dump"] is False  # quick: synthetic unless --dump
    conf = resolve(get_parser().parse_args(["--train-only"]))
    assert conf["train"] and conf["use_dump"]
    assert not (conf["latency"] or conf["streaming"] or conf["profile"])
    with pytest.raises(SystemExit):
        resolve(get_parser().parse_args(["--train-only", "--no-train"]))
    conf = resolve(get_parser().parse_args(["--no-latency", "--no-onnx"]))
    assert conf["streaming"] and conf["int8"] and not conf["onnx"]


# -- the training step on a recipe dump --------------------------------------------
@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_data):
    """A recipe dir: conf/ with a tiny config pair, dump/raw/train from the tiny
    data (wav paths relative to the recipe, as asr.sh writes them)."""
    root = tmp_path_factory.mktemp("recipe")
    dump = root / "dump" / "raw" / "train"
    (root / "dump" / "raw" / "org").mkdir(parents=True)
    dump.mkdir(parents=True)
    lines = []
    for line in (tiny_data / "wav.scp").read_text().splitlines():
        utt, path = line.split()
        shutil.copy(path, root / "dump" / "raw" / "org" / f"{utt}.wav")
        lines.append(f"{utt} dump/raw/org/{utt}.wav")
    (dump / "wav.scp").write_text("\n".join(lines) + "\n")
    shutil.copy(tiny_data / "text", dump / "text")
    (root / "conf").mkdir()
    for encoder in ("fusionformer", "conformer"):
        conf = asr_config(encoder)
        for key in ("token_list", "input_size", "token_type"):
            conf.pop(key)
        conf.update(batch_type="numel", batch_bins=40000, seed=3)
        (root / "conf" / f"train_{encoder}.yaml").write_text(yaml.safe_dump(conf))
    return root


def test_training_step_on_recipe_batches(recipe):
    from espnet_fusionformer.bench.train import run_train

    conf = dict(
        recipe=str(recipe),
        quick=False,  # the recipe's train_fusionformer/conformer.yaml
        train_threads=1,
        train_batches=3,
        train_batch_bins=None,
        seed=0,
        warmup=0,
        repeats=2,
        min_repeats=2,
        budget=0.0,
        use_dump=True,
    )
    rows, info = run_train(conf, print)
    assert info["source"] == "recipe" and info["batch_bins"] == 40000
    # ESPnet's numel sampler: each padded batch within batch_bins (one utterance
    # may exceed it alone); sizes from the shapes written for the dump
    assert info["batches"] == 3 and all(1 <= n <= 4 for n in info["batch_sizes"])
    assert 0 <= info["padding"] < 0.5
    assert info["normalize"] == "utterance_mvn"  # no statistics in this recipe
    assert info["params"]["conformer"] == info["params"]["layernorm"]
    row = rows[0]
    assert row["engine"] == "train" and row["threads"] == 1
    for name in MODELS:
        assert row[name]["n"] == 2 and row[name]["median_ms"] > 0
