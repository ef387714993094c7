"""Exact attention that stores no L x S tensor for backward, with dropout by seed.

For queries Q (..., L, E), keys K (..., S, E) and values V (..., S, Ev), scores
S = scale * Q K^T + M (M the additive mask; a boolean mask adds -inf where False), row-wise
probabilities P = softmax(S), dropped P_d = P * Z / (1 - p) with Z ~ Bernoulli(1 - p), and
O = P_d V. Forward keeps Q, K and V only; backward recomputes P (the same fused softmax on the
same scores: the very P of forward) a chunk of query rows at a time and regenerates Z from the
seed, so no L x S tensor is saved and the temporaries are chunk x S:
    dV = P_d^T dO,   dP = (dO V^T) * Z / (1 - p),   D = rowsum(P * dP),
    dS = P * (dP - D),   dQ = scale * dS K,   dK = scale * dS^T Q.
A chunk holds whole rows, so D comes from the chunk itself and O is not kept (a kernel tiled
over keys as well, like flash attention, needs O for D = rowsum(dO * O)). A row with every key
masked gives a zero output, as PyTorch's scaled_dot_product_attention does. The 1 / (1 - p)
is applied to the chunk x Ev products rather than to the chunk x S ones (fewer passes).

With ``fused`` and without dropout, where PyTorch's own fused kernel saves no L x S tensor
(Q, K, V, O and l: the CPU flash kernel for 4-D inputs with no mask or a float mask; the CUDA
flash and efficient kernels), :func:`attention` calls it instead. By default it keeps only Q, K
and V and re-runs the fused forward in backward for O and l (exact: the same kernel on the same
inputs; it costs one fused forward more); ``keep_output=True`` keeps O and l as PyTorch does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from randprop import random as rnd
from randprop.methods.base import needs_grad

#: query rows per chunk of the pure-PyTorch path; its temporaries are batch x chunk x S
DEFAULT_CHUNK = 128
#: transformers attention implementations registered by :func:`register_transformers`:
#: PyTorch's fused kernel where it is compact (else the chunked Function), and the chunked
#: Function always
TRANSFORMERS_NAME = "randprop"
TRANSFORMERS_CHUNKED_NAME = "randprop_chunked"
#: ... and PyTorch's fused kernel keeping its output, as PyTorch does (faster, one O more saved)
TRANSFORMERS_KEEP_OUTPUT_NAME = "randprop_keep_output"

_FUSED_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores and softmax run in float32 for 16-bit inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Spec:
    """What forward and backward share to recompute a chunk of probabilities."""

    __slots__ = ("scale", "causal", "dropout_p", "seed", "chunk", "rep")

    def __init__(self, scale, causal, dropout_p, seed, chunk, rep):
        self.scale, self.causal, self.dropout_p = scale, causal, dropout_p
        self.seed, self.chunk, self.rep = seed, chunk, rep


def _chunk_scores(
    spec: _Spec, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, r0: int, r1: int
) -> tuple[torch.Tensor, int]:
    """scale * Q[r0:r1] K^T + M[r0:r1] in the work dtype, and the number of key columns used
    (under is_causal only columns < r1 can be attended, so later ones are not computed)."""
    n_cols = min(k.shape[-2], r1) if spec.causal else k.shape[-2]
    s = (q[..., r0:r1, :] @ k[..., :n_cols, :].transpose(-2, -1)).mul_(spec.scale)
    if spec.causal:
        rows = torch.arange(r0, r1, device=s.device).unsqueeze(-1)
        cols = torch.arange(n_cols, device=s.device)
        future = torch.zeros((r1 - r0, n_cols), dtype=s.dtype, device=s.device)
        s = s.add_(future.masked_fill_(cols > rows, -math.inf))  # faster than a masked fill
    elif mask is not None:
        m = mask if mask.dim() < 2 or mask.shape[-2] == 1 else mask[..., r0:r1, :]
        if m.dtype == torch.bool:
            s = s.masked_fill(m.logical_not(), -math.inf)  # s broadcast to the mask's batch
        else:
            s = s + m.to(s.dtype)
    return s, n_cols


def _chunk_probs(
    spec: _Spec, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, r0: int, r1: int
) -> tuple[torch.Tensor, int]:
    """P = softmax(S) of query rows r0:r1 (PyTorch's fused softmax; a row with every key
    masked is 0, as in scaled_dot_product_attention) and the number of key columns used.
    Deterministic, so backward recomputes the very P of forward."""
    s, n_cols = _chunk_scores(spec, q, k, mask, r0, r1)
    p = torch.softmax(s, dim=-1)
    if mask is not None:  # only a mask can leave a row with no key: softmax gives NaN there
        p = p.masked_fill_(s.amax(-1, keepdim=True) == -math.inf, 0.0)
    return p, n_cols


def _keep(spec: _Spec, index: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """The dropout keep-mask of chunk ``index`` as 1.0 / 0.0 in ``like``'s dtype: from its own
    generator seeded by (seed, chunk index), so backward regenerates it exactly (a compiled
    call's tensor seed: drawn inside the custom op ``randprop::attention_keep``, the same mask
    as eager)."""
    if isinstance(spec.seed, torch.Tensor):
        empty = like.new_empty(())
        return torch.ops.randprop.attention_keep(
            empty, list(shape), spec.dropout_p, spec.seed, index
        )
    return _keep_mask(spec.seed, index, tuple(shape), spec.dropout_p, like)


def _keep_mask(
    seed: int, index: int, shape: tuple[int, ...], p: float, like: torch.Tensor
) -> torch.Tensor:
    """``rnd.bernoulli_mask(shape, 1 - p, generator)`` (uniform draws below 1 - p), compared
    in place: 1.0 / 0.0 in ``like``'s dtype."""
    gen = rnd.generator(rnd.derive_seed(seed, layer=index), like.device)
    keep = torch.rand(shape, generator=gen, device=like.device).lt_(1.0 - p)
    return keep.to(like.dtype)


