"""The benchmark's --quick mode end to end: real models, real timings, real files.

Set SKIP_BENCH=1 to skip the quick run (CI runs it in one set of versions only).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if os.environ.get("SKIP_BENCH"):
        pytest.skip("SKIP_BENCH is set")
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "espnet_fusionformer.bench", "--quick", "--out", out],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_json_has_both_encoders_with_equal_sizes(quick_run):
    out, _ = quick_run
    result = json.loads((out / "bench.json").read_text())
    conformer = result["models"]["conformer"]
    fusionformer = result["models"]["fusionformer"]
    for key in ("d_model", "heads", "blocks", "units", "kernel", "input_size"):
        assert conformer[key] == fusionformer[key], key
    assert conformer["params"] > 0 and fusionformer["params_fused"] > 0
    assert result["machine"]["torch"] and result["machine"]["cpu"]


def test_latencies_are_positive_for_both_encoders(quick_run):
    out, _ = quick_run
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    latency = [r for r in rows if r["section"] == "latency"]
    assert latency
    seen = set()
    for row in rows:
        for name in ("conformer", "fusionformer"):
            stats = row[name]
            if stats is None:  # an export failed: it must be reported
                assert result["errors"]
                continue
            assert stats["n"] >= 2 and len(stats["times_ms"]) == stats["n"]
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
        if row["conformer"] and row["fusionformer"]:
            assert row["ratio"] > 0
        seen.add((row["engine"], row["variant"]))
    # eager unfused and fused FusionFormer, batch throughput and the training step
    assert {("eager", "unfused"), ("eager", "fused"), ("train", "train")} <= seen
    assert any(r["section"] == "throughput" for r in rows)
    # every target row says met or missed
    targets = [r for r in rows if r["target"] is not None]
    assert targets and all(r["met"] in (True, False) for r in targets if r["ratio"])
    static = result["static"]
    for key in ("gflops", "peak_mb", "norm_share", "act_share"):
        assert static[key]["conformer"] is not None, key
    assert static["gflops"]["conformer"] > 0 and static["gflops"]["fused"] > 0


def test_table_and_chart_are_written(quick_run):
    out, proc = quick_run
    table = (out / "bench.md").read_text()
    assert "| setting |" in table and "Conformer" in table and "torch" in table
    assert table.strip() in proc.stdout  # printed too
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_streaming_rows_compare_fusionformer_chunks_with_contextual_block(quick_run):
    out, _ = quick_run
    result = json.loads((out / "bench.json").read_text())
    rows = {r["metric"]: r for r in result["rows"] if r["section"] == "streaming"}
    assert set(rows) == {"chunk", "total", "first_token"}
    info = result["streaming"]
    ff, cbc = info["fusionformer"], info["conformer"]
    assert "ContextualBlockConformerEncoder" in cbc["cls"]
    assert ff["output_frames"] == cbc["output_frames"] == 249  # 10 s at rate 4
    assert ff["first_output_input_frames"] == 67  # one 16-frame chunk's window
    assert cbc["first_output_input_frames"] > 4 * (40 - 1)  # a whole block first
    for row in rows.values():
        for name in ("conformer", "fusionformer"):
            stats = row[name]
            assert 0 < stats["median_ms"] <= stats["p90_ms"] <= stats["max_ms"]
    for name in ("conformer", "fusionformer"):
        first = rows["first_token"][name]
        assert first["median_ms"] > first["wait_ms"] > 0  # wait + compute
        assert 0 < rows["total"][name]["rtf"] < 1
    table = (out / "bench.md").read_text()
    assert "## Streaming" in table and "first-token latency" in table


def test_no_streaming_flag():
    from espnet_fusionformer.bench import get_parser, resolve

    assert resolve(get_parser().parse_args(["--quick"]))["streaming"]
    conf = resolve(get_parser().parse_args(["--quick", "--no-streaming"]))
    assert conf["streaming"] is False and conf["stream_frames"] == 1000
