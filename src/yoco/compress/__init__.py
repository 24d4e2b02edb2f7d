"""Training-free KV-cache compression: policies (``policies.py``), the compressed cache they act on
(``store.py``), and its use on transformers models (``hf.py``)."""

from .policies import CORM, H2O, POLICIES, BudgetError, Policy, PyramidKV, SnapKV, StreamingLLM, make_policy
from .store import CompressedKV

__all__ = ["CORM", "H2O", "POLICIES", "BudgetError", "CompressedKV", "Policy", "PyramidKV", "SnapKV",
           "StreamingLLM", "make_policy"]
