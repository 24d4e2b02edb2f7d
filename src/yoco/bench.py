"""``yoco bench``: memory, prefill latency and decode throughput against context length.

For each context length and each architecture (interleaved, so machine drift hits all alike), one
process run measures:

- ``prefill_s``: wall time of the prefill, logits for the last position only;
- ``peak_mem_bytes``: the process's peak resident-memory growth during that prefill;
- ``cache_bytes``: the bytes the cache holds after prefill (the tensors the engine tracks);
- ``decode_tok_s``: greedy decode speed for ``new_tokens`` tokens after that prefill (batch 1), the
  first step a warm-up (with ``compile``, the decode step captured by ``torch.compile``: it compiles);
- ``budget_batch`` / ``budget_tok_s``: how many sequences of that context fit in a memory budget
  (cache + decode activations per sequence) and the decode tokens/s that batch reaches. The batch is
  made by repeating the prefilled sequence's cache (values do not change attention cost).

The machine's matmul FLOP/s and memory bandwidth (copying, and reading alone) are measured in the same
run (at its start and end, keeping the better; both are recorded, and figures more than 25% apart mark
the machine as busy). Each prefill's useful FLOPs (``prefill_flops``, which each model class composes
from its mixers) give its fraction of that peak; each decode step's least bytes read
(``decode_read_bytes_per_token``: the weights, and each cache once per layer that attends to it, as
``CausalLM.decode_read_bytes`` composes them) times its tokens/s give the fraction of the read
bandwidth decode reaches (``decode_bandwidth_fraction``). Beside a prefill's fraction stands what its own
linear layers reach (``linear_peak_fraction``): each one the prefill ran, run again alone at the shape it
was given (``LinearCalls``): the matmul speed this machine's BLAS gives the model's shapes, which bounds
how close to the square matmul's peak the whole prefill can come.

Architectures: this library's ``transformer``, ``yoco-swa``, ``yoco-gret``, and ``hf-llama``: a
transformers ``LlamaForCausalLM`` with the same dimensions, random weights, SDPA attention, its
``DynamicCache`` and ``logits_to_keep=1`` (the Transformer people run today).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import psutil
import torch

from . import layers
from .allocator import release_free_memory
from .config import NAMES, PRESETS, ModelConfig, get_config
from .engine import decode_stepper, prefill
from .errors import YocoError
from .hf_runner import TransformersLM
from .models import (build_model, cache_bytes, cache_growth_per_token, prefill_flops, quadratic_prefill, resolve_dtype,
                     weight_read_bytes)
from .quantize import DEFAULT_GROUP, DEFAULT_RESIDUAL, KVQuantization, QuantizationError
from .report import format_bytes, times

BENCH_ARCHS = ("yoco-swa", "yoco-gret", "transformer", "hf-llama")
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_CONTEXTS = (1024, 2048, 4096, 8192)
GIB = 1 << 30


class BenchError(YocoError, ValueError):
    """A bad benchmark setting; the message names it."""


@dataclass
class BenchSettings:
    archs: tuple[str, ...] = BENCH_ARCHS
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    preset: str = "40m"
    dtype: str = "fp32"
    new_tokens: int = 32
    budget_bytes: int = 4 * GIB
    budget_steps: int = 3
    max_budget_batch: int = 512
    prefill_chunk: int = 2048
    max_quadratic_context: int = 32768  # above this, Transformers are extrapolated, not run
    threads: int = 0  # 0: torch's default
    repeats: int = 1  # prefills timed per row, the fastest reported (noise on a shared machine only slows)
    seed: int = 0
    compile: bool = False  # decode with the step torch.compile captured (engine.decode_stepper)
    # K/V cache bit widths to measure: 8, 4, 2 quantized (yoco.quantize), or the dtype's own width (32 for
    # fp32, 16 for bf16) unquantized; empty: unquantized only
    kv_bits: tuple[int, ...] = ()
    kv_group: int = DEFAULT_GROUP
    kv_residual: int = DEFAULT_RESIDUAL
    overrides: dict = field(default_factory=dict)  # ModelConfig fields replacing the preset's

    def validate(self) -> None:
        check_run(self, self.contexts, "context lengths", ("new_tokens", "budget_steps", "max_budget_batch",
                                                            "prefill_chunk", "repeats"))
        if self.new_tokens < 2:
            raise BenchError("new-tokens must be >= 2 (the first decoded token is a warm-up)")
        if self.budget_bytes <= 0:
            raise BenchError(f"memory budget must be positive, got {self.budget_bytes} bytes")
        own = self.unquantized_bits()
        for bits in self.kv_bits:
            if bits in (32, 16) and bits != own:
                raise BenchError(f"unquantized K/V is stored in the model's dtype ({self.dtype}: {own} bits), "
                                 f"not {bits}: give --dtype {'bf16' if bits == 16 else 'fp32'} for {bits}-bit K/V")
            if bits not in (32, 16):
                try:
                    KVQuantization(bits, self.kv_group, self.kv_residual)
                except QuantizationError as e:
                    raise BenchError(str(e)) from None

    def unquantized_bits(self) -> int:
        return 8 * resolve_dtype(self.dtype).itemsize

    def widths(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.kv_bits)) or (self.unquantized_bits(),)

    def quantization(self, bits: int) -> KVQuantization | None:
        return None if bits == self.unquantized_bits() else KVQuantization(bits, self.kv_group, self.kv_residual)


def check_run(settings, lengths, what: str, counts: tuple[str, ...]) -> None:
    """The checks every benchmark's settings share: known architectures (``archs``), lengths of at least
    2, a known ``preset`` and ``dtype``, and the named counts at least 1."""
    known = ("hf-llama",) + NAMES
    unknown = [a for a in settings.archs if a not in known]
    if unknown or not settings.archs:
        raise BenchError(f"unknown architecture(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(known)}")
    if not lengths or any(not isinstance(n, int) or n < 2 for n in lengths):
        raise BenchError(f"{what} must be integers >= 2, got {list(lengths)}")
    if settings.preset not in PRESETS:
        raise BenchError(f"unknown preset {settings.preset!r}; choose one of {', '.join(PRESETS)}")
    resolve_dtype(settings.dtype)
    for name in counts:
        if getattr(settings, name) < 1:
            raise BenchError(f"{name.replace('_', '-')} must be >= 1, got {getattr(settings, name)}")


# ---------------------------------------------------------------------- memory and machine
def vm_hwm(pid: int | str) -> int | None:
    """The kernel's resident-memory high-water mark (``VmHWM``) of process ``pid`` ("self": this one),
    in bytes; None where /proc does not tell it (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakRSS:
    """Peak resident-memory growth of this process over a ``with`` block.

    Linux: resets the kernel's high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM``;
    elsewhere: samples RSS every 2 ms in a thread.
    """

    def __enter__(self) -> "PeakRSS":
        release_free_memory()
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.kernel = self._reset_hwm()
        self.peak = self.start
        if not self.kernel:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.kernel:
            self.peak = max(vm_hwm("self") or 0, self.process.memory_info().rss)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best-of FLOP/s of an n x n matmul: the machine's practical dense peak for this dtype."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def measure_read_bandwidth(size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of bytes/s of reading a large buffer once (a sum over it, on every thread): what a decode step,
    which reads weights and caches and writes next to nothing, can reach at most."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32)
    src.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t0)
    return size_bytes / best


