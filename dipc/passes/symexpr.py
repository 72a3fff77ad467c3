"""Fast Python functions from the sympy expressions torch's symbolic shapes produce.

torch's shape expressions use its own sympy functions (FloorDiv, CeilToInt, PythonMod, ...) that
``sympy.lambdify`` does not know, and sympy prints ``Mod(a, a*b)`` as ``a % a*b`` (wrong
precedence). :func:`lambdify_int` handles both, so plan-time shapes and SEMU costs evaluate in
microseconds with exactly torch's semantics.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import sympy

_PyMod = sympy.Function("PyMod")


def safe_mod(e: sympy.Basic) -> sympy.Basic:
    """sympy prints ``Mod(a, a*b)`` as ``a % a*b`` (wrong precedence): use an explicit function."""
    is_mod = lambda x: type(x).__name__ in ("Mod", "PythonMod")  # sympy's and torch's
    return e.replace(is_mod, lambda x: _PyMod(*x.args))


def function_impls(exprs: Sequence[sympy.Expr]) -> dict[str, Callable]:
    """Python implementations of the sympy functions torch's shape expressions use (FloorDiv,
    CeilToInt, Mod, ...): evaluate the function itself on integers, so semantics are exactly torch's."""
    impls: dict[str, Callable] = {"PyMod": lambda a, b: a % b}
    for e in exprs:
        for f in e.atoms(sympy.Function):
            func = f.func
            if func.__name__ == "PyMod":
                continue
            impls.setdefault(func.__name__, lambda *a, func=func: _to_python(func(*map(sympy.sympify, a))))
    return impls


def _to_python(v: sympy.Basic) -> Any:
    if v.is_Integer:
        return int(v)
    if v in (sympy.true, sympy.false):
        return bool(v)
    return float(v)



def lambdify_int(symbols: Sequence[sympy.Symbol], exprs: Any) -> Callable[..., Any]:
    """``sympy.lambdify`` for integer shape/cost expressions (one expression or a list)."""
    many = isinstance(exprs, (list, tuple))
    safe = [safe_mod(sympy.sympify(e)) for e in (exprs if many else [exprs])]
    return sympy.lambdify(list(symbols), safe if many else safe[0], [function_impls(safe), "math"])
