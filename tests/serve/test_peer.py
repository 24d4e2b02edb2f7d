"""The load benchmark's peer (yoco.serve.peer): the Llama folder transformers' server loads, its argv
sized to a KV budget, and the server subprocesses (start, errors, stop, peak memory)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from yoco.bench import llama_model
from yoco.bench import vm_hwm
from yoco.config import get_config
from yoco.data import EOS, PAD, train_tokenizer
from yoco.models import cache_bytes
from yoco.serve.peer import (
    DEFAULT_MAX_BATCH_TOKENS, HF_SERVE_ENV, ServerError, free_port, hf_cache_blocks, hf_model_name, hf_serve_command,
    hf_serve_unsupported, launch_server, llama_kv_bytes_per_token, non_text_tokens, peak_rss_bytes, start_server,
    stop_process, write_llama_folder)
from yoco.tokenizer import bytes_to_unicode

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # é\n\nclass C{i}:\n    pass\n" * 4 for i in range(40)]
TINY = {"preset": "tiny", "vocab_size": 300, "max_seq_len": 512}
# the peer is transformers 5.24's server; the oldest transformers this project supports has no such server
needs_hf_serve = pytest.mark.skipif(hf_serve_unsupported() is not None, reason=str(hf_serve_unsupported()))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    return write_llama_folder(tmp_path_factory.mktemp("peer") / "llama", tokenizer, seed=3, **TINY)


def llama_config_json(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"num_hidden_layers": 12, "num_key_value_heads": 2, "head_dim": 64, "hidden_size": 512,
              "num_attention_heads": 8, **fields}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# ---------------------------------------------------------------------- the argv
def test_block_count_is_the_most_blocks_whose_kv_fits_the_budget(tmp_path):
    folder = llama_config_json(tmp_path / "m")
    per_token = 2 * 12 * 2 * 64 * 4  # K and V, layers, kv heads, head_dim, fp32
    assert llama_kv_bytes_per_token(folder) == per_token == 12288
    assert llama_kv_bytes_per_token(folder, "bf16") == per_token // 2

    assert hf_cache_blocks(folder, 1 << 30) == 341  # 1 GiB / (256 x 12 KiB) = 341.33
    exact = 341 * 256 * per_token
    assert hf_cache_blocks(folder, exact) == 341
    assert hf_cache_blocks(folder, exact - 1) == 340
    assert hf_cache_blocks(folder, exact, dtype="bf16") == 682
    assert hf_cache_blocks(folder, exact, block_size=64) == 341 * 4
    with pytest.raises(ServerError, match=r"budget of 3145727 bytes holds no block of 256 tokens \(3145728 bytes"):
        hf_cache_blocks(folder, 256 * per_token - 1)


@needs_hf_serve
def test_the_argv_asks_for_the_budgets_blocks(tmp_path):
    folder = llama_config_json(tmp_path / "m")
    for block_size, dtype, blocks in ((256, "fp32", 341), (64, "fp32", 1365), (256, "bf16", 682)):
        argv = hf_serve_command(folder, port=8123, kv_budget_bytes=1 << 30, block_size=block_size, dtype=dtype)
        assert argv[argv.index("--cb-num-blocks") + 1] == str(blocks)
        assert argv[argv.index("--cb-block-size") + 1] == str(block_size)


def test_kv_bytes_per_token_is_yocos_cache_formula_for_the_same_config(llama_folder):
    # the peer gets the KV budget yoco's own transformer gets: one token's bytes agree
    config = get_config("transformer", **TINY)
    for dtype in ("fp32", "bf16"):
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        assert llama_kv_bytes_per_token(llama_folder, dtype) * 100 == cache_bytes(config, 1, 100, torch_dtype)


def test_head_dim_defaults_to_hidden_over_heads(tmp_path):
    folder = llama_config_json(tmp_path / "m", head_dim=None, hidden_size=96, num_attention_heads=4)
    assert llama_kv_bytes_per_token(folder) == 2 * 12 * 2 * 24 * 4


@needs_hf_serve
def test_the_argv_serves_the_folder_on_the_cpu_with_continuous_batching(tmp_path):
    folder = llama_config_json(tmp_path / "m")
    argv = hf_serve_command(folder, host="127.0.0.1", port=8123, kv_budget_bytes=1 << 30,
                            attn_implementation="eager", max_batch_tokens=4096)
    offline = [f"{k}={v}" for k, v in HF_SERVE_ENV.items()]
    assert "HF_HUB_OFFLINE=1" in offline
    assert argv[:len(offline) + 6] == ["env", *offline, sys.executable, "-m", "transformers.cli.transformers", "serve",
                                       hf_model_name(folder)]
    assert hf_model_name(folder) == str(folder.resolve())
    options = dict(zip(argv[len(offline) + 6:], argv[len(offline) + 7:]))
    assert "--continuous-batching" in argv
    assert {k: options[k] for k in ("--device", "--dtype", "--attn-implementation", "--host", "--port",
                                    "--cb-max-batch-tokens")} == {
        "--device": "cpu", "--dtype": "float32", "--attn-implementation": "eager", "--host": "127.0.0.1",
        "--port": "8123", "--cb-max-batch-tokens": "4096"}
    default = hf_serve_command(folder, port=8123, kv_budget_bytes=1 << 30)
    assert default[default.index("--cb-max-batch-tokens") + 1] == str(DEFAULT_MAX_BATCH_TOKENS)
    assert default[default.index("--attn-implementation") + 1] == "sdpa"
    assert "--cb-max-batch-tokens" not in hf_serve_command(folder, port=8123, kv_budget_bytes=1 << 30,
                                                            max_batch_tokens=None)


def test_bad_settings_are_refused(tmp_path):
    folder = llama_config_json(tmp_path / "m")
    with pytest.raises(ServerError, match="block_size=2"):
        hf_serve_command(folder, port=1, kv_budget_bytes=1 << 30, block_size=2)
    with pytest.raises(ServerError, match="max_batch_tokens=0"):
        hf_serve_command(folder, port=1, kv_budget_bytes=1 << 30, max_batch_tokens=0)
    with pytest.raises(ServerError, match="not a transformers Llama config.json"):
        hf_serve_command(tmp_path / "missing", port=1, kv_budget_bytes=1 << 30)


def test_a_transformers_without_the_server_is_refused(tmp_path, monkeypatch):
    import yoco.serve.peer

    monkeypatch.setattr(yoco.serve.peer, "hf_serve_unsupported", lambda: "transformers 5.4.0 has no --cb-num-blocks")
    with pytest.raises(ServerError, match="cannot be the peer here: transformers 5.4.0 has no --cb-num-blocks"):
        hf_serve_command(llama_config_json(tmp_path / "m"), port=1, kv_budget_bytes=1 << 30)


# ---------------------------------------------------------------------- the folder
def test_the_folder_loads_with_auto_classes_with_the_presets_dimensions(llama_folder, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    config = get_config("transformer", **TINY)
    hf = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (hf.vocab_size, hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers, hf.num_attention_heads,
            hf.num_key_value_heads, hf.max_position_embeddings) == (
        300, config.dim, config.ffn_dim, config.n_layers, config.n_heads, config.n_kv_heads, 512)
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tokenizer.token_to_id(EOS),
                                                                  tokenizer.token_to_id(PAD), None)
    assert model.generation_config.eos_token_id == tokenizer.token_to_id(EOS)

    text = "def f3(x):\n    return x * 3  # é\n"
    hf_tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert hf_tokenizer.model_max_length == 512


def test_the_weights_are_llama_models_with_the_non_text_rows_zeroed(llama_folder, tokenizer):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(llama_folder).state_dict()
    built = llama_model(get_config("transformer", **TINY), torch.float32, 3).state_dict()
    assert saved.keys() == built.keys()
    silent = non_text_tokens(tokenizer, 300)
    for name, tensor in built.items():
        if name == "lm_head.weight":
            tensor[silent] = 0
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    # silent: the special tokens and the 128 lone bytes >= 0x80; not: ASCII, and 'é' (0xC3 0xA9) merged
    byte_id = {b: tokenizer.token_to_id(c) for b, c in bytes_to_unicode().items()}
    assert {tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)} | {byte_id[b] for b in range(128, 256)} <= set(silent)
    assert not {byte_id[b] for b in range(32, 127)} & set(silent)
    assert len(tokenizer.encode("é").ids) == 1 and tokenizer.encode("é").ids[0] not in silent
    assert all("\ufffd" in tokenizer.decode([i]) or tokenizer.decode([i]) == "" for i in silent)


def test_ids_beyond_the_tokenizer_are_silent_too(tokenizer):
    assert non_text_tokens(tokenizer, 310)[-10:] == list(range(300, 310))


def test_rewriting_a_folder_replaces_it_whole(tmp_path, tokenizer):
    folder = tmp_path / "llama"
    write_llama_folder(folder, tokenizer, seed=0, **TINY)
    (folder / "stale.txt").write_text("from the previous folder")
    first = (folder / "model.safetensors").read_bytes()
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    write_llama_folder(folder, tokenizer_file, seed=1, **TINY)  # a tokenizer.json path works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "tokenizer.json"]  # nothing staged is left
    assert not (folder / "stale.txt").exists()
    assert (folder / "model.safetensors").read_bytes() != first


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path, tokenizer):
    with pytest.raises(ServerError, match="tokenizer has 300 tokens but the model's vocabulary .* is 256"):
        write_llama_folder(tmp_path / "llama", tokenizer, preset="tiny")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- server subprocesses
def test_a_server_that_exits_at_once_is_an_error_naming_its_log(tmp_path):
    log = tmp_path / "server.log"
    argv = python("import sys; print('no model here', flush=True); sys.exit(3)")
    with pytest.raises(ServerError, match=rf"exited with status 3 .*{str(log)!r}:\nno model here"):
        with start_server(argv, f"http://127.0.0.1:{free_port()}/health", 30, log):
            pytest.fail("start_server yielded a server that had exited")


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    argv = python("import os, time; open(os.environ['PID_FILE'], 'w').write(str(os.getpid())); time.sleep(60)")
    pid_file = tmp_path / "pid"
    with pytest.raises(ServerError, match=r"did not answer at http://127.0.0.1:\d+/health within 1 s; its log is"):
        launch_server(argv, f"http://127.0.0.1:{free_port()}/health", 1, tmp_path / "log", env={"PID_FILE": str(pid_file)})
    pid = int(pid_file.read_text())
    assert not os.path.exists(f"/proc/{pid}")  # stopped and reaped


def test_a_command_that_cannot_run_is_an_error(tmp_path):
    with pytest.raises(ServerError, match="cannot run '/no/such/server'"):
        launch_server(["/no/such/server"], "http://127.0.0.1:1/health", 5, tmp_path / "log")
    with pytest.raises(ServerError, match="timeout=0"):
        launch_server(["true"], "http://127.0.0.1:1/health", 0)


def test_start_server_waits_for_it_yields_it_and_stops_it(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with start_server(argv, f"http://127.0.0.1:{port}/", 30, tmp_path / "log") as server:
        assert server.process.poll() is None
        assert server.peak_rss_bytes() > 1 << 20  # a Python process: megabytes
    assert server.process.returncode == -15  # SIGTERM sufficed
    assert server.peak_rss_at_stop > 1 << 20  # read before it stopped


def test_a_server_that_ignores_sigterm_is_killed(tmp_path):
    ready = tmp_path / "ready"
    process = subprocess.Popen(python(f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").close()
        time.sleep(60)"""), start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stop_process(process, timeout=0.5) == -9


