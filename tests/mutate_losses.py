"""Mutation check of ``fastrp/algos/losses.py`` against ``tests/test_losses.py``.

Each mutant changes one thing in the body of one loss function - a flipped sign, a swapped
arithmetic or comparison operator, ``min`` for ``max``, a constant 0 <-> 1, a dropped factor
(e.g. a mask: ``alive * x`` -> ``x``), a dropped ``.detach()`` or ``no_grad`` - and the test
module runs against it in a fresh process. A mutant is killed when a test fails. Argument
checks (``check_tensor``, ``raise``) and docstrings are not mutated.

    python tests/mutate_losses.py            # every mutant; prints the survivors and the score
    python tests/mutate_losses.py --list     # the mutants only
    python tests/mutate_losses.py --jobs 2   # two processes at a time

Exit code 0 when the score is at least ``--target`` (default 0.9).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import os
import subprocess
import sys
import tempfile
from typing import Iterator, List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "fastrp", "algos", "losses.py")
TESTS = os.path.join(ROOT, "tests", "test_losses.py")
FUNCTIONS = ("soft_bellman_target", "critic_loss", "sac_actor_loss", "temperature_loss", "polyak_update",
             "sample_policy", "imagined_objective", "model_nll_loss", "fd_gradient_loss")

_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
_CMP_SWAPS = {ast.Lt: ast.GtE, ast.LtE: ast.Gt, ast.Gt: ast.LtE, ast.GtE: ast.Lt, ast.Eq: ast.NotEq,
              ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_NAME_SWAPS = {"minimum": "maximum", "maximum": "minimum", "min": "max", "max": "min", "mean": "sum",
               "sum": "mean", "square": "abs", "exp": "log", "log": "exp"}


def _skipped(node: ast.AST, parents) -> bool:
    """Argument checks and error paths are not the maths."""
    for p in parents:
        if isinstance(p, ast.Raise) or isinstance(p, ast.If) and any(isinstance(s, ast.Raise) for s in p.body):
            return True
        if isinstance(p, ast.Call) and getattr(p.func, "id", getattr(p.func, "attr", "")) == "check_tensor":
            return True
        if isinstance(p, ast.Expr) and isinstance(p.value, ast.Constant) and isinstance(p.value.value, str):
            return True
    return False


def _walk(node: ast.AST, parents=()) -> Iterator[Tuple[ast.AST, tuple]]:
    yield node, parents
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, parents + (node,))


def mutants(source: str) -> List[Tuple[str, int, str]]:
    """``(description, line, mutated source)`` for every mutation of the listed functions."""
    tree = ast.parse(source)
    out: List[Tuple[str, int, str]] = []
    sites = []
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in FUNCTIONS:
            for stmt in fn.body:
                for node, parents in _walk(stmt, (fn,)):
                    if not _skipped(node, parents):
                        sites.append((fn.name, node))
    for index, (fn_name, node) in enumerate(sites):
        for desc, apply in _mutations(node):
            mutated = copy.deepcopy(tree)
            target = [n for n in ast.walk(mutated)][[n for n in ast.walk(tree)].index(node)]
            if apply(target):
                out.append((f"{fn_name}: {desc}", node.lineno, ast.unparse(mutated)))
    return out


def _mutations(node: ast.AST):
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
        new = _BINOP_SWAPS[type(node.op)]
        yield f"{type(node.op).__name__} -> {new.__name__} in `{ast.unparse(node)}`", lambda n, new=new: _set(n, "op", new())
        if isinstance(node.op, ast.Mult):  # drop a factor (a mask, a discount, a weight)
            yield f"drop the left factor of `{ast.unparse(node)}`", lambda n: _replace_with(n, n.right)
            yield f"drop the right factor of `{ast.unparse(node)}`", lambda n: _replace_with(n, n.left)
        if isinstance(node.op, (ast.Add, ast.Sub)):  # drop a term
            yield f"drop the right term of `{ast.unparse(node)}`", lambda n: _replace_with(n, n.left)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        yield f"drop the minus of `{ast.unparse(node)}`", lambda n: _replace_with(n, n.operand)
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMP_SWAPS:
        new = _CMP_SWAPS[type(node.ops[0])]
        yield f"{type(node.ops[0]).__name__} -> {new.__name__} in `{ast.unparse(node)}`", lambda n, new=new: _set(n, "ops", [new()])
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        new_value = 1 if node.value == 0 else 0
        yield f"constant {node.value!r} -> {new_value}", lambda n, v=new_value: _set(n, "value", type(n.value)(v))
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield f"constant {node.value!r} -> {not node.value}", lambda n: _set(n, "value", not n.value)
    if isinstance(node, ast.Attribute) and node.attr in _NAME_SWAPS:
        new = _NAME_SWAPS[node.attr]
        yield f"{node.attr} -> {new} in `{ast.unparse(node)}`", lambda n, new=new: _set(n, "attr", new)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "detach" and not node.args:
        yield f"drop `.detach()` in `{ast.unparse(node)}`", lambda n: _replace_with(n, n.func.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        yield f"drop the `~` of `{ast.unparse(node)}`", lambda n: _replace_with(n, n.operand)


def _set(node, field, value) -> bool:
    setattr(node, field, value)
    return True


def _replace_with(node, other) -> bool:
    """Turn ``node`` into a copy of ``other`` in place (keeps the parent's reference)."""
    replacement = copy.deepcopy(other)
    node.__class__ = replacement.__class__
    node.__dict__.clear()
    node.__dict__.update(replacement.__dict__)
    return True


_RUNNER = """
import sys
import fastrp.algos.losses as losses
source = open(sys.argv[1]).read()
exec(compile(source, losses.__file__, "exec"), losses.__dict__)
import pytest
sys.exit(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", sys.argv[2]]))
"""


def run_mutant(mutated: str, timeout: float) -> str:
    """``killed`` (a test failed or the module broke), ``survived`` or ``timeout``."""
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(mutated)
        path = fh.name
    try:
        proc = subprocess.run([sys.executable, "-c", _RUNNER, path, TESTS], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        return "survived" if proc.returncode == 0 else "killed"
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        os.remove(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (processes)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (a hang counts as killed)")
    parser.add_argument("--target", type=float, default=0.9, help="minimum score for exit code 0")
    args = parser.parse_args(argv)
    with open(TARGET) as fh:
        source = fh.read()
    found = mutants(source)
    if args.list:
        for desc, line, _ in found:
            print(f"line {line}: {desc}")
        print(f"{len(found)} mutants")
        return 0
    print(f"{len(found)} mutants of {os.path.relpath(TARGET, ROOT)}, each against {os.path.relpath(TESTS, ROOT)}")
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        futures = [pool.submit(run_mutant, mutated, args.timeout) for _, _, mutated in found]
        for (desc, line, _), fut in zip(found, futures):
            outcome = fut.result()
            results.append((desc, line, outcome))
            print(f"{outcome:9s} line {line}: {desc}", flush=True)
    killed = sum(outcome != "survived" for _, _, outcome in results)
    score = killed / len(results) if results else 1.0
    print(f"\nscore: {killed}/{len(results)} = {score:.1%} killed")
    survivors = [(d, ln) for d, ln, o in results if o == "survived"]
    if survivors:
        print("survivors:")
        for desc, line in survivors:
            print(f"  line {line}: {desc}")
    return 0 if score >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
