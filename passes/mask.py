"""Prove that an SDPA ``attn_mask`` is causal, or causal AND key padding, by reading its FX cone.

Transformers materialises the attention mask inside compiled graphs: index vectors from
``torch.arange``, broadcast with ``None`` indexing, compared (``kv <= q``), and'ed with a lookup of
the user's ``attention_mask[batch, kv]``. We interpret that cone over an abstract domain instead of
running it:

- ``AInt``: an integer tensor whose value is a linear form over index variables (one per
  ``arange``) and graph symbols, e.g. ``kv + 0``; each tensor axis carries one variable or none.
- ``ABool``: a conjunction of atoms: ``("le", form)`` meaning ``form <= 0``, or ``("pad", node,
  batch_form, key_form)`` meaning ``node[batch, key]`` (a boolean input of shape (B, L)).
- ``AConst``: a constant broadcast everywhere (True, False, 0, 1, ...).
- ``AInput``: an opaque boolean (B, L) tensor from outside the cone.

Every op we do not understand makes the proof fail, with the op named in the reason: the site then
stays dense. The result is exact for every input, not a check on example values: the forms are
symbolic in the sequence length.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from typing import Any

import torch
import torch.fx as fx

__all__ = ["MaskProof", "prove_causal_mask"]

Form = tuple  # sorted tuple of (key, coef) pairs; key "1" is the constant term


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


def _fsubst(f: Form, var: Any, repl: Form) -> Form:
    d = _fdict(f)
    c = d.pop(var, 0)
    out = _form(d)
    return _fadd(out, tuple((k, c * v) for k, v in repl)) if c else out


def _rename(v: Any, old: Any, new: Any) -> Any:
    """Rename index variable ``old`` to ``new`` in an AInt/ABool (axes, forms and atoms)."""
    def rf(f: Form) -> Form:
        return _fsubst(f, old, _form({new: 1}))

    axes = tuple(new if a == old else a for a in v.axes)
    if isinstance(v, AInt):
        return AInt(axes, rf(v.form))
    atoms = frozenset(
        (a[0], rf(a[1])) if a[0] == "le" else (a[0], a[1], rf(a[2]), rf(a[3])) if a[0] == "pad" else a
        for a in v.atoms
    )
    return ABool(axes, atoms)


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
class AInput:
    node: fx.Node
    ndim: int
    is_bool: bool


@dataclasses.dataclass(frozen=True)
class MaskProof:
    """Outcome: ``kind`` is "causal" or "causal+padding"; ``padding`` the (B, L) bool node."""

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


def _operand(n: fx.Node) -> Any:
    """The second operand of a binary op, positional or ``other=``."""
    if len(n.args) > 1:
        return n.args[1]
    if "other" in n.kwargs:
        return n.kwargs["other"]
    raise _Unprovable(f"{getattr(n.target, '__name__', n.target)} without a second operand")


_METHOD_AS_FUNCTION = {
    "__eq__": operator.eq, "__ne__": operator.ne, "__le__": operator.le, "__lt__": operator.lt,
    "__ge__": operator.ge, "__gt__": operator.gt, "__and__": operator.and_, "__add__": operator.add,
    "__sub__": operator.sub, "__getitem__": operator.getitem, "add": torch.add, "sub": torch.sub,
    "logical_and": torch.logical_and, "bitwise_and": torch.bitwise_and,
}


class _Interp:
    def __init__(self) -> None:
        self.env: dict[fx.Node, Any] = {}
        self.var_len: dict[Any, Any] = {}
        self.cone: set[fx.Node] = set()
        self._ids = itertools.count()

    # -- helpers -------------------------------------------------------------------------------
    def val(self, a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a not in self.env:
                self.env[a] = self.eval(a)
            return self.env[a]
        if isinstance(a, bool):
            return AConst(a)
        if isinstance(a, int):
            return AConst(a)
        raise _Unprovable(f"constant {a!r} of type {type(a).__name__}")

    def scalar_form(self, a: Any) -> Form:
        """A Python int or a SymInt node used as an offset."""
        if isinstance(a, bool):
            raise _Unprovable("bool offset")
        if isinstance(a, int):
            return _const_form(a)
        if isinstance(a, fx.Node) and isinstance(_meta(a), torch.SymInt):
            return _form({("sym", a.name): 1})
        if isinstance(a, fx.Node):
            v = self.val(a)
            if isinstance(v, AConst) and isinstance(v.value, int):
                return _const_form(v.value)
        raise _Unprovable(f"offset {a!r} is not an integer")

    @staticmethod
    def ndim(v: Any) -> int:
        if isinstance(v, (AInt, ABool)):
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
        if not isinstance(v, (AInt, ABool)):
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

    def call_function(self, n: fx.Node, target: Any = None) -> Any:
        t = n.target if target is None else target
        if t is torch.arange:
            args = list(n.args)
            if "end" in n.kwargs:
                args = [n.kwargs.get("start", 0), n.kwargs["end"]]
            if n.kwargs.get("step", 1) != 1 or len(args) > 2 or not args:
                raise _Unprovable("arange with a step")
            if n.kwargs.get("dtype") not in (None, torch.int64, torch.int32):
                raise _Unprovable(f"arange of dtype {n.kwargs.get('dtype')}")
            start, end = (0, args[0]) if len(args) == 1 else args
            key = ("var", next(self._ids))
            self.var_len[key] = (start, end)
            return AInt((key,), _fadd(_form({key: 1}), self.scalar_form(start)))
        if t in (operator.add, operator.sub, torch.add, torch.sub):
            if n.kwargs.get("alpha", 1) != 1 or len(n.args) != 2:
                raise _Unprovable("add/sub with alpha")
            a, b = self.val(n.args[0]), _operand(n)
            sign = 1 if t in (operator.add, torch.add) else -1
            if isinstance(b, fx.Node) and isinstance(_meta(b), torch.Tensor):
                av = self.as_int(self.canon(a))
                bv = self.as_int(self.canon(self.val(b)))
                return AInt(self.broadcast_axes(av.axes, bv.axes), _fadd(av.form, bv.form, sign))
            av = self.as_int(a)
            return AInt(av.axes, _fadd(av.form, self.scalar_form(b), sign))
        if t in (operator.le, operator.lt, operator.ge, operator.gt, operator.eq, operator.ne,
                 torch.le, torch.lt, torch.ge, torch.gt, torch.eq, torch.ne):
            return self.compare(t.__name__.strip("_"), self.val(n.args[0]), self.val(_operand(n)))
        if t in (operator.and_, torch.logical_and, torch.bitwise_and):
            a = self.as_bool(self.canon(self.val(n.args[0])))
            b = self.as_bool(self.canon(self.val(_operand(n))))
            return ABool(self.broadcast_axes(a.axes, b.axes), a.atoms | b.atoms)
        if t is operator.getitem:
            return self.getitem(self.val(n.args[0]), n.args[1], n.args[0])
        if t is torch.diff:
            return self.diff(n)
        raise _Unprovable(f"op {getattr(t, '__name__', t)}")

    def call_method(self, n: fx.Node) -> Any:
        name = n.target
        if name in _METHOD_AS_FUNCTION:  # x.__eq__(y), x.add(y), x.logical_and(y): same rules as the functions
            return self.call_function(n, _METHOD_AS_FUNCTION[name])
        if name == "new_ones":  # only dtype matters, not the receiver's value
            if n.kwargs.get("dtype") == torch.bool:
                return AConst(True)
            raise _Unprovable("new_ones of a non-boolean dtype")
        x = self.val(n.args[0])
        if name == "to":
            dtype = n.kwargs.get("dtype")
            for a in n.args[1:]:
                if isinstance(a, torch.dtype):
                    dtype = a
            if isinstance(x, AInput):
                # a (B, L) input moved and/or cast; the node that yields the bool tensor is kept
                return AInput(n, x.ndim, x.is_bool or dtype == torch.bool)
            if dtype is None:
                return x  # a device move
            if isinstance(x, AConst):
                return AConst(bool(x.value)) if dtype == torch.bool else x
            if isinstance(x, ABool) and dtype == torch.bool:
                return x
            raise _Unprovable(f"cast of an index or mask tensor to {dtype}")
        if name == "bool" and isinstance(x, ABool):
            return x
        if name == "bool" and isinstance(x, AConst):
            return AConst(bool(x.value))
        if name == "unsqueeze":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
            if not isinstance(x, (AInt, ABool)):
                return x
            axes = list(x.axes)
            dim = dim if dim >= 0 else len(axes) + 1 + dim
            axes.insert(dim, None)
            return dataclasses.replace(x, axes=tuple(axes))
        if name == "expand":
            sizes = n.args[1:] if not (len(n.args) == 2 and isinstance(n.args[1], (tuple, list))) else n.args[1]
            if isinstance(x, (AInt, ABool)):
                pad = len(sizes) - len(x.axes)
                if pad < 0:
                    raise _Unprovable("expand to fewer dims")
                for var, size in zip(x.axes, sizes[pad:]):
                    if var is not None and size != -1 and not _same_size(size, self.length(var)):
                        raise _Unprovable("expand of a position axis to another length")
                return dataclasses.replace(x, axes=(None,) * pad + tuple(x.axes))
            return x
        if name == "new_ones":
            if n.kwargs.get("dtype") == torch.bool:
                return AConst(True)
            raise _Unprovable("new_ones of a non-boolean dtype")
        if name in ("le", "lt", "ge", "gt", "eq", "ne"):
            return self.compare(name, x, self.val(_operand(n)))
        if name == "cumsum":
            if isinstance(x, AConst) and x.value in (0, False):
                return AConst(0)
            raise _Unprovable("cumsum of a non-zero tensor")
        raise _Unprovable(f"method .{name}()")

    def compare(self, name: str, a: Any, b: Any) -> Any:
        if isinstance(a, AConst) and isinstance(b, AConst):
            return AConst(bool(getattr(operator, name)(a.value, b.value)))
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

    def getitem(self, x: Any, idx: Any, src_node: Any = None) -> Any:
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, fx.Node) for i in idx):
            return self.advanced_index(x, idx, src_node)
        if isinstance(x, AConst):
            return x
        if not isinstance(x, (AInt, ABool)):
            raise _Unprovable("basic indexing of an opaque tensor")
        src = list(x.axes)
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        out: list = []
        form = getattr(x, "form", None)
        pos = 0
        for i in idx:
            if i is None:
                out.append(None)
            elif i is Ellipsis:
                take = len(src) - pos - (n_real - sum(1 for j in idx[: idx.index(i)] if j is not None and j is not Ellipsis))
                out.extend(src[pos : pos + take])
                pos += take
            elif isinstance(i, slice):
                if i == slice(None):
                    out.append(src[pos])
                elif i.start in (None, 0) and i.stop == 1 and i.step in (None, 1):
                    var = src[pos]
                    if var is not None and isinstance(x, AInt):
                        form = _fsubst(form, var, _const_form(0))
                    elif var is not None:
                        raise _Unprovable("slicing a mask")
                    out.append(None)
                else:
                    raise _Unprovable(f"slice {i}")
                pos += 1
            else:
                raise _Unprovable(f"index {i!r}")
        out.extend(src[pos:])
        if isinstance(x, AInt):
            return AInt(tuple(out), form)
        return ABool(tuple(out), x.atoms)

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
        for j, iv in enumerate(ivals):
            # only i -> i over 0..len-1 of that axis: no negative (wrapping) or out-of-range index
            var = iv.form[0][0] if len(iv.form) == 1 and iv.form[0][1] == 1 else None
            if var is None or var == "1" or not _same_size(self.length(var), src.shape[j]) or self.var_len[var][0] != 0:
                raise _Unprovable("advanced index that is not 0..len-1 of the indexed axis")
        if isinstance(x, AInput):
            if x.ndim != 2 or len(ivals) != 2 or not x.is_bool:
                raise _Unprovable("padding mask lookup that is not bool_mask[batch, key]")
            return ABool(axes, frozenset({("pad", x.node, ivals[0].form, ivals[1].form)}))
        if isinstance(x, AInt):
            if len(ivals) != len(x.axes):
                raise _Unprovable("partial advanced indexing")
            form = x.form
            for var, iv in zip(x.axes, ivals):
                if var is not None:
                    form = _fsubst(form, var, iv.form)
            return AInt(axes, form)
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
    """Return a :class:`MaskProof`, or a string saying why the mask is not provably causal."""
    it = _Interp()
    try:
        v = it.val(mask)
    except _Unprovable as e:
        return f"mask not provably causal: {e}"
    except RecursionError:
        return "mask not provably causal: cone too deep"
    except Exception as e:  # a prover bug must never fail the compile: the site stays dense
        return f"mask not provably causal: prover error {type(e).__name__}: {e}"
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
        if ev is None or ev.dim() != 2 or not _same_size(ev.shape[0], batch) or not _same_size(ev.shape[1], kv_len):
            return "padding mask is not (batch, kv_len)"
        padding = node
    elif b_var is not None and any(k == b_var for a in les for k, _ in a[1]):
        return "mask depends on the batch without a padding lookup"
    return MaskProof("causal+padding" if padding is not None else "causal", padding, frozenset(it.cone))
