"""The runnable model: embedding, the flat stack of pre-norm residual sub-layers, final norm, LM head.

    h = embed(ids) * embed_scale                     [B, T, d]
    for each sub-layer i:  h = a_i * s_i + b_i * residual_scale * post_norm_i(mixer_i(norm_i(h)))
                           (post_norm only where the layer has one; the add is fused into the next norm;
                           s_i = h, or norm_i(h) with `skip = normed`; a_i, b_i its skip and branch scales)
                           `input = concat_embed`: norm_i and mixer_i read cat[h, e] (e = the scaled
                           embeddings, [B, T, 2d]); `into = next_input`: h stays, and the branch is added to
                           the next sub-layer's input before its norm only (Zamba2's transformer_hidden_states)
    logits = lm_head(final_norm(h)) * logit_scale    [B, T, V]   (tied: embed.weight is the head)
    logits = logit_cap * tanh(logits / logit_cap)    when the model has a final-logit soft cap

`forward(ids, cache=None, output="logits")` runs prefill, chunked prefill or decode: with a cache, each
call continues at position `cache.seen` and advances it; a one-token call uses each mixer's `step`.
`output="last"` computes logits for the last position only and `output="hidden"` skips the head, so long
streams never materialise [B, T, V]. Modules hold no global state: the kernels arrive at construction.
Each mixer comes from the runtime registry (runtime/kinds), so this module names no concrete kind.
"""

from __future__ import annotations

import torch
from torch import nn

from ltmdsl.ir import ModelIR, SubLayer
from ltmdsl.runtime import initializers as init
from ltmdsl.runtime.cache import Cache, allocate
from ltmdsl.runtime.kernels import Kernels
from ltmdsl.runtime.kinds import LayerPlace, layer_places, runtime_kind
from ltmdsl.runtime.norm import Norm
from ltmdsl.runtime.tensor_parallel import tp_size

OUTPUTS = ("logits", "last", "hidden")


def build_mixer(layer: SubLayer, d: int, kernels: Kernels, place: LayerPlace) -> nn.Module:
    """The module for one sub-layer's mixer config, from the runtime registry entry of `layer.kind`
    (NoRuntimeModule, naming the kind, when it has none); a kind that depends on its place in the stack
    (`RuntimeKind.placed`) also receives `place`."""
    entry = runtime_kind(layer.kind)
    if entry.placed:
        return entry.build(layer.mixer, d, layer.norm.eps, kernels, place=place)
    return entry.build(layer.mixer, d, layer.norm.eps, kernels)


