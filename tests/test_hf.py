"""transformers integration: yoco models load, save and generate as first-class HF causal LMs."""

import json

import pytest
import torch
from harness import engine_logits, left_padded
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from yoco import YocoCache, YocoConfig, YocoForCausalLM, build_model, generate, get_config, load_model, save_model
from yoco.checkpoint import CheckpointError
from yoco.data import load_tokenizer
from yoco.tokenizer import save_tokenizer
from yoco.hf import cache_arg, output_cache
from yoco.cli import main
from yoco.models import cache_bytes
from yoco.models.base import InputError

ARCHS = ["transformer", "yoco-swa", "yoco-gret", "yoco-gdn", "mha", "mqa", "mla", "cla2", "mqa-cla2", "mlkv", "block", "swa"]


def tiny(arch, **overrides):
    return build_model(get_config(arch, "tiny", **overrides), seed=0).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_round_trip_and_auto_classes(arch, tmp_path):
    model = YocoForCausalLM.from_yoco(tiny(arch))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "yoco"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), YocoConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, YocoForCausalLM)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    # The same weights; transformers computes from memory-mapped tensors, whose alignment can pick
    # another CPU kernel (differences of ~3e-8 seen), hence a tolerance far below any real change.
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    # The same folder is a yoco checkpoint, and a yoco checkpoint is a transformers folder.
    torch.testing.assert_close(load_model(tmp_path)(ids), model(ids).logits, rtol=0, atol=0)
    save_model(tiny(arch), tmp_path / "yoco")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "yoco")
    torch.testing.assert_close(again(ids).logits, tiny(arch)(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch,positions", [
    ("yoco-swa", {"global_position": "nope", "attn_temperature": "llama4", "attn_floor_scale": 4}),
    ("yoco-swa", {"rope_extension": "yarn", "rope_factor": 8.0, "rope_original_len": 16}),
    ("transformer", {"rope_extension": "ntk", "rope_factor": 4.0, "attn_temperature": "log", "attn_train_len": 8}),
])
def test_position_options_travel_with_a_transformers_folder(arch, positions, tmp_path):
    model = YocoForCausalLM.from_yoco(tiny(arch, **positions))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert {name: getattr(loaded.config, name) for name in positions} == positions
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
    # and they change the model: the same weights without them give other logits
    plain = YocoForCausalLM.from_yoco(tiny(arch))
    assert (plain(ids).logits - model(ids).logits).abs().max() > 1e-6


def test_dtype_is_honoured(tmp_path):
    YocoForCausalLM.from_yoco(tiny("yoco-swa")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.tensor([[1, 2, 3]])).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_equals_the_yoco_engine_with_left_padding(arch):
    core = tiny(arch)
    model = YocoForCausalLM.from_yoco(core)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [9, 8, 7, 6]]
    want = generate(core, prompts, max_new_tokens=7).tokens
    ids, mask = left_padded(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert out[:, ids.shape[1]:].tolist() == want
    for prompt, row in zip(prompts, want):  # each row alone gives the same tokens
        alone = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=7, do_sample=False, pad_token_id=0)
        assert alone[0, len(prompt):].tolist() == row


@pytest.mark.parametrize("arch", ["transformer", "yoco-swa", "yoco-gret", "mla", "block"])
def test_cache_seen_through_generate_is_yocos_own(arch):
    core = tiny(arch)
    model = YocoForCausalLM.from_yoco(core)
    ids = torch.randint(1, 256, (2, 21), generator=torch.Generator().manual_seed(0))
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)
    cache = output_cache(out)
    assert isinstance(cache, YocoCache)
    capacity = 21 + 5 - 1  # allocated once: the prompt and the new tokens but the last (never fed)
    assert cache.nbytes() == cache_bytes(core.config, 2, capacity, torch.float32) > 0
    assert cache.get_seq_length() == 21 + 4  # the last new token is not fed back


@pytest.mark.parametrize("arch", ["transformer", "yoco-swa", "mla"])
def test_quantized_cache_implementation_is_yocos_own_quantized_cache(arch):
    from yoco.quantize import KVQuantization

    core = tiny(arch)
    model = YocoForCausalLM.from_yoco(core)
    prompts = [list(range(5, 40)), list(range(60, 80))]
    kv = KVQuantization(4, group=8, residual=4)
    want = generate(core, prompts, max_new_tokens=9, kv_bits=kv).tokens
    ids, mask = left_padded(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0,
                         cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": 4,
                                                                         "q_group_size": 8, "residual_length": 4},
                         return_dict_in_generate=True)
    assert out.sequences[:, ids.shape[1]:].tolist() == want
    cache = output_cache(out)
    assert cache.nbytes() == core.cache_bytes_formula(2, ids.shape[1] + 9 - 1, torch.float32, kv_bits=kv)
    with pytest.raises(ValueError, match="axis_key cannot be chosen"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="quantized",
                       cache_config={"axis_key": 1})
    with pytest.raises(ValueError, match="unknown cache_config keys for a yoco model: bits"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="quantized", cache_config={"bits": 4})


