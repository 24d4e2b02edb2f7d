"""yoco serve over HTTP with the official openai client: served == generated alone under concurrent
staggered requests, streaming, stop strings, disconnects, the budget and every bad request's answer."""

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from harness import POLICIES, make_model, serving

from yoco.cli import main
from yoco.engine import generate
from yoco.serve.app import ServerStartError, create_app, serve_forever
from yoco.serve.metrics import parse_metrics
from yoco.serve.peer import free_port
from yoco.serve.scheduler import Scheduler
from yoco.tokenizer import ByteTokenizer

NAME = "tiny"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def server(model, chat_template=None, **options):
    options.setdefault("kv_budget", 1 << 28)
    scheduler = Scheduler(model, ByteTokenizer(256), prefill_chunk=options.pop("prefill_chunk", 6), **options)
    return serving(create_app(scheduler, NAME, chat_template=chat_template))


def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def metrics(url):
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


@pytest.mark.parametrize("variant,policy", [("transformer", None), ("yoco-swa", None), ("yoco-gret", None),
                                            ("yoco-gdn", None), ("mla", None), ("yoco-swa", "snapkv")])
def test_concurrent_staggered_requests_equal_generate_alone(variant, policy):
    model = make_model(variant).eval()
    prompts = [list(range(3, 3 + n)) for n in (31, 5, 17, 9, 24)]
    lengths = [40, 12, 25, 8, 30]
    compression = None if policy is None else POLICIES[policy](8)
    with server(model, compression=compression) as url:
        c = client(url)

        def ask(i):
            time.sleep(0.03 * i)  # staggered arrivals while the earlier ones decode
            r = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i], temperature=0)
            return r.choices[0].token_ids, r.usage

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, range(len(prompts))))
        assert metrics(url)["yoco_max_running_sequences"] >= 2
        assert metrics(url)["yoco_cache_bytes"] == 0  # everything freed after the load
    for prompt, n, (tokens, usage) in zip(prompts, lengths, answers):
        assert tokens == generate(model, [prompt], n, compression=compression).tokens[0]
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), n)


