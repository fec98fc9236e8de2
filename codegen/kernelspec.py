"""`KernelSpec`: the frozen, validated description of one generated kernel module.

A spec is the only thing a template ever sees. It holds a family (which template), and a sorted
tuple of parameters whose values are ints, finite floats, bools or short lower-case identifiers, and
`__post_init__` checks every one against the family's schema, so no string from a spec file can reach
generated code (the hostile-input tests in tests/codegen/test_render.py feed it injection attempts).

Three levels of specialisation (the pattern of PyTorch Inductor's FlexAttention templates):
  * the template (Jinja) decides which code exists: GQA packing, window, causal, bias, SiLU, residual;
  * `tl.constexpr` arguments carry block sizes and head dims (rendered into the module's META dict);
  * run-time arguments carry lengths, strides, pointers, the window length, scales and eps.

`specs_for_layer` / `specs_for_model` map the IR (ltmdsl/ir.py) to the specs a model needs, through
`KIND_SPECS` (kind name -> that kind's specs); kinds without kernels are simply not listed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass

_IDENT = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
DTYPES = ("fp32", "bf16", "fp16")
_MAX_INT = 1 << 24

# family -> {parameter: type}; a spec must give exactly these parameters.
_COMMON = {"dtype": str, "upcast": bool, "num_warps": int, "num_stages": int}
FAMILIES: dict[str, dict[str, type]] = {
    # prefill / chunked prefill / any-length forward attention
    "attention": dict(_COMMON, group=int, group_pad=int, head_dim=int, head_dim_pad=int,
                      v_head_dim=int, v_head_dim_pad=int, causal=bool, window=bool,
                      block_m=int, block_n=int),
    # one query per sequence over an unordered cache (split-KV + fp32 reduction)
    "attention_decode": dict(_COMMON, group=int, group_pad=int, head_dim=int, head_dim_pad=int,
                             v_head_dim=int, v_head_dim_pad=int, block_n=int),
    # depthwise causal conv over a sequence, and its single-step state update
    "conv": dict(_COMMON, taps=int, taps_pad=int, bias=bool, silu=bool, block_t=int, block_c=int),
    # Mamba-1 selective scan and its step
    "selective_scan": dict(_COMMON, d_state=int, d_state_pad=int, block_d=int),
    # Mamba-2 SSD chunked scan (cumsum, chunk states, state passing, chunk outputs) and its step
    "ssd": dict(_COMMON, head_dim=int, head_dim_pad=int, d_state=int, d_state_pad=int, chunk=int, block_m=int),
    # RMSNorm with the residual add fused
    "rmsnorm": dict(_COMMON, residual=bool, block_d=int),
    # the gated delta rule (Gated DeltaNet; KDA with per_channel): chunked forward (two kernels) and its step
    "gated_delta": dict(_COMMON, head_dim=int, head_dim_pad=int, v_head_dim=int, v_head_dim_pad=int, chunk=int,
                        block_v=int, block_c=int, per_channel=bool, l2norm=bool),
}

# parameters that must be powers of two (they size tl.arange ranges or tiles)
_POW2 = {"group_pad", "head_dim_pad", "v_head_dim_pad", "block_m", "block_n", "taps_pad", "block_t",
         "block_c", "d_state_pad", "block_d", "chunk", "block_v", "num_warps"}


class KernelSpecError(ValueError):
    """A kernel spec was given a parameter that is missing, unknown, of the wrong type or unsafe."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass(frozen=True)
