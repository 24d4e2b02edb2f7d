"""lm-evaluation-harness on yoco models: ``yoco-lm-eval ARGS`` (or ``python -m yoco.lm_eval_cli ARGS``)
is the ``lm-eval`` command line with yoco registered with transformers first, so
``--model hf --model_args pretrained=DIR`` loads any yoco folder (a ``yoco train`` checkpoint, a
``yoco init`` folder or a ``save_pretrained`` one) without ``trust_remote_code``."""

from __future__ import annotations

import sys


def main() -> None:
    import yoco  # noqa: F401  (registers the yoco model type with AutoConfig / AutoModelForCausalLM)

    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        sys.exit("yoco-lm-eval needs lm-evaluation-harness: pip install lm_eval")
    cli_evaluate()


if __name__ == "__main__":
    main()
