"""The blocks of a model: what activation checkpointing wraps and feedback rules end at.

A model's blocks are its list of blocks (an attribute named in ``BLOCK_LISTS``, at the top or
the shallowest below it: ``transformer.h`` of transformers' GPT-2, ``model.layers`` of LLaMA) or,
for an nn.Sequential stack, runs of its children that each start at a weight layer.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.conv import _ConvNd

BLOCK_LISTS = ("blocks", "layers", "layer", "h")


def _has_weight_layer(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Linear, _ConvNd)) for m in module.modules())


def sequential_blocks(model: nn.Sequential) -> list[list[nn.Module]]:
    """Split a Sequential into blocks: a new block starts at each child holding a Linear or conv
    layer; parameter-free layers, norms and activations join the block before them (leading
    ones, e.g. Flatten, join the first)."""
    groups: list[list[nn.Module]] = []
    for child in model.children():
        if not groups or (_has_weight_layer(child) and any(map(_has_weight_layer, groups[-1]))):
            groups.append([child])
        else:
            groups[-1].append(child)
    return groups


def find_block_list(model: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    """The model's list of blocks: its attribute named in ``BLOCK_LISTS`` or, failing that, the
    shallowest such non-empty list below it (``transformer.h`` of transformers' GPT-2,
    ``model.layers`` of LLaMA); None for a plain nn.Sequential or a model without one."""
    block_list = next(
        (getattr(model, n) for n in BLOCK_LISTS if isinstance(getattr(model, n, None), nn.Module)),
        None,
    )
    if block_list is None and not isinstance(model, nn.Sequential):
        nested = [
            (name.count("."), module)
            for name, module in model.named_modules()
            if name.rpartition(".")[2] in BLOCK_LISTS
            and isinstance(module, (nn.ModuleList, nn.Sequential))
            and len(module) > 0
        ]
        block_list = min(nested, key=lambda d: d[0])[1] if nested else None
    ok = isinstance(block_list, (nn.ModuleList, nn.Sequential)) and len(block_list) > 0
    return block_list if ok else None
