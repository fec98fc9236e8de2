"""`ltmdsl.from_hf`: a Hugging Face checkpoint folder -> a runtime model holding its weights.

    model = ltmdsl.from_hf("ckpt/", dtype=torch.float32)    # config.json + model.safetensors[.index.json]

The config becomes spec text (configs.py), which `ltmdsl.load` resolves and `ltmdsl.build` compiles without
initialising weights; then every runtime parameter is filled from the checkpoint through the name mapping of
weights.py. Reading is lazy (safetensors memory maps), shard by shard for `model.safetensors.index.json`.
Every checkpoint tensor must be used and every parameter filled with the right shape: anything else is an
`HFError` naming the tensor, never a KeyError traceback. All of that is checked from the safetensors
headers alone (ltmdsl/tensorfile.py) on a model built on the meta device, and the model's bytes are compared
with the memory available, before a single weight is allocated. DeepSeek-V3's multi-token-prediction modules
are loaded when the checkpoint holds them, and left out of the model when it holds none (`without_absent_mtp`).
"""

from __future__ import annotations

import json
import os

from ltmdsl.hf import HFError
from ltmdsl.hf.configs import plan_from_config, read_config
from ltmdsl.hf.spec import Plan
from ltmdsl.hf.weights import buffers_of, expert_counts, gather, layer_configs, mtp_copies, mtp_layers, source_of
from ltmdsl.tensorfile import TensorFileError, TensorInfo, check_fits, read_header

#: safetensors dtypes a Hugging Face weight may have (the runtime casts them to the model's dtype).
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """The tensors of a checkpoint folder: one `model.safetensors` or the shards its index lists."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        self._files: dict[str, object] = {}
        self._where: dict[str, str] = {}
        self.infos: dict[str, TensorInfo] = {}  # from the validated headers
        index_path = os.path.join(folder, INDEX)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise HFError(f"unreadable shard index: {e}", index_path) from None
            if not isinstance(weight_map, dict):
                raise HFError("'weight_map' must map tensor names to shard files", index_path)
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                    raise HFError(f"tensor {name}: shard {shard!r} is not a .safetensors file in the folder",
                                  index_path)
                self._where[name] = shard
            shards = sorted(set(self._where.values()))
        elif os.path.isfile(os.path.join(folder, SINGLE)):
            shards = [SINGLE]
        else:
            others = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                      if os.path.exists(os.path.join(folder, f))]
            hint = f" (found {', '.join(others)}: convert it to safetensors first)" if others else ""
            raise HFError(f"no {SINGLE} or {INDEX}{hint}", folder)
        for shard in shards:
            path = os.path.join(folder, shard)
            try:
                self.infos.update(read_header(path).tensors)
            except TensorFileError as e:
                raise HFError(f"cannot open safetensors file: {str(e).removeprefix(f'{path}: ')}", path) from None
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise HFError(f"cannot open safetensors file: {e}", path) from None
            self._files[shard] = handle
            for name in handle.keys():
                owner = self._where.setdefault(name, shard)
                if owner != shard:
                    raise HFError(f"tensor {name} is listed in {owner} but stored in {shard}", path)
        missing_files = [n for n, s in self._where.items() if s not in self._files]
        if missing_files:
            raise HFError(f"tensor {missing_files[0]} listed in the index is in no shard", index_path)
        for name, shard in self._where.items():
            if name not in self._files[shard].keys():
                raise HFError(f"the index places tensor {name} in {shard}, which does not hold it", folder)

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def read(self, name: str):
        """One tensor (raises KeyError with the name when absent)."""
        if name not in self._where:
            raise KeyError(name)
        return self._files[self._where[name]].get_tensor(name)


    def read_meta(self, name: str):
        """An empty meta-device tensor with the header's shape and dtype of `name` (KeyError when absent)."""
        import torch

        if name not in self._where:
            raise KeyError(name)
        info = self.infos[name]
        return torch.empty(info.shape, dtype=getattr(torch, FLOAT_DTYPES[info.dtype]), device="meta")

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())