@torch.library.custom_op("randprop::attention_keep", mutates_args=())
def _keep_op(
    like: torch.Tensor, shape: list[int], p: float, seed: torch.Tensor, index: int
) -> torch.Tensor:
    return _keep_mask(int(seed), index, tuple(shape), p, like)


@_keep_op.register_fake
def _(like, shape, p, seed, index) -> torch.Tensor:
    return like.new_empty(shape)


def _drop_scale(spec: _Spec) -> float:
    """1 / (1 - p), the rescaling of the kept probabilities (0 when p = 1: nothing kept)."""
    return 0.0 if spec.dropout_p >= 1.0 else 1.0 / (1.0 - spec.dropout_p)


def _expand_kv(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=-3)


def _reduce_kv(g: torch.Tensor, rep: int) -> torch.Tensor:
    return g if rep == 1 else g.unflatten(-3, (g.shape[-3] // rep, rep)).sum(-3)


def _chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(r0, min(r0 + chunk, length)) for r0 in range(0, length, chunk)]


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, spec: _Spec):
        work = _work_dtype(q.dtype)
        # dense (a head split of one projection is strided: every product would copy it)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        qw, kw, vw = q.to(work), _expand_kv(k, spec.rep).to(work), _expand_kv(v, spec.rep).to(work)
        outs = []
        for index, (r0, r1) in enumerate(_chunks(q.shape[-2], spec.chunk)):
            p, n_cols = _chunk_probs(spec, qw, kw, mask, r0, r1)
            if spec.dropout_p > 0:  # (P Z) V / (1 - p): the rescaling on the smaller output
                p = p.mul_(_keep(spec, index, p.shape, p))
                outs.append((p @ vw[..., :n_cols, :]).mul_(_drop_scale(spec)))
            else:
                outs.append(p @ vw[..., :n_cols, :])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)
        ctx.save_for_backward(_own(q), _own(k), _own(v), mask)
        ctx.spec = spec
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        spec: _Spec = ctx.spec
        work = _work_dtype(q.dtype)
        qw, kw, vw = q.to(work), _expand_kv(k, spec.rep).to(work), _expand_kv(v, spec.rep).to(work)
        do = grad_out.to(work).contiguous()
        batch = grad_out.shape[:-2]
        chunks = _chunks(q.shape[-2], spec.chunk)
        one = len(chunks) == 1 and (not spec.causal or chunks[0][1] >= kw.shape[-2])
        if not one:
            dk = torch.zeros((*batch, *kw.shape[-2:]), dtype=work, device=q.device)
            dv = torch.zeros((*batch, *vw.shape[-2:]), dtype=work, device=q.device)
        mask_grad = ctx.needs_input_grad[3]
        if mask_grad:
            padded = (1,) * (len(batch) + 2 - mask.dim()) + tuple(mask.shape)
            dm = torch.zeros(padded, dtype=work, device=q.device)
        drop = _drop_scale(spec) if spec.dropout_p > 0 else 1.0
        dqs = []
        for index, (r0, r1) in enumerate(chunks):
            # with Z the 0/1 keep-mask and c = 1 / (1 - p): dV = c (P Z)^T dO,
            # dP = c (dO V^T) Z =: c G, dS = P (dP - rowsum(P dP)) = c P (G - rowsum(P G))
            p, n_cols = _chunk_probs(spec, qw, kw, mask, r0, r1)
            do_c = do[..., r0:r1, :]
            g = do_c @ vw[..., :n_cols, :].transpose(-2, -1)
            if spec.dropout_p > 0:
                keep = _keep(spec, index, p.shape, p)
                dv_c = ((p * keep).transpose(-2, -1) @ do_c).mul_(drop)
                g = g.mul_(keep)
                del keep
            else:
                dv_c = p.transpose(-2, -1) @ do_c
            ds = g.sub_((p * g).sum(-1, keepdim=True)).mul_(p)  # dS / c
            del p, g
            if mask_grad:
                if padded[-2] == 1:
                    dm += ds.sum_to_size(padded) * drop
                else:
                    dm[..., r0:r1, :] += ds.sum_to_size((*padded[:-2], r1 - r0, padded[-1])) * drop
            dqs.append((ds @ kw[..., :n_cols, :]).mul_(spec.scale * drop))
            dk_c = (ds.transpose(-2, -1) @ qw[..., r0:r1, :]).mul_(spec.scale * drop)
            if one:
                dk, dv = dk_c, dv_c
            else:
                dk[..., :n_cols, :] += dk_c
                dv[..., :n_cols, :] += dv_c
        dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, dim=-2)
        dq = dq.sum_to_size(q.shape).to(q.dtype)
        dk = _reduce_kv(dk.sum_to_size(kw.shape), spec.rep).to(k.dtype)
        dv = _reduce_kv(dv.sum_to_size(vw.shape), spec.rep).to(v.dtype)
        dmask = dm.reshape(mask.shape).to(mask.dtype) if mask_grad else None
        return dq, dk, dv, dmask, None


