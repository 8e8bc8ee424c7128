"""Prove that an SDPA ``attn_mask`` is causal, or causal AND key padding, by reading its FX cone.

Transformers materialises the attention mask inside compiled graphs: index vectors from
``torch.arange``, broadcast with ``None`` indexing, compared (``kv <= q``), and'ed with a lookup of
the user's ``attention_mask[batch, kv]``. Hand-written models use ``torch.ones(n, n).tril()``,
``~triu(ones, 1)``, ``full(-inf).triu(1)`` or ``where(mask, 0, -inf)``. We interpret that cone over
an abstract domain instead of running it:

- ``AInt``: an integer tensor whose value is a linear form over index variables (one per axis
  index) and graph symbols, e.g. ``kv + 0``; each tensor axis carries one variable or none.
- ``ABool``: a conjunction of atoms: ``("le", form)`` meaning ``form <= 0``, or ``("pad", node,
  batch_form, key_form)`` meaning ``bool(node[batch, key])`` (a (B, L) tensor from outside).
- ``AConst``: a constant broadcast everywhere (True, False, 0, 1, -inf, ...).
- ``AInd``: ``value`` where a condition holds, 0 elsewhere (``ones(n, n).tril()``).
- ``AAdd``: an additive float mask: 0 where a condition holds, -inf elsewhere.
- ``AInput``: an opaque (B, L) tensor from outside the cone; ``AOpaque``: an indexed view of a
  non-boolean one, whose truth value (``!= 0``) is a padding atom.

Every op we do not understand makes the proof fail, with the op named in the reason: the site then
stays dense. The result is exact for every input, not a check on example values: the forms are
symbolic in the sequence length. Three things the values alone do not show are checked too: the
dtype of every position tensor can hold its values exactly (no integer overflow, no float rounding;
a symbolic size is taken to be below 2**48), nothing in the cone or aliasing it is written in place
(:func:`mutation_reason`), and a padding lookup's in-range condition, which eager would enforce with
an error, is the op's run-time check (it slices the padding to (B, kv_len) and refuses a shorter one).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from typing import Any, Iterable

import torch
import torch.fx as fx

__all__ = ["MaskProof", "prove_causal_mask", "mutation_reason", "MAX_SIZE"]

Form = tuple  # sorted tuple of (key, coef) pairs; key "1" is the constant term
MAX_SIZE = 2**48  # bound assumed for a symbolic size: no tensor dimension reaches 2**48
_FLOAT_EXACT = {torch.bfloat16: 2**8, torch.float16: 2**11, torch.float32: 2**24, torch.float64: 2**53}


class _Unprovable(Exception):
    pass


def _form(d: dict) -> Form:
    return tuple(sorted(((k, c) for k, c in d.items() if c != 0), key=lambda kc: repr(kc[0])))


def _fdict(f: Form) -> dict:
    return dict(f)


def _fadd(a: Form, b: Form, sign: int = 1) -> Form:
    d = _fdict(a)
    for k, c in b:
        d[k] = d.get(k, 0) + sign * c
    return _form(d)


def _fscale(f: Form, s: int) -> Form:
    return _form({k: s * c for k, c in f})


def _fsubst_all(f: Form, mapping: dict) -> Form:
    """Substitute every variable of ``mapping`` at once (never into a substituted form)."""
    d = _fdict(f)
    out: Form = _form({k: c for k, c in d.items() if k not in mapping})
    for var, repl in mapping.items():
        c = d.get(var, 0)
        if c:
            out = _fadd(out, _fscale(repl, c))
    return out


def _fsubst(f: Form, var: Any, repl: Form) -> Form:
    return _fsubst_all(f, {var: repl})


def _const_form(c: int) -> Form:
    return _form({"1": c})


@dataclasses.dataclass(frozen=True)
class AInt:
    axes: tuple  # per axis: a variable key or None (constant along that axis)
    form: Form


@dataclasses.dataclass(frozen=True)
class ABool:
    axes: tuple
    atoms: frozenset


@dataclasses.dataclass(frozen=True)
class AConst:
    value: Any


@dataclasses.dataclass(frozen=True)
class AInd:
    cond: ABool
    value: Any  # a non-zero number where cond holds; 0 elsewhere


@dataclasses.dataclass(frozen=True)
class AAdd:
    allowed: ABool  # 0 where allowed, -inf elsewhere


@dataclasses.dataclass(frozen=True)
class AInput:
    node: fx.Node
    ndim: int
    is_bool: bool


@dataclasses.dataclass(frozen=True)
class AOpaque:
    axes: tuple
    atom: tuple  # ("pad", node, batch_form, key_form); this value's truth (!= 0) is the atom


def _subst_value(v: Any, mapping: dict, axes: tuple | None = None) -> Any:
    """Substitute variables (var -> form) in an AInt/ABool/AOpaque's forms and atoms; new axes."""
    def sf(f: Form) -> Form:
        return _fsubst_all(f, mapping)

    def sa(a: tuple) -> tuple:
        if a[0] == "le":
            return ("le", sf(a[1]))
        if a[0] == "pad":
            return ("pad", a[1], sf(a[2]), sf(a[3]))
        return a

    axes = v.axes if axes is None else axes
    if isinstance(v, AInt):
        return AInt(axes, sf(v.form))
    if isinstance(v, ABool):
        return ABool(axes, frozenset(sa(a) for a in v.atoms))
    if isinstance(v, AOpaque):
        return AOpaque(axes, sa(v.atom))
    raise _Unprovable(f"indexing of {type(v).__name__}")


def _rename(v: Any, old: Any, new: Any) -> Any:
    """Rename index variable ``old`` to ``new`` (axes, forms and atoms)."""
    axes = tuple(new if a == old else a for a in v.axes)
    return _subst_value(v, {old: _form({new: 1})}, axes)


