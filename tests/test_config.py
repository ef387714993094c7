import pytest

import randprop as rp


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
