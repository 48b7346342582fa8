"""The repository: imports run one way with no cycle, files stay readable in one sitting, nothing cites what a
clone does not have, and profile.py (which shadows the standard library's module) leaves torch importable."""

import os
import subprocess
import sys

from conftest import REPO


def test_torch_and_torchvision_import_from_repo_dir_despite_profile_py():
    """profile.py shadows the stdlib module cProfile imports; torch must still import."""
    code = ("import torch, torchvision, cProfile, profile; "
            "assert profile.Profile.__module__ == '_stdlib_profile'; "
            "assert callable(profile.run) and callable(profile.runctx) and profile._Utils; "
            "cProfile.run('1+1')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


SCRIPTS = {"train_cifar", "train_imagenet", "profile", "sweep"}


def repo_imports() -> dict[str, set[str]]:
    """{module: the repo's modules it imports anywhere in its file (top level or inside functions)}."""
    import ast

    mods = {f[:-3] for f in os.listdir(REPO) if f.endswith(".py") and not f.startswith(("test_", "conftest"))}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(REPO, f"{m}.py")).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & mods - {m}
    return graph


def code_lines(path: str) -> int:
    """Source lines of code, as cloc and SLOCCount count them: lines holding a token, less comments, blank lines
    and docstrings (string statements)."""
    import ast
    import io
    import tokenize

    text = open(path).read()
    docs = {i for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str) for i in range(n.lineno, n.end_lineno + 1)}
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    code = {i for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip
            for i in range(t.start[0], t.end[0] + 1)}
    return len(code - docs)


def test_layout_one_way_imports_short_files_and_a_repo_that_stands_alone():
    """Libraries never import scripts; the import graph has no cycle; files stay readable in one sitting."""
    graph = repo_imports()
    assert SCRIPTS <= set(graph)
    for m, deps in graph.items():
        if m not in SCRIPTS:
            assert not deps & SCRIPTS, f"library {m} imports script(s) {deps & SCRIPTS}"
    assert graph["trie"] == {"routers"} and graph["routers"] == set() and graph["backbones"] == set()
    assert graph["grow_prune"] <= {"trie"} and graph["measure"] <= {"routers"} and graph["runs"] <= {"backbones"}
    state, order = {}, []

    def visit(m, stack):  # depth-first search; a grey node met again closes a cycle
        assert state.get(m) != "grey", f"import cycle: {' -> '.join(stack + [m])}"
        if state.get(m) is None:
            state[m] = "grey"
            for d in sorted(graph[m]):
                visit(d, stack + [m])
            state[m] = "black"
            order.append(m)

    for m in sorted(graph):
        visit(m, [])
    level = {}
    for m in order:  # dependencies first: a module's level is one above its deepest import
        level[m] = 1 + max((level[d] for d in graph[m]), default=0)
    assert max(level.values()) <= 5, f"{max(level.values())} import levels: {level}"
    sizes = {f: len(open(os.path.join(REPO, f)).read().splitlines()) for f in os.listdir(REPO)
             if f.endswith(".py") and not f.startswith(("test_", "conftest"))}
    assert max(sizes.values()) <= 460, sizes
    code = {f: code_lines(os.path.join(REPO, f)) for f in sizes}  # the rest is docstrings citing the paper
    assert sum(code.values()) <= 3500, f"{sum(code.values())} lines of code: {code}"
    source = open(os.path.join(REPO, "trie.py")).read().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("class JulietNet"))
    end = next(i for i, line in enumerate(source[start + 1:], start + 1) if line and not line[0].isspace()
               and not line.startswith(("#", ")")))
    assert end - start <= 260, f"JulietNet is {end - start} lines"
    for f in [*sizes, "README.md"]:
        text = open(os.path.join(REPO, f)).read()
        for ref in ("DES" "IGN", "STY" "LE", "../sha" "red"):  # split: `grep -rn` over the repo finds none
            assert ref not in text, f"{f} cites {ref}, which a clone of the repo does not have"