class Block(nn.Module):
    """One residual sub-layer: `norm` (pre-norm, fused with the pending residual add), `mixer`, and
    `post_norm` on the mixer's output when the layer has one (sandwich norms), joined to the stream as its
    `residual` says (ltmdsl.ir.Residual). `advance` is the one place the residual stream is computed; every
    loop over the stack (the model, pipeline stages, the measured traces) goes through it."""

    def __init__(self, layer: SubLayer, d: int, kernels: Kernels, place: LayerPlace):
        super().__init__()
        self.norm = Norm(layer.norm, d * layer.residual.width, kernels)  # 2d wide over cat[h, e]
        self.mixer = build_mixer(layer, d, kernels, place)
        self.post_norm = Norm(layer.post_norm, d, kernels) if layer.post_norm is not None else None
        self.residual = layer.residual
        self.outputs = runtime_kind(layer.kind).outputs(layer.mixer)  # {name: normalised}: what init rescales
        # True when the stream walk must carry more than (h, pending): embeddings, an injected branch, a use
        self.wide = (layer.residual.input != "stream" or layer.residual.into != "residual"
                     or runtime_kind(layer.kind).new_use is not None)

    def advance(self, h: torch.Tensor, pending: torch.Tensor | None, state, pos0: int, decode: bool,
                residual_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The stream h + pending [B, T, d] (pending None: nothing to add) through this sub-layer -> the new
        (h, pending): h the scaled skip path, pending the branch, added by the next norm (or by the caller).
        `enter`, `mix`, `branch`; a caller that can drop its references in between (LTModel.forward) calls them
        itself, so the added tensor is freed before the mixer runs and the normed input before the branch."""
        if self.wide:
            raise ValueError("this sub-layer reads the embeddings, sends its output into the next input or has "
                             "per-use parameters: run it with `flow`, which carries them")
        normed, h = self.enter(h, pending)
        return h, self.branch(self.mix(normed, state, pos0, decode), residual_scale)

    def flow(self, h: torch.Tensor, pending: torch.Tensor | None, inject: torch.Tensor | None, state, pos0: int,
             decode: bool, residual_scale: float, embeds: torch.Tensor | None = None,
             use: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`advance` for every sub-layer: (h, pending, inject) -> (h, pending, inject) [B, T, d] each, with the
        embeddings `embeds` (input = concat_embed) and the sub-layer's own parameters `use` (RuntimeKind.new_use);
        under into = next_input the branch comes back as the next inject, else as the next pending."""
        normed, h = self.enter(h, pending, inject, embeds)
        out = self.branch(self.mix(normed, state, pos0, decode, use), residual_scale)
        return (h, None, out) if self.residual.into == "next_input" else (h, out, None)

    def enter(self, h: torch.Tensor, pending: torch.Tensor | None, inject: torch.Tensor | None = None,
              embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed input of the mixer [B, T, d] or [B, T, 2d], skip path [B, T, d]), from the stream h + pending;
        `inject` (the previous sub-layer's branch under into = next_input) joins the norm's input only, and
        `embeds` [B, T, d] is concatenated to it under input = concat_embed."""
        if inject is None and self.residual.input == "stream":
            normed, h = self.norm(h, None) if pending is None else self.norm(pending, h)  # [B, T, d] each
        else:
            if pending is not None:
                h = h + pending  # [B, T, d]
            x = h if inject is None else h + inject  # [B, T, d]: the skip path keeps h
            if self.residual.input == "concat_embed":
                x = torch.cat([x, embeds], dim=-1)  # [B, T, 2d]
            normed = self.norm(x, None)[0]  # [B, T, d or 2d]
        if self.residual.skip == "normed":
            h = normed
        if self.residual.skip_scale != 1.0:
            h = h * self.residual.skip_scale
        return normed, h

    def mix(self, normed: torch.Tensor, state, pos0: int, decode: bool, use: nn.Module | None = None) -> torch.Tensor:
        """The mixer on its normed input [B, T, d] (one token's step when decoding) -> its output [B, T, d];
        `use`: the sub-layer's own parameters for a kind that has per-use ones (RuntimeKind.new_use)."""
        extra = {} if use is None else {"use": use}
        if decode:
            return self.mixer.step(normed[:, 0], state, pos0, **extra)[:, None]  # [B, 1, d]
        return self.mixer(normed, state, pos0, **extra)  # [B, T, d]

    def init_weights(self, gen: torch.Generator, branches: int) -> None:
        """The kind's own init, its output projections drawn scaled for a stack of `branches` residual
        branches (runtime.initializers: the stream at init stays of the embeddings' scale)."""
        self.norm.init_weights(gen)
        with init.residual_outputs(self.mixer, self.outputs, branches):
            self.mixer.init_weights(gen)
        if self.post_norm is not None:
            self.post_norm.init_weights(gen)

    def branch(self, out: torch.Tensor, residual_scale: float) -> torch.Tensor:
        """What the sub-layer adds to the residual stream: branch_scale * residual_scale * post_norm(mixer output)
        [..., d]."""
        if self.post_norm is not None:
            out = self.post_norm(out, None)[0]
        scale = residual_scale * self.residual.branch_scale
        return out * scale if scale != 1.0 else out


class LTModel(nn.Module):
    """A ModelIR made runnable. Parameter names follow docs/CONTRACTS.md."""

    def __init__(self, ir: ModelIR, kernels: Kernels):
        super().__init__()
        self.ir, self.kernels = ir, kernels
        d = ir.d_model
        self.embed = nn.Embedding(ir.vocab, d)
        owners: dict[tuple[str, int], Block] = {}
        blocks = []
        for layer, place in zip(ir.layers, layer_places(ir.layers)):
            if layer.tie_group is None:
                blocks.append(Block(layer, d, kernels, place))
                continue
            key = (layer.tie_group, layer.tie_slot or 0)
            if key not in owners:  # the first sub-layer of a tie slot owns the weights (and its place)
                owners[key] = Block(layer, d, kernels, place)
            blocks.append(owners[key])  # later ones share the very same module objects
        self.layers = nn.ModuleList(blocks)
        # Per-use parameters (LoRA adapters of a shared block's uses): one module per sub-layer, tied or not.
        self.uses = nn.ModuleDict({
            str(i): runtime_kind(layer.kind).new_use(layer.mixer, d)
            for i, layer in enumerate(ir.layers) if runtime_kind(layer.kind).new_use is not None
        })
        self.embeds_needed = any(layer.residual.input == "concat_embed" for layer in ir.layers)
        self.final_norm = Norm(ir.final_norm, d, kernels)
        self.lm_head = None if ir.tie_embeddings else nn.Linear(d, ir.vocab, bias=False)
        self.mtp = None  # DeepSeek-V3's multi-token-prediction modules (runtime/mtp.py), where the spec has them
        if ir.mtp is not None:
            from ltmdsl.runtime.mtp import MTPModule

            self.mtp = nn.ModuleList(MTPModule(ir.mtp, d, ir.residual_scale, kernels) for _ in range(ir.mtp.depth))

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Seeded init (fp32 draws on the CPU, copied into the parameters whatever their dtype/device); the
        output projections are sized for the stack's residual branches, one per sub-layer applied (a tied
        block counts each time it runs), as runtime.initializers describes."""
        gen = torch.Generator().manual_seed(seed)
        init.normal_(self.embed.weight, gen)
        done: set[int] = set()
        for block in self.layers:
            if id(block) not in done:  # tied blocks are initialised once
                done.add(id(block))
                block.init_weights(gen, len(self.layers))
        for use in self.uses.values():  # a use's output projection writes the stream too
            use.init_weights(gen, len(self.layers))
        self.final_norm.init_weights(gen)
        if self.lm_head is not None:
            init.normal_(self.lm_head.weight, gen)
        for module in self.mtp or ():
            module.init_weights(gen)

    def num_parameters(self) -> int:
        """Unique parameters (tied blocks counted once): equals `ir.params_total` (+ `ir.params_mtp` where the
        model has multi-token-prediction modules)."""
        return sum(p.numel() for p in self.parameters())

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # -- cache --------------------------------------------------------------------------------

    def new_cache(
        self,
        batch_size: int,
        max_context: int,
        dtype: torch.dtype | None = None,
        conv_taps: str = "full",
        state_dtype: torch.dtype | None = None,
    ) -> Cache:
        """A zeroed cache: one entry per sub-layer, each allocated by its kind (KV for attention, ring
        buffers for windows, conv taps and SSM state for Mamba, nothing for MLP / MoE).

        `dtype` is the KV dtype and, unless `state_dtype` is given, the recurrent-state dtype; both
        default to the model's dtype. Bytes equal ltmdsl.memory.cache_bytes(...) for the same arguments.
        A model split by tensor parallelism (ltmdsl.distributed records its mesh as `tp_mesh`) gets this
        rank's share: its own heads, as the memory model's per-GPU cache at that tp.
        """
        kv = dtype or self.dtype
        return allocate(
            self.ir, batch_size=batch_size, max_context=max_context, kv_dtype=kv,
            state_dtype=state_dtype or kv, conv_taps=conv_taps, device=self.device, tp=tp_size(self),
        )

    # -- forward ------------------------------------------------------------------------------

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight [V, d] (the embedding's when tied): what a chunked loss multiplies by."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states [..., d] -> logits [..., V], scaled and soft-capped as the model says.
        Under tensor parallelism the weight is split by vocabulary rows: this rank's V/t logits, gathered."""
        w = self.head_weight()
        if hasattr(w, "device_mesh"):  # vocab-parallel (ltmdsl.distributed.tensor_parallel)
            from torch.distributed.tensor import DTensor, Shard

            from ltmdsl.runtime.tensor_parallel import copy_to_tp

            mesh = w.device_mesh
            part = copy_to_tp(h, mesh.get_group()) @ w.to_local().t()  # [..., V/t]
            logits = DTensor.from_local(part, mesh, [Shard(part.dim() - 1)]).full_tensor()  # [..., V]
        else:
            logits = h @ w.t()  # [..., V]
        if self.ir.logit_scale != 1.0:
            logits = logits * self.ir.logit_scale
        if self.ir.logit_cap is not None:
            logits = self.ir.logit_cap * torch.tanh(logits / self.ir.logit_cap)
        return logits

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, output: str = "logits") -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V] ("logits"), [B, 1, V] ("last") or hidden [B, T, d] ("hidden")."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}")
        B, T = input_ids.shape
        pos0 = 0 if cache is None else cache.seen
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"cache was allocated for batch {cache.batch_size}, got {B}")
        decode = cache is not None and T == 1
        h = self.embed(input_ids)  # [B, T, d]
        if self.ir.embed_scale != 1.0:
            h = h * self.ir.embed_scale
        embeds = h if self.embeds_needed else None  # [B, T, d]: what `input = concat_embed` layers read beside h
        pending = None  # the previous mixer's output, added into h by the next norm
        inject = None  # an `into = next_input` branch, added to the next norm's input only
        for i, block in enumerate(self.layers):
            normed, h = block.enter(h, pending, inject, embeds)  # [B, T, d or 2d], [B, T, d]
            pending = inject = None  # added: released before the mixer runs, so only h and normed stay live
            state = None if cache is None else cache.layers[i]
            out = block.mix(normed, state, pos0, decode, self.uses[str(i)] if str(i) in self.uses else None)
            normed = None  # read by the mixer only: released before the branch and the next norm run
            out = block.branch(out, self.ir.residual_scale)  # [B, T, d]
            if self.ir.layers[i].residual.into == "next_input":
                inject = out
            else:
                pending = out
            out = None
        normed, _ = self.final_norm(h, None) if pending is None else self.final_norm(pending, h)
        if cache is not None:
            cache.seen += T
        if output == "hidden":
            return normed
        if output == "last":
            return self.head(normed[:, -1:])
        return self.head(normed)

    def mtp_logits(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The multi-token-prediction modules' logits, one [B, T - k, V] per depth k (runtime/mtp.py)."""
        from ltmdsl.runtime.mtp import mtp_logits

        return mtp_logits(self, input_ids)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy: logits of input_ids [B, T] against targets [B, T] (an fp32 softmax, or
        the model's own dtype when wider: a float64 model is a float64 oracle)."""
        logits = self(input_ids)  # [B, T, V]
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # [B, T, V]
        return nn.functional.cross_entropy(wide.flatten(0, 1), targets.flatten())

    # -- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """Prefill the prompt [B, T] then decode `max_new_tokens` one at a time -> [B, T + max_new_tokens].

        temperature 0 is greedy; otherwise sample from softmax(logits / temperature), restricted to the
        `top_k` most likely tokens when given, with a generator seeded by `seed`.
        """
        B, T = input_ids.shape
        if cache is None:
            cache = self.new_cache(B, T + max_new_tokens)
        return decode_tokens(self, input_ids, cache, max_new_tokens, temperature, top_k, seed)


def decode_tokens(model, input_ids: torch.Tensor, cache, max_new_tokens: int, temperature: float,
                  top_k: int | None, seed: int | None) -> torch.Tensor:
    """Prefill `input_ids` [B, T] into `cache` with `model(ids, cache, output="last")`, then decode
    `max_new_tokens` tokens one at a time (greedy at temperature 0, else sampled from a generator seeded by
    `seed`); returns [B, T + max_new_tokens]. Shared by LTModel.generate and its context-parallel form."""
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=input_ids.device)
        gen.manual_seed(0 if seed is None else seed)
    logits = model(input_ids, cache, output="last")[:, -1]  # [B, V]
    out = [input_ids]
    for i in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_k, gen)  # [B]
        out.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache, output="last")[:, -1]
    return torch.cat(out, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax, or a sample at `temperature` (optionally top-k)."""
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # [B, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=gen)[:, 0]
