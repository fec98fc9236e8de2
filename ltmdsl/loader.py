"""Loading a spec: read files safely, follow `use` imports, resolve models and budgets into a `Spec`.

`load(path)` and `loads(text)` are the front door of the library (like json.load / json.loads: one takes
only a path, the other only spec text; nothing guesses which it was given). They never raise anything but
`SpecError` for bad input (missing files, directories, FIFOs and devices, junk, invalid specs) and never
write a file. Files are read only if they are regular files outside /proc and /sys, and never more than
the spec size limit plus one byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ltmdsl import ast
from ltmdsl.budgets import resolve_budget, resolve_gpu
from ltmdsl.errors import Diagnostic, Reporter, SpecError
from ltmdsl.evaluate import EvalError, Scope, did_you_mean
from ltmdsl.ir import BudgetIR, GpuSpec, ModelIR, SpecIR
from ltmdsl.kinds import REGISTRY
from ltmdsl.parser import MAX_FILE_BYTES, decode, parse
from ltmdsl.resolve import Globals, ModelResolver

MAX_IMPORT_DEPTH = 32
#: A `use` statement as the grammar reads it: the keyword, whitespace or comments, a string.
_USE_STATEMENT = re.compile(r'use(?:\s|#[^\n]*)*"[^"\n\\]*"')


@dataclass
class Spec:
    """A loaded spec: the IR plus its source; what `ltmdsl.build` and the memory model take."""

    ir: SpecIR
    path: str
    text: str
    warnings: list[Diagnostic] = field(default_factory=list)

    @property
    def model(self) -> ModelIR:
        """The file's main model: the last one it defines."""
        return self.ir.model()

    @property
    def models(self) -> tuple[ModelIR, ...]:
        return self.ir.models

    @property
    def budgets(self) -> tuple[BudgetIR, ...]:
        return self.ir.budgets

    def budget(self, name: str) -> BudgetIR:
        for b in self.ir.budgets:
            if b.name == name:
                return b
        raise KeyError(f"no budget '{name}'{did_you_mean(name, [b.name for b in self.ir.budgets])}")

    def memory(self, budget: str | None = None, **overrides):
        """The memory report of the main model under a budget (by name) or overrides; see ltmdsl.memory."""
        from ltmdsl.memory import report

        b = self.budget(budget) if budget else None
        model = self.ir.model(b.model) if b else self.model
        return report(model, b, **overrides)


_PSEUDO_FILESYSTEMS = ("/proc", "/sys", "/dev")


def read_spec_file(path: str | os.PathLike) -> str:
    """The text of a spec file; SpecError for a missing path, a directory, anything but a regular file
    (a FIFO would block, a device never ends, /proc and /sys files are the system's, not specs),
    unreadable or oversized data (at most MAX_FILE_BYTES + 1 bytes are read), or non-UTF-8 data.
    The contents of a refused file are never echoed."""
    p = os.fspath(path)
    if not isinstance(p, str):
        p = os.fsdecode(p)
    if not os.path.exists(p):
        raise SpecError(Diagnostic(p, 0, 0, "no such file"))
    if os.path.isdir(p):
        raise SpecError(Diagnostic(p, 0, 0, "is a directory, not a spec file"))
    real = os.path.realpath(p)
    if any(real == root or real.startswith(root + os.sep) for root in _PSEUDO_FILESYSTEMS):
        raise SpecError(Diagnostic(p, 0, 0, f"is a system file ({real}), not a spec file"))
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below then refuses it.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SpecError(Diagnostic(p, 0, 0, f"cannot read: {e.strerror or e}")) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(Diagnostic(p, 0, 0, "is not a regular file (a FIFO, socket or device), not a spec file"))
        if st.st_size > MAX_FILE_BYTES:
            raise SpecError(Diagnostic(p, 0, 0, f"file is {st.st_size} bytes; specs are limited to {MAX_FILE_BYTES} bytes"))
        chunks, left = [], MAX_FILE_BYTES + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    except OSError as e:
        raise SpecError(Diagnostic(p, 0, 0, f"cannot read: {e.strerror or e}")) from None
    finally:
        os.close(fd)
    return decode(data, p)


