"""The layers of randprop import only downwards: random, config, quantize -> methods -> convert -> measure
-> rules -> train -> experiments -> cli (data, models and pde beside rules).

Each layer is imported in a fresh interpreter and the randprop modules it loads are checked;
the import statements of src/ (those inside functions included) are checked against the order.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"

#: rank of each top-level module or package of randprop: imports may point to a lower or
#: equal rank only
RANKS = {
    "random": 0,
    "config": 0,
    "quantize": 0,
    "methods": 1,
    "functional": 1,
    "blocks": 1,
    "convert": 2,
    "measure": 3,
    "checkpointing": 3,
    "plan": 3,
    "rules": 4,
    "pde": 4,
    "data": 4,
    "models": 4,
    "train": 5,
    "experiments": 6,
    "cli": 7,
    "cli_train": 7,
    "cli_plan": 7,
    "__main__": 7,
}
#: ``import randprop``: the package's public names (__all__) come from layers up to rules
ROOT_RANK = RANKS["rules"]
#: upward imports allowed, as (importer, imported) -> the reason
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}

PROBE = """
import json, sys
import {module}
print(json.dumps({{"modules": sorted(m for m in sys.modules if m.split(".")[0] == "randprop"),
                  "tqdm": "tqdm" in sys.modules}}))
"""

MODULES = ["randprop", *(f"randprop.{name}" for name in RANKS if name != "__main__")]


def rank(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "randprop", module
    return ROOT_RANK if len(parts) == 1 else RANKS[parts[1]]


@pytest.fixture(scope="module")
def loaded() -> dict[str, dict]:
    """For each module: what importing it in a fresh interpreter loads (run side by side)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", PROBE.format(module=m)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for m in MODULES
    }
    results = {}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import {m} failed:\n{err}"
        results[m] = json.loads(out.strip().splitlines()[-1])
    return results


def test_importing_the_package_loads_nothing_else(loaded):
    assert loaded["randprop"] == {"modules": ["randprop"], "tqdm": False}


def test_importing_random_loads_only_random(loaded):
    assert loaded["randprop.random"]["modules"] == ["randprop", "randprop.random"]


@pytest.mark.parametrize("module", MODULES[1:])
def test_a_layer_loads_no_higher_layer(loaded, module):
    higher = [m for m in loaded[module]["modules"] if m != "randprop" and rank(m) > rank(module)]
    assert not higher, f"import {module} loads higher layers: {higher}"


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("randprop.methods", ("convert", "measure", "rules", "train", "experiments", "cli")),
        ("randprop.convert", ("measure", "rules", "train", "experiments", "cli")),
        ("randprop.rules", ("train", "experiments", "cli")),
    ],
)
def test_named_layers_stay_unloaded(loaded, module, absent):
    names = {m.split(".")[1] for m in loaded[module]["modules"] if "." in m}
    assert not names & set(absent)


def test_the_probe_can_fail(loaded):
    """Positive control: the training loop does load the layers below it and tqdm."""
    names = {m.split(".")[1] for m in loaded["randprop.train"]["modules"] if "." in m}
    assert {"convert", "methods", "rules", "measure"} <= names
    assert loaded["randprop.train"]["tqdm"]


def imported_modules(path: pathlib.Path, src: pathlib.Path = SRC) -> list[tuple[str, int]]:
    """The randprop modules imported by the file at ``path`` (anywhere in it), with lines;
    ``from randprop import x`` names the submodule randprop.x."""
    package = ".".join(path.relative_to(src).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    edges = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            edges += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *filter(None, [base])])
            if base == "randprop":
                edges += [(f"randprop.{a.name}", node.lineno) for a in node.names]
            else:
                edges.append((base, node.lineno))
    return [(m, line) for m, line in edges if m.split(".")[0] == "randprop"]


def import_edges() -> list[tuple[str, str, int]]:
    edges = []
    for path in sorted((SRC / "randprop").rglob("*.py")):
        module = ".".join(path.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        edges += [(module, target, line) for target, line in imported_modules(path)]
    return edges


def test_src_has_no_upward_import():
    upward = []
    for module, target, line in import_edges():
        if module == "randprop":  # the package root: lazy re-exports of every layer
            continue
        assert target == "randprop" or target.split(".")[1] in RANKS, (
            f"{module}:{line}: {target} has no rank"
        )
        key = (module, target)
        if rank(target) > rank(module) and key not in ALLOWED_UPWARD:
            upward.append(f"{module}:{line} -> {target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_registries_are_complete_when_reached_from_the_root():
    code = (
        "import randprop as rp; print(rp.parse_method('sparsevjp:density=0.5'), "
        "sorted(rp.rules.LEARNING_RULES))"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "vjp:density=0.5,sketch=uniform,structure=element,budget=tensor",
        "['dfa',",
        "'fa',",
        "'memdfa']",
    ]


def test_the_package_root_exports_no_higher_layer():
    import randprop

    assert set(randprop.__all__) <= {*randprop._EXPORTS, *RANKS}
    modules = {randprop._EXPORTS[name] for name in randprop.__all__ if name in randprop._EXPORTS}
    modules |= {f"randprop.{name}" for name in randprop.__all__ if name in RANKS}
    assert max(map(rank, modules)) == ROOT_RANK


def test_the_edge_check_sees_nested_and_relative_imports(tmp_path):
    """Positive control: an import inside a function, and a relative one, are edges."""
    pkg = tmp_path / "randprop" / "methods"
    pkg.mkdir(parents=True)
    path = pkg / "x.py"
    path.write_text("def f():\n    from randprop.train import loop\n\nfrom ..rules import fa\n")
    edges = sorted(imported_modules(path, tmp_path))
    assert edges == [("randprop.rules", 4), ("randprop.train", 2)]
    assert all(rank(target) > rank("randprop.methods.x") for target, _ in edges)