class _FusedRecomputeFn(torch.autograd.Function):
    """PyTorch's fused attention saving only Q, K, V (and a float mask): backward re-runs the
    fused forward, under the autocast state of the forward, for O and l, then the fused
    backward."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal: bool, scale: float, gqa: bool):
        out = F.scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale=scale,
                                             enable_gqa=gqa)  # fmt: skip
        ctx.save_for_backward(_own(q), _own(k), _own(v), mask)
        device = q.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.args = (causal, scale, gqa, device, autocast)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        causal, scale, gqa, device, (enabled, dtype) = ctx.args
        needs = ctx.needs_input_grad[:3]
        leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), needs, strict=True)]
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = F.scaled_dot_product_attention(*leaves, mask, 0.0, causal, scale=scale,
                                                 enable_gqa=gqa)  # fmt: skip
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if need else None for need in needs), None, None, None, None)


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a compact copy where it views a larger storage (as the query, key and value
    split from one projection): saving the view would hold all of that storage. The copy is
    never larger than what it replaces. While torch.compile traces, ``t`` (what a compiled
    graph saves is the compiler's choice)."""
    if (
        torch.compiler.is_compiling()
        or t.untyped_storage().nbytes() <= t.numel() * t.element_size()
    ):
        return t
    # dense, with its dims in the same memory order (the fused kernel's output follows it)
    order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    return t.permute(order).contiguous().permute([order.index(d) for d in range(t.dim())])