def test_sampling_beam_search_stop_strings_and_streamer(tmp_path):
    from transformers import TextIteratorStreamer

    from yoco.tokenizer import byte_level_tokenizer, save_tokenizer

    core = build_model(get_config("yoco-swa", "tiny", vocab_size=258), seed=0).eval()
    model = YocoForCausalLM.from_yoco(core)
    save_tokenizer(byte_level_tokenizer(258), tmp_path, 1024)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = tokenizer(["def f(x):", "ab"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # left padding
    a = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=257)
    torch.manual_seed(0)
    b = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=257)
    torch.manual_seed(0)
    c = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=257)
    assert a.shape == (2, batch["input_ids"].shape[1] + 6) and torch.equal(b, c)
    # Beam search keeps (and reorders) yoco's cache rows; with one beam it is greedy, with three it
    # finds continuations at least as likely as greedy's.
    greedy = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=257)
    one_beam = model.generate(**batch, max_new_tokens=5, num_beams=1, do_sample=False, pad_token_id=257)
    beams = model.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=257,
                           length_penalty=0.0)
    assert torch.equal(greedy, one_beam) and beams.shape == greedy.shape
    T = batch["input_ids"].shape[1]

    def logprob(sequences):
        mask = torch.cat([batch["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1)
        logp = model(input_ids=sequences, attention_mask=mask).logits.log_softmax(-1)
        return logp[:, T - 1:-1].gather(-1, sequences[:, T:, None]).sum((1, 2))

    assert torch.all(logprob(beams) >= logprob(greedy) - 1e-4)
    # Stop strings and a streamer.
    prompt = tokenizer(["def f(x):"], return_tensors="pt")
    new = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=257)[0, 9:]
    text = tokenizer.decode(new)
    stop = text[1:3]
    stopped = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=257, stop_strings=[stop],
                             tokenizer=tokenizer)
    assert tokenizer.decode(stopped[0, 9:]).endswith(stop) and stopped.shape[1] < 9 + 5
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=257, streamer=streamer)
    assert "".join(streamer) == text


@pytest.mark.parametrize("arch", ["transformer", "yoco-swa", "yoco-gret", "mla", "block"])
@pytest.mark.parametrize("lengths", [(21,), (22,), (23,), (21, 22, 23, 9)])
def test_scoring_paths_agree_with_cached_generation(arch, lengths):
    """Cached generation's logits are the full forward's (what labels= scores), and generate without a
    cache (a full forward per token) picks its tokens, for prompts of every length modulo the Block
    Transformer's block, alone and left-padded together."""
    core = tiny(arch)
    model = YocoForCausalLM.from_yoco(core)
    g = torch.Generator().manual_seed(3)
    ids, mask = left_padded([torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths])
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=ids, use_cache=True, output_logits=True, return_dict_in_generate=True,
                            **options)
    assert torch.equal(model.generate(input_ids=ids, use_cache=False, **options), cached.sequences)
    T = ids.shape[1]
    sequences = cached.sequences
    full_mask = torch.cat([mask, torch.ones(len(lengths), 6, dtype=torch.long)], dim=1)
    generated = torch.stack(cached.logits, dim=1)  # [B, 6, V]
    forward = model(input_ids=sequences[:, :-1], attention_mask=full_mask[:, :-1]).logits[:, T - 1:]
    torch.testing.assert_close(forward, generated, rtol=1e-5, atol=1e-5)
    labels = sequences.masked_fill(torch.arange(T + 6) < T, -100)  # score the generated tokens only
    want = torch.nn.functional.cross_entropy(generated.flatten(0, 1), sequences[:, T:].flatten())
    torch.testing.assert_close(model(input_ids=sequences, attention_mask=full_mask, labels=labels).loss, want,
                               rtol=1e-5, atol=1e-5)


