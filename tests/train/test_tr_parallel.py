"""`ltmdsl train --nproc N`: the training loop on N gloo ranks equals the single-process loop.

Parity tolerance: 1e-5 relative on each step's loss and gradient norm (the ranks sum the same terms in
another order; about 1e-7 is measured). Every case forks 2 workers (FileStore rendezvous, no port).
"""

import json
import os

import pytest
import torch
from helpers import assert_close
from train_specs import MQAR, TINY

import ltmdsl
from ltmdsl.cli import main
from ltmdsl.distributed.plan import PlanError, plan_from
from ltmdsl.train import parallel, state
from ltmdsl.train.loop import TrainConfig, train

#: attention + MLP only: the kinds tensor parallelism splits today
TP_TINY = """
model tp_train {
    vocab = 32
    d_model = 16
    dtype = fp32
    norm = rmsnorm(eps = 1e-5)
    head = untied
    layer a = attention(heads = 4, kv_heads = 2)
    layer w = attention(heads = 4, kv_heads = 2, window = 8)
    layer f = mlp(d_ff = 32, act = swiglu)
    stack { a f w f }
}
"""

STEPS = 3


def config(out, **kw) -> TrainConfig:
    base = dict(task="mqar", options=dict(MQAR), steps=STEPS, batch=4, warmup=1, lr=1e-2, out=str(out))
    return TrainConfig(**{**base, **kw})


def single(ir, out, **kw) -> list[dict]:
    return list(train(ir, config(out, **kw)))


def model(text=TINY):
    return ltmdsl.loads(text).ir.models[-1]


def assert_same_steps(got: list[dict], want: list[dict], rtol: float = 1e-5) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for key in ("loss", "grad_norm", "answer_token_acc", "lr"):
        assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]), rtol, key)


@pytest.mark.parametrize("degrees", [
    pytest.param({"zero": 0}, id="dp2-zero0"),
    pytest.param({"zero": 1}, id="dp2-zero1"),
    pytest.param({"zero": 2}, id="dp2-zero2"),
    pytest.param({"zero": 3}, id="dp2-zero3"),
    pytest.param({"cp": 2}, id="cp2"),
    pytest.param({"cp": 2, "cp_split": "contiguous"}, id="cp2-contiguous"),
    pytest.param({"pp": 2, "microbatches": 2}, id="pp2-mb2"),
    pytest.param({"pp": 2, "microbatches": 2, "interleave": 2}, id="pp2-interleave2"),
    pytest.param({"ep": 2}, id="ep2"),
    pytest.param({"pp": 2, "microbatches": 2, "zero": 2}, id="pp2-zero2"),
])
def test_two_ranks_equal_one_process(tmp_path, degrees):
    ir = model()
    want = single(ir, tmp_path / "one")
    plan = plan_from(world=2, **degrees)
    last = parallel.run(ir, config(tmp_path / "two"), plan, nproc=2)
    from ltmdsl.train import metrics

    got = metrics.read(tmp_path / "two" / metrics.METRICS)
    assert_same_steps(got, want)
    assert last["step"] == STEPS


@pytest.mark.parametrize("text, degrees", [
    pytest.param(TP_TINY, {"pp": 2, "tp": 2, "microbatches": 2}, id="pp2-tp2"),
    pytest.param(TP_TINY, {"pp": 2, "tp": 2, "microbatches": 2, "sequence_parallel": True}, id="pp2-tp2-sp"),
    pytest.param(TINY, {"pp": 2, "cp": 2, "microbatches": 2, "zero": 3}, id="pp2-cp2-zero3"),
    pytest.param(TINY, {"pp": 2, "dp": 2, "ep": 2, "microbatches": 2}, id="pp2-dp2-ep2"),
])
def test_pipeline_with_tp_or_cp_on_four_ranks_equals_one_process(tmp_path, text, degrees):
    ir = model(text)
    want = single(ir, tmp_path / "one")
    parallel.run(ir, config(tmp_path / "four"), plan_from(world=4, **degrees), nproc=4)
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(tmp_path / "four" / metrics.METRICS), want)


