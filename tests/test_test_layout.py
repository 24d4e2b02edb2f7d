"""The test suite's own layout: a test module never imports another test module; what several share lives
in tests/harness.py, imported one way only (`from harness import ...`, which pyproject's pytest
`pythonpath = ["tests"]` resolves from a fresh clone, whatever the working directory)."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent

# Top-level names under which a file of tests/ can be imported: the folder itself (from the repository
# root) and, through pytest's pythonpath, every module and folder directly inside it.
LOCAL_NAMES = {"tests"} | {p.stem for p in TESTS.glob("*.py")} | {p.name for p in TESTS.iterdir() if p.is_dir()}


def local_imports(path: Path) -> list[tuple[int, str]]:
    """(line, how it is written) of every import in ``path`` that reaches a file under tests/."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append((node.lineno, f"from {'.' * node.level}{node.module or ''} import ..."))
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in LOCAL_NAMES:
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] in LOCAL_NAMES]
    return found


def test_test_modules_import_only_the_harness_and_only_one_way():
    wrong = [f"{path.relative_to(TESTS)}:{line}: {text}"
             for path in sorted(TESTS.rglob("*.py")) for line, text in local_imports(path)
             if text != "from harness import ..."]
    assert wrong == [], "import shared helpers from tests/harness.py as `from harness import ...`:\n" + "\n".join(wrong)


def test_the_scan_sees_every_way_of_reaching_a_test_module(tmp_path):
    # the rule above must be able to fail: each of these reaches a test module or the harness another way
    module = tmp_path / "m.py"
    module.write_text("from tests.compress.test_store import run\nimport test_engine\nfrom . import conftest\n"
                      "from compress import test_hf\nimport harness\nfrom harness import make_model\nimport torch\n")
    assert local_imports(module) == [(1, "from tests.compress.test_store import ..."),
                                     (2, "import test_engine"), (3, "from . import ..."),
                                     (4, "from compress import ..."), (5, "import harness"),
                                     (6, "from harness import ...")]
