"""The load generator against a real (tiny) yoco server, its figures from known traces, and
bench-serve's refusals."""

import asyncio
import itertools
import json
from types import SimpleNamespace

from harness import make_model, serving

from yoco.cli import main
from yoco.serve.app import create_app
from yoco.report import json_text
from yoco.serve.bench import SERVER_FIGURES, markdown_table, plot, ratio_lines, server_figures
from yoco.serve.load import RequestTrace, carries_a_token, run_load, summarise, tokens_by_minute
from yoco.serve.scheduler import Scheduler
from yoco.tokenizer import ByteTokenizer


def test_summary_of_known_traces():
    traces = [RequestTrace(0.0, [1.0, 1.5, 2.0], done=2.0), RequestTrace(0.5, [1.2, 2.2, 3.2], done=3.2),
              RequestTrace(1.0, [], done=1.1, error="APIError: boom"), RequestTrace(2.5, [3.0, 4.5])]  # cut at the end
    s = summarise(traces, 0.0, 4.0)
    assert (s.requests, s.failed, s.output_tokens, s.max_concurrent) == (2, 1, 7, 2)  # A+B, then B+D
    assert s.output_tok_s == 7 / 4 and s.requests_s == 2 / 4
    assert s.ttft_p50_s == 0.7  # 1.0, 0.7, 0.5
    assert s.itl_p50_s == 1.0  # gaps 0.5, 0.5, 1.0, 1.0 (the failed request has none), 1.5
    assert s.errors == ["APIError: boom"]
    assert s.output_tokens_by_minute == [7]


def test_tokens_by_minute_bins_each_token_once():
    traces = [RequestTrace(0.0, [0.5, 60.0, 60.5, 119.0]), RequestTrace(10.0, [130.0, 150.0, 200.0])]
    assert tokens_by_minute(traces, 0.0, 150.0) == [2, 2, 2]  # 60.0 ends minute 1; 200 is after the end
    assert tokens_by_minute(traces, 60.0, 120.0) == [3]  # 0.5 is before the start
    assert sum(tokens_by_minute(traces, 0.0, 300.0)) == summarise(traces, 0.0, 300.0).output_tokens


def test_a_chunk_counts_as_a_token_when_it_has_text_or_a_token_id():
    assert carries_a_token(SimpleNamespace(text="a"))
    assert carries_a_token(SimpleNamespace(text="", token_ids=[7]))  # yoco: text held back
    assert not carries_a_token(SimpleNamespace(text=""))  # transformers serve's last chunk: usage only
    assert carries_a_token(SimpleNamespace(delta=SimpleNamespace(content="x")))


def test_load_against_a_yoco_server_counts_every_token():
    model = make_model("yoco-swa").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=1 << 26, prefill_chunk=16)
    prompts = (f"prompt number {i} " * 3 for i in itertools.count())
    with serving(create_app(scheduler, "tiny")) as url:
        s = asyncio.run(run_load(f"{url}/v1", "tiny", prompts, concurrency=3, new_tokens=5, requests=7,
                                 extra_body={"ignore_eos": True}, timeout=60))
        server = server_figures(url)
    assert (s.requests, s.failed, s.output_tokens) == (7, 0, 35)
    # each prompt of 48 bytes in 3 calls of 16; 4 tokens of each decoded after its first
    assert server["server_prefill_calls"] == 7 * 3 and server["server_prefill_s"] > 0
    assert 4 <= server["server_decode_steps"] <= 7 * 4 and server["server_decode_s"] > 0
    assert 1 <= server["server_max_running"] <= 3
    assert server_figures("http://127.0.0.1:1") == dict.fromkeys(SERVER_FIGURES)  # nothing there: unknown
    assert 1 <= s.max_concurrent <= 3 and s.ttft_p50_s > 0 and s.itl_p50_s > 0


def test_results_table_ratios_and_json_have_no_nan():
    rows = [{"arch": a, "context": 16384, "concurrency": 64, "requests": r, "failed": 0, "output_tok_s": t,
             "requests_s": t / 128, "max_concurrent": c, "ttft_p50_s": 1.0, "ttft_p99_s": None, "itl_p50_s": 0.5,
             "itl_p99_s": float("nan"), "peak_rss_bytes": None}
            for a, r, t, c in (("yoco-swa", 40, 20.0, 40), ("transformer", 10, 4.0, 5))]
    assert ratio_lines(rows) == ["- yoco-swa vs transformer @ 16384: 8.0x the concurrent sequences, "
                                 "5.0x the output tokens/s"]
    assert "| yoco-swa | 16384 | 64 | 40 | 0 | 20.00 |" in markdown_table(rows)
    assert json.loads(json_text({"results": rows}))["results"][0]["itl_p99_s"] is None


def test_plot_draws_each_server_and_its_minutes(tmp_path):
    rows = [{"arch": a, "context": 16384, "concurrency": 64, "output_tok_s": t, "max_concurrent": c,
             "ttft_p50_s": None, "output_tokens_by_minute": minutes}
            for a, t, c, minutes in (("yoco-swa", 20.0, 40, [60, 900, 1200]), ("transformer", 4.0, 5, []))]
    plot(rows, str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_refuses_bad_input_in_one_line(capsys):
    assert main(["bench-serve", "--arch", "yoco-swa,transformer", "--url", "http://127.0.0.1:1/v1"]) == 2
    assert main(["bench-serve", "--preset", "nosuch"]) == 2
    assert main(["bench-serve", "--duration", "0"]) == 2
    assert main(["bench-serve", "--arch", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "exactly one --arch" in err and "unknown preset 'nosuch'" in err and "Traceback" not in err