class _Loader:
    """Parses a root file and everything it imports, then resolves it."""

    def __init__(self) -> None:
        self.rep = Reporter()
        self.files: dict[str, ast.SpecFile] = {}
        self.order: list[str] = []  # files in dependency order (imports first)
        self.real_seen: set[str] = set()

    def _load_file(self, key: str, text: str, stack: list[str]) -> None:
        """Parse `key` (a display path) and, depth first, every file it uses; `stack` holds real paths."""
        self.rep.add_source(key, text)
        spec_file = parse(text, key)
        self.files[key] = spec_file
        real = os.path.realpath(key) if not key.startswith("<") else key
        self.real_seen.add(real)
        base = Path(key).parent if not key.startswith("<") else Path.cwd()
        for item in spec_file.items:
            if not isinstance(item, ast.Use):
                continue
            target = os.path.realpath(base / item.path)
            if target in stack or target == real:
                cycle = " -> ".join(os.path.basename(s) for s in stack + [real, target])
                self.rep.at(item.pos, f"circular import: {cycle}")
                continue
            if target in self.real_seen:
                continue
            if len(stack) >= MAX_IMPORT_DEPTH:
                self.rep.at(item.pos, "imports nested too deeply")
                continue
            shown = os.path.relpath(target)
            try:
                imported = read_spec_file(target)
            except SpecError as e:
                self.rep.at(item.pos, f"cannot use \"{item.path}\": {shown}: {e.diagnostics[0].message}")
                continue
            try:
                self._load_file(shown, imported, stack + [real])
            except SpecError as e:
                self.rep.diagnostics.extend(e.diagnostics)
        self.order.append(key)

    def load(self, key: str, text: str) -> SpecIR:
        self._load_file(key, text, [])
        self.rep.raise_if_errors()
        return self._resolve(key, text)

    def _resolve(self, root: str, root_text: str) -> SpecIR:
        consts: dict[str, ast.Expr] = {}
        layers: dict[str, ast.LayerDef] = {}
        blocks: dict[str, ast.BlockDef] = {}
        gpu_defs: dict[str, ast.GpuDef] = {}
        models: dict[str, ast.ModelDef] = {}
        budgets: list[ast.BudgetDef] = []
        seen: dict[str, object] = {}
        for key in self.order:
            for item in self.files[key].items:
                name = getattr(item, "name", None)
                if isinstance(item, (ast.ConstDef, ast.LayerDef, ast.BlockDef, ast.GpuDef, ast.ModelDef)):
                    if name in seen:
                        first = seen[name].pos
                        self.rep.at(item.pos, f"duplicate definition '{name}' (first at {first})")
                        continue
                    seen[name] = item
                if isinstance(item, ast.ConstDef):
                    consts[name] = item.value
                elif isinstance(item, ast.LayerDef):
                    layers[name] = item
                    if item.kind not in REGISTRY:
                        self.rep.at(item.kind_pos, f"unknown layer kind '{item.kind}'{did_you_mean(item.kind, REGISTRY)}"
                                    f" (kinds: {', '.join(REGISTRY)})")
                elif isinstance(item, ast.BlockDef):
                    blocks[name] = item
                elif isinstance(item, ast.GpuDef):
                    gpu_defs[name] = item
                elif isinstance(item, ast.ModelDef):
                    models[name] = item
                elif isinstance(item, ast.BudgetDef) and key == root:
                    budgets.append(item)
        scope = Scope(consts)
        g = Globals(scope, layers, blocks, {root})
        digest = hashlib.sha256("\0".join(self.files[k].text for k in self.order).encode()).hexdigest()
        standalone = self._standalone() if len(self.order) > 1 else root_text

        gpus: dict[str, GpuSpec] = {}
        for name, node in gpu_defs.items():
            spec = resolve_gpu(node, scope, self.rep)
            if spec is not None:
                gpus[name] = spec

        root_models = [m for m in models.values() if m.pos.file == root]
        wanted = {b.model for b in budgets}
        to_resolve = root_models + [m for n, m in models.items() if n in wanted and m.pos.file != root]
        resolved: dict[str, ModelIR] = {}
        for node in to_resolve:
            ir = ModelResolver(node, g, self.rep, digest, standalone).resolve()
            if ir is not None:
                resolved[node.name] = ir
        if not root_models and not budgets and not self.rep.has_errors:
            self.rep.error(root, 1, 1, "no model defined (expected 'model NAME { ... }')")

        budget_irs: list[BudgetIR] = []
        budget_names: dict[str, ast.BudgetDef] = {}
        for b in budgets:
            if b.name in budget_names:
                self.rep.at(b.pos, f"duplicate budget '{b.name}'")
                continue
            budget_names[b.name] = b
            if b.model not in models:
                self.rep.at(b.model_pos, f"budget '{b.name}' is for unknown model '{b.model}'"
                            f"{did_you_mean(b.model, models)}")
                continue
            try:
                ir = resolve_budget(b, resolved.get(b.model), scope, gpus, self.rep)
            except EvalError as e:
                self.rep.at(e.pos, e.message)
                continue
            if ir is not None:
                budget_irs.append(ir)

        self._check_constants(root, seen, scope)
        self._warn_unused_globals(root, layers, blocks, consts, scope)
        self.rep.raise_if_errors()
        ordered = tuple(resolved[m.name] for m in to_resolve if m.name in resolved)
        return SpecIR(ordered, tuple(budget_irs), tuple(gpus.values()), root)

    def _standalone(self) -> str:
        """One spec text equivalent to the root and its imports: the files in order, `use` statements removed.

        Definitions are unique across files (duplicates are errors), so the concatenation loads alone;
        checkpoints embed it so that they describe themselves. Each file's text is kept byte for byte
        except for its `use` statements, which are cut out at the parser's own positions (lines counted
        at '\\n' only, as the grammar does): splitting at other line breaks (CR, U+2028, U+0085, ...)
        would turn the rest of a comment into code.
        """
        parts = []
        for key in self.order:
            spec_file = self.files[key]
            text = spec_file.text
            starts = [0] + [m.end() for m in re.finditer("\n", text)]
            cuts = []
            for item in spec_file.items:
                if isinstance(item, ast.Use):
                    at = starts[item.pos.line - 1] + item.pos.col - 1
                    m = _USE_STATEMENT.match(text, at)
                    if m is None:  # the parser placed a `use` here; anything else is a bug worth a traceback
                        raise AssertionError(f"no use statement at {item.pos}")
                    cuts.append((m.start(), m.end(), "\n" * m.group().count("\n")))
            for start, end, keep in reversed(cuts):
                text = text[:start] + keep + text[end:]
            label = "".join(c if c.isprintable() else "?" for c in os.path.basename(key))
            parts.append(f"# from {label}\n" + text)
        return "\n\n".join(parts) + "\n"

    def _check_constants(self, root: str, defs: dict[str, object], scope: Scope) -> None:
        """Evaluate every top-level constant, used or not, and warn about the root file's unused ones.

        Constants are evaluated lazily where they are used; an unused `const w = 10 / 3` would otherwise
        escape both its error and the warning that it is unused.
        """
        unused = [d for name, d in defs.items() if isinstance(d, ast.ConstDef) and name not in scope.used]
        broken = set()
        for d in (d for d in defs.values() if isinstance(d, ast.ConstDef)):
            try:
                scope.lookup(d.name, d.pos)
            except EvalError as e:
                self.rep.at(e.pos, e.message)
                broken.add(d.name)
        for d in unused:
            if d.pos.file == root and d.name not in broken:  # a broken one has its error; that is enough
                self.rep.at(d.pos, f"constant '{d.name}' is never used", "warning")

    def _warn_unused_globals(self, root, layers, blocks, consts, scope: Scope) -> None:
        for name, d in layers.items():
            if d.pos.file == root and f"layer:{name}" not in scope.used:
                self.rep.at(d.pos, f"layer '{name}' is defined but never used", "warning")
        for name, d in blocks.items():
            if d.pos.file == root and f"block:{name}" not in scope.used:
                self.rep.at(d.pos, f"block '{name}' is defined but never used", "warning")