def test_tensor_parallel_equals_one_process(tmp_path):
    ir = model(TP_TINY)
    want = single(ir, tmp_path / "one")
    parallel.run(ir, config(tmp_path / "two"), plan_from(world=2, tp=2), nproc=2)
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(tmp_path / "two" / metrics.METRICS), want)


def test_sequence_parallel_budget_trains_as_one_process(tmp_path, capfd):
    """`ltmdsl train --nproc 2 --budget` on a budget with sp = true runs its plan (tp = 2, the residual stream
    and norms sequence-sharded) and logs the single-process run's steps (1e-5)."""
    from ltmdsl.train import metrics

    path = tmp_path / "tp.ltm"
    path.write_text(TP_TINY + "budget sp2 for tp_train {\n    training context = 24, batch = 4\n"
                    "    on 2 x H100 with tp = 2, sp = true\n}\n")
    assert main(cli_args(str(path), tmp_path / "one")) == 0
    assert main(cli_args(str(path), tmp_path / "two", "--nproc", "2", "--budget", "sp2")) == 0
    capfd.readouterr()
    assert json.loads((tmp_path / "two" / state.RUN).read_text())["plan"] == "dp=1 tp=2 cp=1 pp=1 ep=1 zero=0 sp"
    assert_same_steps(metrics.read(tmp_path / "two" / metrics.METRICS), metrics.read(tmp_path / "one" / metrics.METRICS))


def _tp_answer_gradients(ir, tokens, mask, chunk):
    """One tp rank: the answer loss of `tokens` through `_micro_step` (vocab-parallel under tp) and the full
    gradients it leaves."""
    from ltmdsl.distributed import parallelize
    from ltmdsl.distributed.step import full_gradients

    ranked = parallelize(ir, plan_from(world=2, tp=2), seed=0)
    loss, correct, count = parallel._micro_step(ranked, tokens, mask, config("unused", loss_chunk=chunk))
    return loss, correct, full_gradients(ranked.model)


@pytest.mark.parametrize("head", ["untied", "tied"])
def test_vocab_parallel_answer_loss_equals_one_process(head):
    """tp = 2: the head's V/2 logits on each rank (never gathered) give the single-process answer loss
    (1e-5 relative; the same sums in another order, ~1e-7 measured) and gradients (1e-5), tied and untied."""
    from ltmdsl.runtime.build import build
    from ltmdsl.train.loss import answer_loss

    ir = model(TP_TINY.replace("head = untied", f"head = {head}"))
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, ir.vocab, (2, 12), generator=gen)  # [B, T]
    mask = torch.rand(2, 12, generator=gen) < 0.5  # [B, T]
    one = build(ir, seed=0)
    want = answer_loss(one, tokens, mask, chunk=3)
    want.loss.backward()
    from ltmdsl.distributed import launch

    for loss, correct, grads in launch(_tp_answer_gradients, 2, (ir, tokens, mask, 3)):
        assert abs(loss - want.loss.item()) <= 1e-5 * abs(want.loss.item())
        assert correct == want.correct
        for name, p in one.named_parameters():
            assert_close(grads[name], p.grad, 1e-5, f"gradient of {name}")