def measure_bandwidth(size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of bytes/s of copying a large buffer (bytes read + bytes written)."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * size_bytes / best


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(dtype: torch.dtype) -> dict:
    """What the machine is, and its figures measured now (``probe`` measures them again at the end)."""
    import transformers

    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "ram_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "matmul_dtype": str(arithmetic_dtype(dtype)).removeprefix("torch."),
        **measure_machine(dtype),
    }


PROBED = ("matmul_flops", "bandwidth_bytes_s", "read_bandwidth_bytes_s")
BUSY_DIFFERENCE = 0.25  # start and end figures further apart than this: something else ran meanwhile


def arithmetic_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a model stored in ``dtype`` multiplies in, whose matmul peak its prefill is set against:
    fp32 for bf16 on a CPU without bf16 arithmetic (``layers.Linear``), else ``dtype``."""
    return torch.float32 if dtype == torch.bfloat16 and not layers.CPU_BF16_ARITHMETIC else dtype


def measure_machine(dtype: torch.dtype) -> dict:
    return {"matmul_flops": measure_matmul_flops(arithmetic_dtype(dtype)), "bandwidth_bytes_s": measure_bandwidth(),
            "read_bandwidth_bytes_s": measure_read_bandwidth()}


def probe(start: dict, end: dict, during: list[dict] = ()) -> dict:
    """The verdict on the machine's figures measured at the start and at the end of a run (and, if given,
    between its context lengths).

    The figures used are the best of them all (a busy moment understates the peak, nothing overstates
    it: a probe that caught a slow moment at both ends would otherwise make every row look closer to
    the peak than it was). Each quantity's difference between start and end is relative to its better
    figure; when either differs by more than BUSY_DIFFERENCE the machine counts as busy, and the run's
    timings as doubtful.
    """
    best = {key: max(figures[key] for figures in (start, end, *during)) for key in PROBED}
    difference = {key: abs(start[key] - end[key]) / max(start[key], end[key]) for key in PROBED}
    return {**best, "busy": any(d > BUSY_DIFFERENCE for d in difference.values()),
            "probe": {"start": {key: start[key] for key in PROBED}, "end": {key: end[key] for key in PROBED},
                      "during": [{key: figures[key] for key in PROBED} for figures in during],
                      "difference": difference}}


def busy_warning(machine: dict) -> str | None:
    """One line saying the machine was busy during the run (None when it was not)."""
    if not machine.get("busy"):
        return None
    start, end = machine["probe"]["start"], machine["probe"]["end"]
    return (f"warning: the machine was busy during the run: matmul {start['matmul_flops'] / 1e9:.0f} GFLOP/s at "
            f"the start, {end['matmul_flops'] / 1e9:.0f} at the end; copy bandwidth "
            f"{start['bandwidth_bytes_s'] / 1e9:.1f} GB/s at the start, {end['bandwidth_bytes_s'] / 1e9:.1f} at "
            f"the end; read bandwidth {start['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s at the start, "
            f"{end['read_bandwidth_bytes_s'] / 1e9:.1f} at the end (more than {BUSY_DIFFERENCE:.0%} apart): the "
            "timings are not reliable, rerun on an idle machine")


# ---------------------------------------------------------------------- runners
class EngineRunner:
    """A model the engine runs (one of this library's, or a transformers one through
    ``hf_runner.TransformersLM``): its prefill, decode steps and cache, for one measurement at a time.
    ``config`` is the yoco config whose facts (cache bytes, FLOPs) the measurement is set against;
    ``compile``: its decode steps run the step ``torch.compile`` captured."""

    def __init__(self, arch: str, config: ModelConfig, model, chunk: int | None, compile: bool = False):
        self.arch, self.config, self.model, self.chunk = arch, config, model, chunk
        self.step = decode_stepper(model, compile)
        self.cache = None

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prefill(self, ids: torch.Tensor, capacity: int, quantization: KVQuantization | None = None) -> torch.Tensor:
        """The prompt into a fresh cache of ``capacity`` slots (quantized, if asked): in chunks through the
        engine, or (chunk None) in one call with logits for the last position, as transformers users run it."""
        self.cache = self.model.new_cache(ids.shape[0], capacity=capacity, kv_bits=quantization)
        if self.chunk is None:
            return self.model(ids, self.cache, num_logits=1)[:, -1]
        return prefill(self.model, ids, self.cache, self.chunk)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step of the greedy tokens it decoded (in the vocabulary: unchecked)."""
        return self.step(self.model, tokens, self.cache)

    def cache_bytes(self) -> int:
        return self.cache.nbytes()

    def decode_read_bytes(self, context: int, dtype: torch.dtype, quantization: KVQuantization | None) -> int:
        """Bytes a decode step at ``context`` reads at least (``CausalLM.decode_read_bytes``); for a
        transformers model, whose layers each read their own cache, its weights and the cache it holds."""
        if hasattr(self.model, "decode_read_bytes"):
            return self.model.decode_read_bytes(context, dtype, quantization)
        return weight_read_bytes(self.model.model, dtype) + self.cache.nbytes()

    def repeat(self, n: int) -> None:
        self.cache = self.cache.repeat(n)

    def reset(self) -> None:
        self.cache = None


