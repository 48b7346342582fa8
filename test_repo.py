"""The repository: imports run one way with no cycle, files stay readable in one sitting (lines,
functions and files a reader can hold), names keep one meaning, nothing cites what a clone does not
have, and profile.py (which shadows the standard library's module) leaves torch importable."""

import ast
import io
import os
import subprocess
import sys
import tokenize

from conftest import REPO

SCRIPTS = {"train_cifar", "train_imagenet", "profile", "sweep"}
MODEL_FILES = ("trie.py", "routers.py", "grow_prune.py", "losses.py")  # copied alone by users
SOURCE = sorted(f for f in os.listdir(REPO) if f.endswith(".py")
                and not f.startswith(("test_", "conftest")))


def test_torch_and_torchvision_import_from_repo_dir_despite_profile_py():
    """profile.py shadows the stdlib module cProfile imports; torch must still import."""
    code = ("import torch, torchvision, cProfile, profile; "
            "assert profile.Profile.__module__ == '_stdlib_profile'; "
            "assert callable(profile.run) and callable(profile.runctx) and profile._Utils; "
            "cProfile.run('1+1')")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def parse(f: str) -> ast.Module:
    return ast.parse(open(os.path.join(REPO, f), encoding="utf8").read())


def repo_imports() -> dict[str, set[str]]:
    """{module: the repo's modules it imports at run time, anywhere in its file}: imports under
    `if TYPE_CHECKING:` (annotations only) do not count."""
    mods = {f[:-3] for f in SOURCE}
    graph = {}
    for m in mods:
        tree = parse(f"{m}.py")
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        imports = [n for n in ast.walk(tree) if id(n) not in typing_only]
        names = {a.name.split(".")[0] for n in imports if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in imports
                  if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & mods - {m}
    return graph


def code_lines(path: str) -> int:
    """Source lines of code, as cloc and SLOCCount count them: lines holding a token, less comments,
    blank lines and docstrings (string statements)."""
    text = open(path, encoding="utf8").read()
    docs = {i for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Expr)
            and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
            for i in range(n.lineno, n.end_lineno + 1)}
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    code = {i for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in skip
            for i in range(t.start[0], t.end[0] + 1)}
    return len(code - docs)


def test_imports_run_one_way_without_a_cycle():
    """Libraries never import scripts; the model files import torch and each other only as drawn
    (copy trie.py, routers.py, grow_prune.py, losses.py and backbones.py together); no cycle, and
    at most 6 levels from torch to the last script."""
    graph = repo_imports()
    assert SCRIPTS <= set(graph)
    for m, deps in graph.items():
        if m not in SCRIPTS:
            assert not deps & SCRIPTS, f"library {m} imports script(s) {deps & SCRIPTS}"
    assert graph["trie"] == {"routers", "grow_prune"}
    assert graph["routers"] == graph["grow_prune"] == graph["losses"] == graph["backbones"] == set()
    assert graph["measure"] <= {"energy"} and graph["runs"] <= {"backbones"}
    level = {}

    def visit(m, stack):  # depth first; a module met again on its own stack closes a cycle
        assert m not in stack, f"import cycle: {' -> '.join(stack + [m])}"
        if m not in level:
            level[m] = 1 + max((visit(d, stack + [m]) for d in sorted(graph[m])), default=0)
        return level[m]

    for m in sorted(graph):
        visit(m, [])
    assert max(level.values()) <= 6, f"{max(level.values())} import levels: {level}"


def test_lines_functions_and_files_a_reader_can_hold():
    """At most 100 characters a line and 400 lines a file; no function of a model file over 40
    lines; the source within 3,655 lines of code (cloc's count: the rest is docstrings citing the
    paper; 3,450 before the deployment benchmark, the confidence stop and its lean inference path,
    3,612 before the batch-1 floor and the collapse check at the calibrated operating point, 3,640
    before the served copy with its exits folded, 3,650 before --bench timed the run's own chain and
    warned when it times random images).
    Budgets met by removing what the code does not need, never by packing statements."""
    for f in SOURCE:
        lines = open(os.path.join(REPO, f), encoding="utf8").read().splitlines()
        assert len(lines) <= 400, f"{f} has {len(lines)} lines"
        long = [i + 1 for i, line in enumerate(lines) if len(line.encode("utf8")) > 100]  # bytes
        assert not long, f"{f}: lines over 100 characters: {long}"
        assert not any(";" in t.string for t in tokenize.generate_tokens(
            io.StringIO("\n".join(lines)).readline) if t.type == tokenize.OP), f"{f} packs with ;"
    for f in MODEL_FILES:
        for fn in (n for n in ast.walk(parse(f)) if isinstance(n, ast.FunctionDef)):
            size = fn.end_lineno - fn.lineno + 1
            assert size <= 40, f"{f}: {fn.name} is {size} lines"
    code = {f: code_lines(os.path.join(REPO, f)) for f in SOURCE}
    assert sum(code.values()) <= 3655, f"{sum(code.values())} lines of code: {code}"


GROWTH_SPLIT = {"split_share", "split_sides", "split_loss", "split_weight", "grow_split",
                "update_split"}  # the 2-way split of a node's inputs, and its statistic


def test_split_keeps_its_growth_meaning_only():
    """One meaning per name: every identifier with "split" in it names the growth split (a node's
    inputs split in two, its share, its prior), never a dataset partition or a backbone's cut.
    String and tensor `.split(...)` calls are Python's and torch's own."""
    for f in SOURCE:
        tree = parse(f)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.arg for n in ast.walk(tree) if isinstance(n, ast.arg)}
        names |= {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and n.attr not in ("split", "splitlines", "rsplit")}
        bad = {n for n in names if "split" in n.lower()} - GROWTH_SPLIT
        assert not bad, f"{f}: {sorted(bad)}"


def test_the_repo_stands_alone():
    """Nothing in the code or README cites what a clone of the repo does not have."""
    for f in [*SOURCE, "README.md"]:
        text = open(os.path.join(REPO, f), encoding="utf8").read()
        for ref in ("DES" "IGN", "STY" "LE", "../sha" "red"):  # split: grep over the repo finds none
            assert ref not in text, f"{f} cites {ref}, which a clone of the repo does not have"