def test_exported_weights_equal_the_single_process_run(tmp_path):
    """The checkpoint's model.safetensors (exported from the DCP shards) is what one process trains.

    1e-3: AdamW's first steps move a weight by about lr * g / |g|, so where a gradient is near zero (the
    router's) the rounding of another reduction order shows in the weight (6.8e-5 measured)."""
    ir = model()
    single(ir, tmp_path / "one")
    parallel.run(ir, config(tmp_path / "two"), plan_from(world=2, zero=3), nproc=2)
    from ltmdsl.runtime import checkpoint

    one = checkpoint.load(state.model_file(tmp_path / "one"), ir)
    two = checkpoint.load(state.model_file(tmp_path / "two"), ir)
    for (name, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        assert_close(q, p, 1e-3, name)


def test_resume_under_another_plan_continues_the_run(tmp_path):
    """Stopped after 2 steps under zero 2, resumed under a 2-stage pipeline: steps 3-4 equal the
    uninterrupted single-process run; resumed under the same plan: bit for bit the uninterrupted one."""
    ir = model()
    want = single(ir, tmp_path / "one", steps=4)
    run = tmp_path / "run"
    parallel.run(ir, config(run, steps=4, stop_after=2), plan_from(world=2, zero=2), nproc=2)
    parallel.run(ir, config(run, steps=4, resume=True), plan_from(world=2, pp=2, microbatches=2), nproc=2)
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(run / metrics.METRICS), want)

    same = tmp_path / "same"
    whole = tmp_path / "whole"
    plan = plan_from(world=2, zero=2)
    parallel.run(ir, config(whole, steps=4), plan, nproc=2)
    parallel.run(ir, config(same, steps=4, stop_after=2), plan, nproc=2)
    parallel.run(ir, config(same, steps=4, resume=True), plan, nproc=2)
    assert metrics.read(same / metrics.METRICS) == [
        {**r, "seconds": s["seconds"]} for r, s in zip(metrics.read(whole / metrics.METRICS),
                                                     metrics.read(same / metrics.METRICS))]


def test_resume_of_a_tp_run_with_fused_and_replicated_rows_under_dp(tmp_path):
    """The trainer's own stack under tp = 2: Mamba-1's and Mamba-2's fused in_proj split by segments, the MQA
    layers' one KV head on both ranks. Stopped after 2 steps (its checkpoint in the stored layout), resumed
    under dp = 2 with ZeRO 2: steps 3-4 equal the uninterrupted single-process run, and the exported weights
    load as usual."""
    ir = model(TINY.replace("expand = 2, chunk = 8", "expand = 2, n_groups = 2, chunk = 8"))
    want = single(ir, tmp_path / "one", steps=4)
    run = tmp_path / "run"
    parallel.run(ir, config(run, steps=4, stop_after=2), plan_from(world=2, tp=2), nproc=2)
    parallel.run(ir, config(run, steps=4, resume=True), plan_from(world=2, zero=2), nproc=2)
    from ltmdsl.runtime import checkpoint
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(run / metrics.METRICS), want)
    checkpoint.load(state.model_file(run), ir)


def test_resume_of_a_zero1_run_under_zero3(tmp_path):
    """Stopped after 2 steps under dp = 2 with ZeRO 1 (the distributed optimizer's state gathered into the
    checkpoint's per-parameter layout), resumed under ZeRO 3: steps 3-4 equal the uninterrupted single-process
    run (step 4 follows the step that used the loaded moments)."""
    ir = model()
    want = single(ir, tmp_path / "one", steps=4)
    run = tmp_path / "run"
    parallel.run(ir, config(run, steps=4, stop_after=2), plan_from(world=2, zero=1), nproc=2)
    parallel.run(ir, config(run, steps=4, resume=True), plan_from(world=2, zero=3), nproc=2)
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(run / metrics.METRICS), want)


