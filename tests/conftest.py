import pytest
import torch
from harness import ARCH_VARIANTS


@pytest.fixture(params=sorted(ARCH_VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tests run tiny tensors: an intra-op thread pool only adds synchronisation (and, when the other
    # core is busy, ~15 ms stalls per op). One thread keeps the suite fast and deterministic.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A folder of 40 small Python files: a corpus to train a tokenizer and a tiny model on."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" * 8)
    return str(folder)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A training run folder (tiny yoco-swa, its own 300-id BPE tokenizer, 2 steps) with ``latest``,
    ``data/`` and one checkpoint: what `yoco train` leaves for the commands that read a model."""
    from yoco.train import TrainSettings, train

    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" * 8)
    run = tmp_path_factory.mktemp("run")
    train(TrainSettings(arch="yoco-swa", preset="tiny", corpus=[str(corpus)], vocab_size=300, steps=2, batch_size=2,
                        seq_len=32, save_every=2, eval_every=2, eval_batches=1, val_percent=20.0),
          run, progress=False, log=lambda s: None)
    return run
