"""yoco bench on tiny sizes: every field for every arch and length, formulas, plot, bad flags."""

import json
import math
from collections import Counter

import pytest
import torch

from yoco.bench import (BENCH_ARCHS, BenchError, BenchSettings, LinearCalls, PeakRSS, bench_config, bench_figure,
                        busy_warning, make_runner, positions_needed, prefill_flops, probe, ratio_rows, run_bench,
                        write_plot)
from yoco.cli import main
from yoco.config import get_config
from yoco.models import cache_bytes
from yoco.report import write_json

FIELDS = {"arch", "context", "prefill_s", "peak_mem_bytes", "cache_bytes", "decode_tok_s", "budget_batch",
          "budget_tok_s", "decode_read_bytes_per_token", "decode_bandwidth_fraction"}


def tiny_settings(**changes) -> BenchSettings:
    values = dict(archs=BENCH_ARCHS, contexts=(24, 48), preset="tiny", new_tokens=3, budget_steps=1,
                  max_budget_batch=3, prefill_chunk=16, budget_bytes=1 << 30)
    values.update(changes)
    return BenchSettings(**values)


@pytest.fixture(scope="module")
def report():
    return run_bench(tiny_settings(), log=lambda text: None)


def test_every_arch_and_length_has_every_field(report):
    assert set(report) == {"machine", "settings", "results", "wall_s"}
    assert {(r["arch"], r["context"]) for r in report["results"]} == {(a, c) for a in BENCH_ARCHS for c in (24, 48)}
    for r in report["results"]:
        assert FIELDS <= set(r)
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["budget_tok_s"] > 0
        assert r["budget_batch"] == 3 and r["params"] > 0 and not r["extrapolated"]
        assert 0 < r["prefill_peak_fraction"] < 1.5
        assert 0 < r["prefill_linear_flops"] <= r["prefill_flops"] and r["prefill_linear_s"] > 0
        assert r["linear_peak_fraction"] == pytest.approx(
            r["prefill_linear_flops"] / r["prefill_linear_s"] / report["machine"]["matmul_flops"])
        assert r["decode_bandwidth_fraction"] == pytest.approx(
            r["decode_tok_s"] * r["decode_read_bytes_per_token"] / report["machine"]["read_bandwidth_bytes_s"])
    machine = report["machine"]
    assert machine["matmul_flops"] > 1e8 and machine["bandwidth_bytes_s"] > 1e8 and machine["threads"] >= 1
    assert machine["read_bandwidth_bytes_s"] > 1e8


def test_cache_bytes_match_the_formulas(report):
    settings = tiny_settings()
    for r in report["results"]:
        config = bench_config(r["arch"], settings)
        if r["arch"] == "hf-llama":
            # DynamicCache holds exactly the prompt; the Transformer formula is the same as Llama's.
            expected = cache_bytes(config, 1, r["context"], torch.float32)
        else:
            # The engine preallocates the prompt plus every position the measurement decodes.
            expected = cache_bytes(config, 1, positions_needed(r["context"], settings), torch.float32)
        assert r["cache_bytes"] == expected, r["arch"]
    per_token = {r["arch"]: r["cache_bytes_per_token"] for r in report["results"]}
    assert per_token["hf-llama"] == per_token["transformer"] == 4 * per_token["yoco-swa"]  # tiny: 4 layers


def test_decode_read_bytes_are_the_weights_and_each_layers_cache(report):
    """The bytes a decode step reads: every weight (an untied embedding table: one row) plus the cache
    each layer attends to, counted from the config by hand."""
    config = bench_config("transformer", tiny_settings())
    d, V, kv_row = config.dim, config.vocab_size, 2 * config.n_kv_heads * config.head_dim * 4
    rows = {(r["arch"], r["context"]): r for r in report["results"]}
    for context in (24, 48):
        llama, ours = rows["hf-llama", context], rows["transformer", context]
        # transformers' Llama: untied, so its table but one row is never read; every layer its own K/V
        assert llama["decode_read_bytes_per_token"] == (llama["params"] - (V - 1) * d) * 4 + config.n_layers * kv_row * context
        tied = config.tie_embeddings
        assert ours["decode_read_bytes_per_token"] == (ours["params"] - (0 if tied else (V - 1) * d)) * 4 \
            + config.n_layers * kv_row * context
        yoco = rows["yoco-swa", context]
        swa = bench_config("yoco-swa", tiny_settings())
        n_cross = swa.n_layers - swa.self_layers
        window = swa.self_layers * 2 * swa.n_kv_heads * swa.head_dim * 4 * swa.window  # the rings, read whole
        assert yoco["decode_read_bytes_per_token"] == (yoco["params"] - (0 if swa.tie_embeddings else (V - 1) * d)) * 4 \
            + window + n_cross * kv_row * context  # every cross-decoder layer reads the one global K/V


