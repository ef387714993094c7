"""Weight layers that are linear maps without being nn.Linear: transformers' Conv1D and the
projections of nn.MultiheadAttention.

A method reaches them through its Linear class's ``rp_linear(x, weight, bias)`` (the method's
linear map y = x weight^T + bias for any weight tensor, views included: autograd carries the
weight gradient back to the parameter the view is taken from):

- Conv1D (GPT-2): y = x W + b with W of shape (in, out) is ``rp_linear(x, W^T, b)``. It is
  recognised by duck typing (:func:`is_conv1d`), so transformers is never imported; convert
  combines the method's mixin (registered under ``randprop.config.CONV1D``) with the model's
  own Conv1D class.
- nn.MultiheadAttention: its forward (F.multi_head_attention_forward) reads ``in_proj_weight``
  and ``out_proj.weight`` directly, so converting ``out_proj`` alone would change nothing.
  :class:`MultiheadAttentionLayer` computes the same attention with the in-projection through
  ``rp_linear`` and the out-projection by calling the ``out_proj`` module (which convert turns
  into the method's Linear), so that both are estimated. Without grad enabled it is PyTorch's
  own forward (fast path included).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from randprop.methods.base import RandomizedLayer


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D: class named Conv1D, int ``nf`` and ``nx``, a
    2-d ``weight`` of shape (nx, nf) and a ``bias`` of shape (nf,) or None. Checked by duck
    typing, without importing transformers."""
    if type(module).__name__ != "Conv1D":
        return False
    nf, nx = getattr(module, "nf", None), getattr(module, "nx", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        isinstance(nf, int)
        and isinstance(nx, int)
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (nx, nf)
        and (bias is None or isinstance(bias, torch.Tensor) and tuple(bias.shape) == (nf,))
    )


class Conv1DLayer(RandomizedLayer):
    """Mixin of a method's class for transformers' Conv1D: y = x W + b = rp_linear(x, W^T, b),
    W of shape (in, out), with ``rp_linear`` the method's (its Linear class's); the parameter
    and its state_dict key stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.shape[:-1], self.nf)
        out = self.rp_linear(x.reshape(-1, x.shape[-1]), self.weight.t(), self.bias)
        return out.view(size_out)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True: not attended) as an additive float mask, as PyTorch's MHA does."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating types of masks are supported; got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttentionLayer(RandomizedLayer):
    """Mixin of a method's class for nn.MultiheadAttention: PyTorch's attention with the
    in-projection (``in_proj_weight``, or ``q/k/v_proj_weight``) through the method's
    ``rp_linear`` and the out-projection through the ``out_proj`` module. The forward equals
    nn.MultiheadAttention's (same arguments, batch_first, masks, need_weights, is_causal,
    add_bias_kv, add_zero_attn, dropout); each in-projection call draws one seed."""

    def rp_needs_weight_grad(self) -> bool:
        weights = (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        return torch.is_grad_enabled() and any(w is not None and w.requires_grad for w in weights)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not torch.is_grad_enabled() or query.dim() not in (2, 3):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" relations of the inputs
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (t.transpose(1, 0) for t in (query, key))
                    value = key
            else:
                query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        out, weights = self._attention(
            query, key, value, key_padding_mask, need_weights, attn_mask,
            average_attn_weights, is_causal, batched,
        )  # fmt: skip
        if self.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attention(
        self, query, key, value, key_padding_mask, need_weights, attn_mask,
        average_attn_weights, is_causal, batched,
    ):  # fmt: skip
        """F.multi_head_attention_forward (sequence-first), projections as the class says."""
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        key_padding_mask = _float_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = _float_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self._in_projection(query, key, value)
        src_len = key.shape[0]
        if attn_mask is not None and attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                    f"{(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz * heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            key_padding_mask = (
                key_padding_mask.view(bsz, 1, 1, src_len)
                .expand(-1, heads, -1, -1)
                .reshape(bsz * heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, heads, -1, src_len)
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        return (out.squeeze(1) if not batched else out), None

    def _in_projection(self, query, key, value):
        """q, k, v as F.multi_head_attention_forward projects them (packed where it packs)."""
        linear, bias, embed = self.rp_linear, self.in_proj_bias, query.size(-1)
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None,) * 3 if bias is None else bias.chunk(3)
            return (
                linear(query, self.q_proj_weight, b_q),
                linear(key, self.k_proj_weight, b_k),
                linear(value, self.v_proj_weight, b_v),
            )
        weight = self.in_proj_weight
        if key is value and query is key:
            proj = linear(query, weight, bias).unflatten(-1, (3, embed))
            proj = proj.unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        if key is value:
            w_q, w_kv = weight.split([embed, embed * 2])
            b_q, b_kv = (None, None) if bias is None else bias.split([embed, embed * 2])
            kv = linear(key, w_kv, b_kv).unflatten(-1, (2, embed))
            kv = kv.unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return linear(query, w_q, b_q), kv[0], kv[1]
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = (None,) * 3 if bias is None else bias.chunk(3)
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)