@dataclasses.dataclass(frozen=True)
class MaskProof:
    """Outcome: ``kind`` is "causal" or "causal+padding"; ``padding`` the (B, L) node whose truth
    value (``!= 0``) is the key padding; the op slices it to (B, kv_len) at run time."""

    kind: str
    padding: fx.Node | None
    nodes: frozenset  # the cone's nodes, candidates for removal once the SDPA is rewritten


def _meta(n: Any) -> Any:
    if isinstance(n, fx.Node):
        return n.meta.get("example_value", n.meta.get("val"))
    return n


def _size_repr(x: Any) -> Any:
    """A hashable, symbolic description of an int or SymInt node (same symbol -> same repr)."""
    m = _meta(x)
    if isinstance(m, torch.SymInt):
        return ("sym", str(m.node.expr))
    if isinstance(m, int):
        return m
    return ("node", getattr(x, "name", repr(x)))


def _same_size(a: Any, b: Any) -> bool:
    a, b = _meta(a), _meta(b)
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _abs_bound(x: Any) -> int | None:
    """An upper bound of |x| for an int, a SymInt or a SymInt node; None when unknown."""
    m = _meta(x)
    if isinstance(m, bool):
        return None
    if isinstance(m, int):
        return abs(m)
    if not isinstance(m, torch.SymInt):
        return None
    expr = m.node.expr
    syms = list(expr.free_symbols)
    if any(not str(s).startswith("s") for s in syms):  # unbacked (u0, from .item()) or other
        return None
    try:
        import sympy

        terms = sympy.Poly(expr, *syms).terms() if syms else [((), expr)]
        return int(sum(abs(int(c)) * MAX_SIZE ** sum(mon) for mon, c in terms))
    except Exception:
        return None


def _tensor_dtype(a: Any) -> torch.dtype | None:
    m = _meta(a)
    return m.dtype if isinstance(m, torch.Tensor) else None


def _compute_dtype(a: Any, b: Any) -> torch.dtype | None:
    """The dtype a binary op computes in (PyTorch's type promotion of its two operands)."""
    def dummy(x: Any) -> Any:
        m = _meta(x)
        if isinstance(m, torch.Tensor):
            return torch.zeros((1,) * min(m.dim(), 1), dtype=m.dtype)
        if isinstance(m, (bool, int, float)):
            return m
        if isinstance(m, torch.SymInt):
            return 1
        return None

    da, db = dummy(a), dummy(b)
    if da is None or db is None or not (isinstance(da, torch.Tensor) or isinstance(db, torch.Tensor)):
        return None
    return torch.result_type(da, db)


def _operand(n: fx.Node) -> Any:
    """The second operand of a binary op, positional or ``other=``."""
    if len(n.args) > 1:
        return n.args[1]
    if "other" in n.kwargs:
        return n.kwargs["other"]
    raise _Unprovable(f"{getattr(n.target, '__name__', n.target)} without a second operand")


def _truth_preserving(src: torch.dtype, dst: torch.dtype) -> bool:
    """A cast src -> dst keeps which values are non-zero."""
    if src == dst or dst == torch.bool or src == torch.bool:
        return True
    if not src.is_floating_point and not src.is_complex:
        if dst.is_floating_point:
            return True
        return torch.iinfo(dst).min <= torch.iinfo(src).min and torch.iinfo(dst).max >= torch.iinfo(src).max
    if src.is_floating_point and dst.is_floating_point:
        return dst == torch.float64 or (dst == torch.float32 and src in (torch.float16, torch.bfloat16))
    return False


_METHOD_AS_FUNCTION = {
    "__eq__": operator.eq, "__ne__": operator.ne, "__le__": operator.le, "__lt__": operator.lt,
    "__ge__": operator.ge, "__gt__": operator.gt, "__and__": operator.and_, "__add__": operator.add,
    "__sub__": operator.sub, "__getitem__": operator.getitem, "add": torch.add, "sub": torch.sub,
    "logical_and": torch.logical_and, "bitwise_and": torch.bitwise_and, "__invert__": operator.invert,
    "logical_not": torch.logical_not, "bitwise_not": torch.bitwise_not, "tril": torch.tril, "triu": torch.triu,
    "masked_fill": torch.masked_fill, "diff": torch.diff,
}
_CASTS = {"to", "type", "bool", "long", "int", "short", "float", "half", "bfloat16", "double"}
_CREATE = {torch.ones: 1, torch.zeros: 0, torch.ones_like: 1, torch.zeros_like: 0, torch.full: None,
           torch.full_like: None, "new_ones": 1, "new_zeros": 0, "new_full": None}
_CMP = {"le", "lt", "ge", "gt", "eq", "ne"}
_NOT = (operator.invert, torch.logical_not, torch.bitwise_not)