def llama_model(config: ModelConfig, dtype: torch.dtype, seed: int, attn_implementation: str = "sdpa"):
    """transformers' ``LlamaForCausalLM`` with the dimensions of a yoco Transformer config and random
    weights (seeded), in eval mode: the Transformer people run today, here and as the serving peer
    (``yoco.serve.peer``)."""
    from transformers import LlamaForCausalLM

    from .convert import llama_config_of

    hf_config = llama_config_of(config, attn_implementation)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config).to(dtype).eval()
    if model.config._attn_implementation != attn_implementation:
        raise BenchError(f"transformers chose {model.config._attn_implementation!r} attention, "
                         f"not {attn_implementation!r}")
    return model


def llama_like(config: ModelConfig, dtype: torch.dtype, seed: int) -> TransformersLM:
    """``llama_model`` with SDPA attention, seen through the engine (its cache: transformers'
    ``DynamicCache``)."""
    return TransformersLM(llama_model(config, dtype, seed))


# ---------------------------------------------------------------------- the run
def positions_needed(context: int, settings: BenchSettings) -> int:
    """Cache slots one measurement uses: the prompt, the timed decode, one step sizing the activations,
    and the batched decode; with ``compile`` one slot more, because a compiled step is specialised on
    its cache view being part of the buffer, and would recompile at the step that fills it."""
    return context + settings.new_tokens + 1 + settings.budget_steps + 1 + int(settings.compile)


