"""The layer protocol (methods/base.ConvertedLayer) and the registries of methods and layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import randprop as rp
from randprop.config import METHODS, MethodConfig, register, register_layers
from randprop.methods.base import ConvertedLayer, LayerState, RandomizedLayer
from randprop.methods.masks import MASKED
from randprop.methods.rad import RADLSTM, RADRNNCell


@pytest.fixture
def scratch_methods():
    """Remove the configs a test registers."""
    before = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(before)


def _plain_config(name: str):
    @dataclasses.dataclass(frozen=True)
    class Plain(MethodConfig):
        pass

    Plain.name = name
    return Plain


class PlainLinear(RandomizedLayer, nn.Linear):
    """A method layer relying on every default of the protocol."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rp_active(x):
            self.rp_next_seed()
        return F.linear(x, self.weight, self.bias)


def test_every_registered_layer_keeps_the_protocol():
    registered = [cls for cfg in set(METHODS.values()) for cls in cfg.layer_types.values()]
    assert len(registered) >= 17  # rad 8, vjp 4, trace 3, aop 1, crs 1
    for cls in [*registered, *MASKED.values()]:
        assert issubclass(cls, ConvertedLayer), cls
    assert RADLSTM in registered and RADRNNCell in registered  # rad_rnn registers publicly
    assert rp.Exact.layer_types == {} and rp.RAD.layer_types is not rp.Trace.layer_types


def test_register_aliases(scratch_methods):
    cfg = register(aliases=("scratchalias",))(_plain_config("scratch"))
    assert METHODS["scratch"] is METHODS["scratchalias"] is cfg
    assert rp.parse_method("scratchalias") == cfg()
    assert rp.parse_method("sparsevjp:density=0.5") == rp.SparseVJP(density=0.5)
    with pytest.raises(ValueError, match="'rad' is already RAD"):
        register(_plain_config("rad"))
    with pytest.raises(ValueError, match="lower-case"):
        register(aliases=("Bad Name",))(_plain_config("scratch2"))


def test_register_layers_checks_its_input(scratch_methods):
    cfg = register(_plain_config("scratch"))
    with pytest.raises(TypeError, match="subclass of the layer type it replaces, Conv2d"):
        register_layers(cfg, {nn.Conv2d: PlainLinear})
    register_layers(cfg, {nn.Linear: PlainLinear})
    register_layers(cfg, {nn.Linear: PlainLinear})  # the same again is fine
    with pytest.raises(ValueError, match="already converts Linear to PlainLinear"):
        register_layers(cfg, {nn.Linear: rp.methods.rad.RADLinear})
    assert cfg().layer_class(nn.Linear) is PlainLinear and cfg().layer_class(nn.Conv2d) is None


def test_a_layer_with_the_defaults_converts_restores_and_checkpoints(scratch_methods):
    cfg = register(_plain_config("scratch"))
    register_layers(cfg, {nn.Linear: PlainLinear})
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    expected = model(x)
    report = rp.convert(model, cfg())
    assert report.converted == ["0", "1", "2"] and report.methods["0"] == "scratch"
    assert report.methods["1"] == "exact, 1-bit mask"  # the compact ReLU's rp_storage
    torch.testing.assert_close(model(x), expected)
    assert rp.method_state(model) == {"0": 1, "2": 1}  # no rp_buffers: the step alone
    rp.load_method_state(model, {"0": 7, "2": {"step": 3}})
    assert (model[0].rp_step, model[2].rp_step) == (7, 3)
    assert rp.restore(model) == ["0", "1", "2"]
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert not any(k.startswith("rp_") for m in model for k in vars(m))


def test_convert_refuses_a_class_without_the_protocol(scratch_methods):
    class Bare(nn.Linear):
        pass

    cfg = register(_plain_config("scratch"))
    register_layers(cfg, {nn.Linear: Bare})
    with pytest.raises(TypeError, match="Bare for Linear does not derive from .*ConvertedLayer"):
        rp.convert(nn.Linear(2, 2), cfg())


def test_rp_unsupported_and_rp_release_are_called(scratch_methods):
    released = []

    class Picky(RandomizedLayer, nn.Linear):
        @staticmethod
        def rp_unsupported(module: nn.Module) -> str | None:
            return "no bias, please" if module.bias is not None else None

        def rp_release(self) -> None:
            released.append(self)

    cfg = register(_plain_config("scratch"))
    register_layers(cfg, {nn.Linear: Picky})
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, bias=False))
    report = rp.convert(model, cfg())
    assert report.converted == ["1"] and report.skipped == {"0": "no bias, please"}
    rp.restore(model)
    assert released == [model[1]] and type(model[1]) is nn.Linear


def test_state_holders_are_exported_and_keep_their_names():
    """AOPMemory / CRSState are LayerState holders; AOP keeps its buffer names (checkpoints)."""
    assert issubclass(rp.AOPMemory, LayerState) and issubclass(rp.CRSState, LayerState)
    assert rp.methods.AOPMemory is rp.AOPMemory and rp.methods.CRSState is rp.CRSState
    model = nn.Sequential(nn.Linear(6, 4))
    rp.convert(model, rp.AOP(k=2, memory="queue"))
    model(torch.randn(5, 6)).sum().backward()
    state = rp.method_state(model)["0"]
    assert set(state) == {"step", "aop_memory_x", "aop_memory_d", "aop_memory_count"}
    model[0].aop_dropped = 3
    assert rp.reset_memory(model) == ["0"]
    assert rp.methods.base.reset_memory is rp.reset_memory
    assert "aop_memory_x" not in model[0]._buffers and not hasattr(model[0], "aop_dropped")