class _Interp:
    def __init__(self) -> None:
        self.env: dict[fx.Node, Any] = {}
        self.var_len: dict[Any, Any] = {}
        self.sym_nodes: dict[Any, Any] = {}
        self.cone: set[fx.Node] = set()
        self._ids = itertools.count()

    # -- helpers -------------------------------------------------------------------------------
    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a not in self.env:
                v = self.eval(a)
                if isinstance(v, AInt):
                    self.check_exact(v.form, _tensor_dtype(a), a.name)
                self.env[a] = v
            return self.env[a]
        if isinstance(a, (bool, int)):
            return AConst(a)
        if isinstance(a, float) and (a == 0 or a == -math.inf):
            return AConst(a)
        raise _Unprovable(f"constant {a!r} of type {type(a).__name__}")

    def new_var(self, start: Any, end: Any) -> Any:
        key = ("var", next(self._ids))
        self.var_len[key] = (start, end)
        return key

    def interval(self, form: Form) -> tuple[int, int] | None:
        lo = hi = 0
        for k, c in form:
            if k == "1":
                lo, hi = lo + c, hi + c
                continue
            if k in self.var_len:
                start, end = self.var_len[k]
                bs, be = _abs_bound(start), _abs_bound(end)
                if bs is None or be is None:
                    return None
                x_lo, x_hi = 0, bs + be
            else:
                b = _abs_bound(self.sym_nodes.get(k))
                if b is None:
                    return None
                x_lo, x_hi = -b, b
            lo, hi = lo + min(c * x_lo, c * x_hi), hi + max(c * x_lo, c * x_hi)
        return lo, hi

    def check_exact(self, form: Form, dtype: torch.dtype | None, what: str) -> None:
        """Fail unless every value of ``form`` is held exactly by ``dtype`` (no overflow, no rounding)."""
        if dtype is None or dtype == torch.bool:
            return
        iv = self.interval(form)
        if iv is None:
            raise _Unprovable(f"positions of {what} have no known bound")
        lo, hi = iv
        if dtype.is_floating_point:
            lim = _FLOAT_EXACT.get(dtype)
            if lim is None or max(-lo, hi) > lim:
                raise _Unprovable(f"positions of {what} may round in {dtype} (up to {max(-lo, hi)})")
        elif dtype.is_complex:
            raise _Unprovable(f"complex positions in {what}")
        else:
            info = torch.iinfo(dtype)
            if lo < info.min or hi > info.max:
                raise _Unprovable(f"positions of {what} may overflow {dtype} (range {lo}..{hi})")

    def check_operands(self, n: fx.Node, a: Any, b: Any, av: Any, bv: Any) -> None:
        """Both operands of an arithmetic or comparison node are held exactly where it computes."""
        dt = _compute_dtype(a, b)
        for v in (av, bv):
            if isinstance(v, AInt):
                self.check_exact(v.form, dt, n.name)
            elif isinstance(v, AConst) and isinstance(v.value, int) and not isinstance(v.value, bool):
                self.check_exact(_const_form(v.value), dt, n.name)

    def scalar_form(self, a: Any) -> Form:
        """A Python int or a SymInt node used as an offset."""
        if isinstance(a, bool):
            raise _Unprovable("bool offset")
        if isinstance(a, int):
            return _const_form(a)
        if isinstance(a, fx.Node) and isinstance(_meta(a), torch.SymInt):
            key = ("sym", a.name)
            self.sym_nodes[key] = a
            return _form({key: 1})
        if isinstance(a, fx.Node):
            v = self.val(a)
            if isinstance(v, AConst) and isinstance(v.value, int) and not isinstance(v.value, bool):
                return _const_form(v.value)
        raise _Unprovable(f"offset {a!r} is not an integer")

    @staticmethod
    def ndim(v: Any) -> int:
        if isinstance(v, (AInt, ABool, AOpaque)):
            return len(v.axes)
        if isinstance(v, AInput):
            return v.ndim
        return 0

    def canon(self, v: Any) -> Any:
        """Name each index variable by the axis it sits on (counted from the right) and its range.

        A variable is the index along its axis, so one ``arange`` broadcast along two axes
        (``i[None, :] <= i[:, None]``) is two variables, and two aranges of one range on the same
        axis are one. Ranges are compared symbolically; different ranges stay different variables
        (and then meet in ``broadcast_axes``, which refuses them).
        """
        if isinstance(v, AInd):
            return AInd(self.canon(v.cond), v.value)
        if isinstance(v, AAdd):
            return AAdd(self.canon(v.allowed))
        if not isinstance(v, (AInt, ABool, AOpaque)):
            return v
        renames = {}
        for i, var in enumerate(v.axes):
            if var is not None:
                start, end = self.var_len[var]
                new = ("axis", i - len(v.axes), _size_repr(start), _size_repr(end))
                if new != var:
                    renames[var] = new
                    self.var_len.setdefault(new, (start, end))
        for j, old in enumerate(renames):  # via temporary names: a new name may be another's old one
            v = _rename(v, old, ("tmp", j))
        for j, new in enumerate(renames.values()):
            v = _rename(v, ("tmp", j), new)
        return v

    @staticmethod
    def broadcast_axes(a: tuple, b: tuple) -> tuple:
        n = max(len(a), len(b))
        a = (None,) * (n - len(a)) + a
        b = (None,) * (n - len(b)) + b
        out = []
        for x, y in zip(a, b):
            if x is not None and y is not None and x != y:
                raise _Unprovable("two index variables on one axis")
            out.append(x if x is not None else y)
        return tuple(out)

    def as_int(self, v: Any) -> AInt:
        if isinstance(v, AInt):
            return v
        if isinstance(v, AConst) and isinstance(v.value, int) and not isinstance(v.value, bool):
            return AInt((), _const_form(v.value))
        raise _Unprovable(f"expected an integer index tensor, got {type(v).__name__}")

    def as_bool(self, v: Any) -> ABool:
        if isinstance(v, ABool):
            return v
        if isinstance(v, AConst) and isinstance(v.value, bool):
            return ABool((), frozenset() if v.value else frozenset({("false",)}))
        raise _Unprovable(f"expected a boolean tensor, got {type(v).__name__}")

    def conj(self, a: Any, b: Any) -> ABool:
        a, b = self.as_bool(self.canon(a)), self.as_bool(self.canon(b))
        return ABool(self.broadcast_axes(a.axes, b.axes), a.atoms | b.atoms)

    def negate(self, v: Any) -> Any:
        if isinstance(v, AConst) and isinstance(v.value, bool):
            return AConst(not v.value)
        v = self.as_bool(v)
        if not v.atoms:
            return AConst(False)
        if v.atoms == frozenset({("false",)}):
            return AConst(True)
        if len(v.atoms) == 1:
            (atom,) = v.atoms
            if atom[0] == "le":  # not (f <= 0)  <=>  f >= 1  <=>  -f + 1 <= 0 (integers)
                return ABool(v.axes, frozenset({("le", _fadd(_fscale(atom[1], -1), _const_form(1)))}))
        raise _Unprovable("negation of a padding lookup or of a conjunction")

    def position_vars(self, n_axes: int, shape: Any) -> tuple:
        """Fresh index variables for the last ``n_axes`` axes of a tensor of meta ``shape``."""
        return tuple(self.new_var(0, s) for s in shape[len(shape) - n_axes:])

    # -- evaluation ----------------------------------------------------------------------------
    def eval(self, n: fx.Node) -> Any:
        self.cone.add(n)
        if n.op == "placeholder":
            ev = _meta(n)
            if isinstance(ev, torch.Tensor):
                return AInput(n, ev.dim(), ev.dtype == torch.bool)
            raise _Unprovable(f"graph input {n.name} is not a tensor")
        if n.op == "call_function":
            return self.call_function(n)
        if n.op == "call_method":
            return self.call_method(n)
        raise _Unprovable(f"node {n.name} ({n.op})")

    def create(self, n: fx.Node, fill: Any) -> AConst:
        """ones/zeros/full and their _like/new_ forms: a constant; its shape is read where it matters."""
        dtype = _tensor_dtype(n)
        if fill is None:  # full(size, v), full_like(x, v), x.new_full(size, v)
            pos = 2 if n.op == "call_method" else 1
            fill = n.args[pos] if len(n.args) > pos else n.kwargs.get("fill_value")
            if isinstance(fill, bool) or not isinstance(fill, (int, float)):
                raise _Unprovable(f"fill value {fill!r} is not a number")
        if dtype == torch.bool:
            return AConst(bool(fill))
        if dtype is not None and dtype.is_floating_point:
            return AConst(float(fill))
        if isinstance(fill, float) and not fill.is_integer():
            raise _Unprovable("fractional fill of an integer tensor")
        return AConst(int(fill))

    def call_function(self, n: fx.Node, target: Any = None) -> Any:
        t = n.target if target is None else target
        if t is torch.arange:
            args = list(n.args)
            if "end" in n.kwargs:
                args = [n.kwargs.get("start", 0), n.kwargs["end"]]
            if n.kwargs.get("step", 1) != 1 or len(args) > 2 or not args:
                raise _Unprovable("arange with a step")
            start, end = (0, args[0]) if len(args) == 1 else args
            key = self.new_var(start, end)
            return AInt((key,), _fadd(_form({key: 1}), self.scalar_form(start)))
        if t in _CREATE:
            return self.create(n, _CREATE[t])
        if t in (operator.add, operator.sub, torch.add, torch.sub):
            if n.kwargs.get("alpha", 1) != 1 or len(n.args) != 2:
                raise _Unprovable("add/sub with alpha")
            a, b = n.args[0], _operand(n)
            sign = 1 if t in (operator.add, torch.add) else -1
            av = self.val(a)
            bv = self.val(b) if isinstance(b, fx.Node) and isinstance(_meta(b), torch.Tensor) else None
            if isinstance(av, AAdd) or isinstance(bv, AAdd):
                if sign != 1:
                    raise _Unprovable("subtraction of an additive mask")
                masks = [x for x in (av, bv) if isinstance(x, AAdd)]
                others = [x for x in (av, bv) if x is not None and not isinstance(x, AAdd)]
                if any(not (isinstance(x, AConst) and x.value == 0) for x in others) or (bv is None and b != 0):
                    raise _Unprovable("additive mask plus a non-mask tensor")
                out = masks[0].allowed
                for m in masks[1:]:
                    out = self.conj(out, m.allowed)
                return AAdd(out)
            if bv is not None:
                avi = self.as_int(self.canon(av))
                bvi = self.as_int(self.canon(bv))
                self.check_operands(n, a, b, avi, bvi)
                return AInt(self.broadcast_axes(avi.axes, bvi.axes), _fadd(avi.form, bvi.form, sign))
            avi = self.as_int(av)
            bf = self.scalar_form(b)
            self.check_operands(n, a, b if not isinstance(b, fx.Node) else 1, avi, AInt((), bf))
            return AInt(avi.axes, _fadd(avi.form, bf, sign))
        if t in (operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                 torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne):
            a, b = n.args[0], _operand(n)
            av, bv = self.val(a), self.val(b)
            self.check_operands(n, a, b, av, bv)
            return self.compare(t.__name__.strip("_"), av, bv)
        if t in (operator.and_, torch.logical_and, torch.bitwise_and):
            a, b = self.val(n.args[0]), self.val(_operand(n))
            if t is not torch.logical_and and any(_tensor_dtype(x) not in (None, torch.bool)
                                                  for x in (n.args[0], _operand(n))):
                raise _Unprovable("bitwise and of non-boolean tensors")
            return self.conj(self.truth(a), self.truth(b))
        if t in _NOT:
            x = n.args[0]
            if t is not torch.logical_not and _tensor_dtype(x) != torch.bool:
                raise _Unprovable("bitwise not of a non-boolean tensor")
            return self.negate(self.canon(self.truth(self.val(x))))
        if t in (torch.tril, torch.triu):
            return self.tri(n, t is torch.tril)
        if t is torch.where:
            if len(n.args) != 3:
                raise _Unprovable("where with one argument")
            return self.where(self.val(n.args[0]), self.val(n.args[1]), self.val(n.args[2]))
        if t is torch.masked_fill:
            value = n.args[2] if len(n.args) > 2 else n.kwargs.get("value")
            return self.where(self.val(n.args[1] if len(n.args) > 1 else n.kwargs["mask"]), self.val(value),
                              self.val(n.args[0]))
        if t is operator.getitem:
            return self.getitem(self.val(n.args[0]), n.args[1], n.args[0], n)
        if t is torch.diff:
            return self.diff(n)
        raise _Unprovable(f"op {getattr(t, '__name__', t)}")

    def truth(self, v: Any) -> Any:
        """The boolean meaning of a value used as a mask operand (an AOpaque is not boolean)."""
        if isinstance(v, AOpaque):
            raise _Unprovable("a non-boolean padding tensor used as a boolean")
        if isinstance(v, AInd):
            return v.cond
        return v

    def tri(self, n: fx.Node, lower: bool) -> Any:
        x = self.val(n.args[0])
        d = n.args[1] if len(n.args) > 1 else n.kwargs.get("diagonal", 0)
        if not isinstance(d, int) or isinstance(d, bool):
            raise _Unprovable("tril/triu with a non-constant diagonal")
        shape = _meta(n).shape
        if len(shape) < 2:
            raise _Unprovable("tril/triu of a tensor with fewer than 2 dims")
        r, c = self.position_vars(2, shape)
        axes = (None,) * (len(shape) - 2) + (r, c)
        kept = _form({c: 1, r: -1, "1": -d}) if lower else _form({r: 1, c: -1, "1": d})  # c - r <= d / c - r >= d
        keep = ABool(axes, frozenset({("le", kept)}))
        if isinstance(x, AConst) and x.value == 0:
            return x
        if isinstance(x, AConst) and x.value is True:
            return self.canon(keep)
        if isinstance(x, AConst) and x.value == -math.inf:
            return AAdd(self.canon(self.negate(keep)))
        if isinstance(x, AConst) and isinstance(x.value, (int, float)) and not isinstance(x.value, bool):
            return AInd(self.canon(keep), x.value)
        if isinstance(x, ABool):
            return self.conj(x, keep)
        raise _Unprovable(f"tril/triu of {type(x).__name__}")

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        """``where(cond, a, b)`` (and ``b.masked_fill(cond, a)``) for the mask-building cases."""
        cond = self.canon(self.truth(cond))
        a, b = self.canon(a), self.canon(b)
        if isinstance(a, AConst) and isinstance(b, AConst):
            if a.value is True and b.value is False:
                return cond
            if a.value is False and b.value is True:
                return self.negate(cond)
            if a.value == 0 and b.value == -math.inf and not isinstance(a.value, bool):
                return AAdd(self.as_bool(cond))
            if a.value == -math.inf and b.value == 0 and not isinstance(b.value, bool):
                return AAdd(self.as_bool(self.negate(cond)))
            raise _Unprovable(f"where with values {a.value!r} and {b.value!r} (an additive mask needs 0 and -inf)")
        if isinstance(a, AConst) and a.value is False and isinstance(b, ABool):
            return self.conj(b, self.negate(cond))
        if isinstance(b, AConst) and b.value is False and isinstance(a, ABool):
            return self.conj(a, cond)
        if isinstance(a, AConst) and a.value == -math.inf and isinstance(b, AAdd):
            return AAdd(self.conj(b.allowed, self.negate(cond)))
        raise _Unprovable("where/masked_fill of this form")

    def cast(self, n: fx.Node, x: Any) -> Any:
        src = _tensor_dtype(n.args[0])
        dst = _tensor_dtype(n)
        if src is None or dst is None:
            raise _Unprovable(f"cast {n.name} of unknown dtype")
        if isinstance(x, AInput):  # the moved/cast node is the one the op must read
            if not _truth_preserving(src, dst):
                raise _Unprovable(f"cast of the padding mask from {src} to {dst} changes which values are non-zero")
            return AInput(n, x.ndim, dst == torch.bool)
        if src == dst:
            return x  # a device move, or a cast to its own dtype
        if isinstance(x, AOpaque):
            if dst == torch.bool:
                return ABool(x.axes, frozenset({x.atom}))
            if _truth_preserving(src, dst):
                return x
            raise _Unprovable(f"cast of the padding mask from {src} to {dst} changes which values are non-zero")
        if isinstance(x, AConst):
            if dst == torch.bool:
                return AConst(bool(x.value))
            if dst.is_floating_point:
                return AConst(float(x.value))
            if isinstance(x.value, float) and not x.value.is_integer():
                raise _Unprovable(f"cast of {x.value} to {dst}")
            return AConst(int(x.value))
        if isinstance(x, AInt):
            if dst == torch.bool:
                return self.compare("ne", x, AConst(0))
            return x  # exactness in the new dtype: checked in val()
        if isinstance(x, AInd):
            if dst == torch.bool:
                return x.cond
            return x
        if isinstance(x, AAdd) and dst.is_floating_point and src.is_floating_point:
            return x
        raise _Unprovable(f"cast of {type(x).__name__} from {src} to {dst}")

    def reshape_same(self, n: fx.Node, x: Any) -> Any:
        """view/reshape to the shape it already has (``attention_mask.view(batch, -1)``)."""
        src, out = _meta(n.args[0]), _meta(n)
        if (isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and src.dim() == out.dim()
                and all(_same_size(a, b) for a, b in zip(src.shape, out.shape))):
            if isinstance(x, AInput):
                return AInput(n, x.ndim, x.is_bool)
            return x
        raise _Unprovable(f"method .{n.target}() that changes the shape")

    def call_method(self, n: fx.Node) -> Any:
        name = n.target
        if name in _METHOD_AS_FUNCTION:  # x.__eq__(y), x.add(y), x.logical_and(y): same rules as the functions
            return self.call_function(n, _METHOD_AS_FUNCTION[name])
        if name in _CREATE:  # only dtype matters, not the receiver's value
            return self.create(n, _CREATE[name])
        x = self.val(n.args[0])
        if name in _CASTS:
            return self.cast(n, x)
        if name in ("view", "reshape"):
            return self.reshape_same(n, x)
        if name == "unsqueeze":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
            if isinstance(x, AInd):
                return AInd(self.unsqueeze(x.cond, dim), x.value)
            if isinstance(x, AAdd):
                return AAdd(self.unsqueeze(x.allowed, dim))
            if isinstance(x, AInput):
                x = self.positional(x)
            return self.unsqueeze(x, dim)
        if name == "expand":
            sizes = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (tuple, list))) else n.args[1]
            inner = x.cond if isinstance(x, AInd) else x.allowed if isinstance(x, AAdd) else x
            if isinstance(inner, AInput):
                inner = self.positional(inner)
            if isinstance(inner, (AInt, ABool, AOpaque)):
                pad = len(sizes) - len(inner.axes)
                if pad < 0:
                    raise _Unprovable("expand to fewer dims")
                for var, size in zip(inner.axes, sizes[pad:]):
                    if var is not None and size != -1 and not _same_size(size, self.length(var)):
                        raise _Unprovable("expand of a position axis to another length")
                inner = dataclasses.replace(inner, axes=(None,) * pad + tuple(inner.axes))
                return AInd(inner, x.value) if isinstance(x, AInd) else AAdd(inner) if isinstance(x, AAdd) else inner
            return x
        if name in _CMP:
            return self.compare(name, x, self.val(_operand(n)))
        if name == "cumsum":
            if isinstance(x, AConst) and x.value in (0, False):
                return AConst(0)
            raise _Unprovable("cumsum of a non-zero tensor")
        raise _Unprovable(f"method .{name}()")

    def unsqueeze(self, x: Any, dim: int) -> Any:
        if not isinstance(x, (AInt, ABool, AOpaque)):
            return x
        axes = list(x.axes)
        dim = dim if dim >= 0 else len(axes) + 1 + dim
        axes.insert(dim, None)
        return dataclasses.replace(x, axes=tuple(axes))

    def positional(self, x: AInput) -> Any:
        """A (B, L) outside tensor as a function of its two axis positions: ``node[b, k]``."""
        if x.ndim != 2:
            raise _Unprovable(f"a {x.ndim}-D tensor from outside the mask (only a (batch, key) padding mask is read)")
        b, k = self.position_vars(2, _meta(x.node).shape)
        atom = ("pad", x.node, _form({b: 1}), _form({k: 1}))
        return ABool((b, k), frozenset({atom})) if x.is_bool else AOpaque((b, k), atom)

    def compare(self, name: str, a: Any, b: Any) -> Any:
        if isinstance(a, AConst) and isinstance(b, AConst):
            return AConst(bool(getattr(operator, name)(a.value, b.value)))
        for x, y, flip in ((a, b, False), (b, a, True)):  # padding != 0 / indicator == 1 and the like
            if isinstance(x, (AOpaque, AInd)) and isinstance(y, AConst):
                truth = ABool(x.axes, frozenset({x.atom})) if isinstance(x, AOpaque) else x.cond
                nonzero = x.value if isinstance(x, AInd) else None
                if name in ("ne", "eq") and y.value == 0 and not isinstance(y.value, bool):
                    return truth if name == "ne" else self.negate(truth)
                if isinstance(x, AInd) and name in ("eq", "ne") and y.value == nonzero:
                    return truth if name == "eq" else self.negate(truth)
                raise _Unprovable(f"{name} of a padding or indicator tensor with {y.value!r}")
        if isinstance(a, AAdd) or isinstance(b, AAdd):
            raise _Unprovable("comparison of an additive mask")
        a = self.as_int(self.canon(a))
        b = self.as_int(self.canon(b))
        axes = self.broadcast_axes(a.axes, b.axes)
        diff = _fadd(a.form, b.form, -1)  # a - b
        if name in ("eq", "ne"):
            if diff == ():
                return AConst(name == "eq")
            if all(k == "1" for k, _ in diff):
                return AConst(name == "ne")
            d = _fdict(diff)
            c = d.pop("1", 0)
            if len(d) == 1:
                (var, coef), = d.items()
                # an index variable is >= 0: a * var + c == 0 has no solution when -c / a < 0
                if isinstance(var, tuple) and var[0] == "axis" and (-c) * coef < 0:
                    return AConst(name == "ne")
            raise _Unprovable(f"{name} between index tensors")
        atom = {
            "le": diff,
            "lt": _fadd(diff, _const_form(1)),
            "ge": _fadd(b.form, a.form, -1),
            "gt": _fadd(_fadd(b.form, a.form, -1), _const_form(1)),
        }[name]
        d = _fdict(atom)
        c = d.pop("1", 0)
        if all(isinstance(k, tuple) and k[0] == "axis" for k in d):
            # index variables are >= 0: sum(coef * var) + c <= 0 holds everywhere when every coef
            # is <= 0 and c <= 0, and nowhere when every coef is >= 0 and c > 0
            if all(v <= 0 for v in d.values()) and c <= 0:
                return AConst(True)
            if all(v >= 0 for v in d.values()) and c > 0:
                return AConst(False)
        return ABool(axes, frozenset({("le", atom)}))

    def getitem(self, x: Any, idx: Any, src_node: Any = None, node: Any = None) -> Any:
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, fx.Node) for i in idx):
            return self.advanced_index(x, idx, src_node)
        if isinstance(x, AConst):
            return x
        if isinstance(x, AInd):
            return AInd(self.getitem(x.cond, idx, src_node, node), x.value)
        if isinstance(x, AAdd):
            return AAdd(self.getitem(x.allowed, idx, src_node, node))
        if isinstance(x, AInput):
            x = self.positional(x)
        if not isinstance(x, (AInt, ABool, AOpaque)):
            raise _Unprovable("basic indexing of an opaque tensor")
        out_meta = _meta(node)
        src = list(x.axes)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if n_real > len(src):
            raise _Unprovable("too many indices")
        out: list = []
        mapping: dict = {}
        pos = 0
        for i in idx:
            if i is None:
                out.append(None)
            elif i is Ellipsis:
                take = len(src) - n_real
                out.extend(src[pos : pos + take])
                pos += take
            elif isinstance(i, slice):
                var = src[pos]
                if i == slice(None) or var is None:
                    if i.step not in (None, 1):
                        raise _Unprovable(f"slice {i}")
                    out.append(var)
                else:
                    start = 0 if i.start is None else i.start
                    if i.step not in (None, 1) or not isinstance(start, int) or start < 0 or (
                            i.stop is not None and not (isinstance(i.stop, int) and i.stop >= 0)
                            and not isinstance(_meta(i.stop), torch.SymInt)):
                        raise _Unprovable(f"slice {i}")
                    if out_meta is None:
                        raise _Unprovable("slice with an unknown result shape")
                    length = out_meta.shape[len(out)]
                    if _same_size(length, 1):
                        mapping[var] = _const_form(start)
                        out.append(None)
                    else:
                        new = self.new_var(0, length)
                        mapping[var] = _form({new: 1, "1": start})
                        out.append(new)
                pos += 1
            elif isinstance(i, int) and not isinstance(i, bool) and i >= 0:
                if src[pos] is not None:
                    mapping[src[pos]] = _const_form(i)
                pos += 1
            else:
                raise _Unprovable(f"index {i!r}")
        out.extend(src[pos:])
        return self.canon(_subst_value(x, mapping, tuple(out)))

    def length(self, var: Any) -> Any:
        start, end = self.var_len[var]
        if start != 0:
            raise _Unprovable("arange with a start")
        return end

    def advanced_index(self, x: Any, idx: tuple, src_node: Any) -> Any:
        if not all(isinstance(i, fx.Node) for i in idx):
            raise _Unprovable("mixed basic and advanced indexing")
        ivals = [self.as_int(self.canon(self.val(i))) for i in idx]
        axes: tuple = ()
        for iv in ivals:
            axes = self.broadcast_axes(axes, iv.axes)
        if isinstance(x, AConst):
            return x
        src = _meta(src_node)
        if not isinstance(src, torch.Tensor) or src.dim() != len(ivals):
            raise _Unprovable("partial advanced indexing")
        single = []
        for iv in ivals:
            var = iv.form[0][0] if len(iv.form) == 1 and iv.form[0][1] == 1 else None
            single.append(None if var == "1" else var)
        if isinstance(x, AInput):
            # node[b, k]: every index is one position variable over 0..E-1 (never negative, so never
            # wrapping) or a constant >= 0; E may exceed the axis (eager raises then, the op too)
            for iv, var in zip(ivals, single):
                const = iv.form == () or (len(iv.form) == 1 and iv.form[0][0] == "1" and iv.form[0][1] >= 0)
                if not const and (var is None or self.var_len[var][0] != 0):
                    raise _Unprovable("advanced index that is not 0..len-1 of the indexed axis")
            if x.ndim != 2:
                raise _Unprovable("padding mask lookup that is not mask[batch, key]")
            atom = ("pad", x.node, ivals[0].form, ivals[1].form)
            return ABool(axes, frozenset({atom})) if x.is_bool else AOpaque(axes, atom)
        for j, var in enumerate(single):
            # only i -> i over 0..len-1 of that axis: no negative (wrapping) or out-of-range index
            if var is None or not _same_size(self.length(var), src.shape[j]):
                raise _Unprovable("advanced index that is not 0..len-1 of the indexed axis")
        if isinstance(x, AInt):
            if len(ivals) != len(x.axes):
                raise _Unprovable("partial advanced indexing")
            mapping = {var: iv.form for var, iv in zip(x.axes, ivals) if var is not None}
            return AInt(axes, _fsubst_all(x.form, mapping))  # all axes at once: rel[i[None, :], i[:, None]]
        raise _Unprovable("advanced indexing of a mask")

    def diff(self, n: fx.Node) -> Any:
        x = self.as_int(self.val(n.args[0]))
        dim = n.kwargs.get("dim", -1)
        if n.kwargs.get("append") is not None or "prepend" not in n.kwargs or n.kwargs.get("n", 1) != 1:
            raise _Unprovable("diff without a prepend")
        dim = dim if dim >= 0 else len(x.axes) + dim
        var = x.axes[dim]
        if var is None:
            raise _Unprovable("diff along a constant axis")
        coef = _fdict(x.form).get(var, 0)
        p = self.as_int(self.val(n.kwargs["prepend"]))
        if p.form != _fsubst(x.form, var, _const_form(-1)):
            raise _Unprovable("diff whose prepend is not the sequence's predecessor")
        return AConst(coef)