@pytest.mark.parametrize("saved, resumed", [
    pytest.param((2, {"cp": 2}), (2, {"zero": 1}), id="cp2-to-dp2-zero1"),
    pytest.param((2, {"zero": 3}), (2, {"cp": 2, "zero": 1}), id="dp2-zero3-to-cp2-zero1"),
    pytest.param((2, {"tp": 2}), (2, {"cp": 2}), id="tp2-one-mamba2-group-to-cp2"),
    pytest.param((2, {"cp": 2}), (4, {"tp": 2, "zero": 3}), id="cp2-to-dp2-tp2-zero3-one-mamba2-group"),
])
def test_resume_with_context_parallelism_continues_the_run(tmp_path, saved, resumed):
    """Stopped after 2 steps under cp = 2 (the load-balanced split: each rank two chunks of every sequence) and
    resumed under dp = 2, or the other way round, or stopped under tp = 2 (the trainer's Mamba-2 has one group:
    each rank holds it) and resumed under cp = 2, or from cp = 2 to dp 2 x tp 2 x ZeRO 3: steps 3-4 (loss,
    gradient norm, answer accuracy, lr) equal the uninterrupted single-process run, so the data position, the
    schedule and the optimizer state carry over, and the clipped gradient norm counts the B and C rows the tp
    ranks share once (it counted them on every rank: steps 3-4 off by 3e-5 and 3e-4)."""
    from ltmdsl.train import metrics

    ir = model()
    want = single(ir, tmp_path / "one", steps=4)
    run = tmp_path / "run"
    (world, degrees), (world2, degrees2) = saved, resumed
    parallel.run(ir, config(run, steps=4, stop_after=2), plan_from(world=world, **degrees), nproc=world)
    parallel.run(ir, config(run, steps=4, resume=True), plan_from(world=world2, **degrees2), nproc=world2)
    assert_same_steps(metrics.read(run / metrics.METRICS), want)


def test_resume_of_a_pipeline_zero2_run_under_zero3(tmp_path):
    """Stopped after 2 steps under pp = 2 with ZeRO 2 (each stage's FSDP2 shards in the checkpoint), resumed
    under dp = 2 with ZeRO 3: steps 3-4 equal the uninterrupted single-process run."""
    ir = model()
    want = single(ir, tmp_path / "one", steps=4)
    run = tmp_path / "run"
    parallel.run(ir, config(run, steps=4, stop_after=2), plan_from(world=2, pp=2, microbatches=2, zero=2), nproc=2)
    parallel.run(ir, config(run, steps=4, resume=True), plan_from(world=2, zero=3), nproc=2)
    from ltmdsl.train import metrics

    assert_same_steps(metrics.read(run / metrics.METRICS), want)


def test_a_rank_dying_mid_step_leaves_the_last_checkpoint(tmp_path, monkeypatch):
    """Rank 1 dies in step 3: the run ends with an error naming the rank (no hang), step 2's
    checkpoint is intact and latest.json still names it."""
    from ltmdsl.distributed.launch import WorkerError

    ir = model()
    real = parallel._micro_step
    calls = {"n": 0}

    def dying(ranked, tokens, mask, cfg):
        import torch.distributed as dist

        calls["n"] += 1
        if dist.get_rank() == 1 and calls["n"] == 3:
            os._exit(7)
        return real(ranked, tokens, mask, cfg)

    monkeypatch.setattr(parallel, "_micro_step", dying)  # forked workers inherit it
    out = tmp_path / "run"
    with pytest.raises(WorkerError, match="rank"):
        parallel.run(ir, config(out, steps=4, save_every=1), plan_from(world=2), nproc=2, timeout_s=60)
    step, where = state.latest(out)
    assert step == 2 and (where / "dcp").is_dir() and (where / state.MODEL).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


# -- the command line --------------------------------------------------------------------------------


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.ltm"
    path.write_text(TINY + """
budget two_ranks for tiny_train {
    training context = 24, batch = 4
    on 2 x H100 with pp = 2, microbatches = 2
}
""")
    return str(path)


def cli_args(spec, out, *extra):
    return ["train", spec, "--task", "mqar", "--context", "24", "--num-kv-pairs", "2", "--vocab-size", "32",
            "--steps", "2", "--batch", "4", "--warmup", "1", "--out", str(out), *extra]