def _fused_is_compact(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> bool:
    """Whether PyTorch's scaled_dot_product_attention, without dropout, runs a fused kernel that
    saves only Q, K, V, O, the logsumexp (and a float mask as given): measured on CPU (flash
    kernel for 4-D inputs; a boolean mask would be converted to a new L x S float tensor and
    saved), asked of PyTorch on CUDA."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if mask is not None and (mask.dtype == torch.bool or mask.requires_grad):
        return False
    if q.device.type == "cpu":
        return q.dtype in _FUSED_CPU_DTYPES
    if q.device.type == "cuda":
        params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, causal, False)
        return torch.backends.cuda.can_use_flash_attention(
            params
        ) or torch.backends.cuda.can_use_efficient_attention(params)
    return False


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    seed: int | None = None,
    enable_gqa: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    fused: bool = True,
    keep_output: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention whose backward stores no L x S tensor.

    query (..., L, E), key (..., S, E), value (..., S, Ev); attn_mask boolean (True: attend) or
    additive float, broadcastable to (..., L, S); is_causal the top-left-aligned causal mask;
    scale defaults to 1 / sqrt(E); enable_gqa lets key and value have fewer heads (dim -3) than
    query, as in PyTorch. Dropout on the attention probabilities keeps only an integer seed: the
    mask of each chunk of ``chunk_size`` query rows is drawn from a generator seeded with
    (seed, chunk index) and regenerated in backward. ``seed`` None draws one from PyTorch's
    default CPU generator when dropout_p > 0 (as F.dropout consumes it), so torch.manual_seed
    controls it and activation checkpointing replays it. Without dropout and with ``fused``,
    PyTorch's fused kernel is called where it saves no L x S tensor itself (see
    :func:`_fused_is_compact`), saving Q, K, V and re-running its forward in backward for the
    output O and logsumexp, or with ``keep_output`` saving O and the logsumexp as PyTorch does
    (no re-run: faster, one O more saved); ``fused=False`` always runs the chunked pure-PyTorch
    Function (saves Q, K and V).
    """
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set: pass one of them")
    if query.dim() < 2 or key.dim() < 2 or value.dim() < 2:
        raise ValueError(
            "query, key and value must have at least 2 dims (..., L, E), (..., S, E), (..., S, Ev)"
        )
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"query (..., L, E) and key (..., S, E) must share E, key and value (..., S, Ev) "
            f"share S; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
            f"value {tuple(value.shape)}"
        )
    if attn_mask is not None and not (
        attn_mask.dtype == torch.bool or attn_mask.is_floating_point()
    ):
        raise ValueError(f"attn_mask must be boolean or floating point, got {attn_mask.dtype}")
    rep = 1
    if enable_gqa and query.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if hk != value.shape[-3] or hq % hk:
            raise ValueError(
                f"with enable_gqa, key and value heads (dim -3) must be equal and divide the "
                f"query heads; got query {hq}, key {hk}, value {value.shape[-3]}"
            )
        rep = hq // hk
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    if fused and dropout_p == 0.0 and _fused_is_compact(query, key, value, attn_mask, is_causal):
        if not keep_output and needs_grad(query, key, value) and torch.compiler.is_compiling():
            # the same recompute, in the form a compiler traces (non-reentrant checkpoint)
            return checkpoint(F.scaled_dot_product_attention, query, key, value, attn_mask, 0.0,
                              is_causal, scale=scale, enable_gqa=rep > 1, use_reentrant=False)  # fmt: skip
        if not keep_output and needs_grad(query, key, value):
            return _FusedRecomputeFn.apply(query, key, value, attn_mask, is_causal, scale, rep > 1)
        q, k, v = _own(query), _own(key), _own(value)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=rep > 1
        )
    if dropout_p > 0.0 and seed is None:  # while compiling, the draw as a tensor, not read back
        seed = torch.randint(0, 2**62, (), device="cpu")
        seed = seed if torch.compiler.is_compiling() else int(seed)
    seed = seed if isinstance(seed, torch.Tensor) else int(seed or 0)
    spec = _Spec(scale, bool(is_causal), float(dropout_p), seed, chunk_size, rep)
    return _AttentionFn.apply(query, key, value, attn_mask, spec)