# -- in-place writes ---------------------------------------------------------------------------
_VIEWS = {
    "view", "view_as", "reshape", "reshape_as", "expand", "expand_as", "unsqueeze", "squeeze", "permute",
    "transpose", "t", "T", "mT", "narrow", "select", "as_strided", "detach", "to", "type", "type_as",
    "contiguous", "bool", "long", "int", "short", "float", "half", "bfloat16", "double", "flatten",
    "unflatten", "movedim", "moveaxis", "split", "chunk", "unbind", "tensor_split", "diagonal", "getitem",
    "__getitem__", "unfold", "swapaxes", "swapdims", "real", "imag", "alias", "cpu", "cuda", "broadcast_to",
    "view_as_real", "view_as_complex", "align_as", "data", "clone_if_needed",
}
_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _is_view(n: fx.Node) -> bool:
    """May the node's output share storage with its first argument?"""
    return n.op in ("call_method", "call_function") and _name(n.target) in _VIEWS


def _writes(n: fx.Node, x: fx.Node) -> bool:
    """Does node ``n`` write into tensor ``x`` (its argument)?"""
    out = n.kwargs.get("out")
    if out is x or (isinstance(out, (tuple, list)) and x in out):
        return True
    first = n.args[0] if n.args else None
    name = _name(n.target)
    if n.op == "call_method":
        inplace = (name.endswith("_") and not name.startswith("__")) or (name.startswith("__i") and name.endswith("__")
                                                                         and name not in ("__init__", "__index__"))
        return (inplace or name == "__setitem__") and first is x
    if n.op == "call_function":
        if n.target in _INPLACE_OPERATORS:
            return first is x
        schema = getattr(n.target, "_schema", None)
        if schema is None and hasattr(n.target, "overloads"):  # an OpOverloadPacket: any mutable overload
            try:
                schemas = [getattr(n.target, o)._schema for o in n.target.overloads()]
            except Exception:
                schemas = []
            if any(s.is_mutable for s in schemas):
                return x in n.all_input_nodes
        elif schema is not None:
            return bool(schema.is_mutable) and x in n.all_input_nodes
        from_operator = (getattr(n.target, "__module__", None) or "").endswith("operator")  # operator.and_ is not
        return name.endswith("_") and not name.startswith("_") and not from_operator and first is x
    return n.op == "call_module" and x in n.all_input_nodes  # a submodule may write its inputs


