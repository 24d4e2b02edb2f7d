"""yoco: language models whose key/value cache does not eat the machine."""

from .cache import CacheError, KVCache, ModelCache
from .config import ARCHITECTURES, PRESETS, ConfigError, ModelConfig, get_config
from .engine import GenerationResult, generate, stream
from .errors import YocoError
from .models import CausalLM, InputError, build_model
from .checkpoint import CheckpointError, load_model, save_model
from .hf import YocoCache, YocoConfig, YocoForCausalLM, register as _register_with_transformers

_register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "PRESETS", "CacheError", "CausalLM", "CheckpointError", "ConfigError", "GenerationResult",
    "InputError", "KVCache", "ModelCache", "ModelConfig", "build_model", "generate", "get_config", "load_model",
    "YocoCache", "YocoConfig", "YocoError", "YocoForCausalLM", "save_model", "stream",
]
