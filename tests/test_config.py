import pytest

import randprop as rp
from randprop.config import METHODS


@pytest.mark.parametrize(
    "cfg", [rp.RAD(), rp.RAD(keep=0.25, mode="project", same_sample=True), rp.Exact()]
)
def test_string_form_round_trips(cfg):
    assert rp.parse_method(str(cfg)) == cfg


def test_parse_defaults_and_options():
    assert rp.parse_method("rad") == rp.RAD()
    assert rp.parse_method("RAD: keep=0.5, mode=project") == rp.RAD(keep=0.5, mode="project")
    assert rp.parse_method("rad:same_sample=true").same_sample is True


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 0}, "keep must be a number in \\(0, 1\\]"),
        ({"keep": 1.5}, "keep must be a number in \\(0, 1\\]"),
        ({"keep": -0.1}, "keep"),
        ({"mode": "magic"}, "mode must be one of 'sample', 'project'"),
    ],
)
def test_invalid_values_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rp.RAD(**kwargs)


@pytest.mark.parametrize(
    "text, match",
    [
        ("nope", "unknown method 'nope'; choose from .*rad"),
        ("rad:keeep=0.1", "unknown or malformed option"),
        ("rad:keep=abc", "keep must be float"),
        ("rad:mode=magic", "mode must be one of"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        rp.parse_method(text)


def test_configs_are_frozen():
    with pytest.raises(AttributeError):
        rp.RAD().keep = 0.5


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_config_round_trips(name):
    cfg = METHODS[name]()
    assert rp.parse_method(str(cfg)) == cfg


@pytest.mark.parametrize(
    "cfg",
    [
        rp.AOP(k=3, policy="weighted", memory="queue", decay=0.5, capacity=2.0),
        rp.AOP(keep=0.5, target="both", memory="off"),
        rp.Trace(probes=4, probe="orthogonal", channels="independent"),
        rp.SparseVJP(density=0.5, sketch="lowrank", structure="row"),
        rp.CRS(keep=0.5, winners=0.25, momentum=0.5),
    ],
    ids=str,
)
def test_non_default_configs_round_trip(cfg):
    assert rp.parse_method(str(cfg)) == cfg


def test_optional_fields_parse_none_and_numbers():
    assert rp.parse_method("aop:k=none,keep=0.5") == rp.AOP(keep=0.5)
    assert rp.parse_method("aop:keep=none,k=2") == rp.AOP(k=2)
    with pytest.raises(ValueError, match="k must be int or none; got 'x'"):
        rp.parse_method("aop:k=x")


def test_a_repeated_option_is_an_error_even_with_the_same_value():
    with pytest.raises(ValueError, match="rad: option 'keep' given more than once"):
        rp.parse_method("rad:keep=0.1,keep=0.1")