def test_cli_nproc_takes_the_budget_plan_and_prints_json(spec, tmp_path, capfd):
    """Rank 0 prints the JSON lines (a forked worker writes to the inherited stdout: capfd, not capsys)."""
    assert main(cli_args(spec, tmp_path / "run", "--nproc", "2", "--json")) == 0
    captured = capfd.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    run = json.loads((tmp_path / "run" / state.RUN).read_text())
    assert "pp=2" in run["plan"]
    assert main(["eval", str(tmp_path / "run"), "--samples", "2", "--json"]) == 0


@pytest.mark.parametrize("extra, message", [
    pytest.param(("--nproc", "2", "--tp", "3"), "must equal the world size 2", id="product-not-world"),
    pytest.param(("--nproc", "2", "--cp", "2", "--context", "25"), "does not divide the sequence", id="cp-context"),
    pytest.param(("--nproc", "2", "--cp", "2", "--context", "26"), "2*cp = 4 chunks", id="cp-balanced-context"),
    pytest.param(("--nproc", "2", "--budget", "nope"), "no budget 'nope'", id="unknown-budget"),
    pytest.param(("--nproc", "4", "--tp", "4"), "tp = 4 does not divide the 2 heads of layer 'w'",
                 id="tp-unsplittable-kind"),
])
def test_cli_refuses_a_bad_plan_before_launch(spec, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert main(cli_args(spec, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_cp_split_reaches_the_plan(spec, tmp_path, capsys):
    """--cp-split contiguous: the plan in the refusal says so, and the balanced split's 2*cp rule is not applied
    (the run is refused for its tp only, before any worker starts)."""
    out = tmp_path / "run"
    assert main(cli_args(spec, out, "--nproc", "2", "--cp", "2", "--cp-split", "contiguous", "--tp", "3",
                         "--context", "26")) == 2
    err = capsys.readouterr().err
    assert "cp_split=contiguous" in err and "must equal the world size 2" in err and "2*cp" not in err


def test_cli_resume_of_another_spec_is_refused(spec, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli_args(spec, out, "--nproc", "2", "--dp", "2")) == 0
    other = tmp_path / "other.ltm"
    other.write_text(TINY.replace("d_model = 16", "d_model = 24"))
    capsys.readouterr()
    assert main(cli_args(str(other), out, "--nproc", "2", "--dp", "2", "--resume")) == 1
    err = capsys.readouterr().err
    assert "another spec" in err and "Traceback" not in err
    assert state.latest(out)[0] == 2


def test_fused_layers_train_under_tp_and_undividable_ones_are_refused():
    """tp splits short_conv's and Mamba-2's fused in_proj by segments, whose distributed checkpoints are
    written in the stored layout: training accepts the plan, also with fewer Mamba-2 groups than ranks (each
    rank holds its heads' group). One tp cannot divide is refused before launch in the memory model's words."""
    text = ("model m {\n vocab = 32\n d_model = 16\n layer c = short_conv(kernel = 3)\n"
            " layer s = mamba2(d_state = 8, head_dim = 8, expand = 2, n_groups = N, chunk = 8)\n"
            " layer f = mlp(d_ff = 32)\n stack { c f s f }\n}\n")
    for groups in ("2", "1"):
        parallel.check(ltmdsl.loads(text.replace("N", groups)).ir.model(), plan_from(world=2, tp=2), 2, batch=4,
                       context=24)
    with pytest.raises(PlanError, match="tp = 8 does not divide the 4 SSM heads of layer 's'"):
        parallel.check(ltmdsl.loads(text.replace("N", "1")).ir.model(), plan_from(world=8, tp=8), 8, batch=4,
                       context=24)


def test_cli_under_torchrun_runs_as_one_rank_of_its_group(spec, tmp_path):
    """The same command started by torchrun (standalone: it picks a free port) trains as 2 ranks."""
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "ltmdsl.cli", *cli_args(spec, out, "--dp", "2", "--json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in lines] == [1, 2]  # rank 0 alone prints
    assert state.latest(out)[0] == 2