def test_streaming_matches_non_streaming_and_seeded_sampling_repeats():
    model = make_model("yoco-swa").eval()
    with server(model) as url:
        c = client(url)
        whole = c.completions.create(model=NAME, prompt="hello there", max_tokens=20, temperature=0)
        chunks = list(c.completions.create(model=NAME, prompt="hello there", max_tokens=20, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text
        assert [t for ch in chunks if ch.choices for t in ch.choices[0].token_ids] == whole.choices[0].token_ids
        assert chunks[-1].usage.completion_tokens == 20 and chunks[-2].choices[0].finish_reason == "length"
        seeded = [c.completions.create(model=NAME, prompt=[1, 2, 3], max_tokens=12, temperature=1.0, seed=3)
                  .choices[0].token_ids for _ in range(2)]
        assert seeded[0] == seeded[1] == generate(model, [[1, 2, 3]], 12, temperature=1.0, seed=3).tokens[0]
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 3, "stream": True},
                          timeout=30) as raw:
            lines = [line for line in raw.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_stop_string_ends_the_text_before_it():
    model = make_model("transformer").eval()
    alone = generate(model, [list(b"abc")], 40).tokens[0]
    text = ByteTokenizer(256).decode(alone)
    stop = next(text[i:i + 2] for i in range(5, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    with server(model) as url:
        r = client(url).completions.create(model=NAME, prompt="abc", max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[:text.index(stop)]


def test_chat_completions_with_a_template_and_without():
    model = make_model("yoco-swa").eval()
    messages = [{"role": "user", "content": "hi"}]
    with server(model, chat_template=TEMPLATE) as url:
        r = client(url).chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
        prompt = list(b"<user>hi\n<assistant>")
        assert r.choices[0].token_ids == generate(model, [prompt], 6).tokens[0]
        assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(prompt)
        stream = list(client(url).chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                          stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == r.choices[0].message.content
    with server(model) as url:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client(url).chat.completions.create(model=NAME, messages=messages, max_tokens=6)


def test_client_that_disconnects_mid_stream_frees_its_sequence():
    model = make_model("yoco-swa").eval()
    with server(model) as url:
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                          json={"prompt": [1, 2, 3], "max_tokens": 900, "stream": True}) as response:
            got = 0
            for line in response.iter_lines():
                got += line.startswith("data: ")
                if got == 3:
                    break  # leaving the block closes the connection mid-stream
        deadline = time.monotonic() + 20
        while metrics(url)["yoco_running_sequences"] and time.monotonic() < deadline:
            time.sleep(0.05)
        m = metrics(url)
        assert m["yoco_running_sequences"] == 0 and m["yoco_cache_bytes"] == 0
        assert m['yoco_requests_finished_total{reason="cancelled"}'] == 1
        assert m["yoco_generation_tokens_total"] < 900


def wait_for(url, condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition(metrics(url)):
        assert time.monotonic() < deadline, metrics(url)
        time.sleep(0.01)


def test_budget_runs_k_at_a_time_then_the_queue_then_503():
    model = make_model("transformer").eval()
    prompt, n = list(range(1, 21)), 150
    per_sequence = model.cache_bytes_formula(1, len(prompt) + n, torch.float32)
    k = 2
    alone = generate(model, [prompt], n).tokens[0]
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0}
    with server(model, kv_budget=k * per_sequence, max_waiting=3) as url:
        post = lambda: httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # noqa: E731
        with ThreadPoolExecutor(k + 3) as pool:
            first = [pool.submit(post) for _ in range(k)]
            wait_for(url, lambda m: m["yoco_running_sequences"] + m["yoco_prefilling_sequences"] == k)
            queued = [pool.submit(post) for _ in range(3)]  # no room: they wait, then run k at a time
            wait_for(url, lambda m: m["yoco_waiting_requests"] == 3)
            refused = post()  # beyond the queue
            answers = [f.result() for f in first + queued]
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "waiting" in refused.json()["error"]["message"]
        assert [a.json()["choices"][0]["token_ids"] for a in answers] == [alone] * (k + 3)
        m = metrics(url)
        assert m["yoco_max_running_sequences"] == k
        assert m["yoco_max_cache_bytes"] == k * per_sequence == m["yoco_cache_budget_bytes"]
        assert m["yoco_cache_bytes"] == 0 and m['yoco_requests_finished_total{reason="length"}'] == k + 3


BAD_REQUESTS = [
    ('{"prompt": "x", "max_tokens": ', 400, "malformed JSON"),
    ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, 422, "top_p"),
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": [1, 2, 999]}, 400, "outside the vocabulary"),
    ({"prompt": "x" * 1100}, 400, "longer than the model's max_seq_len=1024"),
    ({"prompt": "x", "max_tokens": 1024}, 400, "exceeds the model's max_seq_len"),
    ({"prompt": "x" * 600, "max_tokens": 300}, 400, "more than the server's whole budget"),
    ({"prompt": "x", "n": 2}, 400, "n is not supported"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs is not supported"),
    ({"prompt": "x", "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ({"prompt": ""}, 400, "empty"),
]


def test_every_bad_request_gets_its_status_and_message_and_the_server_goes_on():
    model = make_model("transformer").eval()
    budget = model.cache_bytes_formula(1, 800, torch.float32)
    with server(model, kv_budget=budget) as url:
        for body, status, message in BAD_REQUESTS:
            content = body if isinstance(body, str) else json.dumps(body)
            r = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"},
                           timeout=30)
            assert r.status_code == status, (body, r.text)
            assert message in r.json()["error"]["message"], (body, r.text)
        ok = client(url).completions.create(model=NAME, prompt=[1, 2], max_tokens=3, temperature=0)
        assert ok.choices[0].token_ids == generate(model, [[1, 2]], 3).tokens[0]
        models = client(url).models.list()
        assert [m.id for m in models.data] == [NAME]
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        page = httpx.get(f"{url}/metrics", timeout=10).text
        assert "# TYPE yoco_time_to_first_token_seconds histogram" in page
        assert 'yoco_inter_token_latency_seconds_bucket{le="+Inf"}' in page
        m = metrics(url)  # prompt [1, 2] in one chunk; 3 tokens: the prefill's first, then 2 decode steps
        assert m["yoco_prefill_call_seconds_count"] >= 1 and m["yoco_decode_step_seconds_count"] >= 2
        assert m["yoco_prefill_call_seconds_sum"] > 0 and m["yoco_decode_step_seconds_sum"] > 0


def test_serve_forever_runs_the_scheduler_on_the_calling_thread_until_sigterm():
    model = make_model("transformer").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=1 << 28, prefill_chunk=6)
    stepped_on = set()
    step = scheduler.step
    scheduler.step = lambda: stepped_on.add(threading.get_ident()) or step()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    answers = []

    def ask():
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    httpx.get(f"{url}/health", timeout=5)
                    break
                except httpx.TransportError:
                    time.sleep(0.02)
            r = client(url).completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=4, temperature=0)
            answers.append(r.choices[0].token_ids)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # serve_forever's handler, on the main thread, ends it

    before = signal.getsignal(signal.SIGTERM)
    asker = threading.Thread(target=ask)
    asker.start()
    serve_forever(create_app(scheduler, NAME, scheduler_thread=False), scheduler, "127.0.0.1", port)
    asker.join(30)
    assert answers == [generate(model, [[5, 6, 7]], 4).tokens[0]]
    assert stepped_on == {threading.get_ident()}  # every iteration on this (the calling) thread
    assert signal.getsignal(signal.SIGTERM) is before


def test_serve_forever_says_when_the_port_is_taken():
    model = make_model("transformer").eval()
    scheduler = Scheduler(model, ByteTokenizer(256), kv_budget=1 << 28)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerStartError, match="is the port taken"):
            serve_forever(create_app(scheduler, NAME, scheduler_thread=False), scheduler, "127.0.0.1",
                          taken.getsockname()[1])


def test_serve_command_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(tmp_path), "--kv-budget-gib", "0"]) == 2
    from yoco.checkpoint import save_model

    save_model(make_model("yoco-swa"), tmp_path / "m")
    assert main(["serve", str(tmp_path / "m"), "--compression", "infllm", "--compression-budget", "0.5"]) == 2
    assert main(["serve", str(tmp_path / "m"), "--compression", "nosuch"]) == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(tmp_path / "m"), "--port", str(taken.getsockname()[1])]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 5 and "is the port taken" in lines[-1] and all(line.startswith(("yoco serve: error:", "usage:")) or "error" in line
                                   for line in lines)
    assert "Traceback" not in "".join(lines)
