"""The lint every generated kernel passes before it is imported: what the GPU compiler would reject.

Triton's interpreter (TRITON_INTERPRET=1, the CPU test path) accepts kernels the GPU compiler refuses,
so CPU tests alone would not catch them (the interpreter also accepts tl.dot below 16,
non-power-of-two tl.arange and out-of-bounds loads). The lint reads the generated source
with `ast`, takes each kernel's constexpr values from the module's META dict, and infers tile shapes by
following tl.arange / tl.zeros / tl.full / tl.load / broadcasting / reductions / tl.dot through the
kernel body. It reports:

  * a tl.dot whose operand shapes cannot be inferred, are not 2-D, disagree, or have a dim below 16;
  * a tl.arange whose length is not a power of two (or cannot be evaluated from constexprs);
  * block pointers (tl.make_block_ptr / .advance / tensor descriptors: removed in Triton 3.8);
  * @triton.autotune on a kernel that stores into a pointer it also loads (in-place state updates);
  * a META entry that is missing a kernel's constexpr, or a kernel without a META entry;
  * an estimated shared-memory footprint above the H100 limit (227 KiB per block).

The shared-memory estimate, per kernel: for every tl.dot, its A operand once plus its B operand times
num_stages when the dot sits in a loop (software pipelining buffers B; Hopper's wgmma reads A from
registers or one buffer), elements of 2 bytes for bf16/fp16 kernels and 4 for fp32 ones (a module whose dots
take fp32 operands whatever its data dtype says so with `DOT_ELEMENT_BYTES = 4` beside META); the dots
outside loops add up, and of the top-level loops (which run one after another) the largest counts.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

SMEM_LIMIT_BYTES = 227 * 1024  # H100: 227 KiB of shared memory per thread block
MIN_DOT_DIM = 16

_ELEMENTWISE = {"exp", "exp2", "log", "log2", "sqrt", "rsqrt", "sigmoid", "abs", "cos", "sin", "fma",
                "maximum", "minimum", "where", "softplus", "erf", "floor", "ceil", "cast"}
_REDUCE = {"sum", "max", "min", "argmax", "argmin", "xor_sum"}
_SCAN = {"cumsum", "cumprod", "associative_scan"}
_BLOCK_PTR = {"make_block_ptr", "advance", "make_tensor_descriptor", "load_tensor_descriptor"}


class LintError(RuntimeError):
    """A generated kernel would not compile (or would misbehave) on the GPU; `problems` lists why."""

    def __init__(self, name: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"lint failed for {name}:\n  " + "\n  ".join(problems))


@dataclass
class DotInfo:
    kernel: str
    line: int
    a: tuple | None
    b: tuple | None
    in_loop: bool
    loop: int | None  # which top-level loop of the kernel body holds it (None: outside loops)


@dataclass
class KernelReport:
    """What the lint learned about one @triton.jit function."""

    name: str
    dots: list[DotInfo] = field(default_factory=list)
    aranges: list[tuple[int, int | None]] = field(default_factory=list)  # (line, length)
    smem_bytes: int = 0


def _broadcast(*shapes):
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = {s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0}
        dims.discard(1)
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _callee(node: ast.Call) -> str:
    """'tl.dot' -> 'dot', 'tl.math.exp2' -> 'exp2', 'x.to' -> '.to', 'float' -> 'float'."""
    f = node.func
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and f.value.id in ("tl", "triton"):
            return f.attr
        if isinstance(f.value, ast.Attribute) and isinstance(f.value.value, ast.Name) and f.value.value.id == "tl":
            return f.attr  # tl.math.exp2
        return "." + f.attr
    if isinstance(f, ast.Name):
        return f.id
    return "?"


class _KernelWalker:
    """Infers tile shapes through one kernel body, statement by statement."""

    def __init__(self, name: str, consts: dict[str, int]):
        self.report = KernelReport(name)
        self.consts = dict(consts)
        self.shapes: dict[str, tuple | None] = {}
        self.loop_depth = 0
        self.loop_id: int | None = None
        self.problems: list[str] = []

    # -- constant folding of constexpr expressions --------------------------------------------
    def value(self, node) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name):
            return self.consts.get(node.id)
        if isinstance(node, ast.BinOp):
            a, b = self.value(node.left), self.value(node.right)
            if a is None or b is None:
                return None
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b if b else None}
            fn = ops.get(type(node.op))
            return fn() if fn else None
        return None

    # -- shapes ------------------------------------------------------------------------------
    def shape(self, node) -> tuple | None:
        if isinstance(node, ast.Constant):
            return ()
        if isinstance(node, ast.Name):
            return self.shapes.get(node.id, ())  # kernel arguments and loop counters are scalars
        if isinstance(node, ast.BinOp):
            return _broadcast(self.shape(node.left), self.shape(node.right))
        if isinstance(node, ast.BoolOp):
            return _broadcast(*(self.shape(v) for v in node.values))
        if isinstance(node, ast.Compare):
            return _broadcast(self.shape(node.left), *(self.shape(c) for c in node.comparators))
        if isinstance(node, ast.UnaryOp):
            return self.shape(node.operand)
        if isinstance(node, ast.IfExp):
            return _broadcast(self.shape(node.body), self.shape(node.orelse))
        if isinstance(node, ast.Subscript):
            return self._subscript(node)
        if isinstance(node, ast.Attribute):
            return ()  # x.dtype, X.dtype.element_ty
        if isinstance(node, ast.Call):
            return self._call(node)
        return None

    def _subscript(self, node: ast.Subscript):
        base = self.shape(node.value)
        if base is None:
            return None
        idx = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        out, dims = [], list(base)
        for item in idx:
            if isinstance(item, ast.Constant) and item.value is None:
                out.append(1)
            elif isinstance(item, ast.Slice) and item.lower is None and item.upper is None:
                if not dims:
                    return None
                out.append(dims.pop(0))
            else:
                return None
        return tuple(out + dims)

    def _axis(self, node: ast.Call):
        if len(node.args) > 1:
            return self.value(node.args[1])
        for kw in node.keywords:
            if kw.arg == "axis":
                return self.value(kw.value)
        return None

    def _call(self, node: ast.Call):
        name = _callee(node)
        args = node.args
        if name in _BLOCK_PTR:
            self.problems.append(f"line {node.lineno}: tl.{name} (block pointers are removed in Triton 3.8)")
            return None
        if name == "arange":
            lo, hi = self.value(args[0]), self.value(args[1])
            n = None if lo is None or hi is None else hi - lo
            self.report.aranges.append((node.lineno, n))
            if n is None:
                self.problems.append(f"line {node.lineno}: tl.arange bounds are not constexpr")
            elif n <= 0 or n & (n - 1):
                self.problems.append(f"line {node.lineno}: tl.arange of length {n} is not a power of two")
            return (n,) if n else None
        if name in ("zeros", "full"):
            dims = args[0].elts if isinstance(args[0], (ast.List, ast.Tuple)) else None
            vals = [self.value(d) for d in dims] if dims is not None else [None]
            return None if any(v is None for v in vals) else tuple(vals)
        if name == "load":
            return self.shape(args[0])
        if name == "dot":
            a, b = self.shape(args[0]), self.shape(args[1])
            self.report.dots.append(DotInfo(self.report.name, node.lineno, a, b, self.loop_depth > 0, self.loop_id))
            if a is None or b is None or len(a) != 2 or len(b) != 2:
                self.problems.append(f"line {node.lineno}: tl.dot operand shapes not inferred as 2-D ({a}, {b})")
                return None
            if a[1] != b[0]:
                self.problems.append(f"line {node.lineno}: tl.dot inner dims differ: {a} x {b}")
            if min(a + b) < MIN_DOT_DIM:
                self.problems.append(f"line {node.lineno}: tl.dot {a} x {b} has a dim below {MIN_DOT_DIM}")
            return (a[0], b[1])
        if name in ("trans", "permute"):
            s = self.shape(args[0])
            return None if s is None else tuple(reversed(s))
        if name in _REDUCE:
            s = self.shape(args[0])
            axis = self._axis(node)
            if s is None:
                return None
            if axis is None:
                return ()
            return tuple(d for i, d in enumerate(s) if i != axis % max(len(s), 1))
        if name in _SCAN or name == ".to":
            return self.shape(args[0]) if name in _SCAN else self.shape(node.func.value)
        if name in _ELEMENTWISE:
            return _broadcast(*(self.shape(a) for a in args))
        if name in ("program_id", "num_programs", "float", "int", "cdiv"):
            return ()
        if name in ("store", "static_assert", "device_print", "debug_barrier"):
            for a in args:
                self.shape(a)
            return None
        return None

    def _loop(self, st) -> None:
        outer = self.loop_depth == 0
        if outer:
            self.loop_id = st.lineno
        self.loop_depth += 1
        self.visit(st.body)
        self.loop_depth -= 1
        if outer:
            self.loop_id = None

    # -- statements --------------------------------------------------------------------------
    def visit(self, stmts) -> None:
        for st in stmts:
            if isinstance(st, ast.Assign):
                s = self.shape(st.value)
                for t in st.targets:
                    if isinstance(t, ast.Name):
                        self.shapes[t.id] = s
            elif isinstance(st, ast.AugAssign):
                s = _broadcast(self.shape(st.target), self.shape(st.value))
                if isinstance(st.target, ast.Name):
                    self.shapes[st.target.id] = s
            elif isinstance(st, ast.AnnAssign) and st.value is not None and isinstance(st.target, ast.Name):
                self.shapes[st.target.id] = self.shape(st.value)
            elif isinstance(st, ast.Expr):
                self.shape(st.value)
            elif isinstance(st, ast.For):
                for a in getattr(st.iter, "args", []):
                    self.shape(a)
                if isinstance(st.target, ast.Name):
                    self.shapes[st.target.id] = ()
                self._loop(st)
            elif isinstance(st, (ast.While,)):
                self._loop(st)
            elif isinstance(st, ast.If):
                self.visit(st.body)
                self.visit(st.orelse)
            elif isinstance(st, ast.Return) and st.value is not None:
                self.shape(st.value)


def _decorators(fn: ast.FunctionDef) -> set[str]:
    out = set()
    for d in fn.decorator_list:
        node = d.func if isinstance(d, ast.Call) else d
        if isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Name):
            out.add(node.id)
    return out


def _pointer_roots(fn: ast.FunctionDef, what: str) -> set[str]:
    roots = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and _callee(node) == what and node.args:
            for sub in ast.walk(node.args[0]):
                if isinstance(sub, ast.Name) and sub.id[:1].isupper():
                    roots.add(sub.id)
    return roots


def _meta(tree: ast.Module) -> dict:
    for st in tree.body:
        if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "META" for t in st.targets):
            return ast.literal_eval(st.value)
    return {}


def _dot_element_bytes(tree: ast.Module) -> int | None:
    """The module's `DOT_ELEMENT_BYTES = n` (its dots' operand size whatever the data dtype), if it sets one."""
    for st in tree.body:
        if isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DOT_ELEMENT_BYTES"
                                              for t in st.targets):
            value = st.value.value if isinstance(st.value, ast.Constant) else None
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
    return None


def lint(source: str, dtype: str = "bf16") -> tuple[list[str], dict[str, KernelReport]]:
    """(problems, per-kernel reports) for one generated module; `dtype` sizes the shared-memory estimate."""
    problems: list[str] = []
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"syntax error: {e}"], {}
    try:
        meta = _meta(tree)
    except ValueError as e:
        return [f"META is not a literal dict: {e}"], {}
    elem = _dot_element_bytes(tree) or (4 if dtype == "fp32" else 2)
    reports: dict[str, KernelReport] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _BLOCK_PTR:
            problems.append(f"line {node.lineno}: {node.attr} (block pointers are removed in Triton 3.8)")
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or "jit" not in _decorators(fn):
            continue
        consts = meta.get(fn.name)
        if consts is None:
            problems.append(f"{fn.name}: no META entry")
            continue
        constexprs = [a.arg for a in fn.args.args
                      if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)]
        for c in constexprs:
            if c not in consts:
                problems.append(f"{fn.name}: META lacks constexpr {c}")
        for k in ("num_warps", "num_stages"):
            if k not in consts:
                problems.append(f"{fn.name}: META lacks {k}")
        if "autotune" in _decorators(fn):
            both = _pointer_roots(fn, "load") & _pointer_roots(fn, "store")
            if both:
                problems.append(f"{fn.name}: autotuned but updates {sorted(both)} in place")
        walker = _KernelWalker(fn.name, {k: v for k, v in consts.items() if isinstance(v, int)})
        walker.visit(fn.body)
        problems += [f"{fn.name}: {p}" for p in walker.problems]
        stages = int(consts.get("num_stages", 1))
        per_region: dict[int | None, int] = {}  # loops run one after another: their buffers are reused
        for d in walker.report.dots:
            if d.a is not None and d.b is not None:
                bytes_ = d.a[0] * d.a[1] * elem + d.b[0] * d.b[1] * elem * (stages if d.in_loop else 1)
                per_region[d.loop] = per_region.get(d.loop, 0) + bytes_
        outside = per_region.pop(None, 0)
        smem = outside + max(per_region.values(), default=0)
        walker.report.smem_bytes = smem
        if smem > SMEM_LIMIT_BYTES:
            problems.append(f"{fn.name}: estimated shared memory {smem // 1024} KiB > {SMEM_LIMIT_BYTES // 1024} KiB")
        reports[fn.name] = walker.report
    for name in meta:
        if name not in reports and not any(p.startswith(f"{name}:") for p in problems):
            problems.append(f"META names {name}, which is not a @triton.jit kernel here")
    return problems, reports


def lint_or_raise(source: str, spec) -> dict[str, KernelReport]:
    """Lint a generated module of `spec`; raise LintError listing every problem."""
    problems, reports = lint(source, spec["dtype"])
    if problems:
        raise LintError(spec.name, problems)
    return reports
