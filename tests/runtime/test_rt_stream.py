"""`ltmdsl stream`: measured cache bytes equal the memory model's, a constant-memory spec keeps its cache
and peak RSS flat as N grows, a growing cache that would not fit is refused with exit 3 before anything
is allocated, and token counts accept unit suffixes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
from paths import EXAMPLES

import ltmdsl
from ltmdsl.commands import stream

STREAM = str(EXAMPLES / "stream-hybrid.ltm")
TINY = str(EXAMPLES / "tiny-hybrid.ltm")


def run(argv, capsys):
    p = argparse.ArgumentParser()
    stream.add_arguments(p)
    code = stream.run(p.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_report(capsys):
    code, out, err = run([STREAM, "--tokens", "3000", "--chunk", "512", "--batch", "2", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["tokens"] == 3000 and r["batch"] == 2 and r["last_logits_finite"]
    assert r["cache_bytes_measured"] == r["cache_bytes_predicted"] > 0
    assert r["tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0 and not r["cache_grows_with_tokens"]
    assert err == ""  # no progress bar with --json


def test_constant_memory_cache_does_not_grow(capsys):
    sizes = []
    for n in ("1000", "8Ki"):
        code, out, _ = run([STREAM, "--tokens", n, "--chunk", "700", "--json"], capsys)
        assert code == 0
        sizes.append(json.loads(out)["cache_bytes_measured"])
    assert sizes[0] == sizes[1]


def test_growing_cache_that_cannot_fit_is_refused(capsys):
    code, out, err = run([TINY, "--tokens", "10G", "--json"], capsys)
    assert code == 3
    # tiny-hybrid's global attention grows its KV cache, and its MLA layer's prefill up-projects the whole
    # cached context per chunk: either can be the largest part at 10G tokens, and the refusal names it
    assert "refusing" in err and ("KV cache grows" in err or "activations of one" in err) and out == ""


def test_chunk_whose_activations_cannot_fit_is_refused(capsys):
    """A constant-memory spec with a 200M-token chunk: cache and weights are tiny, but the memory model's prefill
    workspace for one such chunk is hundreds of GiB. Refused before anything is allocated, naming the chunk."""
    code, out, err = run([STREAM, "--tokens", "200M", "--chunk", "200M"], capsys)
    assert code == 3 and out == ""
    assert "refusing" in err and "activations" in err and "--chunk" in err and "200,000,000-token chunk" in err


def test_refusal_counts_the_chunk_activations_against_mem_available(capsys, monkeypatch):
    """With 64 MiB available, a 100K-token chunk (about 160 MB of prefill workspace by the memory model) does
    not fit although cache + weights (under 200 KiB) do; a 1K-token chunk of the same run does."""
    from ltmdsl.memory import report

    ir = ltmdsl.load(STREAM).model
    need = report(ir, None, context=100_000, batch=1, chunk=100_000, gpus=1, conv_taps="full").components
    avail = 64 * 2**20
    assert need["weights"] + need["kv_cache"] + need["recurrent_state"] < avail < sum(need.values())
    monkeypatch.setattr(stream, "mem_available", lambda: avail)
    code, out, err = run([STREAM, "--tokens", "100K", "--chunk", "100K", "--json"], capsys)
    assert code == 3 and out == "" and "activations" in err
    code, out, err = run([STREAM, "--tokens", "3000", "--chunk", "1000", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["memory_predicted_bytes"]["activations"] > 0


@pytest.mark.parametrize("flags", [[], ["--json"]], ids=["summary", "json"])
def test_results_are_printed_when_stdout_is_not_a_terminal(flags):
    """stdout a pipe and stderr a pipe: the results still reach stdout, and no progress bar reaches stderr."""
    proc = subprocess.run([sys.executable, "-m", "ltmdsl.cli", "stream", STREAM, "--tokens", "2000", "--chunk",
                           "500", *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if flags:
        assert json.loads(proc.stdout)["tokens"] == 2000
    else:
        assert proc.stdout.startswith("stream_hybrid: 2,000 tokens x batch 1 in ") and "tokens/s" in proc.stdout
        assert "cache 10.50 KiB (predicted 10.50 KiB)" in proc.stdout
    assert proc.stderr == ""


def test_tiny_hybrid_streams_with_a_growing_cache(capsys):
    code, out, _ = run([TINY, "--tokens", "600", "--chunk", "256", "--json"], capsys)
    r = json.loads(out)
    assert code == 0 and r["cache_grows_with_tokens"]
    assert r["cache_bytes_measured"] == r["cache_bytes_predicted"]


def test_peak_rss_flat_for_constant_memory_spec():
    """Peak RSS in fresh processes at N = 2K and N = 64K differs by less than 16 MiB."""
    peaks = []
    for n in ("2000", "64Ki"):
        proc = subprocess.run(
            [sys.executable, "-m", "ltmdsl.cli", "stream", STREAM, "--tokens", n, "--chunk", "1024", "--json"],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        peaks.append(json.loads(proc.stdout)["peak_rss_bytes"])
    assert abs(peaks[1] - peaks[0]) < 16 * 2**20, f"peak RSS {peaks}"


@pytest.mark.parametrize("text,value", [("4096", 4096), ("1M", 10**6), ("64Ki", 65536), ("1e3", 1000)])
def test_count_parser(text, value):
    assert stream.count(text) == value


@pytest.mark.parametrize("text", ["0", "-5", "1.5", "lots"])
def test_count_parser_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        stream.count(text)


SPLITTABLE = """
model s {
    vocab = 128
    d_model = 32
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = tied
    layer ssm = mamba2(d_state = 16, head_dim = 16, expand = 2, n_groups = 2, chunk = 64)
    layer swa = attention(heads = 2, kv_heads = 2, window = 16)
    layer ffn = mlp(d_ff = 64, act = swiglu)
    stack { ssm ffn swa ffn }
}
"""


def test_nproc_streams_on_tensor_parallel_ranks_each_holding_half_the_cache(tmp_path, capsys):
    """`--nproc 2`: two forked gloo ranks, the model split by tp; rank 0's cache is its heads' share, the
    memory model's cache_bytes(tp=2): Mamba-2's 4 heads and 2 groups and the window's 2 KV heads halve."""
    spec = tmp_path / "s.ltm"
    spec.write_text(SPLITTABLE)
    code, out, err = run([str(spec), "--tokens", "96", "--chunk", "32", "--json"], capsys)
    assert code == 0, err
    whole = json.loads(out)
    code, out, err = run([str(spec), "--tokens", "96", "--chunk", "32", "--nproc", "2", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["tp"] == 2 and r["last_logits_finite"] and r["tokens_per_s"] > 0
    assert r["cache_bytes_measured"] == r["cache_bytes_predicted"] == whole["cache_bytes_measured"] // 2


def test_nproc_refuses_a_model_tp_cannot_split_before_launch(capsys):
    """8 ranks for the Mamba-2's 4 heads (its one group of B and C no longer stops tp = 2: each rank holds it)."""
    code, _, err = run([STREAM, "--tokens", "64", "--nproc", "8"], capsys)
    assert code == 2
    assert "stream_hybrid cannot be split over 8 ranks: layer 'ssm': tp = 8 must divide the mamba2's 4 heads" in err


#: a global attention beside SPLITTABLE's layers: context parallelism splits its cache, not the states
CP_SPEC = SPLITTABLE.replace("    stack { ssm ffn swa ffn }",
                             "    layer attn = attention(heads = 2, kv_heads = 2, rope_theta = 10000)\n"
                             "    stack { ssm ffn swa ffn attn ffn }")


@pytest.mark.parametrize("nproc, cp", [(2, 2), (4, 2)], ids=["cp2", "tp2-cp2"])
def test_cp_streams_each_rank_holding_its_share_of_the_attention_cache(tmp_path, capsys, nproc, cp):
    """`--nproc N --cp K`: K ranks split the sequence (ltmdsl.distributed.cp_inference), N/K split the heads;
    rank 0's cache equals the memory model's cache_bytes(tp=N/K, cp=K): the attention caches 1/(tp*cp) of one
    process's, Mamba-2's state 1/tp."""
    from ltmdsl.memory import cache_bytes
    from ltmdsl.units import DTYPES

    spec = tmp_path / "s.ltm"
    spec.write_text(CP_SPEC)
    code, out, err = run([str(spec), "--tokens", "96", "--chunk", "32", "--nproc", str(nproc), "--cp", str(cp),
                          "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["cp"] == cp and r["tp"] == nproc // cp and r["last_logits_finite"]
    ir = ltmdsl.loads(CP_SPEC).model
    tp = nproc // cp
    want = cache_bytes(ir, batch=1, context=96, kv_dtype=DTYPES["fp32"], state_dtype=DTYPES["fp32"], tp=tp, cp=cp)
    whole = cache_bytes(ir, batch=1, context=96, kv_dtype=DTYPES["fp32"], state_dtype=DTYPES["fp32"])
    assert r["cache_bytes_measured"] == r["cache_bytes_predicted"] == sum(want.values())
    assert want["kv_cache"] * tp * cp == whole["kv_cache"]
    assert want["recurrent_state"] * tp == whole["recurrent_state"]


def test_cp_refuses_what_it_cannot_split_before_launch(capsys):
    code, _, err = run([TINY, "--tokens", "64", "--chunk", "32", "--nproc", "2", "--cp", "2"], capsys)
    assert code == 2
    assert "tiny_hybrid cannot run context-parallel inference: no form for kind 'mla'" in err
    code, _, err = run([TINY, "--tokens", "64", "--chunk", "33", "--nproc", "2", "--cp", "2"], capsys)
    assert code == 2 and "--cp 2 must divide the tokens (64) and the chunk (33)" in err