def _tensors(params: dict, ir, plan: Plan, ckpt: Checkpoint, read, folder: str) -> dict:
    """Runtime parameter name -> tensor gathered through `read`, after checking that the names match."""
    available = ckpt.names
    experts = expert_counts(ir)
    layers = layer_configs(ir)
    sources = {name: source_of(plan, name, experts, available, layers=layers) for name in params}
    used = {n for src in sources.values() for n in src.names}
    allowed = {"lm_head.weight"} if ir.tie_embeddings else set()  # some tied checkpoints repeat it
    skipped = tuple(plan.hf.get("unloaded", ()))  # modules transformers does not load either (DeepSeek-V3's and
    # Nemotron-H's MTP layers, a vision tower)
    allowed |= {n for n in available if skipped and n.startswith(skipped)}
    allowed |= set(buffers_of(plan, ir))  # computed tensors transformers saves too: checked by load_weights
    allowed |= set(mtp_copies(plan, available))  # the MTP layers' copies of the embedding and head: check_copies
    unexpected = sorted(available - used - allowed)
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise HFError(f"unexpected tensor{'s' if len(unexpected) > 1 else ''} {', '.join(unexpected[:5])}{more} "
                      f"(not part of a {plan.family} model with this config)", folder)
    try:
        return gather(sources, read, {n: tuple(p.shape) for n, p in params.items()})
    except HFError as e:
        raise HFError(e.message, folder) from None


def check_weights(ir, plan: Plan, ckpt: Checkpoint, dtype) -> None:
    """Every check of `load_weights`, from the headers alone on a meta-device model; then whether the
    model fits in memory. Nothing is allocated."""
    import torch

    from ltmdsl.runtime.build import kernels_for
    from ltmdsl.runtime.checkpoint import stored_tensors
    from ltmdsl.runtime.model import LTModel

    odd = sorted(n for n, info in ckpt.infos.items() if info.dtype not in FLOAT_DTYPES)
    if odd:
        raise HFError(f"tensor {odd[0]} is {ckpt.infos[odd[0]].dtype}; weights must be one of "
                      f"{', '.join(FLOAT_DTYPES)}", ckpt.folder)
    with torch.device("meta"):
        params = stored_tensors(LTModel(ir, kernels_for("torch", ir)))
    _tensors(params, ir, plan, ckpt, ckpt.read_meta, ckpt.folder)
    check_copies(plan, ir, ckpt, ckpt.folder, values=False)
    itemsize = torch.empty((), dtype=dtype).element_size()
    # built in fp32, cast to dtype, and every checkpoint tensor read (and stacked) once while filling it
    need = (ir.params_total + ir.params_mtp) * (4 + (itemsize if dtype != torch.float32 else 0)) + 2 * ckpt.nbytes
    try:
        check_fits(need, f"model {ir.name}")
    except TensorFileError as e:
        raise HFError(str(e), ckpt.folder) from None


def check_copies(plan: Plan, ir, ckpt: Checkpoint, folder: str, values: bool) -> None:
    """The MTP layers' copies of the embedding and the head (DeepSeek-V3's embed_tokens, shared_head.head) must
    be the main model's tensors, which ltmdsl's MTP modules share: their shapes from the headers, and with
    `values` their contents, bit for bit."""
    import torch

    experts = expert_counts(ir)
    for name, runtime in mtp_copies(plan, ckpt.names).items():
        if name not in ckpt.names:
            continue
        main = source_of(plan, runtime, experts, ckpt.names).names[0]
        if main not in ckpt.names:  # a tied checkpoint without lm_head.weight
            main = source_of(plan, "embed.weight", experts, ckpt.names).names[0]
        if ckpt.infos[name].shape != ckpt.infos[main].shape or values and not torch.equal(ckpt.read(name),
                                                                                           ckpt.read(main)):
            raise HFError(f"tensor {name} is not a copy of {main}: ltmdsl's multi-token-prediction modules share "
                          "the main model's embedding and head", folder)


