"""ARCHITECTURE.md's rooms and what each may import, checked on the code's own imports (every `import` and
`from ... import` of a leapalign module: at module level, inside functions and under TYPE_CHECKING)."""

from __future__ import annotations

import ast
import re

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "platform" / "leapalign"

# Rooms from the top (entry) to the bottom (foundations): a module may import its own room and the rooms
# below it. Keys are module names relative to leapalign; a folder's name stands for every module in it.
ROOMS = {
    "entry": ["cli", "__main__"],
    "Ray edge": ["distributed"],
    "runs": ["train", "recipes", "preflight", "experiments"],
    "run state": ["run", "run_folder", "finetune", "parallel"],
    "evaluation and reports": ["evaluation", "comparison", "reports", "stats", "world"],
    "math": ["methods"],
    "models and rewards": ["models", "sampling", "rewards", "text_cache", "costs", "compute"],
    "foundations": ["config", "data", "streams", "numerics", "io", "images", "logs", "progress", "tracking"],
}
# The one import that runs up: a world prompt file is read (and checked word by word) by the world's reader.
UPWARD = {("data", "world.prompts")}
MAX_LINES = 500  # above it a file says why it is one file ("Why one file over 500 lines: ...")


def modules() -> dict[str, object]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """The leapalign modules `name` imports (relative names), however and wherever it imports them."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[10:] in MODULES else node.module
                for a in node.names
            ]
        out |= {n.removeprefix("leapalign.") for n in names if n.startswith("leapalign.")}
    return out - {name}


def room_of(name: str) -> int:
    for rank, members in enumerate(ROOMS.values()):
        if any(name == m or name.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"leapalign.{name} is in no room: add it to ARCHITECTURE.md and ROOMS")


def test_every_module_has_a_room_and_imports_only_its_own_or_lower_rooms():
    names = list(ROOMS)
    upward = []
    for name in MODULES:
        if not name:
            continue
        for target in imports(name):
            if room_of(target) < room_of(name) and (name, target) not in UPWARD:
                upward.append(f"{name} ({names[room_of(name)]}) -> {target} ({names[room_of(target)]})")
    assert not upward, "imports that run up a room:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = {name: {t for t in imports(name) if t in MODULES} for name in MODULES}
    done, stack = set(), []

    def visit(name: str) -> None:
        if name in stack:
            cycle = stack[stack.index(name) :] + [name]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if name in done:
            return
        stack.append(name)
        for target in sorted(graph[name]):
            visit(target)
        stack.pop()
        done.add(name)

    for name in graph:
        visit(name)


@pytest.mark.parametrize("doc", ["ARCHITECTURE.md", "README.md"])
def test_the_docs_name_every_room_of_the_tree(doc):
    text = (REPO / doc).read_text()
    tops = sorted({name.split(".")[0] for name in MODULES if name and name != "__main__"})
    missing = [top for top in tops if not re.search(rf"`?{re.escape(top)}(\.py|/)", text)]
    assert not missing, f"{doc} does not name {missing}: its layout no longer matches the tree"


def test_a_file_over_500_lines_says_why():
    long = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    unexplained = [
        f"{name} ({lines} lines)"
        for name, lines in long.items()
        if lines > MAX_LINES and "Why one file over 500 lines" not in (ast.get_docstring(
            ast.parse(MODULES[name].read_text())) or "")
    ]  # fmt: skip
    assert not unexplained, f"over {MAX_LINES} lines without a stated reason: {unexplained}"
