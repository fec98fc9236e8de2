"""The chunked answer loss equals the plain cross-entropy, with the same gradients, in less memory.

Oracle: `F.cross_entropy` on the full logits `rows @ weight.T`, in float64 (tolerance 1e-12, relative).
Memory: peak RSS (VmHWM) of a fresh process measured after the chunked loss and again after the plain one
on the same data, the peak reset in between where Linux allows it (otherwise the peak only grows, and a
rise still shows that the plain loss peaked higher than the chunked one did).
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from paths import ROOT
from ltmdsl.train.loss import answer_rows, chunked_cross_entropy


def _case(n=37, d=8, v=50, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, d, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=gen, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=gen)
    return rows, weight, targets


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000], ids=lambda c: f"chunk{c}")
def test_chunked_equals_plain_loss_and_grads(chunk):
    rows, weight, targets = _case()
    plain = F.cross_entropy(rows @ weight.t(), targets)
    g_rows, g_w = torch.autograd.grad(plain, (rows, weight))
    result = chunked_cross_entropy(rows, weight, targets, chunk)
    c_rows, c_w = torch.autograd.grad(result.loss * 3.0, (rows, weight))  # the upstream gradient scales
    assert_close(result.loss.detach(), plain.detach(), 1e-12, "loss")
    assert_close(c_rows, 3.0 * g_rows, 1e-12, "d loss / d rows")
    assert_close(c_w, 3.0 * g_w, 1e-12, "d loss / d weight")
    assert result.correct == int(((rows @ weight.t()).argmax(-1) == targets).sum())
    assert result.count == 37


@pytest.mark.parametrize("chunk", [1, 7, 1000], ids=lambda c: f"chunk{c}")
def test_chunked_soft_capped_loss_equals_plain(chunk):
    """Gemma-style final-logit soft cap: logits = cap * tanh(h.w / cap), loss and gradients through the cap."""
    rows, weight, targets = _case()
    cap = 1.5
    plain = F.cross_entropy(cap * torch.tanh(rows @ weight.t() / cap), targets)
    g_rows, g_w = torch.autograd.grad(plain, (rows, weight))
    result = chunked_cross_entropy(rows, weight, targets, chunk, cap=cap)
    c_rows, c_w = torch.autograd.grad(result.loss, (rows, weight))
    assert_close(result.loss.detach(), plain.detach(), 1e-12, "capped loss")
    assert_close(c_rows, g_rows, 1e-12, "capped d loss / d rows")
    assert_close(c_w, g_w, 1e-12, "capped d loss / d weight")


def test_answer_loss_uses_the_models_logit_scale_and_cap():
    """answer_loss equals the plain cross-entropy of the model's own logits (its head scales and caps them)."""
    import ltmdsl
    from ltmdsl.train.loss import answer_loss

    spec = ltmdsl.loads("""model m {
    vocab = 40
    d_model = 16
    dtype = fp32
    logit_scale = 0.5
    logit_cap = 3.0
    layer f = mlp(d_ff = 24)
    stack { f }
}
""")
    model = ltmdsl.build(spec, seed=0).double()
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 5:] = True
    logits = model(tokens)  # [B, T, V], the model's head: scale then cap
    plain = F.cross_entropy(logits[:, :-1][mask[:, 1:]], tokens[:, 1:][mask[:, 1:]])
    assert_close(answer_loss(model, tokens, mask, chunk=4).loss.detach(), plain.detach(), 1e-12, "answer loss")


