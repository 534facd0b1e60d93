"""The house's layout: runnable scripts on top, import-only code below them, no import circle, no script importing
another script, small modules that say their job, and training that needs neither onnx nor onnxruntime."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD_LIBRARIES = {"resnet", "fcn", "data_generator", "model_utils"}  # the card's files that scripts import
HUB = "hubconf"  # torch.hub's entry file: it must sit at the top and run nothing


def _modules():
    """{module name: path} of every project module (top-level files and the package), tests left out."""
    files = list(ROOT.glob("*.py")) + list(ROOT.glob("seglib/*.py"))
    return {".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): f for f in files}


def _imports(path, modules):
    """Project modules that ``path`` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}, modules


def _scripts(modules):
    return {m for m, p in modules.items() if "." not in m and 'if __name__ == "__main__":' in p.read_text()}


def test_scripts_import_no_other_script(graph):
    edges, modules = graph
    scripts = _scripts(modules)
    assert {"train", "evaluate", "export", "benchmark", "curves", "data_generator", "summary"} <= scripts
    bad = [f"{m} imports {d}" for m in sorted(scripts) for d in sorted(edges[m])
           if d in scripts and d not in CARD_LIBRARIES]
    assert not bad, bad


def test_library_modules_import_no_script(graph):
    edges, modules = graph
    scripts = _scripts(modules) - CARD_LIBRARIES
    libraries = set(modules) - scripts
    bad = [f"{m} imports {d}" for m in sorted(libraries) for d in sorted(edges[m]) if d in scripts]
    assert not bad, bad
    assert not {m for m in modules if "." not in m} - scripts - CARD_LIBRARIES - {"seglib", HUB}, \
        "a top-level module is neither a file of the card nor a script"


def test_no_import_circle(graph):
    edges, _ = graph
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import circle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(edges[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(edges):
        visit(m, [])


def test_modules_are_small_and_say_their_job(graph):
    _, modules = graph
    for name, path in modules.items():
        text = path.read_text()
        assert len(text.splitlines()) <= 600, f"{path.name} has {len(text.splitlines())} lines"
        assert ast.get_docstring(ast.parse(text)), f"{name} has no module docstring"


BOTTOM = {"resnet", "fcn"}  # the model files, beneath everything
LIBRARY = {"model_utils"}  # the card's run helpers: import-only, on the package's floor


def _floor(module):
    """2: the scripts on top (data_generator among them); 1: the package and model_utils; 0: the model files."""
    return 0 if module in BOTTOM else 1 if module.startswith("seglib") or module in LIBRARY else 2


def test_house_reads_top_down(graph):
    """No arrow back up: the package never imports a script, and the bottom files import nothing above them."""
    edges, _ = graph
    up = [f"{m} imports {d}" for m in sorted(edges) for d in sorted(edges[m]) if _floor(d) > _floor(m)]
    assert not up, up
    assert edges["model_utils"] == {"seglib.files"}  # the one error it raises (UsageError) lives with the others
    assert {d for m in edges if m.startswith("seglib") for d in edges[m]} & {"data_generator", "train"} == set()


def test_model_files_import_only_torch(graph):
    edges, modules = graph
    assert edges["resnet"] == set() and edges["fcn"] == {"resnet"}
    for name in ("resnet", "fcn"):
        tree = ast.parse(modules[name].read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert roots <= {"torch", "resnet", "math"}, (name, roots)


def test_importing_a_script_runs_nothing():
    code = ("import io, contextlib, sys; out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    import train, evaluate, export, benchmark, curves, data_generator, summary, hubconf\n"
            "assert out.getvalue() == '', out.getvalue()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