@pytest.mark.parametrize("arch", ["cla2", "mlkv", "mla", "yoco-gret", "yoco-gdn", "block"])
def test_decode_read_bytes_count_a_shared_cache_once_per_reader(arch):
    from yoco.models import build_model, weight_read_bytes

    model = build_model(get_config(arch, "tiny"))
    context = 64 * model.config.block_len
    caches = model.new_cache(1, capacity=context).layers
    if arch == "block":  # one cache entry holding every layer's own: each read once
        assert model.decode_read_bytes(context, torch.float32) == weight_read_bytes(model, torch.float32) + caches[0].nbytes()
        return
    readers = model.cache_readers()
    assert len(readers) == len(caches) and sum(readers) >= len(caches)
    if arch in ("cla2", "mlkv"):
        assert sum(readers) == model.config.n_layers > len(caches)  # layers share: each still reads
    expected = weight_read_bytes(model, torch.float32) + sum(n * c.nbytes() for n, c in zip(readers, caches))
    assert model.decode_read_bytes(context, torch.float32) == expected


def test_json_and_plot_files(report, tmp_path):
    write_json(report, tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
    write_plot(report, tmp_path / "bench.png")
    data = (tmp_path / "bench.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "bench.png").shape[2] in (3, 4)


def test_quadratic_archs_beyond_the_limit_are_extrapolated():
    settings = tiny_settings(archs=("transformer", "yoco-swa"), contexts=(32, 256), max_quadratic_context=64)
    results = {(r["arch"], r["context"]): r for r in run_bench(settings, log=lambda text: None)["results"]}
    row = results[("transformer", 256)]
    assert row["extrapolated"] and row["peak_mem_bytes"] is None
    assert row["cache_bytes"] == cache_bytes(bench_config("transformer", settings), 1, 256, torch.float32)
    assert row["prefill_s"] > results[("transformer", 32)]["prefill_s"]
    assert not results[("yoco-swa", 256)]["extrapolated"]  # only Transformers are extrapolated


def test_linear_calls_record_every_linear_layer_a_prefill_runs():
    settings = tiny_settings(contexts=(48,))
    n, chunk = 48, settings.prefill_chunk
    recorded = {}
    for arch in ("transformer", "hf-llama", "yoco-swa"):
        runner = make_runner(arch, settings)
        ids = torch.randint(0, runner.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode(), LinearCalls() as linears:
            runner.prefill(ids, n + 4)
        recorded[arch] = linears
    config = runner.config
    # A Transformer's FLOPs outside its causal attention are all its linear layers' (transformers' Llama
    # runs the prompt in one call, ours in chunks: the same FLOPs)
    attention = config.n_layers * 4 * config.dim * n * (n + 1) / 2
    for arch in ("transformer", "hf-llama"):
        assert recorded[arch].flops() == prefill_flops(bench_config(arch, settings), n) - attention
    # YOCO: the self-decoder's 7 projections and the global K/V's 2 over every chunk, the cross-decoder's
    # 5 (its K/V are the global ones) and the LM head for the last position only
    rows = Counter()
    for (_, shape, _), count in recorded["yoco-swa"].calls.items():
        rows[math.prod(shape[:-1])] += count
    half = config.n_layers // 2
    assert rows == {chunk: (7 * half + 2) * (n // chunk), 1: 5 * half + 1}
    assert recorded["yoco-swa"].seconds() > 0
    # an input given by keyword is recorded too
    layer = torch.nn.Linear(4, 3)
    with LinearCalls() as linears:
        layer(input=torch.randn(2, 5, 4))
    assert linears.calls == {(layer, (2, 5, 4), torch.float32): 1} and linears.flops() == 2 * 10 * 4 * 3


def test_prefill_flops():
    t = get_config("transformer", "40m")
    n = 4096
    linear = 12 * (512 * 512 * 2 + 512 * 128 * 2 + 3 * 512 * 1408)
    expected = 2 * linear * n + 12 * 4 * 8 * 64 * n * (n + 1) / 2 + 2 * 512 * 4096
    assert prefill_flops(t, n) == pytest.approx(expected)
    # YOCO's prefill is linear in context once past the window: equal increments.
    for arch in ("yoco-swa", "yoco-gret"):
        c = get_config(arch, "40m")
        f = [prefill_flops(c, k * 8192) for k in (1, 2, 3)]
        assert f[2] - f[1] == pytest.approx(f[1] - f[0])
    # ... while the Transformer's grows quadratically.
    f = [prefill_flops(t, k * 8192) for k in (1, 2, 3)]
    assert f[2] - f[1] > 1.2 * (f[1] - f[0])


def test_peak_rss_sees_an_allocation():
    with PeakRSS() as peak:
        block = torch.ones(64 << 20, dtype=torch.uint8)
        del block
    assert peak.growth >= 60 << 20


@pytest.mark.parametrize("changes,message", [
    (dict(archs=("mamba",)), "unknown architecture"),
    (dict(contexts=(0,)), "context lengths"),
    (dict(contexts=(-5, 10)), "context lengths"),
    (dict(new_tokens=1), "new-tokens"),
    (dict(budget_bytes=0), "budget"),
    (dict(kv_bits=(16,)), "unquantized K/V is stored in the model's dtype .fp32: 32 bits., not 16"),
    (dict(kv_bits=(32, 3)), "kv bits must be one of 2, 4, 8"),
    (dict(kv_bits=(4,), kv_group=0), "kv group size must be >= 1"),
    (dict(repeats=0), "repeats"),
])
def test_bad_settings(changes, message):
    with pytest.raises(BenchError, match=message):
        tiny_settings(**changes).validate()


def test_repeated_prefills_report_the_fastest(monkeypatch):
    # a busy machine only slows a run: of the timings (a clock that the prefills advance by 3, 1 and 2 s)
    # the fastest is reported, and all are kept
    import yoco.bench as bench

    class Clock:
        now = 0.0

        def __call__(self):
            self.now += 1e-3  # every reading a little later, so that no interval is empty
            return self.now

    clock, durations = Clock(), iter([3.0, 1.0, 2.0])
    prefill = bench.EngineRunner.prefill

    def slowed(self, *args, **kwargs):
        logits = prefill(self, *args, **kwargs)
        clock.now += next(durations)
        return logits

    monkeypatch.setattr(bench.time, "perf_counter", clock)
    monkeypatch.setattr(bench.EngineRunner, "prefill", slowed)
    settings = tiny_settings(archs=("yoco-swa",), contexts=(24,), repeats=3)
    row = bench.measure(bench.make_runner("yoco-swa", settings), 24, settings,
                        {"matmul_flops": 1e9, "read_bandwidth_bytes_s": 1e9})
    assert row["prefill_s_each"] == pytest.approx([3.001, 1.001, 2.001])
    assert row["prefill_s"] == pytest.approx(1.001)


def test_quantized_rows_beside_the_unquantized_for_the_models_that_quantize():
    from yoco.bench import kv_bits_rows
    from yoco.models import build_model
    from yoco.quantize import KVQuantization

    settings = tiny_settings(archs=("yoco-swa", "transformer", "hf-llama", "block"), contexts=(48,), kv_bits=(32, 4, 2),
                             kv_group=8, kv_residual=8)
    logs = []
    report = run_bench(settings, log=logs.append)
    rows = {(r["arch"], r["kv_bits"]): r for r in report["results"]}
    # hf-llama's quantized rows are transformers' own QuantizedCache (quanto: the test extras install it)
    assert set(rows) == {("yoco-swa", 32), ("yoco-swa", 4), ("yoco-swa", 2), ("transformer", 32), ("transformer", 4),
                         ("transformer", 2), ("hf-llama", 32), ("hf-llama", 4), ("hf-llama", 2), ("block", 32)}
    assert 0 < rows["hf-llama", 2]["cache_bytes"] < rows["hf-llama", 4]["cache_bytes"] < rows["hf-llama", 32]["cache_bytes"]
    assert any(line.startswith("block: no quantized rows (the Block Transformer's caches") for line in logs)
    for arch in ("yoco-swa", "transformer"):
        model = build_model(bench_config(arch, settings), dtype=torch.float32)
        for bits in (4, 2):
            expected = model.cache_bytes_formula(1, positions_needed(48, settings), torch.float32,
                                                 kv_bits=KVQuantization(bits, 8, 8))
            assert rows[(arch, bits)]["cache_bytes"] == expected
        assert rows[(arch, 2)]["cache_bytes"] < rows[(arch, 4)]["cache_bytes"] < rows[(arch, 32)]["cache_bytes"]
        assert rows[(arch, 4)]["decode_step_peak_bytes"] is not None
    lines = kv_bits_rows(report)
    assert len(lines) == 6 and lines[0].startswith("yoco-swa @ 48, 4-bit K/V vs 32-bit: cache ")
    assert lines[-1].startswith("hf-llama @ 48, 2-bit K/V vs 32-bit: cache ")
    assert ratio_rows(report)[0].startswith("yoco-swa vs hf-llama @ 48:")  # unquantized against unquantized


def test_budget_too_small_for_one_sequence():
    with pytest.raises(BenchError, match="too small for one"):
        run_bench(tiny_settings(archs=("transformer",), contexts=(32,), budget_bytes=1000), log=lambda text: None)


@pytest.mark.parametrize("argv,message", [
    (["bench", "--arch", "mamba"], "unknown architecture"),
    (["bench", "--context", "0"], "argument --context: '0': must be a token count >= 2"),
    (["bench", "--context", "4x"], "not a token count"),
    (["bench", "--preset", "tiny", "--arch", "transformer", "--context", "32", "--budget-gib", "0.000001"],
     "too small for one"),
    (["bench", "--kv-bits", "32,5"], "argument --kv-bits: '5': a K/V bit width is one of 32, 16, 8, 4, 2"),
])
def test_cli_bad_flags_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bench_writes_outputs(tmp_path, capsys):
    argv = ["bench", "--preset", "tiny", "--arch", "yoco-swa,hf-llama", "--context", "32", "--new-tokens", "2",
            "--budget-steps", "1", "--max-budget-batch", "2", "--json", str(tmp_path / "b.json"),
            "--plot", str(tmp_path / "b.png"), "--markdown", str(tmp_path / "b.md")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "yoco-swa vs hf-llama @ 32" in out and "machine:" in out
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [r["arch"] for r in rows] == ["yoco-swa", "hf-llama"]
    assert (tmp_path / "b.png").stat().st_size > 0
    assert "| yoco-swa | 32 |" in (tmp_path / "b.md").read_text()


def test_cli_bench_compile_decodes_every_runner_with_the_compiled_step(monkeypatch, tmp_path):
    import yoco.bench

    compiled = []  # torch.compile stood in for by a recorder (the real one is tested in test_decode_step.py)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append((fn.__name__, options)) or fn)
    monkeypatch.setattr(yoco.bench, "measure_matmul_flops", lambda dtype: 100e9)
    monkeypatch.setattr(yoco.bench, "measure_bandwidth", lambda: 40e9)
    monkeypatch.setattr(yoco.bench, "measure_read_bandwidth", lambda: 30e9)
    argv = ["bench", "--preset", "tiny", "--arch", "yoco-swa,hf-llama", "--context", "32", "--new-tokens", "2",
            "--budget-steps", "1", "--max-budget-batch", "2", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["compile"] is False and compiled == []
    assert main(argv + ["--compile"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["settings"]["compile"] is True
    assert compiled == [("sampled_decode_step", {"dynamic": True})] * 2


def test_prefill_flops_of_the_kv_family():
    base = prefill_flops(get_config("gqa", "40m"), 4096)
    # Cross-layer sharing drops K/V projections of the consuming layers only.
    saved = 6 * 2 * 512 * 128 * 2 * 4096  # 6 of 12 layers, k and v, 2 FLOPs per multiply-add
    assert prefill_flops(get_config("cla2", "40m"), 4096) == pytest.approx(base - saved)
    # MLA's attention runs over d_nope + d_R query/key dims and d_nope value dims.
    mla = get_config("mla", "40m")
    assert prefill_flops(mla, 8192) - prefill_flops(mla, 4096) > prefill_flops(mla, 4096)  # quadratic
    # The Block Transformer's block decoder sees n / block_len positions.
    block = get_config("block", "40m")
    assert prefill_flops(block, 4096) < prefill_flops(get_config("transformer", "40m"), 4096) / 4


def figures(gflops: float, gbytes_s: float, read_gbytes_s: float = 30) -> dict:
    return {"matmul_flops": gflops * 1e9, "bandwidth_bytes_s": gbytes_s * 1e9, "read_bandwidth_bytes_s": read_gbytes_s * 1e9}


def test_probe_keeps_both_figures_and_uses_the_better():
    calm = probe(figures(190, 40), figures(200, 38))
    assert not calm["busy"] and busy_warning(calm) is None
    assert calm["matmul_flops"] == 200e9 and calm["bandwidth_bytes_s"] == 40e9
    assert calm["probe"]["start"] == figures(190, 40) and calm["probe"]["end"] == figures(200, 38)
    assert calm["probe"]["difference"] == pytest.approx({"matmul_flops": 0.05, "bandwidth_bytes_s": 0.05,
                                                         "read_bandwidth_bytes_s": 0})
    assert not probe(figures(200, 40), figures(150, 30))["busy"]  # 25% apart: still calm


def test_probes_between_the_ends_count_towards_the_best_figures_not_towards_busy():
    between = [figures(250, 30, 20), figures(180, 45, 35)]
    verdict = probe(figures(190, 40), figures(200, 38), between)
    assert verdict["matmul_flops"] == 250e9 and verdict["bandwidth_bytes_s"] == 45e9
    assert verdict["read_bandwidth_bytes_s"] == 35e9
    assert not verdict["busy"] and verdict["probe"]["during"] == between  # start and end alone decide busy


@pytest.mark.parametrize("start,end", [(figures(100, 40), figures(200, 40)),  # matmul alone
                                       (figures(200, 40), figures(200, 20)),  # bandwidth alone
                                       (figures(200, 40, 30), figures(200, 40, 15))])  # reading alone
def test_probe_calls_the_machine_busy_when_start_and_end_differ_by_more_than_a_quarter(start, end):
    busy = probe(start, end)
    assert busy["busy"] and max(busy["probe"]["difference"].values()) == pytest.approx(0.5)
    assert busy["matmul_flops"] == 200e9 and busy["bandwidth_bytes_s"] == 40e9
    warning = busy_warning(busy)
    assert "busy" in warning and "rerun" in warning and "\n" not in warning
    matmul = f"{start['matmul_flops'] / 1e9:.0f} GFLOP/s at the start, {end['matmul_flops'] / 1e9:.0f} at the end"
    bandwidth = (f"{start['bandwidth_bytes_s'] / 1e9:.1f} GB/s at the start, "
                 f"{end['bandwidth_bytes_s'] / 1e9:.1f} at the end")
    assert matmul in warning and bandwidth in warning


@pytest.mark.parametrize("end_gflops,busy", [(100, True), (190, False)])
def test_cli_bench_warns_when_the_machine_was_busy(end_gflops, busy, monkeypatch, tmp_path, capsys):
    import yoco.bench

    measured = iter([200e9, end_gflops * 1e9])  # the start, then the end of the run
    monkeypatch.setattr(yoco.bench, "measure_matmul_flops", lambda dtype: next(measured))
    monkeypatch.setattr(yoco.bench, "measure_bandwidth", lambda: 40e9)
    monkeypatch.setattr(yoco.bench, "measure_read_bandwidth", lambda: 30e9)
    argv = ["bench", "--preset", "tiny", "--arch", "yoco-swa", "--context", "32", "--new-tokens", "2",
            "--budget-steps", "1", "--max-budget-batch", "2", "--json", str(tmp_path / "b.json"),
            "--markdown", str(tmp_path / "b.md")]
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "busy" in line]
    machine = json.loads((tmp_path / "b.json").read_text())["machine"]
    probed = machine["probe"]
    assert machine["busy"] is busy and probed["difference"]["matmul_flops"] == pytest.approx(1 - end_gflops / 200)
    assert probed["start"]["matmul_flops"] == 200e9 and probed["end"]["matmul_flops"] == end_gflops * 1e9
    assert machine["matmul_flops"] == 200e9  # the better figure
    row = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert row["prefill_peak_fraction"] == pytest.approx(row["prefill_flops"] / row["prefill_s"] / 200e9)
    assert row["decode_bandwidth_fraction"] == pytest.approx(row["decode_tok_s"] * row["decode_read_bytes_per_token"] / 30e9)
    if busy:
        assert warnings == [busy_warning(machine)] and "200 GFLOP/s at the start, 100 at the end" in warnings[0]
        assert busy_warning(machine) in (tmp_path / "b.md").read_text()
    else:
        assert warnings == []


def test_cli_bench_measures_the_machine_between_context_lengths_and_uses_the_best(monkeypatch, tmp_path):
    import yoco.bench

    measured = iter([200e9, 300e9, 190e9])  # the start, between the two lengths, the end
    monkeypatch.setattr(yoco.bench, "measure_matmul_flops", lambda dtype: next(measured))
    monkeypatch.setattr(yoco.bench, "measure_bandwidth", lambda: 40e9)
    monkeypatch.setattr(yoco.bench, "measure_read_bandwidth", lambda: 30e9)
    argv = ["bench", "--preset", "tiny", "--arch", "yoco-swa", "--context", "32,64", "--new-tokens", "2",
            "--budget-steps", "1", "--max-budget-batch", "2", "--json", str(tmp_path / "b.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert [p["matmul_flops"] for p in report["machine"]["probe"]["during"]] == [300e9]
    assert report["machine"]["matmul_flops"] == 300e9 and not report["machine"]["busy"]
    for row in report["results"]:
        assert row["prefill_peak_fraction"] == pytest.approx(row["prefill_flops"] / row["prefill_s"] / 300e9)
        linear_speed = row["prefill_linear_flops"] / row["prefill_linear_s"]
        assert row["linear_peak_fraction"] == pytest.approx(linear_speed / 300e9)


def made_up_row(arch: str, context: int = 1024, **values) -> dict:
    row = dict(arch=arch, context=context, params=1e6, prefill_s=1.0, peak_mem_bytes=1 << 20, cache_bytes=1 << 20,
               cache_bytes_per_token=1024, decode_tok_s=10.0, budget_batch=4, budget_tok_s=40.0, prefill_flops=1e9,
               prefill_peak_fraction=0.5, decode_read_bytes_per_token=1 << 21, decode_bandwidth_fraction=0.7,
               extrapolated=False)
    row.update(values)
    return row


def made_up_report(*rows: dict) -> dict:
    """A bench report holding `rows`, for the code that only reads one."""
    return {"machine": {"cpu": "a made-up CPU", "threads": 2},
            "settings": {"contexts": sorted({r["context"] for r in rows}), "preset": "tiny", "dtype": "fp32",
                         "budget_bytes": 1 << 30},
            "results": list(rows)}


def test_ratios_below_one_say_the_opposite_word():
    llama = made_up_row("hf-llama")
    behind = made_up_row("yoco-swa", prefill_s=3.3, cache_bytes_per_token=2048, cache_bytes=2 << 20,
                         peak_mem_bytes=4 << 20, decode_tok_s=5.0, budget_tok_s=20.0)
    assert ratio_rows(made_up_report(behind, llama)) == [
        "yoco-swa vs hf-llama @ 1024: prefill 3.3x slower, cache per token 2.0x larger (in all 2.0x larger), "
        "peak memory 4.0x larger, decode 2.0x slower, budget throughput 2.0x lower"]
    ahead = made_up_row("yoco-swa", prefill_s=0.25, cache_bytes_per_token=256, cache_bytes=1 << 19,
                        peak_mem_bytes=1 << 18, decode_tok_s=30.0, budget_tok_s=200.0)
    assert ratio_rows(made_up_report(ahead, llama)) == [
        "yoco-swa vs hf-llama @ 1024: prefill 4.0x faster, cache per token 4.0x smaller (in all 2.0x smaller), "
        "peak memory 4.0x smaller, decode 3.0x faster, budget throughput 5.0x higher"]


@pytest.mark.parametrize("extrapolated", [False, True])
def test_plot_title_mentions_dashes_only_when_something_is_dashed(extrapolated):
    import matplotlib.pyplot as plt

    rows = [made_up_row(arch, context, extrapolated=extrapolated and arch == "hf-llama" and context == 2048)
            for arch in ("yoco-swa", "hf-llama") for context in (1024, 2048)]
    fig = bench_figure(made_up_report(*rows))
    dashed = [line for ax in fig.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert bool(dashed) is extrapolated
    assert ("dashed = extrapolated" in fig._suptitle.get_text()) is extrapolated
    plt.close(fig)


@pytest.mark.parametrize("bf16_arithmetic,expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_a_bf16_prefill_is_set_against_the_peak_of_the_arithmetic_it_runs_in(bf16_arithmetic, expected, monkeypatch):
    import yoco.bench
    from yoco import layers

    monkeypatch.setattr(layers, "CPU_BF16_ARITHMETIC", bf16_arithmetic)
    measured = []
    monkeypatch.setattr(yoco.bench, "measure_matmul_flops", lambda dtype: measured.append(dtype) or 1e11)
    monkeypatch.setattr(yoco.bench, "measure_bandwidth", lambda: 40e9)
    monkeypatch.setattr(yoco.bench, "measure_read_bandwidth", lambda: 30e9)
    assert yoco.bench.machine_info(torch.bfloat16)["matmul_dtype"] == str(expected).removeprefix("torch.")
    assert measured == [expected]
    assert yoco.bench.arithmetic_dtype(torch.float32) == torch.float32