class KernelSpec:
    """One kernel module to render: `family` names the template, `params` its sorted parameters."""

    family: str
    params: tuple[tuple[str, int | float | bool | str], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise KernelSpecError(f"unknown kernel family {self.family!r}")
        if not isinstance(self.params, tuple):
            raise KernelSpecError("params must be a tuple of (name, value) pairs")
        schema = FAMILIES[self.family]
        names = []
        for item in self.params:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise KernelSpecError(f"bad parameter entry {item!r}")
            key, value = item
            if not isinstance(key, str) or not _IDENT.match(key):
                raise KernelSpecError(f"bad parameter name {key!r}")
            if key not in schema:
                raise KernelSpecError(f"{self.family}: unknown parameter {key!r}")
            _check_value(self.family, key, value, schema[key])
            names.append(key)
        if names != sorted(names) or len(set(names)) != len(names):
            raise KernelSpecError("params must be sorted by name, each once")
        missing = set(schema) - set(names)
        if missing:
            raise KernelSpecError(f"{self.family}: missing parameters {sorted(missing)}")
        p = dict(self.params)
        if p["dtype"] not in DTYPES:
            raise KernelSpecError(f"dtype must be one of {DTYPES}, not {p['dtype']!r}")
        for key in ("group", "head_dim", "v_head_dim", "taps", "d_state"):
            pad = key + "_pad" if key != "group" else "group_pad"
            if key in p and p[pad] < p[key]:
                raise KernelSpecError(f"{pad}={p[pad]} is smaller than {key}={p[key]}")

    @classmethod
    def make(cls, family: str, **params) -> "KernelSpec":
        return cls(family, tuple(sorted(params.items())))

    def __getitem__(self, key: str):
        return dict(self.params)[key]

    @property
    def context(self) -> dict:
        """What the template sees: the parameters plus `name` and `spec_hash`."""
        return dict(self.params, name=self.name, spec_hash=self.spec_hash, family=self.family)

    @property
    def spec_hash(self) -> str:
        text = json.dumps([self.family, [list(kv) for kv in self.params]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """A readable identifier: family plus the parameters that select code, e.g. attention_g4_d64_causal_bf16."""
        p = dict(self.params)
        parts = [self.family]
        if "group" in p:
            parts.append(f"g{p['group']}")
        if "head_dim" in p:
            parts.append(f"d{p['head_dim']}")
        if "v_head_dim" in p and p["v_head_dim"] != p["head_dim"]:
            parts.append(f"dv{p['v_head_dim']}")
        if "d_state" in p:
            parts.append(f"n{p['d_state']}")
        if "chunk" in p:
            parts.append(f"c{p['chunk']}")
        if "taps" in p:
            parts.append(f"k{p['taps']}")
        for flag in ("causal", "window", "bias", "silu", "residual", "per_channel", "l2norm"):
            if p.get(flag):
                parts.append(flag)
        parts.append(p["dtype"])
        if p["upcast"]:
            parts.append("interp")
        return "_".join(parts)


def _check_value(family: str, key: str, value, want: type) -> None:
    where = f"{family}.{key}"
    if want is bool:
        if not isinstance(value, bool):
            raise KernelSpecError(f"{where} must be a bool, not {value!r}")
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KernelSpecError(f"{where} must be an int, not {value!r}")
        if not 0 < value <= _MAX_INT:
            raise KernelSpecError(f"{where}={value} out of range")
        if key in _POW2 and not _is_pow2(value):
            raise KernelSpecError(f"{where}={value} must be a power of two")
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KernelSpecError(f"{where} must be a finite number, not {value!r}")
    elif want is str:
        if not isinstance(value, str) or not _IDENT.match(value):
            raise KernelSpecError(f"{where} must be a lower-case identifier, not {value!r}")
    else:  # pragma: no cover - schema bug
        raise KernelSpecError(f"{where}: unsupported schema type {want}")


# ---------------------------------------------------------------------------------------------
# Choosing parameters: the defaults below are the GPU launch shapes; the interpreter uses the same.
# ---------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then upcast bf16/fp16 to fp32 before any arithmetic."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_name(dtype) -> str:
    """'fp32' | 'bf16' | 'fp16' from a torch dtype or a spec dtype name; KernelSpecError otherwise."""
    name = str(dtype).replace("torch.", "")
    name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f32": "fp32"}.get(name, name)
    if name not in DTYPES:
        raise KernelSpecError(f"no Triton kernels for dtype {dtype}")
    return name


def attention_spec(*, group: int, head_dim: int, v_head_dim: int, causal: bool, window: bool,
                   dtype: str, upcast: bool | None = None) -> KernelSpec:
    """Forward attention: G query heads of one KV head packed as rows of a 128-row tile."""
    upcast = interpreting() if upcast is None else upcast
    group_pad = next_pow2(group)
    dpad, dvpad = max(16, next_pow2(head_dim)), max(16, next_pow2(v_head_dim))
    rows = 128 if max(dpad, dvpad) <= 128 else 64
    block_m = max(1, rows // group_pad)
    rows = block_m * group_pad
    if rows < 16:  # tl.dot needs M >= 16
        block_m = 16 // group_pad
    small = max(dpad, dvpad) <= 128 and dtype != "fp32"  # fp32 tiles take twice the shared memory
    return KernelSpec.make(
        "attention", group=group, group_pad=group_pad, head_dim=head_dim, head_dim_pad=dpad,
        v_head_dim=v_head_dim, v_head_dim_pad=dvpad, causal=bool(causal), window=bool(window),
        block_m=block_m, block_n=64 if small else 32, dtype=dtype, upcast=upcast,
        num_warps=8 if max(dpad, dvpad) >= 128 else 4, num_stages=3 if small else 2)


def attention_decode_spec(*, group: int, head_dim: int, v_head_dim: int, dtype: str,
                          upcast: bool | None = None) -> KernelSpec:
    """Decode attention: the G heads of a KV head padded to >= 16 rows; the cache split over programs."""
    upcast = interpreting() if upcast is None else upcast
    dpad, dvpad = max(16, next_pow2(head_dim)), max(16, next_pow2(v_head_dim))
    small = max(dpad, dvpad) * (4 if dtype == "fp32" else 2) <= 256
    return KernelSpec.make(
        "attention_decode", group=group, group_pad=max(16, next_pow2(group)), head_dim=head_dim,
        head_dim_pad=dpad, v_head_dim=v_head_dim, v_head_dim_pad=dvpad, block_n=64 if small else 32,
        dtype=dtype, upcast=upcast, num_warps=4, num_stages=3 if small else 2)


def conv_spec(*, taps: int, bias: bool, silu: bool, dtype: str, upcast: bool | None = None) -> KernelSpec:
    upcast = interpreting() if upcast is None else upcast
    return KernelSpec.make("conv", taps=taps, taps_pad=next_pow2(taps), bias=bool(bias), silu=bool(silu),
                           block_t=32, block_c=128, dtype=dtype, upcast=upcast, num_warps=4, num_stages=1)


def selective_scan_spec(*, d_state: int, dtype: str, upcast: bool | None = None) -> KernelSpec:
    upcast = interpreting() if upcast is None else upcast
    # block_d 16, 4 warps: 1.07 ms vs 1.55 ms for 32 channels at T 2K, Di 5120, N 16 on an H100
    return KernelSpec.make("selective_scan", d_state=d_state, d_state_pad=next_pow2(d_state), block_d=16,
                           dtype=dtype, upcast=upcast, num_warps=4, num_stages=3)


def ssd_spec(*, head_dim: int, d_state: int, chunk: int, dtype: str, upcast: bool | None = None) -> KernelSpec:
    """Mamba-2 SSD: 4 warps (measured best on an H100 for P 64, N 128, C 256), 64-row tiles and the
    deepest software pipelining whose shared-memory estimate fits (smaller tiles for huge P x N)."""
    return _ssd_spec(head_dim, d_state, chunk, dtype, interpreting() if upcast is None else upcast)


@functools.lru_cache(maxsize=256)
def _ssd_spec(head_dim: int, d_state: int, chunk: int, dtype: str, upcast: bool) -> KernelSpec:
    dpad, npad = max(16, next_pow2(head_dim)), max(16, next_pow2(d_state))
    base = dict(head_dim=head_dim, head_dim_pad=dpad, d_state=d_state, d_state_pad=npad,
                chunk=max(16, next_pow2(chunk)), dtype=dtype, upcast=upcast, num_warps=4)
    return fit_shared_memory("ssd", base, [dict(block_m=64, num_stages=3), dict(block_m=64, num_stages=2),
                                           dict(block_m=64, num_stages=1), dict(block_m=32, num_stages=1),
                                           dict(block_m=16, num_stages=1)])


def fit_shared_memory(family: str, base: dict, choices: list[dict]) -> KernelSpec:
    """The first of `choices` (merged into `base`) whose rendered kernels pass the lint's shared-memory
    estimate; the last one otherwise (compiling it then fails with the lint's message)."""
    from ltmdsl.codegen.lint import lint
    from ltmdsl.codegen.render import render

    spec = None
    for choice in choices:
        spec = KernelSpec.make(family, **base, **choice)
        problems, _ = lint(render(spec), spec["dtype"])
        if not any("shared memory" in p for p in problems):
            return spec
    return spec


def rmsnorm_spec(*, d: int, residual: bool, dtype: str, upcast: bool | None = None) -> KernelSpec:
    upcast = interpreting() if upcast is None else upcast
    block = next_pow2(d)
    return KernelSpec.make("rmsnorm", residual=bool(residual), block_d=block, dtype=dtype, upcast=upcast,
                           num_warps=min(16, max(1, block // 256)), num_stages=1)


def delta_kernel_chunk(chunk: int) -> int:
    """The chunk the gated delta rule's kernels tile by: the layer's chunk, which must be a power of two (the
    language checks it: ltmdsl/kinds/gated_deltanet.py `check_chunk`), raised to 16, tl.dot's smallest tile.
    The chunked form is exact for any chunk, so a layer with chunk 8 computes the same rule in tiles of 16."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or not _is_pow2(chunk):
        raise KernelSpecError(f"the gated delta rule's kernels need a chunk that is a power of two, not {chunk!r}")
    return max(16, chunk)


def gated_delta_spec(*, head_dim: int, v_head_dim: int, chunk: int, per_channel: bool, l2norm: bool, dtype: str,
                     upcast: bool | None = None) -> KernelSpec:
    """The gated delta rule: Gated DeltaNet (a decay per head) or KDA (`per_channel`: a decay per key channel).

    Rows of the chunk are one tile, head dims padded to powers of two (>= 16 for tl.dot); the state's Dv
    columns are split over programs in blocks of at most 64 (they are independent); KDA's exact per-channel
    scores take [C, C, BLOCK_C] decays with C * C * BLOCK_C <= 8192 elements; 8 warps from C x D = 64 x 128
    up (a guess until measured on a GPU). Stages as the shared-memory estimate allows."""
    return _gated_delta_spec(head_dim, v_head_dim, delta_kernel_chunk(chunk), bool(per_channel), bool(l2norm),
                             dtype, interpreting() if upcast is None else upcast)


@functools.lru_cache(maxsize=256)
def _gated_delta_spec(head_dim: int, v_head_dim: int, chunk: int, per_channel: bool, l2norm: bool, dtype: str,
                      upcast: bool) -> KernelSpec:
    dpad, dvpad = max(16, next_pow2(head_dim)), max(16, next_pow2(v_head_dim))
    heavy = chunk * max(dpad, dvpad) >= 64 * 128  # [C, D] fp32 tiles of 32 KiB: 8 warps keep them in registers
    base = dict(head_dim=head_dim, head_dim_pad=dpad, v_head_dim=v_head_dim, v_head_dim_pad=dvpad, chunk=chunk,
                block_c=min(dpad, max(1, 8192 // (chunk * chunk))), per_channel=per_channel, l2norm=l2norm,
                dtype=dtype, upcast=upcast, num_warps=8 if heavy else 4)
    bv = min(dvpad, 64)
    return fit_shared_memory("gated_delta", base, [dict(block_v=bv, num_stages=2), dict(block_v=bv, num_stages=1),
                                                   dict(block_v=16, num_stages=1)])


def _attention_specs(m, dtype: str, upcast: bool | None) -> list[KernelSpec]:
    """Attention (ltmdsl.ir AttentionConfig): prefill over the GQA group, and decode."""
    g = m.heads // m.kv_heads
    return [attention_spec(group=g, head_dim=m.head_dim, v_head_dim=m.v_head_dim, causal=m.causal,
                           window=m.window is not None, dtype=dtype, upcast=upcast),
            attention_decode_spec(group=g, head_dim=m.head_dim, v_head_dim=m.v_head_dim, dtype=dtype,
                                  upcast=upcast)]


def _mamba_specs(m, dtype: str, upcast: bool | None) -> list[KernelSpec]:
    """Mamba-1: the causal conv (and its step) and the selective scan (and its step)."""
    return [conv_spec(taps=m.d_conv, bias=m.conv_bias, silu=True, dtype=dtype, upcast=upcast),
            selective_scan_spec(d_state=m.d_state, dtype=dtype, upcast=upcast)]


def _mamba2_specs(m, dtype: str, upcast: bool | None) -> list[KernelSpec]:
    """Mamba-2: the causal conv (and its step) and the chunked SSD scan (and its step)."""
    return [conv_spec(taps=m.d_conv, bias=m.conv_bias, silu=True, dtype=dtype, upcast=upcast),
            ssd_spec(head_dim=m.head_dim, d_state=m.d_state, chunk=m.chunk, dtype=dtype, upcast=upcast)]


def _delta_rule_specs(dk: int, dv: int, chunk: int, per_channel: bool, dtype: str, upcast: bool | None):
    """The delta rule's modules: the layer's chunk for prefill, and chunk 16 for the step (the decode op has
    no chunk, codegen/ops.py `gated_delta_step`); one module when they coincide. Both kinds L2-normalise q, k."""
    return list(dict.fromkeys(gated_delta_spec(head_dim=dk, v_head_dim=dv, chunk=c, per_channel=per_channel,
                                               l2norm=True, dtype=dtype, upcast=upcast) for c in (chunk, 16)))


def _gated_deltanet_specs(m, dtype: str, upcast: bool | None) -> list[KernelSpec]:
    """Gated DeltaNet (ltmdsl.kinds.gated_deltanet): the causal conv over q, k, v (and its step) and the delta
    rule with a decay per head, q and k L2-normalised (and its step)."""
    return [conv_spec(taps=m.d_conv, bias=m.conv_bias, silu=True, dtype=dtype, upcast=upcast),
            *_delta_rule_specs(m.head_dim, m.v_head_dim, m.chunk, False, dtype, upcast)]


def _kda_specs(m, dtype: str, upcast: bool | None) -> list[KernelSpec]:
    """KDA (ltmdsl.kinds.kda): the causal conv and the delta rule with a decay per key channel."""
    return [conv_spec(taps=m.d_conv, bias=m.conv_bias, silu=True, dtype=dtype, upcast=upcast),
            *_delta_rule_specs(m.head_dim, m.head_dim, m.chunk, True, dtype, upcast)]


#: Layer kind name (the registry key, `SubLayer.kind`) -> the kernel specs a mixer of that kind runs on.
#: A kind that is not listed has no generated kernels: its ops run their PyTorch reference on the triton
#: back end (ltmdsl.codegen.backend), so a new kind needs no entry here until it gets a kernel.
KIND_SPECS = {
    "attention": _attention_specs,
    "mamba": _mamba_specs,
    "mamba2": _mamba2_specs,
    "gated_deltanet": _gated_deltanet_specs,
    "kda": _kda_specs,
}

#: Norm kinds with a generated kernel (the add_rmsnorm op); others run their PyTorch op.
NORM_KERNELS = frozenset({"rmsnorm"})


def specs_for_layer(layer, dtype: str, upcast: bool | None = None) -> list[KernelSpec]:
    """The kernel modules one sub-layer (ltmdsl.ir.SubLayer) runs on, its pre-norm included."""
    out: list[KernelSpec] = []
    if layer.norm.kind in NORM_KERNELS:
        out.append(rmsnorm_spec(d=_d_model_of(layer), residual=True, dtype=dtype, upcast=upcast))
    kind_specs = KIND_SPECS.get(layer.kind)
    if kind_specs is not None:
        out.extend(kind_specs(layer.mixer, dtype, upcast))
    return out


def _d_model_of(layer) -> int:
    d = getattr(layer, "d_model", None)
    if d is None:
        raise KernelSpecError("specs_for_layer needs the model width: use specs_for_model")
    return d


class _Sized:
    """A SubLayer view that also knows d_model (the IR keeps d on the model, not the layer)."""

    def __init__(self, layer, d_model: int):
        self._layer, self.d_model = layer, d_model

    def __getattr__(self, name):
        return getattr(self._layer, name)


def model_dtype(model) -> str:
    """The kernel dtype of a ModelIR: its storage dtype when Triton has kernels for it, else fp32."""
    try:
        return dtype_name(model.dtype.name)
    except KernelSpecError:
        return "fp32"


def specs_for_model(model, dtype: str | None = None, upcast: bool | None = None) -> list[KernelSpec]:
    """Every distinct kernel module a ModelIR needs, in first-use order (duplicates removed)."""
    dtype = dtype or model_dtype(model)
    seen: dict[KernelSpec, None] = {}
    for layer in model.layers:
        for spec in specs_for_layer(_Sized(layer, model.d_model), dtype, upcast):
            seen.setdefault(spec, None)
    if any(layer.norm.kind in NORM_KERNELS for layer in model.layers[:1]):  # the first norm has no residual yet
        seen.setdefault(rmsnorm_spec(d=model.d_model, residual=False, dtype=dtype, upcast=upcast), None)
    if model.final_norm.kind in NORM_KERNELS:
        seen.setdefault(rmsnorm_spec(d=model.d_model, residual=True, dtype=dtype, upcast=upcast), None)
    return list(seen)
