"""Random-configuration fuzz of every method over layer kinds, shapes and settings.

Each case is drawn from a seeded stream: a layer (Linear, Conv1d/2d/3d, RNN, LSTM, RNNCell,
LSTMCell) with random shape, stride, padding (ints, tuples, 'same', 'valid'; zeros, reflect,
replicate, circular), dilation, groups (depthwise included), bias, batched or unbatched input,
dtype (float32, float64, bfloat16 forward only), input layout (contiguous, strided,
channels_last for Conv2d/3d), what is frozen (nothing, the input, the bias or the weight), the
loss (a random projection of the outputs, or their plain sum: a gradient with zero strides), one
or two forward calls per step, and a method from rp.METHODS with random valid parameters (the
storage bits of the stored values included). :func:`check_case` runs two training
steps of the converted layer beside the same plain layer and checks that

- the forward equals PyTorch's, and so do the exact parts of the backward (input gradient where
  the method keeps it exact, bias gradients; for SparseVJP, every gradient equals PyTorch's
  backward of the sketched output gradient S G for the same draw of S, but for the weight
  gradients from k-bit stored rows);
- the global RNG is untouched;
- the same seed gives bitwise the same gradients, and a different seed different ones for a
  configuration that draws anything.

:func:`check_unbiased` averages K draws of the methods that claim unbiased gradients (RAD,
Trace, SparseVJP, CRS, Quant; AOP is biased by design) with stat_checks.assert_unbiased and
assert_no_scale_bias. The positive controls run the same checks on deliberately broken estimators, which must fail.

RANDPROP_FUZZ_CASES (default 200) scales the draw; a tenth of it (at least 20) are unbiasedness
cases. benchmarks/fuzz.py runs a larger sweep with the same harness.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import random
import warnings
from collections.abc import Callable

import pytest
import torch
from stat_checks import assert_no_scale_bias, assert_unbiased
from torch import nn

import randprop as rp
from randprop import random as rnd
from randprop.methods.aop import LayerState
from randprop.methods.crs import choose_rows
from randprop.methods.vjp import sparse_vjp

CASES = int(os.environ.get("RANDPROP_FUZZ_CASES", "200"))
STAT_CASES = max(20, CASES // 10)
STAT_DRAWS = 400
FUZZ_SEED = 11

#: Cases excluded with the reason (tag -> reason); none at present: empty shapes, once listed
#: here, now work as in plain PyTorch.
KNOWN: dict[str, str] = {}

CONVS = {"Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
RNNS = {"RNN": nn.RNN, "LSTM": nn.LSTM, "RNNCell": nn.RNNCell, "LSTMCell": nn.LSTMCell}
KINDS = {"Linear": nn.Linear, **CONVS, **RNNS}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
UNBIASED = ("rad", "trace", "vjp", "crs", "quant")  # AOP is biased by design; exact has no draws


@dataclasses.dataclass
class Case:
    """One drawn configuration: a layer, its input and a method (all plain data)."""

    index: int
    kind: str
    kwargs: dict
    shape: tuple[int, ...]
    state_shapes: tuple[tuple[int, ...], ...]  # initial states of recurrent layers (or none)
    dtype: str
    layout: str  # of the input: "contiguous", "channels_last" (Conv2d/3d) or "strided"
    frozen: str  # what needs no gradient: "", "input", "bias" or "weight"
    loss: str  # "dot": sum_i <u_i, output_i>, u_i random; "sum": the outputs' sum (strides 0)
    calls: int  # forward calls per step (a layer used twice in one graph: outputs added)
    method: str
    seed: int
    tags: tuple[str, ...] = ()

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return (
            f"#{self.index} {self.kind}({opts}) x{list(self.shape)} "
            f"states={list(self.state_shapes)} {self.dtype} {self.layout} "
            f"frozen={self.frozen or 'none'} loss={self.loss} calls={self.calls} "
            f"method={self.method} seed={self.seed}"
        )


# --- drawing cases ---------------------------------------------------------------------------


def _fraction(rng: random.Random, one: float = 0.15) -> float:
    return 1.0 if rng.random() < one else round(rng.uniform(0.05, 0.95), 3)


def _bits(rng: random.Random) -> int:
    """Storage bits of the stored values: full precision half the time, else 1, 2, 4 or 8."""
    return 32 if rng.random() < 0.5 else rng.choice([1, 2, 4, 8])


def draw_method(name: str, rng: random.Random, rows: int, out_features: int) -> rp.MethodConfig:
    """A random valid config of method ``name`` for a layer with ``rows`` input rows."""
    if name == "exact":
        return rp.Exact()
    if name == "rad":
        return rp.RAD(
            keep=_fraction(rng),
            mode=rng.choice(["sample", "project"]),
            same_sample=rng.random() < 0.3,
            bits=_bits(rng),
        )
    if name == "trace":
        return rp.Trace(
            probes=rng.randint(1, 12),
            probe=rng.choice(["gaussian", "rademacher", "orthogonal"]),
            channels=rng.choice(["multi", "independent"]),
            bits=_bits(rng),
        )
    if name == "vjp":
        sketch = rng.choice(["uniform", "optimal", "lowrank", "gaussian"])
        structures = (
            ["row", "column"] if sketch in ("lowrank", "gaussian") else ["element", "row", "column"]
        )
        structure = rng.choice(structures)
        budget = (
            "row"
            if (sketch, structure) == ("optimal", "element") and rng.random() < 0.5
            else "tensor"
        )
        row_storage = structure == "row" and sketch != "optimal"  # stores rows: bits apply
        return rp.SparseVJP(
            density=_fraction(rng),
            sketch=sketch,
            structure=structure,
            budget=budget,
            bits=_bits(rng) if row_storage else 32,
        )
    if name == "crs":
        return rp.CRS(
            keep=_fraction(rng),
            winners=round(rng.uniform(0, 0.9), 3) if rng.random() < 0.8 else 0.0,
            momentum=round(rng.uniform(0, 0.99), 3),
            bits=_bits(rng),
        )
    if name == "aop":
        target = rng.choice(["weight", "weight", "input", "both"])
        memory = "off" if target == "input" else rng.choice(["rows", "queue", "off"])
        common = dict(
            policy=rng.choice(["topk", "weighted", "random"]),
            memory=memory,
            decay=1.0 if rng.random() < 0.5 else round(rng.uniform(0.5, 1), 3),
            target=target,
            capacity=round(rng.uniform(0.5, 2), 3),
        )
        limit = min(rows, out_features) if target != "weight" else rows
        if rng.random() < 0.3 and limit >= 1:
            return rp.AOP(k=rng.randint(1, limit), **common)
        return rp.AOP(keep=_fraction(rng), **common)
    if name == "quant":
        group = 0 if rng.random() < 0.5 else rng.randint(1, 40)
        return rp.Quant(bits=rng.choice([1, 2, 4, 8]), group=group)
    raise AssertionError(f"no parameter drawer for method {name!r}: add one to the fuzz")


def method_names() -> list[str]:
    """Every registered method once (aliases such as 'sparsevjp' share a class)."""
    return sorted({cls.name for cls in rp.METHODS.values()})


def supported_kinds(name: str) -> list[str]:
    cfg = rp.METHODS[name]()
    kinds = [k for k, cls in KINDS.items() if cfg.layer_class(cls) is not None]
    return kinds or list(KINDS)  # exact converts nothing: any layer


def _draw_linear(rng: random.Random):
    empty = rng.choice(["batch", "in", "out"]) if rng.random() < 0.03 else ""
    n_in = 0 if empty == "in" else rng.randint(1, 9)
    n_out = 0 if empty == "out" else rng.randint(1, 7)
    kwargs = dict(in_features=n_in, out_features=n_out, bias=rng.random() < 0.7)
    lead = rng.choice([(), (rng.randint(1, 6),), (rng.randint(1, 4), rng.randint(1, 4)), (2, 2, 3)])
    if empty == "batch":
        lead = (0, *lead[1:]) if lead else (0,)
    return kwargs, (*lead, n_in), ()


def _draw_conv(kind: str, rng: random.Random):
    d = int(kind[-2])
    group_kind = rng.choice(["one", "one", "some", "depthwise"])
    if group_kind == "depthwise":
        c_in = rng.randint(1, 4)
        groups, c_out = c_in, c_in * rng.randint(1, 2)
    else:
        groups = 1 if group_kind == "one" else rng.randint(2, 3)
        c_in, c_out = groups * rng.randint(1, 2), groups * rng.randint(1, 3)

    def per_dim(low: int, high: int):
        values = tuple(rng.randint(low, high) for _ in range(d))
        return values[0] if rng.random() < 0.5 and len(set(values)) == 1 else values

    kernel, stride, dilation = per_dim(1, 3), per_dim(1, 3), per_dim(1, 2)
    style = rng.choice(["int", "tuple", "same", "valid"])
    if style == "same":
        padding, stride = "same", 1
    elif style == "valid":
        padding = "valid"
    elif style == "int":
        padding = rng.randint(0, 2)
    else:
        padding = tuple(rng.randint(0, 2) for _ in range(d))
    kwargs = dict(
        in_channels=c_in,
        out_channels=c_out,
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=rng.random() < 0.7,
        padding_mode=rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]),
    )
    high = {1: 12, 2: 8, 3: 5}[d]
    spatial = tuple(rng.randint(3, high) for _ in range(d))
    batch = () if rng.random() < 0.2 else (0 if rng.random() < 0.03 else rng.randint(1, 4),)
    return kwargs, (*batch, c_in, *spatial), ()


def _draw_rnn(kind: str, rng: random.Random):
    n_in, hidden = rng.randint(1, 5), rng.randint(1, 5)
    kwargs: dict = dict(input_size=n_in, hidden_size=hidden, bias=rng.random() < 0.7)
    if kind in ("RNN", "RNNCell"):
        kwargs["nonlinearity"] = "relu"
    unbatched = rng.random() < 0.25
    batch = rng.randint(1, 3)
    n_states = 2 if kind.startswith("LSTM") else 1
    with_state = rng.random() < 0.5
    if kind.endswith("Cell"):
        shape = (n_in,) if unbatched else (batch, n_in)
        state = (hidden,) if unbatched else (batch, hidden)
    else:
        layers = rng.randint(1, 2)
        kwargs.update(num_layers=layers, batch_first=rng.random() < 0.5)
        steps = rng.randint(1, 4)
        if unbatched:
            shape = (steps, n_in)
        else:
            shape = (batch, steps, n_in) if kwargs["batch_first"] else (steps, batch, n_in)
        state = (layers, hidden) if unbatched else (layers, batch, hidden)
    return kwargs, shape, (state,) * n_states if with_state else ()


def _rows(kind: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape[:-1]) if kind == "Linear" else 1


def draw_case(rng: random.Random, index: int, methods: list[str] | None = None) -> Case:
    """Draw one case; redraw until the plain PyTorch layer accepts it."""
    names = methods or method_names()
    while True:
        name = rng.choice(names)
        kind = rng.choice(supported_kinds(name))
        if kind == "Linear":
            kwargs, shape, states = _draw_linear(rng)
        elif kind in CONVS:
            kwargs, shape, states = _draw_conv(kind, rng)
        else:
            kwargs, shape, states = _draw_rnn(kind, rng)
        dtype = rng.choices(list(DTYPES), weights=[4, 5, 1])[0]
        layouts = ["contiguous", "contiguous", "strided"]
        if kind in ("Conv2d", "Conv3d") and len(shape) == int(kind[-2]) + 2:
            layouts.append("channels_last")
        layout = rng.choice(layouts)
        frozen = rng.choice(["", "", "", "input", "bias", "weight"])
        if frozen == "bias" and not kwargs.get("bias", True):
            frozen = ""
        out_features = kwargs.get("out_features", 1)
        cfg = draw_method(name, rng, _rows(kind, shape), out_features)
        empty = 0 in shape or 0 in (kwargs.get("in_features"), kwargs.get("out_features"))
        case = Case(
            index, kind, kwargs, shape, states, dtype, layout, frozen,
            "sum" if rng.random() < 0.15 else "dot", 2 if rng.random() < 0.15 else 1, str(cfg),
            rng.randrange(2**31), ("empty",) if empty else (),
        )  # fmt: skip
        if _plain_accepts(case):
            return case


def _plain_accepts(case: Case) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element weights, padding='same', even kernel
        try:
            module, inputs = build(case)
            module(*inputs)
        except (RuntimeError, ValueError):
            return False
    return True


def draw_cases(n: int, seed: int = FUZZ_SEED) -> list[Case]:
    """The ``n`` cases of the cheap checks."""
    rng = random.Random(seed)
    return [draw_case(rng, i) for i in range(n)]


def draw_stat_cases(n: int, seed: int = FUZZ_SEED + 1) -> list[Case]:
    """``n`` cases of the methods that claim unbiased gradients, with a trainable weight."""
    rng, cases = random.Random(seed), []
    while len(cases) < n:
        case = draw_case(rng, len(cases), list(UNBIASED))
        if not case.tags and case.frozen != "weight":
            cases.append(case)
    return cases


# --- running a case --------------------------------------------------------------------------


def build(case: Case, dtype: torch.dtype | None = None) -> tuple[nn.Module, list[torch.Tensor]]:
    """The plain layer (parameters from the case's seed) and its inputs."""
    dtype = dtype or DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(case.seed)
    module = KINDS[case.kind](**case.kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    module = module.to(dtype)
    for name, p in module.named_parameters():
        p.requires_grad_(not (case.frozen and name.startswith(case.frozen)))
    inputs = [torch.randn(case.shape, generator=gen).to(dtype)]
    if case.layout == "strided":  # every other element of a twice as long last dim
        wide = torch.randn((*case.shape[:-1], 2 * case.shape[-1]), generator=gen).to(dtype)
        inputs = [wide[..., ::2]]
    inputs += [torch.randn(s, generator=gen).to(dtype) for s in case.state_shapes]
    if case.layout == "channels_last":
        fmt = torch.channels_last if case.kind == "Conv2d" else torch.channels_last_3d
        module = module.to(memory_format=fmt)
        inputs = [x.contiguous(memory_format=fmt) for x in inputs]
    inputs = [x.requires_grad_(case.frozen != "input") for x in inputs]
    if case.state_shapes and case.kind in ("LSTM", "LSTMCell"):
        inputs = [inputs[0], tuple(inputs[1:])]
    return module, inputs


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return [out]


def _leaves(inputs) -> list:
    """Fresh leaf copies of the inputs (tuples of states kept as tuples) that require grad."""
    return [
        tuple(_leaves(list(x)))
        if isinstance(x, tuple)
        else x.detach().requires_grad_(x.requires_grad)
        for x in inputs
    ]


@dataclasses.dataclass
class Step:
    outputs: list[torch.Tensor]
    grads: dict[str, torch.Tensor | None]


def step(
    module: nn.Module, inputs: list, upstream: list[torch.Tensor] | str | None, calls: int = 1
) -> tuple[Step, list[torch.Tensor] | str]:
    """Forward (``calls`` times, outputs added), then backward of sum_i <upstream_i, output_i>
    (upstream None: draw it; "sum": the plain sum of the outputs); gradients by name."""
    module.zero_grad(set_to_none=True)
    leaves = _leaves(inputs)
    outputs = _flat(module(*leaves))
    for _ in range(calls - 1):
        outputs = [a + b for a, b in zip(outputs, _flat(module(*leaves)), strict=True)]
    if upstream is None:  # the plain reference draws the upstream gradients
        gen = torch.Generator().manual_seed(len(outputs))
        upstream = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    if upstream == "sum":
        sum(o.sum() for o in outputs).backward()
    else:
        sum(((o * u).sum() for o, u in zip(outputs, upstream, strict=True))).backward()
    grads = {f"input{i}": x.grad for i, x in enumerate(_flat(leaves))}
    grads.update({n: p.grad for n, p in module.named_parameters()})
    return Step([o.detach() for o in outputs], grads), upstream


def exact_grads(case: Case, cfg: rp.MethodConfig) -> set[str]:
    """Names of the gradients the method computes exactly (beside the forward)."""
    module, inputs = build(case)
    inputs_ = {f"input{i}" for i in range(len(_flat(inputs)))}
    params = {n for n, _ in module.named_parameters()}
    biases = {n for n in params if n.startswith("bias")}
    if cfg.name == "exact":
        return inputs_ | params
    if cfg.name in ("rad", "trace", "crs", "quant"):
        return inputs_ | biases
    if cfg.name == "aop":
        exact = {"weight": inputs_, "input": {"weight"}, "both": set()}[cfg.target]
        return biases | exact
    return set()  # SparseVJP: checked against the backward of the sketched signal


def tolerance(dtype: str) -> dict:
    return {
        "float64": dict(rtol=1e-9, atol=1e-10),
        "float32": dict(rtol=1e-4, atol=1e-5),
        "bfloat16": dict(rtol=2e-2, atol=2e-2),
    }[dtype]


Converter = Callable[[nn.Module, rp.MethodConfig, int], nn.Module]


def convert(plain: nn.Module, cfg: rp.MethodConfig, seed: int) -> nn.Module:
    """A converted copy of ``plain``; fails if a supported layer was left exact."""
    module = copy.deepcopy(plain)
    report = rp.convert(module, cfg, seed=seed)
    if cfg.layer_class(type(plain)) is not None:
        assert report.converted == [""], f"not converted: {report.skipped}"
    return module


class _VJPReference(nn.Module):
    """The plain layer followed by the SparseVJP sketch op, drawn with ``seeds`` in the order of
    the forward calls (rows: dim 0 of the batched input, columns: the feature / channel dim)."""

    def __init__(self, layer: nn.Module, cfg: rp.SparseVJP, seeds: list[int], unbatched: bool):
        super().__init__()
        self.layer, self.cfg, self.seeds, self.unbatched = layer, cfg, iter(seeds), unbatched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linear = isinstance(self.layer, nn.Linear)
        x = x.unsqueeze(0) if self.unbatched else x
        out = sparse_vjp(self.layer(x), self.cfg, next(self.seeds), -1 if linear else 1)
        return out.squeeze(0) if self.unbatched else out


def _unbatched(case: Case) -> bool:
    if case.kind == "Linear":
        return len(case.shape) == 1
    return case.kind in CONVS and len(case.shape) == int(case.kind[-2]) + 1


def is_random(
    case: Case,
    cfg: rp.MethodConfig,
    module: nn.Module,
    x: torch.Tensor,
    output: torch.Tensor,
    estimated: list[str],
) -> bool:
    """Whether the configuration draws enough that 8 other seeds cannot all repeat the
    gradients of the first (a conservative count of the distinct outcomes of one draw);
    ``estimated``: the names of the estimated gradients that are not zero."""
    shape = case.shape
    batched = (1, *shape) if _unbatched(case) else shape
    if cfg.name == "exact":
        return False
    if cfg.name == "rad":
        if case.kind == "Linear":
            sizes, groups = [shape[-1]], 1
        elif case.kind in CONVS:
            sizes, groups = [_padded_positions(module, batched)], batched[1]
        else:  # recurrent: the sketched inputs of the weights with a non-zero gradient
            hidden = case.kwargs["hidden_size"]
            sizes = [
                case.kwargs["input_size"] if n in ("weight_ih", "weight_ih_l0") else hidden
                for n in estimated
                if n.startswith("weight")
            ]
            groups = 1
        if cfg.mode == "project":
            return max(sizes, default=0) >= 3
        sizes = [groups * n if cfg.same_sample else n for n in sizes]
        return any(math.comb(n, rnd.kept_count(n, cfg.keep)) >= 5 for n in sizes)
    if cfg.name == "trace":
        n = _padded_positions(module, batched) * (batched[1] if cfg.channels == "multi" else 1)
        if cfg.probe == "orthogonal":
            return cfg.probes % n != 0
        return cfg.probe == "gaussian" or cfg.probes * (n - 1) >= 3
    if cfg.name == "vjp":
        if cfg.structure == "element":
            units = output.numel()
        elif cfg.structure == "row":
            units = 1 if _unbatched(case) else output.shape[0]
        else:
            units = output.shape[-1 if case.kind == "Linear" else (0 if _unbatched(case) else 1)]
        if cfg.sketch == "gaussian":
            return True
        if cfg.sketch == "lowrank":
            return rnd.kept_count(units, cfg.density) < units
        q = cfg.density
        return (q * q + (1 - q) ** 2) ** units <= 0.2
    if cfg.name == "crs":  # the rows kept depend on the data: the chance that 9 draws agree
        rows = x.detach().reshape(-1, x.shape[-1]).float().norm(dim=1)  # first-step scores
        k = rnd.kept_count(rows.numel(), cfg.keep)
        winners = math.floor(cfg.winners * k + 1e-9)
        picks = collections.Counter(
            tuple(sorted(choose_rows(rows, k, winners, rnd.generator(i))[0].tolist()))
            for i in range(200)
        )
        return sum((c / 200) ** 9 for c in picks.values()) < 1e-4
    if cfg.name == "quant":  # a group of three or more elements has a randomly rounded one
        if case.kind == "Linear":
            return (cfg.group or shape[-1]) >= 3 and math.prod(shape) >= 3
        return (cfg.group or _padded_positions(module, batched)) >= 3
    if cfg.name == "aop":
        rows, m = math.prod(shape[:-1]), case.kwargs["out_features"]
        checks = []
        if cfg.selects_weight and case.frozen != "weight":
            checks.append((rows, cfg.count(rows)))
        if cfg.selects_input and case.frozen != "input":
            checks.append((m, cfg.count(m)))
        return cfg.policy == "random" and any(math.comb(n, k) >= 5 for n, k in checks)
    return True


def _padded_positions(conv: nn.Module, batched: tuple[int, ...]) -> int:
    """Positions per channel of the input a converted convolution sketches (after any padding
    it applies to the input itself: non-zero padding modes and 'same')."""
    spatial = batched[2:]
    if conv.padding_mode == "zeros" and conv.padding != "same":
        return math.prod(spatial)
    pads = conv._reversed_padding_repeated_twice
    last = len(spatial) - 1
    return math.prod(
        s + pads[2 * (last - i)] + pads[2 * (last - i) + 1] for i, s in enumerate(spatial)
    )


def _state_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    return (
        {n: b.clone() for n, b in module.named_buffers()} if isinstance(module, LayerState) else {}
    )


def _load_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        module.register_buffer(name, value.clone())


def _assert_close(got, want, what: str, tol: dict) -> None:
    if want is None:
        assert got is None, f"{what}: a gradient where PyTorch has none"
        return
    assert got is not None, f"{what}: no gradient where PyTorch has one"
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what} differs from PyTorch: {m}")


def run_converted(case: Case, plain, inputs, upstream, cfg, seed, converter, steps: int = 2):
    """``steps`` steps of a converted copy: (module, Steps, the seeds each step's forward calls
    draw; these are recorded for SparseVJP only, whose backward is checked per draw)."""
    module = converter(plain, cfg, seed)
    results, seeds = [], []
    for _ in range(steps):
        if cfg.name == "vjp":
            seeds.append([module.rp_next_seed() for _ in range(case.calls)])
            module.rp_step -= case.calls  # the draws the layer is about to make
        results.append(step(module, inputs, upstream, case.calls)[0])
    return module, results, seeds


def _skip_known(case: Case) -> None:
    for tag in case.tags:
        if tag in KNOWN:
            pytest.skip(f"known: {KNOWN[tag]}")


def _upstream(case: Case) -> str | None:
    return "sum" if case.loss == "sum" else None


def _estimated(case: Case, cfg: rp.MethodConfig, ref: Step) -> list[str]:
    """The gradients the method estimates whose exact value is not zero (an estimate of zero,
    e.g. behind a ReLU that is off everywhere, is zero whatever the draw)."""
    exact = exact_grads(case, cfg)
    return [
        n for n, g in ref.grads.items() if n not in exact and g is not None and bool(g.ne(0).any())
    ]


def check_case(case: Case, converter: Converter = convert) -> None:
    """Forward, exact parts, global RNG and reproducibility of one case (see module doc)."""
    _skip_known(case)
    cfg = rp.parse_method(case.method)
    assert rp.parse_method(str(cfg)) == cfg
    tol = tolerance(case.dtype)
    plain, inputs = build(case)
    ref, upstream = step(plain, inputs, _upstream(case), case.calls)
    exact = exact_grads(case, cfg)
    rng_state = torch.get_rng_state()
    module, results, vjp_seeds = run_converted(
        case, plain, inputs, upstream, cfg, case.seed, converter
    )
    assert torch.equal(torch.get_rng_state(), rng_state), "the global RNG was advanced"
    for got in results:
        for i, (o, w) in enumerate(zip(got.outputs, ref.outputs, strict=True)):
            _assert_close(o, w, f"forward output {i}", tol)
            if case.layout == "channels_last":
                fmt = torch.channels_last if case.kind == "Conv2d" else torch.channels_last_3d
                assert o.is_contiguous(memory_format=fmt) == w.is_contiguous(memory_format=fmt), (
                    f"forward output {i}: another memory format than PyTorch's"
                )
        if case.dtype == "bfloat16":
            for name, g in got.grads.items():
                assert g is None or torch.isfinite(g.float()).all(), f"{name}: not finite"
            continue  # bfloat16: forward only
        for name in exact:
            _assert_close(got.grads[name], ref.grads[name], f"gradient {name}", tol)
    empty = inputs[0].numel() == 0 or any(p.numel() == 0 for p in plain.parameters())
    if cfg.name == "vjp" and case.dtype != "bfloat16":
        for got, draws in zip(results, vjp_seeds, strict=True):
            if empty:  # nothing to sketch: the plain op runs, every gradient is PyTorch's
                for name, g in got.grads.items():
                    _assert_close(g, ref.grads[name], f"gradient {name} (empty layer)", tol)
                continue
            reference = _VJPReference(plain, cfg, draws, _unbatched(case))
            want = step(reference, inputs, upstream, case.calls)[0]
            for name, g in got.grads.items():
                if cfg.bits < 32 and name.startswith("weight"):
                    continue  # from the k-bit stored rows: unbiased, see check_unbiased
                w = want.grads[name] if name in want.grads else want.grads[f"layer.{name}"]
                _assert_close(g, w, f"gradient {name} vs the backward of S G", tol)
    again = run_converted(case, plain, inputs, upstream, cfg, case.seed, converter)[1]
    for a, b in zip(results, again, strict=True):
        for name, g in a.grads.items():
            h = b.grads[name]
            same = g is None and h is None
            same = same or (g is not None and h is not None and torch.equal(g, h))
            assert same, f"gradient {name}: the same seed gave different values"
    estimated = _estimated(case, cfg, ref)
    if (
        estimated
        and not empty
        and is_random(case, cfg, module, inputs[0], ref.outputs[0], estimated)
    ):
        first = results[0].grads
        for other in range(1, 9):
            grads = run_converted(case, plain, inputs, upstream, cfg, case.seed + other,
                                  converter, 1)[1][0].grads  # fmt: skip
            if any(not torch.equal(grads[n], first[n]) for n in estimated):
                break
        else:
            raise AssertionError("eight other seeds all gave the same gradients")


def _draw_grads(module, inputs, upstream, case: Case, state, count: int) -> dict:
    """``count`` gradient draws, each from the same estimator state (CRS: one estimate)."""
    samples = []
    for _ in range(count):
        _load_buffers(module, state)
        samples.append(step(module, inputs, upstream, case.calls)[0].grads)
    return {n: torch.stack([s[n] for s in samples]) for n, g in samples[0].items() if g is not None}


def _assert_mean(stack: torch.Tensor, exact: torch.Tensor) -> None:
    assert_unbiased(stack, exact)
    assert_no_scale_bias(stack, exact)


def check_unbiased(
    case: Case, converter: Converter = convert, draws: int = STAT_DRAWS, confirm: int = 4
) -> None:
    """The mean of ``draws`` float64 gradients (one converted layer, its seed stream advancing)
    equals PyTorch's gradient: Hotelling T^2 and the scale ratio along the exact gradient, per
    gradient tensor that varies; the others must equal PyTorch's.

    A rejection is confirmed on ``confirm`` x ``draws`` fresh draws: estimators with rare
    outcomes (CRS keeping all but one row, SparseVJP's optimal sketch with a few small p_i)
    make the F approximation of T^2 anti-conservative at small K, while a real bias is
    rejected again, with more power."""
    _skip_known(case)
    cfg = rp.parse_method(case.method)
    plain, inputs = build(case, torch.float64)
    ref, upstream = step(plain, inputs, _upstream(case), case.calls)
    module = converter(plain, cfg, case.seed)
    step(module, inputs, upstream, case.calls)  # warm-up: CRS then has a non-zero estimate
    state = _state_buffers(module)
    samples = _draw_grads(module, inputs, upstream, case, state, draws)
    varied = 0
    for name, exact in ref.grads.items():
        if exact is None:
            continue
        stack = samples[name]
        # a draw that varies only by rounding (e.g. a full-rank orthogonal sketch) is exact
        if not (stack.numel() and (stack - stack[0]).abs().max() > 1e-9 * exact.abs().max()):
            # k-bit storage keeps its scale and minimum in float32
            tol = tolerance("float32" if getattr(cfg, "bits", 32) < 32 else "float64")
            _assert_close(stack[0], exact, f"gradient {name} (no variance)", tol)
            continue
        varied += 1
        try:
            _assert_mean(stack, exact)
        except AssertionError:
            more = _draw_grads(module, inputs, upstream, case, state, confirm * draws)[name]
            try:
                _assert_mean(more, exact)
            except AssertionError as err:
                raise AssertionError(f"gradient {name}: {err} (confirmed)") from None
    estimated = _estimated(case, cfg, ref)
    if estimated and is_random(case, cfg, module, inputs[0], ref.outputs[0], estimated):
        assert varied, "nothing random was tested"


# --- the draws -------------------------------------------------------------------------------

FUZZ = draw_cases(CASES)
STAT = draw_stat_cases(STAT_CASES)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", FUZZ, ids=[f"case{c.index}" for c in FUZZ])
def test_fuzz_case(case):
    check_case(case)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", STAT, ids=[f"stat{c.index}" for c in STAT])
def test_fuzz_unbiased(case):
    for tag in case.tags:
        if tag in KNOWN:
            pytest.skip(f"known: {KNOWN[tag]}")
    check_unbiased(case)


def test_draw_covers_every_method_kind_and_setting():
    """The quick draw reaches every method, layer kind, dtype, padding mode and form."""
    assert {rp.parse_method(c.method).name for c in FUZZ} == set(method_names())
    assert {c.kind for c in FUZZ} == set(KINDS)
    assert {c.dtype for c in FUZZ} == set(DTYPES)
    convs = [c for c in FUZZ if c.kind in CONVS]
    assert {c.kwargs["padding_mode"] for c in convs} == {
        "zeros",
        "reflect",
        "replicate",
        "circular",
    }
    assert {"same", "valid"} <= {
        c.kwargs["padding"] for c in convs if isinstance(c.kwargs["padding"], str)
    }
    assert any(c.kwargs["groups"] == c.kwargs["in_channels"] > 1 for c in convs)  # depthwise
    assert {c.layout for c in FUZZ} == {"contiguous", "channels_last", "strided"}
    assert {c.frozen for c in FUZZ} == {"", "input", "bias", "weight"}
    assert {c.loss for c in FUZZ} == {"dot", "sum"}
    assert {c.calls for c in FUZZ} == {1, 2}
    assert any(_unbatched(c) for c in FUZZ)
    assert {rp.parse_method(c.method).name for c in STAT} == set(UNBIASED)
    assert any(rp.parse_method(c.method).bits < 32 for c in STAT)  # k-bit storage
    assert draw_cases(5) == FUZZ[:5]  # seeded


# --- positive controls: the harness fails on broken estimators -------------------------------


def _broken(hook: Callable[[nn.Module], None]) -> Converter:
    def converter(plain, cfg, seed):
        module = convert(plain, cfg, seed)
        hook(module)
        return module

    return converter


def _control_case(method: str, rows: int = 8, features: int = 6) -> Case:
    linear = dict(in_features=features, out_features=4, bias=True)
    shape = (rows, features)
    return Case(0, "Linear", linear, shape, (), "float64", "contiguous", "", "dot", 1, method, 5)


def test_positive_control_forward_off_by_1e_3():
    broken = _broken(lambda m: m.register_forward_hook(lambda mod, args, out: out + 1e-3))
    check_case(_control_case("rad:keep=0.5"))
    with pytest.raises(AssertionError, match="forward output 0 differs"):
        check_case(_control_case("rad:keep=0.5"), broken)


def test_positive_control_exact_part_off():
    def scale_input_grad(m):
        m.register_full_backward_hook(lambda mod, gin, gout: (gin[0] * 1.001,))

    with pytest.raises(AssertionError, match="gradient input0 differs"):
        check_case(_control_case("crs:keep=0.5"), _broken(scale_input_grad))


def test_positive_control_global_rng_and_seed():
    def draw_from_global_rng(module, args):
        torch.rand(1)

    touches = _broken(lambda m: m.register_forward_pre_hook(draw_from_global_rng))
    with pytest.raises(AssertionError, match="global RNG"):
        check_case(_control_case("rad:keep=0.5"), touches)
    fixed_seed = _broken(lambda m: setattr(m, "rp_seed", 0))
    with pytest.raises(AssertionError, match="other seeds all gave the same"):
        check_case(_control_case("rad:keep=0.5"), fixed_seed)
    counter = iter(range(10**6))
    unseeded = _broken(lambda m: setattr(m, "rp_seed", next(counter)))
    with pytest.raises(AssertionError, match="the same seed gave different"):
        check_case(_control_case("rad:keep=0.5"), unseeded)


def test_positive_control_weight_gradient_scaled_by_1_03():
    """A 3% scale bias in the weight gradient fails the unbiasedness check at the fuzz's K."""
    case = _control_case("rad:keep=0.9,mode=sample", rows=64, features=20)
    check_unbiased(case)
    scaled = _broken(lambda m: m.weight.register_hook(lambda g: g * 1.03))
    with pytest.raises(AssertionError, match="gradient weight: (biased|scale bias)"):
        check_unbiased(case, scaled)