def test_summed_target_loss_skips_ignored_positions_through_the_models_head():
    """summed_target_loss = the summed F.cross_entropy of the model's own logits (scale and cap) over the
    positions whose target is not -100 (1e-12 in float64), with its gradient; none left: a zero in the graph."""
    import ltmdsl
    from ltmdsl.train.loss import summed_target_loss

    model = ltmdsl.build(ltmdsl.loads("""model m {
    vocab = 40
    d_model = 16
    dtype = fp32
    logit_scale = 0.5
    logit_cap = 3.0
    layer f = mlp(d_ff = 24)
    stack { f }
}
"""), seed=0).double()
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 9, 16, generator=gen, dtype=torch.float64, requires_grad=True)  # [B, T, d]
    targets = torch.randint(0, 40, (2, 9), generator=gen)
    targets[0, :4] = -100
    plain = F.cross_entropy(model.head(hidden).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    want = torch.autograd.grad(plain, hidden)[0]
    summed, correct, count = summed_target_loss(model, hidden, targets, chunk=4)
    assert_close(summed.detach(), plain.detach(), 1e-12, "summed loss")
    assert_close(torch.autograd.grad(summed, hidden)[0], want, 1e-12, "d loss / d hidden")
    assert count == 14 and correct == int((model.head(hidden).argmax(-1) == targets).sum())
    none, _, zero = summed_target_loss(model, hidden, torch.full_like(targets, -100))
    assert zero == 0 and none.item() == 0.0 and none.requires_grad


def test_bf16_autocast_close_to_fp32():
    rows, weight, targets = _case(dtype=torch.float32)
    plain = F.cross_entropy(rows @ weight.t(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = chunked_cross_entropy(rows.bfloat16(), weight, targets, 8)
    assert_close(result.loss.detach().float(), plain.detach(), 2e-2, "bf16 loss (bf16 has 8 mantissa bits)")


def test_answer_rows_pick_the_position_before_each_answer():
    hidden = torch.arange(2 * 5, dtype=torch.float64).reshape(2, 5, 1)  # [B, T, 1]: value = b*5 + t
    tokens = torch.tensor([[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]])
    mask = torch.tensor([[False, False, True, False, True], [False, True, False, False, False]])
    rows, targets = answer_rows(hidden, tokens, mask)
    assert rows[:, 0].tolist() == [1.0, 3.0, 5.0]  # positions t - 1 of answers at (0,2), (0,4), (1,1)
    assert targets.tolist() == [7, 5, 3]


def test_no_answer_tokens_is_an_error():
    rows, weight, _ = _case(n=0)
    with pytest.raises(ValueError, match="no answer tokens"):
        chunked_cross_entropy(rows, weight, torch.zeros(0, dtype=torch.long))


PEAK = """
import json, torch, torch.nn.functional as F
from ltmdsl.train.loss import chunked_cross_entropy
torch.set_num_threads(1)
n, d, v = 4096, 16, 8192                     # plain logits: 4096 x 8192 fp32 = 128 MiB
rows = torch.randn(n, d, requires_grad=True)
weight = torch.randn(v, d, requires_grad=True)
targets = torch.randint(0, v, (n,))

def peak():                                  # VmHWM: this process's peak RSS (not inherited across exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

def reset():                                 # start a new peak from the current RSS where Linux allows it
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

reset()
chunked_cross_entropy(rows, weight, targets, 256).loss.backward()
after_chunked = peak()
reset()
F.cross_entropy(rows @ weight.t(), targets).backward()
print(json.dumps({"after_chunked": after_chunked, "after_plain": peak()}))
"""


def test_chunked_loss_peaks_lower_than_plain():
    out = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, cwd=ROOT, check=True)
    peaks = json.loads(out.stdout)
    rise = peaks["after_plain"] - peaks["after_chunked"]
    assert rise > 64 * 2**20, f"plain loss peaked only {rise / 2**20:.1f} MiB above the chunked one"


# -- vocab-parallel: the head's rows split over tp ranks --------------------------------------------------


def _vocab_parallel_rank(chunk, cap, tp):
    """One tp rank: the chunked loss on its V/tp rows of the head -> (loss, correct, d rows, d its rows)."""
    import torch.distributed as dist

    from ltmdsl.train.loss import VocabShard

    rows, weight, targets = _case()
    rank, width = dist.get_rank(), weight.shape[0] // tp
    mine = weight.detach()[rank * width:(rank + 1) * width].clone().requires_grad_(True)  # [V/tp, d]
    shard = VocabShard(group=dist.group.WORLD, start=rank * width, vocab=weight.shape[0])
    result = chunked_cross_entropy(rows, mine, targets, chunk, cap=cap, shard=shard)
    g_rows, g_mine = torch.autograd.grad(result.loss * 3.0, (rows, mine))
    return result.loss.detach(), result.correct, g_rows, g_mine


@pytest.mark.parametrize("chunk, cap, tp", [(7, None, 2), (1000, None, 5), (7, 1.5, 2)],
                         ids=["chunk7-tp2", "chunk1000-tp5", "capped-tp2"])
def test_vocab_parallel_loss_equals_plain(chunk, cap, tp):
    """Each of tp gloo ranks holds V/tp head rows (V = 50; some targets and argmaxes on every rank): loss,
    argmax count, the rows' gradient (every rank the whole one) and each rank's rows of the weight gradient
    equal F.cross_entropy on the full logits in float64 within 1e-12."""
    from ltmdsl.distributed import launch

    rows, weight, targets = _case()
    logits = rows @ weight.t()
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    plain = F.cross_entropy(logits, targets)
    g_rows, g_w = torch.autograd.grad(plain * 3.0, (rows, weight))
    width = weight.shape[0] // tp
    for rank, (loss, correct, c_rows, c_mine) in enumerate(launch(_vocab_parallel_rank, tp, (chunk, cap, tp))):
        assert_close(loss, plain.detach(), 1e-12, f"rank {rank} loss")
        assert correct == int((logits.argmax(-1) == targets).sum())
        assert_close(c_rows, g_rows, 1e-12, f"rank {rank} d loss / d rows")
        assert_close(c_mine, g_w[rank * width:(rank + 1) * width], 1e-12, f"rank {rank} d loss / d its rows")