def test_peak_rss_counts_the_children(tmp_path):
    ready = tmp_path / "ready"
    child = f"b = bytearray(200 << 20); open({str(ready)!r}, 'w').close(); import time; time.sleep(60)"
    process = subprocess.Popen(python(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {child!r}])
        time.sleep(60)"""), start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        assert peak_rss_bytes(process.pid) >= vm_hwm(process.pid) + (200 << 20)
    finally:
        stop_process(process, timeout=5)
    assert peak_rss_bytes(process.pid) is None  # gone: nothing to read


# ---------------------------------------------------------------------- the real peer
@needs_hf_serve
def test_transformers_serve_streams_one_chunk_per_token_of_the_folders_greedy_output(llama_folder, tmp_path):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    port = free_port()
    argv = hf_serve_command(llama_folder, port=port, kv_budget_bytes=64 * 16 * llama_kv_bytes_per_token(llama_folder),
                            block_size=16, max_batch_tokens=256)
    prompt = TEXTS[5][:60]
    hf_tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    ids = hf_tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = AutoModelForCausalLM.from_pretrained(llama_folder).generate(ids, max_new_tokens=6, do_sample=False)
    want = hf_tokenizer.decode(greedy[0, ids.shape[1]:])
    with start_server(argv, f"http://127.0.0.1:{port}/health", 120, tmp_path / "peer.log") as server:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=120, max_retries=0)
        assert [m.id for m in client.models.list().data] == [hf_model_name(llama_folder)]
        stream = client.completions.create(model=hf_model_name(llama_folder), prompt=prompt, max_tokens=6,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        chunks, usage = [], None
        for chunk in stream:
            chunks += [c.text for c in chunk.choices if c.text]
            usage = chunk.usage or usage
            assert len(chunks) <= 6
    assert server.peak_rss_at_stop > 0
    assert len(chunks) == 6 and "".join(chunks) == want
    assert (usage.prompt_tokens, usage.completion_tokens) == (ids.shape[1], 6)