def bench_config(arch: str, settings: BenchSettings) -> ModelConfig:
    longest = positions_needed(max(settings.contexts), settings)
    base = "transformer" if arch == "hf-llama" else arch
    config = get_config(base, settings.preset, **settings.overrides)
    if config.max_seq_len < longest:
        config = config.replace(max_seq_len=longest)
    return config


def make_runner(arch: str, settings: BenchSettings):
    dtype = resolve_dtype(settings.dtype)
    config = bench_config(arch, settings)
    if arch == "hf-llama":
        return EngineRunner(arch, config, llama_like(config, dtype, settings.seed), None, settings.compile)
    return EngineRunner(arch, config, build_model(config, dtype=dtype, seed=settings.seed), settings.prefill_chunk,
                        settings.compile)


def timed_decode(runner, first: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Greedy decode `steps` tokens; tokens/s over all but the first step (a warm-up)."""
    tokens = first
    t0 = None
    for i in range(steps):
        if i == 1:
            t0 = time.perf_counter()
        tokens = runner.decode(tokens).argmax(-1)
    elapsed = time.perf_counter() - t0
    return (steps - 1) * tokens.shape[0] / elapsed, tokens


def why_not_quantized(runner, quantization: KVQuantization) -> str | None:
    """Why the runner's model cannot store its cache quantized (its own message), or None if it can."""
    try:
        runner.model.new_cache(1, capacity=2, kv_bits=quantization)
    except YocoError as e:
        return str(e)
    return None


class LinearCalls:
    """The linear layers (``nn.Linear``: this library's and transformers') that run while it is entered,
    recorded by a global forward hook: each module with the shape and dtype of its input, and how often.
    ``seconds`` runs them alone again at those shapes (the fastest of ``repeats``; one layer for all those
    of its kind, size and input shape), so that a prefill can be set beside the speed its own matmuls
    reach on this machine. The hook costs a few microseconds a call."""

    def __init__(self):
        self.calls: Counter = Counter()
        self._handle = None

    def __enter__(self) -> "LinearCalls":
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def _record(self, module, args, output) -> None:
        if isinstance(module, torch.nn.Linear) and isinstance(output, torch.Tensor):
            # the input's shape from the output's rows (an input passed by keyword is not in args)
            dtype = args[0].dtype if args and isinstance(args[0], torch.Tensor) else output.dtype
            self.calls[module, (*output.shape[:-1], module.in_features), dtype] += 1

    def flops(self) -> float:
        return float(sum(2 * math.prod(shape[:-1]) * module.in_features * module.out_features * count
                         for (module, shape, _), count in self.calls.items()))

    def seconds(self, repeats: int = 5) -> float:
        # Layers of one kind, size and dtype given inputs of one shape do the same work: one of them is
        # timed for all (a 12-layer model's 84 projections are 5 shapes)
        alike: dict[tuple, list] = {}  # kind -> [one module of that kind, the calls of them all]
        for (module, shape, dtype), count in self.calls.items():
            kind = (type(module), module.in_features, module.out_features, module.bias is not None,
                    module.weight.dtype, module.weight.device, shape, dtype)
            alike.setdefault(kind, [module, 0])[1] += count
        total = 0.0
        with torch.inference_mode():
            for (*_, shape, dtype), (module, count) in alike.items():
                x = torch.randn(shape, dtype=dtype, device=module.weight.device)
                module(x)  # warm-up
                best = math.inf
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    module(x)
                    best = min(best, time.perf_counter() - t0)
                total += best * count
        return total


def measure(runner, context: int, settings: BenchSettings, machine: dict, progress=None, bits: int | None = None) -> dict:
    dtype = resolve_dtype(settings.dtype)
    bits = settings.unquantized_bits() if bits is None else bits
    quantization = settings.quantization(bits)
    generator = torch.Generator().manual_seed(settings.seed + context)
    ids = torch.randint(0, runner.config.vocab_size, (1, context), generator=generator)
    capacity = positions_needed(context, settings)
    with torch.inference_mode():
        timings = []
        linears = LinearCalls()
        for _ in range(settings.repeats):
            runner.reset()
            # the first prefill records its linear layers (then timed alone, below)
            with PeakRSS() as run_peak, linears if not timings else contextlib.nullcontext():
                t0 = time.perf_counter()
                logits = runner.prefill(ids, capacity, quantization)
                timings.append(time.perf_counter() - t0)
            if len(timings) == 1:
                peak = run_peak  # the first, from a fresh start, holds the memory growth
        prefill_s = min(timings)
        held = runner.cache_bytes()
        read_bytes = runner.decode_read_bytes(context, dtype, quantization)
        if progress:
            progress(f"{runner.arch} @ {context}: decoding")
        decode_tok_s, last = timed_decode(runner, logits.argmax(-1), settings.new_tokens)
        # Per-sequence memory for the budget: the cache at this context, plus what one decode step
        # allocates on top of it (scores, MLP activations, a copied cache layer for DynamicCache).
        with PeakRSS() as step_peak:
            runner.decode(last)
        # (transformers' QuantizedCache states no formula: what it holds after the prompt stands for it)
        quantized_bytes = getattr(runner.model, "cache_bytes_formula", None)
        formula = cache_bytes(runner.config, 1, capacity, dtype) if quantization is None else \
            quantized_bytes(1, capacity, dtype, kv_bits=quantization) if quantized_bytes else held
        per_sequence = formula + step_peak.growth
        budget_batch = settings.budget_bytes // per_sequence
        if budget_batch < 1:
            raise BenchError(f"memory budget of {settings.budget_bytes} bytes is too small for one {runner.arch} "
                             f"sequence of {context} tokens, which needs {per_sequence} bytes")
        budget_batch = int(min(budget_batch, settings.max_budget_batch))
        if progress:
            progress(f"{runner.arch} @ {context}: batch {budget_batch}")
        runner.repeat(budget_batch)
        budget_tok_s, _ = timed_decode(runner, last.repeat_interleave(budget_batch), settings.budget_steps + 1)
        runner.reset()
    if progress:
        progress(f"{runner.arch} @ {context}: its linear layers alone")
    linear_flops, linear_s = linears.flops(), linears.seconds()
    flops = prefill_flops(runner.config, context)
    row = {
        "arch": runner.arch, "context": context, "kv_bits": bits, "params": runner.params,
        "prefill_s": prefill_s, "prefill_s_each": timings, "peak_mem_bytes": peak.growth,
        "peak_rss_bytes": peak.peak, "cache_bytes": held,
        "cache_bytes_per_token": cache_growth_per_token(runner.config, dtype) if quantization is None else
        (quantized_bytes(1, 2 * context, dtype, kv_bits=quantization)
         - quantized_bytes(1, context, dtype, kv_bits=quantization)) / context if quantized_bytes else held / context,
        "decode_step_peak_bytes": step_peak.growth,
        "decode_tok_s": decode_tok_s, "budget_batch": budget_batch, "budget_tok_s": budget_tok_s,
        "prefill_flops": flops, "prefill_linear_flops": linear_flops, "prefill_linear_s": linear_s,
        "decode_read_bytes_per_token": read_bytes, "extrapolated": False,
    }
    return against_machine(row, machine)


def against_machine(row: dict, machine: dict) -> dict:
    """A measured row's figures against the machine's (``row`` itself, completed): its prefill and that
    prefill's linear layers against the matmul peak, its decode against the read bandwidth."""
    row["prefill_peak_fraction"] = row["prefill_flops"] / row["prefill_s"] / machine["matmul_flops"]
    row["linear_peak_fraction"] = row["prefill_linear_flops"] / row["prefill_linear_s"] / machine["matmul_flops"]
    row["decode_bandwidth_fraction"] = (row["decode_tok_s"] * row["decode_read_bytes_per_token"]
                                        / machine["read_bandwidth_bytes_s"])
    return row


def extrapolate(arch: str, config: ModelConfig, context: int, measured: list[dict], settings: BenchSettings) -> dict:
    """A Transformer row beyond max_quadratic_context, scaled from its longest measured context:
    prefill by useful FLOPs, decode by bytes read per token (weights + cache), memory by formula."""
    if not measured:
        raise BenchError(f"{arch} at context {context} is above --max-quadratic-context "
                         f"{settings.max_quadratic_context} and would be extrapolated, but no shorter context "
                         f"was measured for it in this run: add one (e.g. --context 8192,{context})")
    ref = max(measured, key=lambda r: r["context"])
    dtype = resolve_dtype(settings.dtype)
    n, m = context, ref["context"]
    cache = cache_bytes(config, 1, n, dtype)
    ref_cache = cache_bytes(config, 1, m, dtype)
    budget_batch = int(min(settings.budget_bytes // cache, settings.max_budget_batch))
    # decode is bound by the bytes it reads: the reference's, with its cache grown to this context
    read_bytes = ref["decode_read_bytes_per_token"] + cache - ref_cache
    decode_scale = ref["decode_read_bytes_per_token"] / read_bytes
    return {
        "arch": arch, "context": n, "kv_bits": settings.unquantized_bits(), "params": ref["params"],
        "prefill_s": ref["prefill_s"] * prefill_flops(config, n) / prefill_flops(config, m),
        "peak_mem_bytes": None, "peak_rss_bytes": None, "cache_bytes": cache,
        "cache_bytes_per_token": cache_growth_per_token(config, dtype), "decode_step_peak_bytes": None,
        "decode_tok_s": ref["decode_tok_s"] * decode_scale,
        "budget_batch": budget_batch,
        "budget_tok_s": None,
        "prefill_flops": prefill_flops(config, n), "prefill_peak_fraction": None,
        "prefill_linear_flops": None, "prefill_linear_s": None, "linear_peak_fraction": None,
        "decode_read_bytes_per_token": read_bytes, "decode_bandwidth_fraction": None,
        "extrapolated": True,
    }


def room_to_compile(settings: BenchSettings):
    """With ``compile``, room for every compilation of the decode step the run makes: each architecture
    compiles it for batch 1 and again for the budget batch, and past torch's default limit of 8 per
    function the later architectures would silently decode eagerly."""
    if not settings.compile:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(cache_size_limit=max(8, 4 * len(settings.archs)))


def start_run(settings, log) -> tuple[float, torch.dtype, dict]:
    """What every benchmark run does first: check its settings, set its threads, measure the machine.
    Returns the start time, the dtype and the machine's figures (``probe_again`` at the end)."""
    settings.validate()
    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = resolve_dtype(settings.dtype)
    log("measuring the machine (matmul FLOP/s, memory bandwidth)...")
    machine = machine_info(dtype)
    log(f"machine: {machine_line(machine)}")
    return started, dtype, machine


def probe_again(machine: dict, dtype: torch.dtype, during: list[dict] = ()) -> None:
    """Measure the machine again at the end of a run: a busy moment at the start would understate the
    peak, and start and end far apart say that the run shared the machine (``probe``); ``during``: the
    figures measured between (``measure_machine``), which count towards the best."""
    machine.update(probe({key: machine[key] for key in PROBED}, measure_machine(dtype), during))


def run_bench(settings: BenchSettings, log=print) -> dict:
    from tqdm import tqdm

    started, dtype, machine = start_run(settings, log)
    runners = {}
    for arch in settings.archs:
        runners[arch] = make_runner(arch, settings)
    contexts = sorted(set(settings.contexts))
    unquantized = settings.unquantized_bits()
    quantized = [b for b in settings.widths() if b != unquantized]
    refused = {(a, b): why_not_quantized(runners[a], settings.quantization(b)) for a in settings.archs for b in quantized}
    for arch in settings.archs:
        reasons = [refused[arch, b] for b in quantized]
        if reasons and all(reasons) and len(set(reasons)) == 1:
            log(f"{arch}: no quantized rows ({reasons[0]})")
        else:
            for bits, reason in zip(quantized, reasons):
                if reason:
                    log(f"{arch}: no {bits}-bit rows ({reason})")
    plan = [(c, a, b) for c in contexts for a in settings.archs for b in settings.widths()
            if b == unquantized or not refused[a, b]]
    results: list[dict] = []
    during: list[dict] = []  # the machine measured between context lengths (a second each)
    bar = tqdm(plan, desc="bench", unit="run", dynamic_ncols=True)
    with room_to_compile(settings):
        for context, arch, bits in bar:
            if results and context != results[-1]["context"]:
                bar.set_postfix_str("measuring the machine")
                during.append(measure_machine(dtype))
            bar.set_postfix_str(f"{arch} @ {context}" + ("" if bits == unquantized else f", {bits}-bit K/V"))
            if quadratic_prefill(runners[arch].config) and context > settings.max_quadratic_context:
                if bits == unquantized:  # (quantized rows of a quadratic model past the limit: not run)
                    measured = [r for r in results if r["arch"] == arch and not r["extrapolated"]
                                and r["kv_bits"] == unquantized]
                    results.append(extrapolate(arch, runners[arch].config, context, measured, settings))
                continue
            results.append(measure(runners[arch], context, settings, machine,
                                   progress=lambda text: bar.set_postfix_str(text), bits=bits))
    bar.close()
    probe_again(machine, dtype, during)  # every prefill and decode is then expressed against the best figures
    for r in results:
        if not r["extrapolated"]:
            against_machine(r, machine)
    settings_dict = asdict(settings)
    settings_dict["archs"], settings_dict["contexts"] = list(settings.archs), contexts
    return {"machine": machine, "settings": settings_dict, "results": results,
            "wall_s": time.perf_counter() - started}


# ---------------------------------------------------------------------- KV bytes per token
def kv_table(preset: str = "40m", context: int = 4096, dtype: str = "fp32", names=None) -> list[dict]:
    """KV-cache bytes per token of context for every architecture: the formula, and the measurement
    (the growth of a real cache from `context` to 2 x `context` positions), plus the part that does
    not grow with context."""
    torch_dtype = resolve_dtype(dtype)
    rows = []
    for name in names or NAMES:
        config = get_config(name, preset)
        config = config.replace(max_seq_len=max(config.max_seq_len, 2 * context))
        model = build_model(config, dtype=torch_dtype)
        context = -(-context // config.block_len) * config.block_len  # whole blocks for the Block Transformer
        short = model.new_cache(1, capacity=context).nbytes()
        long = model.new_cache(1, capacity=2 * context).nbytes()
        per_token = (long - short) / context
        rows.append({"arch": name, "preset": preset, "params": model.num_parameters(),
                     "formula_bytes_per_token": cache_growth_per_token(config, torch_dtype),
                     "measured_bytes_per_token": per_token, "constant_bytes": short - per_token * context,
                     "cache_bytes_at_context": short, "context": context})
        del model
    base = next((r for r in rows if r["arch"] == "transformer"), None)
    for r in rows:
        r["vs_transformer"] = (base["cache_bytes_at_context"] / r["cache_bytes_at_context"]) if base else None
    return rows


# ---------------------------------------------------------------------- reporting
def machine_line(machine: dict) -> str:
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']} threads, "
            f"{machine['ram_bytes'] / GIB:.0f} GiB; matmul {machine['matmul_flops'] / 1e9:.0f} GFLOP/s, "
            f"copy bandwidth {machine['bandwidth_bytes_s'] / 1e9:.1f} GB/s, read bandwidth "
            f"{machine['read_bandwidth_bytes_s'] / 1e9:.1f} GB/s; torch {machine['torch']}")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(fraction: float | None) -> str:
    return _fmt(None if fraction is None else 100 * fraction, ".0f")


TABLE_HEADERS = ["arch", "context", "kv bits", "params", "prefill s", "% peak", "linear % peak", "peak mem", "cache",
                 "decode tok/s", "decode MB/token", "% bandwidth", "budget batch", "budget tok/s"]


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        star = "*" if r["extrapolated"] else ""
        rows.append([r["arch"] + star, str(r["context"]), str(r.get("kv_bits", "-")), f"{r['params'] / 1e6:.1f}M", _fmt(r["prefill_s"], ".2f"),
                     _percent(r["prefill_peak_fraction"]), _percent(r.get("linear_peak_fraction")),
                     format_bytes(r["peak_mem_bytes"], 1), format_bytes(r["cache_bytes"], 1), _fmt(r["decode_tok_s"], ".1f"),
                     _fmt(r["decode_read_bytes_per_token"] / 1e6, ".1f"),
                     _percent(r["decode_bandwidth_fraction"]),
                     str(r["budget_batch"]), _fmt(r["budget_tok_s"], ".1f")])
    return rows


def ratio_rows(report: dict, base: str = "hf-llama", arch: str = "yoco-swa") -> list[str]:
    """Side-by-side ratios of `arch` against `base` at each context both have (unquantized caches)."""
    widths = [r.get("kv_bits") for r in report["results"]]
    plain = max((w for w in widths if w in (32, 16)), default=None)
    by = {(r["arch"], r["context"]): r for r in report["results"] if r.get("kv_bits") in (plain, None)}
    lines = []
    for context in report["settings"]["contexts"]:
        a, b = by.get((arch, context)), by.get((base, context))
        if not a or not b:
            continue
        parts = [f"{arch} vs {base} @ {context}:"]
        if b["prefill_s"]:
            parts.append(f"prefill {times(b['prefill_s'] / a['prefill_s'], 'faster', 'slower')}")
        parts.append(f"cache per token "
                     f"{times(b['cache_bytes_per_token'] / a['cache_bytes_per_token'], 'smaller', 'larger')} "
                     f"(in all {times(b['cache_bytes'] / a['cache_bytes'], 'smaller', 'larger')})")
        if a["peak_mem_bytes"] and b["peak_mem_bytes"]:
            parts.append(f"peak memory {times(b['peak_mem_bytes'] / a['peak_mem_bytes'], 'smaller', 'larger')}")
        parts.append(f"decode {times(a['decode_tok_s'] / b['decode_tok_s'], 'faster', 'slower')}")
        if a["budget_tok_s"] and b["budget_tok_s"]:
            parts.append(f"budget throughput {times(a['budget_tok_s'] / b['budget_tok_s'], 'higher', 'lower')}")
        lines.append(" ".join(parts[:1]) + " " + ", ".join(parts[1:]))
    return lines


def kv_bits_rows(report: dict) -> list[str]:
    """Each quantized row against the same architecture and context unquantized: cache and decode."""
    results = report["results"]
    plain = {(r["arch"], r["context"]): r for r in results if r.get("kv_bits") in (32, 16)}
    lines = []
    for r in results:
        base = plain.get((r["arch"], r["context"]))
        if r.get("kv_bits") in (32, 16, None) or base is None:
            continue
        lines.append(f"{r['arch']} @ {r['context']}, {r['kv_bits']}-bit K/V vs {base['kv_bits']}-bit: cache "
                     f"{times(base['cache_bytes'] / r['cache_bytes'], 'smaller', 'larger')}, decode "
                     f"{times(r['decode_tok_s'] / base['decode_tok_s'], 'faster', 'slower')}")
    return lines


def bench_figure(report: dict):
    """Memory, prefill time and throughput against context length (log-log), one line per arch."""
    from .report import plain_tick_labels, subplots

    panels = [("peak_mem_bytes", "peak memory growth in prefill (MiB)", 1 / (1 << 20)),
              ("cache_bytes", "cache after prefill (MiB)", 1 / (1 << 20)),
              ("prefill_s", "prefill time (s)", 1.0),
              ("prefill_peak_fraction", "prefill: % of measured matmul peak", 100.0),
              ("decode_tok_s", "decode tokens/s (batch 1)", 1.0),
              ("budget_tok_s", f"tokens/s within a {report['settings']['budget_bytes'] / GIB:.0f} GiB budget", 1.0)]
    fig, grid = subplots(2, 3, figsize=(13, 7.5))
    axes = grid.flatten()
    series = list(dict.fromkeys((r["arch"], r.get("kv_bits")) for r in report["results"]))
    several_widths = len({bits for _, bits in series}) > 1
    for ax, (key, title, scale) in zip(axes, panels):
        for arch, bits in series:
            rows = sorted((r for r in report["results"] if r["arch"] == arch and r.get("kv_bits") == bits
                           and r[key] is not None), key=lambda r: r["context"])
            measured = [r for r in rows if not r["extrapolated"]]
            label = f"{arch} ({bits}-bit K/V)" if several_widths else arch
            line, = ax.plot([r["context"] for r in measured], [r[key] * scale for r in measured], "o-", label=label)
            extra = [r for r in rows if r["extrapolated"]]
            if extra:
                pts = measured[-1:] + extra
                ax.plot([r["context"] for r in pts], [r[key] * scale for r in pts], "x--", color=line.get_color())
        ax.set_xscale("log", base=2)
        if key == "prefill_peak_fraction":
            ax.set_ylim(0, 100)  # a share of the machine's peak reads best on a linear scale
        else:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    machine = report["machine"]
    dashed = "; dashed = extrapolated" if any(r["extrapolated"] for r in report["results"]) else ""
    fig.suptitle(f"yoco bench ({report['settings']['preset']}, {report['settings']['dtype']}): {machine['cpu']}, "
                 f"{machine['threads']} threads{dashed}", fontsize=10)
    plain_tick_labels(fig)
    fig.tight_layout()
    return fig


def write_plot(report: dict, path: str | os.PathLike) -> None:
    from .report import save_figure

    save_figure(bench_figure(report), path)


__all__ = ["BENCH_ARCHS", "BenchError", "BenchSettings", "bench_figure", "kv_bits_rows", "prefill_flops", "run_bench",
           "write_plot"]
