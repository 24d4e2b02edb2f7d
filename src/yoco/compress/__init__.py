"""Training-free KV-cache compression: policies (``policies.py``), the compressed cache they act on
(``store.py``; InfLLM's context memory, ``infllm.py``), and its use on transformers models (``hf.py``)."""

from .infllm import InfLLMKV
from .policies import (CORM, H2O, POLICIES, BudgetError, InfLLM, Policy, PyramidKV, SnapKV, StreamingLLM, make_policy,
                       policy_for_context)
from .store import CompressedKV

__all__ = ["CORM", "H2O", "POLICIES", "BudgetError", "CompressedKV", "InfLLM", "InfLLMKV", "Policy", "PyramidKV",
           "SnapKV", "StreamingLLM", "make_policy", "policy_for_context"]
