"""scripts/kvpress_compare.py, yoco's side of the kvpress comparison: its answers are the engine's greedy
answers with the policy, its byte counts exact, and its table counts agreeing answers. (The peer itself
runs in kvpress's own environment: scripts/kvpress-peer.sh.)"""

import importlib.util
from pathlib import Path

import pytest
import torch
from harness import hf_model

from yoco.compress import policy_for_context
from yoco.engine import generate
from yoco.hf_runner import TransformersLM
from yoco.ruler import TaskPrompt

SCRIPT = Path(__file__).parents[1] / "scripts" / "kvpress_compare.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("kvpress_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("press", [None, "snapkv", "streamingllm", "tova", "adakv"])
def test_its_answers_are_the_engines_greedy_answers_and_kept_bytes_exact(script, press):
    model = TransformersLM(hf_model())  # 3 layers, 2 K/V heads of 16 channels, fp32
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    policy = None if press is None else policy_for_context(script.POLICY_OF_PRESS[press], 0.5, 200)
    got = script.answer(model, ids, 6, policy, eos={7})
    want = generate(model, [ids], max_new_tokens=6, compression=policy, stop_tokens=[7]).tokens[0]
    assert got["tokens"] == want and got["prefill_s"] > 0
    position = 3 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x channels x 4 bytes
    if press == "adakv":  # its heads share the budget: dense tensors as long as the longest head's share
        assert 100 * position < got["cache_bytes"] < 200 * position and got["cache_bytes"] % position == 0
    else:
        assert got["cache_bytes"] == (200 if press is None else 100) * position


def test_the_table_counts_the_answers_both_sides_gave(script):
    prompts = [TaskPrompt("single_needle", [1, 2], ["5"], 3), TaskPrompt("multi_value", [3], ["5", "6"], 3),
               TaskPrompt("passkey", [4], ["7"], 1)]

    def said(*answers):
        return [{"tokens": a, "cache_bytes": 2048, "prefill_s": 0.5} for a in answers]

    decode = lambda tokens: " ".join(map(str, tokens))  # noqa: E731
    ours = {("snapkv", 0.5): said([5], [5, 6], [7])}
    peer = {("snapkv", 0.5): said([5], [6, 9], [8])}
    [row] = script.compare(prompts, ours, peer, decode)
    assert row["same_answers"] == 1 and row["prompts"] == 3
    assert row["yoco"]["task_acc"] == {"single_needle": 1.0, "multi_value": 1.0, "passkey": 1.0}
    assert row["kvpress"]["task_acc"] == {"single_needle": 1.0, "multi_value": 0.5, "passkey": 0.0}
    table = script.markdown([row], {"yoco_transformers": "5.24.0", "kvpress": "0.5.5", "kvpress_transformers": "5.2.0"})
    assert "| snapkv | 0.5 | 100% | 0% | 100% | 75% | 2 | 2 | 0.500 | 0.500 | 1/3 |" in table
    assert "transformers 5.24.0" in table and "kvpress 0.5.5 (transformers 5.2.0)" in table