def test_labels_give_the_mean_next_token_loss():
    core = tiny("yoco-swa")
    model = YocoForCausalLM.from_yoco(core)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    want = torch.nn.functional.cross_entropy(core(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, want)
    assert output_cache(out) is None  # a plain forward builds no cache


@pytest.mark.parametrize("arch", ["yoco-swa", "transformer"])
def test_transformers_activation_checkpointing_checkpoints_yocos_blocks(arch):
    """transformers' switch (5.x: ``activation_checkpointing_enable``, before it
    ``gradient_checkpointing_enable``) turns on every block's checkpointing; the gradients are the same,
    and the switch back turns it off."""
    from yoco.models.base import Block

    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    def grads(model):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, model = YocoForCausalLM.from_yoco(tiny(arch)).train(), YocoForCausalLM.from_yoco(tiny(arch)).train()
    new_api = hasattr(model, "activation_checkpointing_enable")
    (model.activation_checkpointing_enable if new_api else model.gradient_checkpointing_enable)()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert blocks and all(b.gradient_checkpointing for b in blocks)
    want, got = grads(plain), grads(model)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    (model.activation_checkpointing_disable if new_api else model.gradient_checkpointing_disable)()
    assert not any(b.gradient_checkpointing for b in blocks)


def test_bad_input_is_named():
    model = YocoForCausalLM.from_yoco(tiny("transformer"))
    with pytest.raises(InputError, match="left padding"):
        model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]))
    ids, mask = left_padded([[5, 6, 7], [8]])
    model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([[0, 1, 2], [1, 1, 0]]))  # pads: any
    with pytest.raises(InputError, match="position_ids disagree"):
        model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([[0, 1, 2], [1, 1, 5]]))
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    with pytest.raises(InputError, match="position_ids disagree"):  # after the cache: 3 and 1 are next
        model(input_ids=torch.tensor([[1], [2]]), position_ids=torch.tensor([[3], [2]]), **cache_arg(output_cache(out)))
    model(input_ids=torch.tensor([[1], [2]]), position_ids=torch.tensor([[3], [1]]), **cache_arg(output_cache(out)))
    with pytest.raises(InputError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="window"):
        YocoConfig(arch="yoco-swa", window=None)  # the config is validated by ModelConfig


def test_folders_that_are_broken_or_not_yoco_give_clear_errors(tmp_path):
    YocoForCausalLM.from_yoco(tiny("transformer")).save_pretrained(tmp_path / "ok")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing"):
        load_model(bad)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(bad)
    with pytest.raises(Exception, match="safetensors|header|corrupt|deserializ"):
        AutoModelForCausalLM.from_pretrained(bad)
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "arch": "no-such-arch"}))
    with pytest.raises(CheckpointError, match="arch"):
        load_model(bad)
    with pytest.raises(ValueError, match="arch"):
        AutoConfig.from_pretrained(bad)
    (bad / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="llama"):
        load_model(bad)


@pytest.mark.parametrize("tie", [False, True])
def test_llama_converts_with_identical_logits_then_pools_kv_heads(tie, tmp_path):
    from yoco.convert import convert_kv_heads, from_llama

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.2)  # larger than the default init, so the logits differ a lot by token
    ids = torch.randint(0, 300, (2, 40))
    want = llama(ids).logits
    model = from_llama(llama)
    torch.testing.assert_close(model(ids), want, atol=2e-5, rtol=1e-5)
    llama.save_pretrained(tmp_path / "llama")
    assert main(["convert", "--from-llama", str(tmp_path / "llama"), "--out", str(tmp_path / "yoco")]) == 0
    torch.testing.assert_close(load_model(tmp_path / "yoco")(ids), want, atol=2e-5, rtol=1e-5)
    # On to GQA by mean-pooling (exact when the heads of a group are equal).
    assert main(["convert", "--from-llama", str(tmp_path / "llama"), "--kv-heads", "2",
                 "--out", str(tmp_path / "gqa")]) == 0
    assert load_model(tmp_path / "gqa").config.n_kv_heads == 2
    assert convert_kv_heads(model, 1).config.n_kv_heads == 1


def test_llama_with_unsupported_features_is_refused():
    from yoco.config import ConfigError
    from yoco.convert import from_llama

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, attention_bias=True)
    with pytest.raises(ConfigError, match="bias"):
        from_llama(LlamaForCausalLM(config))


