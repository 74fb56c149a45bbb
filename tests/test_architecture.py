"""Contract tests for the layout: the import arrows of the README, no private cross-package imports,
no import cycles, every exported name resolves, ruff is clean and public docstring examples run."""
from __future__ import annotations

import re
import ast
import doctest
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("weightspace", "merging", "analysis", "viz")

# importer package -> packages it must not import. The CLI (and __main__) of weightspace is the only
# module of the base package allowed to import the other three.
FORBIDDEN = {
    "weightspace": {"merging", "analysis", "viz"},
    "merging": {"analysis", "viz"},
    "analysis": {"merging", "viz"},
    "viz": {"merging", "analysis"},
}
CLI_MODULES = {"weightspace.cli", "weightspace.__main__"}


def _is_cli(mod: str) -> bool:
    """The CLI is weightspace.cli, __main__ and its private parts weightspace._cli_* (merge, demo)."""
    return mod in CLI_MODULES or mod.startswith("weightspace._cli_")


def _module_name(path: Path, root: Path) -> Tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def collect_imports(root: Path, packages=PACKAGES) -> Dict[str, List[Tuple[str, List[str], bool, int]]]:
    """module -> [(imported module, imported names, at module level, line)], relative imports resolved."""
    out: Dict[str, List[Tuple[str, List[str], bool, int]]] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            mod, is_pkg = _module_name(path, root)
            tree = ast.parse(path.read_text(), filename=str(path))
            base = mod.split(".") if is_pkg else mod.split(".")[:-1]
            func_nodes = set()
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    func_nodes.update(id(n) for n in ast.walk(node) if n is not node)
            found = []
            for node in ast.walk(tree):
                top = id(node) not in func_nodes
                if isinstance(node, ast.Import):
                    found += [(a.name, [], top, node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        anchor = base[: len(base) - node.level + 1]
                        target = ".".join(anchor + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    found.append((target, [a.name for a in node.names], top, node.lineno))
            out[mod] = found
    return out


def check_layout(root: Path, packages=PACKAGES) -> List[str]:
    """All violations of the layout rules under ``root`` (an empty list when the arrows hold)."""
    imports = collect_imports(root, packages)
    modules = set(imports)
    problems: List[str] = []
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for mod, found in imports.items():
        pkg = mod.split(".")[0]
        for target, names, top, line in found:
            tpkg = target.split(".")[0]
            if tpkg not in packages:
                continue
            where = f"{mod}:{line}"
            if tpkg in FORBIDDEN.get(pkg, ()) and not _is_cli(mod):
                problems.append(f"{where}: {pkg} must not import {target}")
            if "weightspace.cli" in [target] + [f"{target}.{n}" for n in names] and not _is_cli(mod):
                problems.append(f"{where}: nothing imports weightspace.cli")
            if tpkg != pkg:
                private = [p for p in target.split(".") if _is_private(p)]
                private += [n for n in names if _is_private(n)]
                if private:
                    problems.append(f"{where}: private cross-package import {target} {names or ''}".rstrip())
            # edges for the cycle check: module-level imports only (a function-level import is the
            # documented way to defer an optional dependency and cannot deadlock module loading)
            if top:
                for name in names or [None]:
                    sub = f"{target}.{name}" if name else None
                    dest = sub if sub in modules else target
                    if dest in modules and dest != mod:
                        graph[mod].add(dest)
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One representative cycle per strongly connected component with more than one module."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    comps: List[List[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp) + [sorted(comp)[0]])

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return comps


def test_import_arrows_hold():
    assert check_layout(ROOT) == []


def _write(root: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_layout_checker_flags_synthetic_bad_imports(tmp_path):
    """Negative control: each rule fires on a tree that breaks it, and a clean tree passes."""
    clean = {
        "weightspace/__init__.py": "",
        "weightspace/_private.py": "",
        "weightspace/public.py": "from weightspace import _private\n",
        "weightspace/cli.py": "import analysis\nimport viz\n",
        "merging/__init__.py": "from weightspace.public import x\n",
        "analysis/__init__.py": "import weightspace\n",
        "analysis/m.py": "def f():\n    from analysis import n\n",
        "analysis/n.py": "from analysis import m\n",
        "viz/__init__.py": "",
    }
    _write(tmp_path / "clean", clean)
    assert check_layout(tmp_path / "clean") == []

    bad = dict(clean)
    bad["weightspace/features.py"] = "import merging\n"                     # base imports a consumer
    bad["merging/_x.py"] = "from analysis import thing\n"                   # sibling arrow
    bad["analysis/p.py"] = "from weightspace._private import helper\n"      # private cross-package module
    bad["analysis/q.py"] = "from weightspace.public import _helper\n"       # private cross-package name
    bad["analysis/r.py"] = "from . import s\n"                              # a cycle via relative imports
    bad["analysis/s.py"] = "from analysis.r import y\n"
    bad["viz/v.py"] = "from weightspace import cli\n"
    _write(tmp_path / "bad", bad)
    problems = check_layout(tmp_path / "bad")
    text = "\n".join(problems)
    assert "weightspace.features:1: weightspace must not import merging" in text
    assert "merging._x:1: merging must not import analysis" in text
    assert "analysis.p:1: private cross-package import weightspace._private" in text
    assert "analysis.q:1: private cross-package import weightspace.public ['_helper']" in text
    assert "import cycle: analysis.r -> analysis.s -> analysis.r" in text
    assert "viz.v:1: nothing imports weightspace.cli" in text
    assert "analysis.m" not in text  # a function-level import does not make a cycle


def _all_packages() -> List[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, prefix=pkg + "."):
            if info.ispkg and not any(_is_private(p) for p in info.name.split(".")):
                names.append(info.name)
    return names


@pytest.mark.parametrize("package", _all_packages())
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    exported = getattr(mod, "__all__", None)
    assert exported, f"{package} has no __all__"
    assert len(set(exported)) == len(exported), f"duplicates in {package}.__all__"
    for name in exported:
        assert getattr(mod, name) is not None, f"{package}.{name}"
    assert set(exported) <= set(dir(mod))


def test_lazy_exports_raise_attribute_error_for_unknown_names():
    import weightspace

    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        weightspace.not_a_name  # noqa: B018


def _public_modules() -> List[str]:
    mods = []
    for pkg in PACKAGES:
        root = importlib.import_module(pkg)
        mods.append(pkg)
        for info in pkgutil.walk_packages(root.__path__, prefix=pkg + "."):
            if not any(_is_private(p) for p in info.name.split(".")) and not _is_cli(info.name):
                mods.append(info.name)
    return mods


@pytest.mark.parametrize("module", _public_modules())
def test_public_docstring_examples_run(module):
    mod = importlib.import_module(module)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(mod, module):
        runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.failed == 0, f"{res.failed} doctest example(s) failed in {module} (run with -s for the report)"



# data containers that are not results of a computation (no settings/log of their own)
# containers and contracts, not results: specs, graph pieces, the method registry and its calling contract
_NOT_RESULTS = {"PermutationSpec", "Axis", "GraphTensors", "Layer", "EdgeBlock", "NodeFeature", "Feat", "GraphOutput",
                "MergeContext", "MethodOutput", "MethodInfo"}
_ROWS = {"EpochRecord", "LayerSpectrum", "Barrier", "PCADirections", "FeatureStats", "CrossStats"}  # parts of a result


def _exported_dataclasses():
    import dataclasses as dc

    out = []
    for package in ("weightspace", "analysis", "merging", "weightspace.nn", "weightspace.features", "weightspace.zoo",
                    "weightspace.symmetry",
                    "weightspace.graph", "weightspace.state"):
        mod = importlib.import_module(package)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if isinstance(obj, type) and dc.is_dataclass(obj) and name not in _NOT_RESULTS:
                out.append(obj)
    return sorted(set(out), key=lambda c: c.__qualname__)


def test_one_result_convention():
    import dataclasses as dc

    from weightspace.results import Result

    classes = _exported_dataclasses()
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, Result), f"{cls.__qualname__} does not subclass weightspace.results.Result"
        assert cls.__dataclass_params__.frozen, f"{cls.__qualname__} is not frozen"
        assert not hasattr(cls, "as_dict"), f"{cls.__qualname__} still has as_dict (use to_dict)"
        names = {f.name for f in dc.fields(cls)}
        if cls.__name__ not in _ROWS:
            assert {"settings", "log"} <= names, f"{cls.__qualname__} lacks settings/log fields"
            log_field = next(f for f in dc.fields(cls) if f.name == "log")
            assert not log_field.compare, f"{cls.__qualname__}.log takes part in ==; timings would break equality"


def test_result_to_dict_is_json_and_stamps_versions():
    import json

    import numpy as np
    import torch

    import analysis

    res = analysis.fit_power_law(np.random.default_rng(0).pareto(2.0, 500) + 1.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["type"] == "PowerLawFit" and d["settings"]["versions"]["torch"] == torch.__version__
    assert d["alpha"] == res.alpha
    assert set(d["log"]) == {"seconds"} and d["log"]["seconds"] >= 0  # records_time filled the log


def test_every_toolkit_error_has_one_base():
    import analysis
    import weightspace
    from weightspace.io import CheckpointError
    from weightspace.results import WeightspaceError

    errors = {weightspace.SpecError: ValueError, weightspace.TraceError: RuntimeError,
              weightspace.graph.GraphError: RuntimeError, CheckpointError: ValueError,
              analysis.UnsupportedOperationError: ValueError}
    for err, base in errors.items():
        assert issubclass(err, WeightspaceError) and issubclass(err, base), err


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: pip install -e '.[test]' (it is in the test extra)")
    proc = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_sources_cite_papers_not_files_outside_the_repository():
    """Docstrings, comments and the docs cite papers inline; a citation of the design notes by section
    number points users to a file they do not have. Negative control: the pattern finds one in a sample."""
    pattern = re.compile("REFERENCES" + r"(\.md)?\s*(\u00a7|section)")
    assert pattern.search("the objective depends on it (" + "REFERENCES" + " \u00a72.1)")
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        if path.suffix not in (".py", ".md") or ".git" in path.parts:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}")
    assert offenders == [], offenders
