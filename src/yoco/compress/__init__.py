"""Training-free KV-cache compression: policies (``policies.py``), the compressed cache they act on
(``store.py``; InfLLM's context memory, ``infllm.py``), and its use on transformers models (``hf.py``)."""

from . import policies
from .infllm import InfLLMKV
from .policies import *  # noqa: F403 -- every policy class by name (policies.__all__), so adding one touches policies.py only
from .store import CompressedKV

__all__ = [*policies.__all__, "CompressedKV", "InfLLMKV"]
