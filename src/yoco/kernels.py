"""Softmax attention kernels and the one masking rule every attention cache obeys.

Every mask is built by ``slot_mask`` from slot numbers, so full, windowed, cached, padded, cross and
compressed attention obey one rule: a query at slot q sees an entry holding slot s iff ``0 <= s <= q``,
``q - s < window`` (if windowed), and ``s`` is a real token of its row (a pad query sees only itself,
so it stays finite). Entries may hold the same slots for every row (``[S]``: plain caches, in slot
order) or their own per row and K/V head (``[B, h, S]``: compressed caches, in any order).

The kernels (``attend``, ``chunk_attention``, ``causal_attention``) are what the caches run;
mixers never call them directly but through a cache's ``attend`` (``cache.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from .layers import Step, autocasting_to_bf16, rounded_to_bf16, widens_bf16


def slot_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, pad: torch.Tensor | None, window: int | None = None,
              *, none_if_unmasked: bool = True) -> torch.Tensor | None:
    """Boolean attention mask (True = may attend) of queries at ``q_slots`` [T] over entries holding
    ``k_slots``: [S] (every row alike; -1 for an empty entry, e.g. a ring buffer not yet full) gives
    [B or 1, 1, T, S]; [B, h, S] (per row and K/V head) gives [B, h, T, S].

    ``none_if_unmasked``: return None when nothing is masked, so the caller can take SDPA's unmasked
    (fastest) path. Finding that out reads the mask's values, a host synchronisation: the plain
    caches' per-step paths know it from Python ints instead (no padding, slot arithmetic, a ring's
    fill level), skip the call when nothing is masked and pass False (the compressed stores always
    mask, and pass False too)."""
    keys = k_slots if k_slots.dim() == 3 else k_slots[None, None]  # [B or 1, h or 1, S]
    rel = q_slots[:, None] - keys[..., None, :]  # [b, h, T, S]
    allowed = (rel >= 0) & (keys >= 0)[..., None, :]
    if window is not None:
        allowed &= rel < window
    if pad is not None:
        real_key = keys >= pad[:, None, None]  # [B, h, S]
        allowed = allowed & (real_key[..., None, :] | (rel == 0))
        if none_if_unmasked and bool(pad.max() == 0) and bool(allowed.all()):
            return None
        return allowed
    if none_if_unmasked and bool(allowed.all()):
        return None
    return allowed


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention; q [B, H, T, d], k/v [B, n_kv, S, d] with n_kv dividing H; ``scale`` None is
    SDPA's 1/sqrt(d)."""
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    if (T > 1 and widens_bf16(q.device) and torch.is_grad_enabled()
            and (q.dtype == torch.bfloat16 or autocasting_to_bf16(q.device))
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        # Training in bf16 (autocast, which runs SDPA in bf16) on a CPU without bf16 arithmetic: SDPA's
        # backward in bf16 takes 2.2-2.9x its time in fp32 there (8,192 queries: 2.7 s against 0.94 s;
        # the forward alike), so the values, rounded to bf16 as autocast would, are attended in fp32 and
        # the result rounded back.
        widened = mask if mask is None or mask.dtype == torch.bool else mask.float()
        with torch.autocast(q.device.type, enabled=False):
            o = attend(rounded_to_bf16(q), rounded_to_bf16(k), rounded_to_bf16(v), widened, causal, scale)
        return o.to(torch.bfloat16)
    if T == 1 and mask is None:
        fused = native_decode_attention(q, k, v, scale)
        if fused is not None:
            return fused[0]
    if T == 1 and H != n_kv:
        # Decode: fold each group's query heads into the query length so every K/V head is read once
        # for its whole group (about 2x faster than enable_gqa on CPU); a [B, 1, 1, S] mask broadcasts.
        o = F.scaled_dot_product_attention(q.reshape(B, n_kv, H // n_kv, d), k, v, attn_mask=mask, scale=scale)
        return o.reshape(B, H, 1, v.shape[-1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          enable_gqa=H != n_kv, scale=scale)


def native_library_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, in_graph: bool = False,
                       dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
    """The native kernels (``yoco.native``) for attention of q over k/v, or None where none applies: not
    on the CPU, not all of one of ``dtypes``, gradients wanted (PyTorch's autograd path), values whose
    rows are not dense, or the kernels not built; inside torch.compile too, unless the caller reaches
    them through a custom operator the graph can hold (``in_graph``)."""
    if (q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype and q.dtype in dtypes)
            or (torch.compiler.is_compiling() and not in_graph) or v.stride(-1) != 1
            or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        return None
    return native.library()


# At most this many queries per K/V head go to the native decode kernel (a decode step's group of query
# heads; a prefill chunk's many queries are faster as PyTorch's blockwise matmuls).
NATIVE_QUERIES = 64
# The widths (channels of a key or value row) the native decode kernels take.
NATIVE_WIDTHS = range(16, 513, 16)


def native_decode_buffers(q: torch.Tensor, n_kv: int, dv: int,
                          scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the native decode kernels take and fill, for queries q [B, H, T, d] over n_kv K/V heads: the
    queries of each K/V head together, [B, n_kv, M = H / n_kv * T, d] float32, dense, already times the
    softmax scale (None: 1/sqrt(d)); and the empty outputs [B, n_kv, M, dv] and log-sum-exp [B, n_kv, M]
    (read back as [B, H, T, dv] and [B, H, T])."""
    B, H, T, d = q.shape
    M = (H // n_kv) * T
    grouped = (q.reshape(B, n_kv, M, d).float() * (d ** -0.5 if scale is None else scale)).contiguous()
    return grouped, torch.empty(B, n_kv, M, dv, dtype=torch.float32), torch.empty(B, n_kv, M, dtype=torch.float32)


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and log-sum-exp of q [B, H, T, d] over float32 or bfloat16 k/v [B, n_kv, S, d] by the
    native dense decode kernel, for shapes ``native_decode_attention`` has checked; where the kernel cannot run (the
    library gone, or its partial results not allocated) the formula computes the same."""
    B, H, T, d = q.shape
    h, S, dv = k.shape[1], k.shape[2], v.shape[-1]
    lib = native.library()
    if lib is not None:
        grouped, out, lse = native_decode_buffers(q, h, dv, scale)
        counts = torch.full((B,), S, dtype=torch.long)
        if not lib.yoco_dense_attention(grouped.data_ptr(), grouped.stride(0), grouped.stride(1),
                                        k.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                                        v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                        counts.data_ptr(), B, h, (H // h) * T, d, dv, k.dtype == torch.bfloat16,
                                        torch.get_num_threads(), out.data_ptr(), lse.data_ptr()):
            return out.reshape(B, H, T, dv).to(q.dtype), lse.reshape(B, H, T)
    scores = (q.reshape(B, h, H // h * T, d).float() * scale) @ k.float().transpose(-1, -2)
    lse = scores.logsumexp(-1)
    out = (scores - lse[..., None]).exp() @ v.float()
    return out.reshape(B, H, T, dv).to(q.dtype), lse.reshape(B, H, T)


# ``dense_decode`` as an operator torch.compile can hold in its graph (it cannot trace a ctypes call);
# eager code calls the function itself, without the dispatcher's overhead.
dense_decode_attention = torch.library.custom_op("yoco::dense_decode_attention", dense_decode, mutates_args=())


@dense_decode_attention.register_fake
def _(q, k, v, scale):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


def native_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Unmasked attention (and its float32 log-sum-exp [B, H, T]) of few queries q [B, H, T, d] over
    float32 or bfloat16 k/v [B, n_kv, S, d] (q of their dtype) by the native kernel
    (``csrc/decode_attention.c``: online softmax in float32, the keys split over both cores and merged
    by log-sum-exp, as Flash-Decoding does), or None where it does not apply: another dtype or device,
    gradients wanted, many queries, positions whose rows are not dense, widths
    the kernel does not take (the caller then takes PyTorch's path). Inside torch.compile it is reached
    through the operator ``dense_decode_attention``, so a compiled decode step reads a long cache as
    fast as an eager one."""
    B, H, T, d = q.shape
    h, S, dv = k.shape[1], k.shape[2], v.shape[-1]
    lib = native_library_for(q, k, v, in_graph=True, dtypes=(torch.float32, torch.bfloat16))
    if (lib is None or (H // h) * T > NATIVE_QUERIES or S == 0 or k.stride(-1) != 1
            or d not in NATIVE_WIDTHS or dv not in NATIVE_WIDTHS):
        return None
    scale = d ** -0.5 if scale is None else scale
    if torch.compiler.is_compiling():
        return dense_decode_attention(q, k, v, scale)
    return dense_decode(q, k, v, scale)


# Keys per block of the native window kernel (csrc/window_attention.c's KB): it takes the keys in blocks
# of this many positions, each block transposed.
WINDOW_KEY_BLOCK = 32


def native_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, earlier: int,
                            window: int, scale: float | None = None) -> torch.Tensor | None:
    """Sliding-window attention of the queries q [B, H, T, d] over k/v [B, n_kv, S = earlier + T, d] (the
    ``earlier`` keys before the queries, then their own): query t sees keys earlier + t - window < j <=
    earlier + t (window >= S: causal attention over every earlier key). ``scale`` None is 1/sqrt(d).
    Computed by the native kernel (``csrc/window_attention.c``: flash attention over the band only,
    each key block read once for a K/V head's query heads at 16 positions, and from memory once for 4
    such tiles, which take the keys span by span), or None where it does not
    apply (not float32 or bf16 on the CPU, gradients wanted, inside torch.compile, shapes it declines),
    and the caller takes PyTorch's path. bf16 is widened to fp32 for the kernel and the result rounded
    back: cheap beside the attention, which PyTorch's bf16 path runs several times slower on a CPU
    without bf16 arithmetic."""
    if q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu":
        out = native_window_attention(q.float(), k.float(), v.float(), earlier, window, scale)
        return None if out is None else out.to(torch.bfloat16)
    B, H, T, d = q.shape
    h, S = k.shape[1], k.shape[2]
    lib = native_library_for(q, k, v)
    if lib is None or S != earlier + T or q.stride(-1) != 1 or k.shape[-1] != d or v.shape[-1] != d:
        return None
    blocks = -(-S // WINDOW_KEY_BLOCK)
    keys = k.new_zeros(B, h, blocks * WINDOW_KEY_BLOCK, d)
    keys[:, :, :S] = k
    keys = keys.view(B, h, blocks, WINDOW_KEY_BLOCK, d).transpose(-1, -2).contiguous()  # [B, h, blocks, d, KB]
    out = torch.empty(B, H, T, d, dtype=torch.float32)
    status = lib.yoco_window_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                       keys.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
                                       v.data_ptr(), v.stride(0), v.stride(1), v.stride(2),
                                       B, H, h, T, S, d, earlier, window, d ** -0.5 if scale is None else scale,
                                       torch.get_num_threads(), out.data_ptr(), out.stride(0), out.stride(1),
                                       out.stride(2))
    return None if status else out


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, H, T, d] over k/v [B, n, S, d] under a per-head mask [B, h, T, S]: h = n (each
    K/V head its own entries: a group's query heads are folded into the query length, so the mask
    needs no copy per query head), or h = 1 (one mask for every head, e.g. entries decompressed into
    per-head keys)."""
    B, H, T, d = q.shape
    n, h = k.shape[1], mask.shape[1]
    if h != n:
        return attend(q, k, v, mask)
    G = H // n
    mask = mask[:, :, None].expand(B, h, G, T, mask.shape[-1]).reshape(B, h, G * T, -1)
    o = F.scaled_dot_product_attention(q.reshape(B, n, G * T, d), k, v, attn_mask=mask)
    return o.reshape(B, H, T, v.shape[-1])


# PyTorch's CPU flash-attention kernel also returns the log-sum-exp, which lets two attentions over
# disjoint key sets be merged exactly. Private API: used only where present, on CPU.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def flash_parts_available(q: torch.Tensor) -> bool:
    """Whether attention can run as flash-attention parts merged by their log-sum-exp (``merge_parts``)."""
    return q.device.type == "cpu" and _FLASH_CPU is not None


def flash_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
               scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One unmasked (or top-left causal) flash attention and its log-sum-exp [B, H, T]."""
    out, lse = _FLASH_CPU(*_rows_dense(q, k, v), 0.0, causal, scale=scale)[:2]
    return out, lse


def _rows_dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The private CPU flash kernel reads each row as if its last dim were contiguous (torch 2.13: a
    transposed key gives wrong results, not an error); SDPA makes them so before calling it, and so do we."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def attention_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                   causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, T, d] over k/v [B, n_kv, S, d] (n_kv dividing H) and its log-sum-exp
    [B, H, T], for merging with other parts (``merge_parts``). ``allowed`` [B, 1, T, S] (True = may
    attend; None: everything, or top-left ``causal``). A query that may see none of these keys gets
    output 0 and log-sum-exp -inf (it weighs nothing in the merge)."""
    if allowed is not None and causal:
        raise ValueError("give a mask or causal, not both")
    B, H, T, d = q.shape
    n_kv = k.shape[1]
    if allowed is not None and allowed.shape[1] not in (1, H):
        # a mask per K/V head (entries differ per head): fold each group's query heads into the query
        # length so the mask needs no copy per query head (as ``grouped_attention``)
        G = H // n_kv
        allowed = allowed[:, :, None].expand(B, n_kv, G, T, allowed.shape[-1]).reshape(B, n_kv, G * T, -1)
        out, lse = attention_part(q.reshape(B, n_kv, G * T, d), k, v, allowed, scale=scale)
        return out.reshape(B, H, T, out.shape[-1]), lse.reshape(B, H, T)
    if flash_parts_available(q):
        if allowed is None:
            return flash_part(q, k, v, causal, scale)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        out, lse = _FLASH_CPU(*_rows_dense(q, k, v), 0.0, False, attn_mask=bias, scale=scale)[:2]
        # (the kernel gives a query that sees nothing log-sum-exp 0, not -inf)
        return out, lse.masked_fill(~allowed.any(-1), float("-inf"))
    group = H // n_kv
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (d ** -0.5 if scale is None else scale)
    if causal:
        allowed = torch.ones(T, k.shape[2], dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = scores.logsumexp(-1)
    weights = (scores - lse[..., None]).exp().nan_to_num(0.0)
    return (weights @ v.float()).to(q.dtype), lse


def merge_parts(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """The attention over the union of disjoint key sets, from each set's (output, log-sum-exp): each
    output weighted by its share of the softmax mass (every query must see a key of some part)."""
    if len(parts) == 1:
        return parts[0][0]
    top = torch.stack([lse for _, lse in parts]).amax(0)
    total = weighted = None
    for out, lse in parts:
        w = (lse - top).exp()[..., None]
        weighted = out.float() * w if weighted is None else weighted + out.float() * w
        total = w if total is None else total + w
    return (weighted / total).to(dtype)


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal attention of a chunk of T queries whose keys k/v [B, n_kv, S, d] end with the chunk's own
    (no padding): the S - T earlier keys are fully visible, the last T causal.

    On CPU this runs as two unmasked flash attentions (prefix, and the chunk with is_causal) merged by
    their log-sum-exp, about 15% faster than one attention with an explicit [T, S] mask, which the
    kernel expands to a float mask and reads for every block.
    """
    T, S = q.shape[2], k.shape[2]
    if not flash_parts_available(q) or S == T:
        mask = None  # a single query after every key (its own last) sees them all
        if T > 1:
            q_slots = torch.arange(S - T, S, device=q.device)
            mask = slot_mask(q_slots, torch.arange(S, device=q.device), None, none_if_unmasked=False)
        return attend(q, k, v, mask, causal=S == T, scale=scale)
    return merge_parts([flash_part(q, k[:, :, : S - T], v[:, :, : S - T], False, scale),
                        flash_part(q, k[:, :, S - T:], v[:, :, S - T:], True, scale)], q.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step,
                     scale: float | None = None) -> torch.Tensor:
    """Queries at the step's slots against keys at slots 0..S-1 (a cache's, or this call's own when the
    call starts at slot 0), picking the fastest exact path. Which path, and whether anything is masked,
    follows from the step's ints and whether rows are padded (a padded row always hides its pads from
    its queries at decode), never from tensor values: no host synchronisation."""
    if step.pad is None:
        if step.length == 1:
            return attend(q, k, v, scale=scale)  # one query, keys ending with its own: it sees them all
        # the window kernel with a window past every key: 1.04-1.8x PyTorch's CPU flash attention
        # (1K-64K keys, 2 cores; it reads each key block once for a K/V head's query heads)
        fused = native_window_attention(q, k, v, k.shape[2] - step.length, k.shape[2], scale)
        if fused is not None:
            return fused
        if step.start == 0:
            return attend(q, k, v, causal=True, scale=scale)
        return chunk_attention(q, k, v, scale)
    mask = slot_mask(step.slots, torch.arange(k.shape[2], device=q.device), step.pad, none_if_unmasked=False)
    return attend(q, k, v, mask, scale=scale)