def mutation_reason(nodes: Iterable[fx.Node], after: fx.Node | None = None, before: fx.Node | None = None) -> str | None:
    """Why these tensors cannot be trusted to hold the values read from the graph, or None.

    Any in-place write (``x[...] = v``, ``x.fill_()``, ``out=x``, ops whose schema mutates) to one
    of ``nodes`` or to anything that may share its storage (views in either direction, casts and
    moves that may return ``self``) fails: anywhere in the graph, or, given ``after``/``before``,
    strictly between those two nodes (k/v read by ``repeat_kv`` and then by the op at the SDPA).
    """
    order = {}
    if after is not None or before is not None:
        graph = (after or before).graph
        order = {n: i for i, n in enumerate(graph.nodes)}
    lo = order.get(after, -1) if after is not None else -1
    hi = order.get(before, len(order)) if before is not None else None
    alias = {n for n in nodes if isinstance(n, fx.Node)}
    todo = list(alias)
    while todo:
        n = todo.pop()
        near = [u for u in n.users if _is_view(u) and u.args and u.args[0] is n]
        if _is_view(n) and n.args and isinstance(n.args[0], fx.Node):
            near.append(n.args[0])
        for m in near:
            if m not in alias:
                alias.add(m)
                todo.append(m)
    for n in sorted(alias, key=lambda n: n.name):
        for u in n.users:
            if order and not (lo < order.get(u, lo) and (hi is None or order.get(u, hi) < hi)):
                continue
            if _writes(u, n):
                return f"mask mutated in place: {u.name} ({_name(u.target)}) writes {n.name}"
    return None