def check_buffers(plan: Plan, ir, ckpt: Checkpoint, folder: str) -> None:
    """The computed tensors a checkpoint holds (lightning's slopes and decay tables) must be the ones the runtime
    computes for this config and stack (to the checkpoint dtype's rounding): another value would be a model the
    language does not describe. Absent ones are fine (transformers recomputes them too)."""
    import torch

    for name, want in buffers_of(plan, ir).items():
        if name not in ckpt.names:
            continue
        got = ckpt.read(name)
        tol = 1e-5 if got.dtype in (torch.float32, torch.float64) else 1e-2
        if tuple(got.shape) != tuple(want.shape) or not torch.allclose(got.double(), want.double(), rtol=tol,
                                                                       atol=0):
            raise HFError(f"tensor {name} (shape {list(got.shape)}) is not what this config computes (shape "
                          f"{list(want.shape)}, from its heads, block_size and the layer's depth)", folder)


def load_weights(model, plan: Plan, folder: str, ckpt: Checkpoint | None = None) -> None:
    """Fill every parameter and persistent buffer of a runtime `model` built from `plan` with the checkpoint's
    tensors."""
    import torch

    from ltmdsl.runtime.checkpoint import stored_tensors, warn_nonfinite

    ckpt = ckpt or Checkpoint(folder)
    params = stored_tensors(model)  # tied weights appear once; persistent buffers (a MoE's selection bias) too
    read: list[tuple[str, object]] = []  # (checkpoint name, tensor): NaN warnings name the file's tensors

    def reading(name: str):
        read.append((name, ckpt.read(name)))
        return read[-1][1]

    tensors = _tensors(params, model.ir, plan, ckpt, reading, folder)
    warn_nonfinite(read, folder)
    check_buffers(plan, model.ir, ckpt, folder)
    check_copies(plan, model.ir, ckpt, folder, values=True)
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))


def without_absent_mtp(plan: Plan, ckpt: Checkpoint) -> Plan:
    """The plan without its MTP modules when the checkpoint holds no tensor of their layers (transformers saves
    none: its DeepSeek-V3 builds no MTP module), with a NOTE saying so; a checkpoint with some of them must hold
    them all (a missing one is an error naming it)."""
    import dataclasses

    layers = mtp_layers(plan)
    if not layers or any(n.startswith(layers) for n in ckpt.names):
        return plan
    note = (f"the checkpoint holds no multi-token-prediction tensors ({layers[0]}*): the model is built without "
            "its mtp modules")
    return dataclasses.replace(plan, mtp=None, notes=(*plan.notes, note))


def from_hf(path, dtype=None, *, ignore=(), name: str | None = None, device="cpu", backend: str = "torch"):
    """A runtime model with the weights of the checkpoint at `path` (a folder, or its config.json).

    `dtype` defaults to torch.float32. `ignore` names config keys to drop knowingly (see configs.py); the
    spec the model was built from is `model.ir.source_text`.
    """
    import torch

    import ltmdsl

    cfg, cfg_path = read_config(path)
    folder = os.path.dirname(cfg_path) or "."
    plan = plan_from_config(cfg, name=name, source=cfg_path, ignore=ignore)
    ckpt = Checkpoint(folder)
    plan = without_absent_mtp(plan, ckpt)
    spec = ltmdsl.loads(plan.spec_text(), name=f"<{cfg_path}>")
    check_weights(spec.model, plan, ckpt, dtype or torch.float32)
    model = ltmdsl.build(spec, backend=backend, dtype=dtype or torch.float32, device=device, init=False)
    load_weights(model, plan, folder, ckpt)
    model.eval()
    return model