def _load_text(key: str, text: str) -> Spec:
    loader = _Loader()
    try:
        ir = loader.load(key, text)
    except RecursionError:
        raise SpecError(Diagnostic(key, 1, 1, "spec nested too deeply")) from None
    return Spec(ir=ir, path=key, text=text, warnings=loader.rep.warnings)


def load(path: str | os.PathLike) -> Spec:
    """Load the spec file at `path` (a str or os.PathLike, never spec text: see `loads`).

    Raises SpecError with every problem found; warnings are kept on `Spec.warnings`.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"ltmdsl.load takes a path (str or os.PathLike), not {type(path).__name__}; "
                        "use ltmdsl.loads for spec text")
    key = os.fspath(path)
    if not isinstance(key, str):
        key = os.fsdecode(key)
    return _load_text(key, read_spec_file(key))


def loads(text: str, name: str = "<string>") -> Spec:
    """Load spec `text` (never a path: see `load`); `name` is the file name diagnostics show.

    `use` statements in the text resolve against the current directory. Raises SpecError like `load`.
    """
    if not isinstance(text, str):
        raise TypeError(f"ltmdsl.loads takes spec text (str), not {type(text).__name__}; use ltmdsl.load for a path")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise SpecError(Diagnostic(name, 0, 0, f"spec text is larger than {MAX_FILE_BYTES} bytes"))
    return _load_text(name, text)