# -- transformers


def transformers_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    fused: bool = True,
    keep_output: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (as its sdpa_attention_forward): query, key,
    value (batch, heads, L, head_dim) -> ((batch, L, heads, head_dim), None). Dropout applies
    only while ``module.training``; its seed comes from the default CPU generator, which
    transformers' own dropout would consume. ``fused`` and ``keep_output`` as in
    :func:`attention`."""
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"the {TRANSFORMERS_NAME!r} attention does not support softcap; use 'eager' for "
            f"this model"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length = query.shape[2]
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:  # top-left alignment equals bottom-right here
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # folded into a float mask, as transformers' sdpa does
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        if is_causal:
            position_bias = position_bias[..., : key.shape[2]]
        attention_mask = create_position_bias_mask(
            position_bias, attention_mask, is_causal, query, key
        )
        is_causal = False
    out = attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout if module.training else 0.0,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=groups > 1,
        fused=fused,
        keep_output=keep_output,
    )
    return out.transpose(1, 2).contiguous(), None


def register_transformers() -> None:
    """Register :func:`transformers_attention_forward` as transformers' attention implementations
    ``"randprop"``, ``"randprop_chunked"`` (fused=False) and ``"randprop_keep_output"``
    (keep_output=True), with the masks transformers builds for "sdpa" (boolean, or none and
    is_causal when only causal). Imports transformers, which randprop otherwise never needs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRANSFORMERS_NAME, transformers_attention_forward)
    AttentionInterface.register(
        TRANSFORMERS_CHUNKED_NAME, functools.partial(transformers_attention_forward, fused=False)
    )
    AttentionInterface.register(
        TRANSFORMERS_KEEP_OUTPUT_NAME,
        functools.partial(transformers_attention_forward, keep_output=True),
    )
    for name in (TRANSFORMERS_NAME, TRANSFORMERS_CHUNKED_NAME, TRANSFORMERS_KEEP_OUTPUT_NAME):
        AttentionMaskInterface.register(name, sdpa_mask)


def use_compact_attention(
    model: nn.Module, *, fused: bool = True, keep_output: bool = False
) -> nn.Module:
    """Switch a transformers model (a PreTrainedModel) to randprop's attention: exact, no L x S
    tensor saved for backward, dropout by seed; ``fused`` and ``keep_output`` as in
    :func:`attention` (implementation "randprop"; fused=False: "randprop_chunked", the chunked
    Function always; keep_output=True: "randprop_keep_output"). Returns the model;
    ``model.set_attn_implementation("sdpa")`` switches back."""
    setter: Callable[[str], None] | None = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError(
            f"model must be a transformers PreTrainedModel (with set_attn_implementation); "
            f"got {type(model).__name__}"
        )
    if not isinstance(fused, bool) or not isinstance(keep_output, bool):
        raise TypeError(
            f"fused and keep_output must be True or False; got {fused!r}, {keep_output!r}"
        )
    register_transformers()
    if not fused:
        setter(TRANSFORMERS_CHUNKED_NAME)
    else:
        setter(TRANSFORMERS_KEEP_OUTPUT_NAME if keep_output else TRANSFORMERS_NAME)
    return model