@pytest.mark.parametrize("scale_embeddings", [False, True])
def test_a_yoco_transformer_written_as_a_llama_has_its_logits_and_tokenizer(scale_embeddings, tmp_path, capsys):
    assert main(["init", "--arch", "transformer", "--preset", "small", "--out", str(tmp_path / "yoco")]) == 0
    model = load_model(tmp_path / "yoco")
    model = build_model(model.config.replace(scale_embeddings=scale_embeddings, n_layers=2), seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # logits that differ a lot by token
    tokenizer = load_tokenizer(tmp_path / "yoco")
    save_model(model, tmp_path / "source", eos_token_id=256, tokenizer=tokenizer)
    save_tokenizer(tokenizer, tmp_path / "source", model.config.max_seq_len)
    assert main(["convert", "--checkpoint", str(tmp_path / "source"), "--to-llama", "--out", str(tmp_path / "llama")]) == 0
    llama = AutoModelForCausalLM.from_pretrained(tmp_path / "llama")
    assert type(llama).__name__ == "LlamaForCausalLM" and llama.config.eos_token_id == 256
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    torch.testing.assert_close(llama(ids).logits, model(ids), atol=2e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(tmp_path / "llama")("def f():")["input_ids"] == tokenizer.encode("def f():").ids
    from yoco.convert import from_llama  # and back: the same logits again
    torch.testing.assert_close(from_llama(llama)(ids), model(ids), atol=2e-5, rtol=1e-5)
    # what a Llama cannot express is refused with a message, and nothing is written
    assert main(["init", "--arch", "yoco-swa", "--preset", "tiny", "--out", str(tmp_path / "swa")]) == 0
    capsys.readouterr()
    assert main(["convert", "--checkpoint", str(tmp_path / "swa"), "--to-llama", "--out", str(tmp_path / "no")]) == 2
    assert "cannot write this model as a Llama" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["convert", "--checkpoint", str(tmp_path / "source"), "--to-llama", "--out", str(tmp_path / "llama")]) == 2


def test_yoco_init_writes_a_folder_transformers_loads(tmp_path, capsys):
    assert main(["init", "--arch", "mla", "--preset", "tiny", "--out", str(tmp_path)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer("hello", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [list(b"hello")]
    assert model.config.eos_token_id is None  # the tiny preset's 256 ids leave no room for <|endoftext|>
    assert main(["init", "--arch", "yoco-swa", "--preset", "small", "--out", str(tmp_path / "small")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "small").config.eos_token_id == 256
    assert AutoTokenizer.from_pretrained(tmp_path / "small").eos_token_id == 256
    torch.testing.assert_close(model(ids).logits, load_model(tmp_path)(ids), rtol=0, atol=1e-6)
    # yoco generate reads the folder save_pretrained writes (prefixed weights) as well.
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    fingerprint = json.loads((tmp_path / "config.json").read_text())["tokenizer_fingerprint"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tokenizer_fingerprint"] == fingerprint
    assert main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "3"]) == 0



@pytest.mark.parametrize("arch", ["yoco-swa", "block"])
def test_lm_eval_harness_scores_a_local_task_offline(arch, tmp_path, monkeypatch):
    """lm-evaluation-harness (the `hf` model type) on a saved yoco folder: its log-likelihoods are the
    ones cached generation computes (prefill of the context, then the continuation token by token)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from yoco.tokenizer import byte_level_tokenizer, save_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    core = build_model(get_config(arch, "tiny", vocab_size=258), seed=0).eval()
    save_model(core, tmp_path / "model")
    save_tokenizer(byte_level_tokenizer(258), tmp_path / "model", 1024)
    docs = [{"question": "def add(a, b):\n    return a", "choices": ["+ b", "* b"], "answer": 0},
            {"question": "import", "choices": ["os", "sys", "(("], "answer": 1}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: yoco_tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n")
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'model'},dtype=float32",
                                      tasks=["yoco_tiny_choice"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      device="cpu", batch_size=2, log_samples=True)
    assert 0 <= results["results"]["yoco_tiny_choice"]["acc,none"] <= 1
    samples = results["samples"]["yoco_tiny_choice"]
    assert len(samples) == 2
    for sample in samples:
        doc = sample["doc"]
        context = list(doc["question"].encode())
        for choice, response in zip(doc["choices"], sample["resps"]):
            choice = " " + choice  # lm-eval's default target delimiter
            ids = torch.tensor([context + list(choice.encode())])
            logp = engine_logits(core, ids[:, :-1], len(context), chunk=8).log_softmax(-1)[0]
            want = logp.gather(-1, ids[0, len(context):, None]).sum().item()
            assert response[0][0] == pytest.approx(want, abs=1e-4)


USER_SCRIPT = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from yoco import YocoForCausalLM, build_model
from yoco.bench import EngineRunner, llama_like
from yoco.compress import SnapKV
from yoco.compress.hf import generate as hf_generate
from yoco.config import get_config
from yoco.engine import generate
from yoco.hf_runner import TransformersLM

core = build_model("yoco-swa", preset="tiny", seed=0)
model = YocoForCausalLM.from_yoco(core)
ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
for use_cache in (True, False):
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   use_cache=use_cache)
model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
model(input_ids=ids, labels=ids)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
hf_generate(llama, ids, SnapKV(3), attention_mask=mask, max_new_tokens=3, pad_token_id=0)
generate(TransformersLM(llama), [[5, 6, 7, 8]], 3)
generate(TransformersLM(llama), [[5, 6, 7, 8]], 3, compression=SnapKV(2))
config = get_config("transformer", "tiny")
runner = EngineRunner("hf-llama", config, llama_like(config, torch.float32, 0), None)
runner.decode(runner.prefill(torch.tensor([[1, 2, 3]]), 8).argmax(-1))
print("done")
"""


def test_no_deprecation_warning_reaches_a_user():
    """What a user's script prints on the installed transformers: no deprecation of an argument or a
    field yoco uses (Python warnings at their default filters, transformers' logger at its default)."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", USER_SCRIPT], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "done"
    printed = run.stderr.lower()
    assert "deprecat" not in printed and "futurewarning" not in printed, run.stderr


@pytest.mark.parametrize("arch", ["transformer", "yoco-swa", "yoco-gret", "mla", "cla2"])
def test_hidden_states_are_the_embeddings_and_every_blocks_output(arch):
    core = tiny(arch)
    model = YocoForCausalLM.from_yoco(core)
    ids = torch.randint(1, 256, (2, 13), generator=torch.Generator().manual_seed(4))
    # the residual stream by hand: embeddings, then each block in order
    blocks = core.residual_blocks()
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out)) for b in blocks]
    with torch.no_grad():
        logits = core(ids)
    for h in hooks:
        h.remove()
    out = model(input_ids=ids, output_hidden_states=True)
    states = out.hidden_states
    assert len(states) == core.config.n_layers + 1 == len(blocks) + 1
    assert all(s.shape == (2, 13, core.config.dim) for s in states)
    torch.testing.assert_close(states[0], core.embed_tokens(ids))
    for got, want in zip(states[1:-1], seen[:-1]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(states[-1], core.norm(seen[-1]))  # the last one normed, as transformers does
    torch.testing.assert_close(core.lm_head(states[-1]), logits, rtol=1e-5, atol=1e-5)
    # with logits for the last position only (YOCO's cross-decoder would skip the rest), and through a cache
    last = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    assert last.logits.shape == (2, 1, core.config.vocab_size) and len(last.hidden_states) == len(states)
    torch.testing.assert_close(last.hidden_states[-1], states[-1])
    cached = model(input_ids=ids[:, :9], use_cache=True)
    step = model(input_ids=ids[:, 9:], output_hidden_states=True, **cache_arg(output_cache(cached)))
    torch.testing.assert_close(step.hidden_states[-1], states[-1][:, 9:], rtol=1e-5, atol=1e-5)
    gen = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                         output_hidden_states=True, return_dict_in_generate=True)
    assert len(gen.hidden_states) == 2 and len(gen.hidden_states[0]) == core.config.n_layers + 1


def test_output_attentions_and_block_hidden_states_are_refused_clearly():
    model = YocoForCausalLM.from_yoco(tiny("yoco-swa"))
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="output_attentions is not supported"):
        model(input_ids=ids, output_attentions=True)
    with pytest.raises(InputError, match="Block Transformer has no hidden state"):
        YocoForCausalLM.from_yoco(tiny("block"))(input_ids=ids, output_hidden_states=True)
    assert model(input_ids=ids, output_attentions=False).hidden_states is None


def test_the_readme_snippet_runs(trained_run, tmp_path, monkeypatch):
    """The README's transformers example, as written, on a trained checkpoint."""
    from pathlib import Path

    from yoco.checkpoint import latest_checkpoint

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Hugging Face transformers"):]
    snippet = section[section.index("```python") + len("```python"):]
    snippet = snippet[:snippet.index("```")]
    monkeypatch.chdir(tmp_path)
    snippet = snippet.replace("runs/swa/checkpoint-200", str(latest_checkpoint(trained_run)))
    exec(compile(snippet, "README.md", "exec"), {})
    assert (tmp_path / "hf-copy" / "config.json").is_file()