def _fmt_le(form: Form, names: dict) -> str:
    """``form <= 0`` in words, e.g. ``key - query <= 0``."""
    parts = []
    const = 0
    for k, c in form:
        if k == "1":
            const = c
            continue
        name = names.get(k, "pos")
        parts.append(("- " if c < 0 else "+ ") + (f"{abs(c)}*" if abs(c) != 1 else "") + name)
    lhs = " ".join(parts).lstrip("+ ") or "0"
    return f"{lhs} <= {-const}"


def prove_causal_mask(mask: fx.Node, q_len: Any, kv_len: Any, batch: Any) -> MaskProof | str:
    """Return a :class:`MaskProof`, or a string saying why the mask is not provably causal.

    A boolean mask must evaluate to an ``ABool``, a float mask to an ``AAdd`` (0 / -inf)."""
    it = _Interp()
    try:
        v = it.val(mask)
    except _Unprovable as e:
        return f"mask not provably causal: {e}"
    except RecursionError:
        return "mask not provably causal: cone too deep"
    except Exception as e:  # a prover bug must never fail the compile: the site stays dense
        return f"mask not provably causal: prover error {type(e).__name__}: {e}"
    mutated = mutation_reason(it.cone)  # first: a written mask's value above is not what SDPA reads
    if mutated:
        return mutated
    dtype = _tensor_dtype(mask)
    if isinstance(v, AAdd):
        if dtype is None or not dtype.is_floating_point:
            return "mask not provably causal: an additive mask that is not a float tensor"
        v = v.allowed
    elif dtype != torch.bool:
        return f"additive mask (dtype {dtype}) is not proven causal: it is not 0 / -inf of a causal condition"
    if isinstance(v, AConst):
        return f"mask is the constant {v.value!r}, not causal"
    if not isinstance(v, ABool):
        return "mask is not a boolean function of positions"
    axes = (None,) * (4 - len(v.axes)) + tuple(v.axes)
    if len(axes) != 4:
        return "mask has more than 4 dims"
    b_var, h_var, q_var, k_var = axes
    if h_var is not None:
        return "mask depends on the head"
    if q_var is None or k_var is None:
        return "mask does not depend on both query and key positions"
    for var, length, what in ((q_var, q_len, "query"), (k_var, kv_len, "key")):
        start, end = it.var_len[var]
        if start != 0 or not _same_size(end, length):
            return f"mask's {what} positions are not 0..{what}_len-1"
    causal = _form({k_var: 1, q_var: -1})
    les = [a for a in v.atoms if a[0] == "le"]
    pads = [a for a in v.atoms if a[0] == "pad"]
    other = [a for a in v.atoms if a[0] not in ("le", "pad")]
    if other:
        return "mask is always False"
    if len(les) != 1 or les[0][1] != causal:
        names = {q_var: "query", k_var: "key", b_var: "batch"}
        terms = " & ".join(_fmt_le(a[1], names) for a in les)
        return f"mask is not causal-only: it keeps {terms or 'every position'}"
    padding = None
    if pads:
        if len(pads) > 1:
            return "mask has more than one padding lookup"
        _, node, bform, kform = pads[0]
        if kform != _form({k_var: 1}):
            return "padding lookup is not indexed by the key position"
        if b_var is None:
            if not _same_size(batch, 1) or bform not in ((), _const_form(0)):
                return "padding lookup is not indexed by the batch"
        else:
            bstart, bend = it.var_len[b_var]
            if bform != _form({b_var: 1}) or bstart != 0 or not _same_size(bend, batch):
                return "padding lookup is not indexed by the batch"
        ev = _meta(node)
        if ev is None or ev.dim() != 2:
            return "padding mask is not (batch, kv_len)"
        # node[b, k] over b < batch, k < kv_len: the op reads node[:batch, :kv_len] (checked at run time)
        padding = node
    elif b_var is not None and any(k == b_var for a in les for k, _ in a[1]):
        return "mask depends on the batch without a padding lookup"
    return MaskProof("causal+padding" if padding is not None else "causal", padding, frozenset(it.cone))
