"""The training loop: resume is bit-for-bit, accumulation matches a big batch, checkpoints are whole.

Everything runs a tiny model (train_specs.TINY, every stateful kind) for a handful of steps, except the two
end-to-end checks that recall models learn MQAR: a conv + attention model (train_specs.CONV_ATTENTION) in
150 steps, and ltm-100m's tiny twin (train_specs.LTM_TINY, examples/ltm-tiny.ltm at vocab 32) in 120.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ltmdsl.evals import VocabError
from ltmdsl.train import state
from ltmdsl.train.loop import TrainConfig, train
from train_specs import CONV_ATTENTION, LTM_TINY, MQAR, tiny_spec

IR = tiny_spec().model


def run(out, until=None, **kw):
    settings = dict(task="mqar", out=str(out), steps=4, batch=2, options=MQAR, warmup=2, lr=1e-2)
    settings.update(kw)
    return list(train(IR, TrainConfig(**settings), until=until))


def weights(out):
    step, where = state.latest(out)
    return step, load_file(str(where / state.MODEL))


def without_time(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def test_resume_is_bit_for_bit(tmp_path):
    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_after=2)
    rest = run(tmp_path / "b", resume=True)
    assert [r["step"] for r in first + rest] == [1, 2, 3, 4]
    assert without_time(first + rest) == without_time(straight)
    (sa, wa), (sb, wb) = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert sa == sb == 4 and wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name  # identical, not merely close
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def test_accumulation_equals_one_big_batch(tmp_path):
    # every MQAR sample has the same number of answers, so the mean of micro-batch means is the batch mean
    big = run(tmp_path / "big", steps=1, batch=4, clip=0.0)
    acc = run(tmp_path / "acc", steps=1, batch=2, accum=2, clip=0.0)
    assert acc[0]["loss"] == pytest.approx(big[0]["loss"], rel=1e-6)
    (_, wa), (_, wb) = weights(tmp_path / "big"), weights(tmp_path / "acc")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=0, atol=1e-6), name  # fp32 sums in another order


def test_loss_falls_on_the_answers(tmp_path):
    records = run(tmp_path / "r", steps=12, batch=8, lr=3e-2)
    assert records[-1]["loss"] < records[0]["loss"]


def learned_exact_match(tmp_path, text: str, steps: int) -> tuple[list, float]:
    """Train `text`'s model on MQAR (2 pairs of 15 keys, context 24) for `steps` steps of 32 samples at
    lr 3e-3, reload its last checkpoint into a model of other weights, and score 100 held-out samples
    decoded greedily through the cache -> (the step records, exact match)."""
    from ltmdsl.evals import get_task
    from ltmdsl.runtime.build import build
    from ltmdsl.train.data import EVAL_SEED
    from ltmdsl.train.scoring import score

    ir = tiny_spec(text).model
    records = list(train(ir, TrainConfig(task="mqar", out=str(tmp_path / "r"), steps=steps, batch=32, lr=3e-3,
                                         warmup=5, options=MQAR)))
    model = build(ir, dtype=torch.float32, seed=1)  # other weights, replaced by the checkpoint's
    state.load_weights(model, state.latest(tmp_path / "r")[1])
    task = get_task("mqar")
    return records, score(model, task, task.make_options(**MQAR), EVAL_SEED, samples=100).accuracy


def test_a_recall_model_learns_mqar_and_answers_through_the_cache(tmp_path):
    """End to end, the loop teaches recall: data, answer positions, loss, gradients and cache decoding must
    all be right for a conv + attention model to answer held-out MQAR queries (chance 1/16). Measured:
    0.95-0.98 answer-token accuracy by step 120-150; required > 0.8 exact match through the cache."""
    records, accuracy = learned_exact_match(tmp_path, CONV_ATTENTION, steps=150)
    assert records[-1]["loss"] < 0.5 < records[0]["loss"]
    assert accuracy > 0.8, f"exact match {accuracy:.2f} after 150 steps"


def test_the_tiny_twin_of_ltm_100m_learns_mqar_through_the_cache(tmp_path):
    """examples/ltm-tiny.ltm's own layer pattern (Mamba-2, short conv, global attention, MLP, then the
    sliding-window block) learns recall fast: measured 0.93 held-out exact match at step 100 and 0.98 at
    125 of a 200-step schedule (chance 1/16); required > 0.8 through the cache after 120 steps, every
    answer decoded through the global NoPE layer's KV cache and the Mamba-2 and conv states."""
    records, accuracy = learned_exact_match(tmp_path, LTM_TINY, steps=120)
    assert sum(r["loss"] for r in records[-10:]) / 10 < 1.0 < records[0]["loss"]  # chance: ln 16 = 2.8
    assert accuracy > 0.8, f"exact match {accuracy:.2f} after 120 steps"


def test_until_stops_at_the_first_true_step_with_a_checkpoint(tmp_path):
    """`until(model, record)` is asked after every step; the first True ends the run there, checkpointed,
    and the steps before it are exactly those of a run without the hook."""
    asked = []

    def until(model, record):
        assert isinstance(model, torch.nn.Module)
        asked.append(record["step"])
        return record["step"] == 3

    stopped = run(tmp_path / "a", steps=6, until=until)
    assert asked == [1, 2, 3] and [r["step"] for r in stopped] == [1, 2, 3]
    assert weights(tmp_path / "a")[0] == 3
    full = run(tmp_path / "b", steps=6)
    assert without_time(stopped) == without_time(full[:3])


def test_teacher_forced_exact_match_counts_answers_guessed_after_the_true_tokens():
    """The batched held-out score is the fraction of answer spans whose every token is the greedy guess
    after the true tokens, recomputed here one sample at a time (across batches of 5, 5 and 2)."""
    from ltmdsl.evals import get_task
    from ltmdsl.runtime.build import build
    from ltmdsl.train.heldout import teacher_forced_exact_match

    ir = tiny_spec(CONV_ATTENTION).model
    model = build(ir, dtype=torch.float32, seed=0)
    task = get_task("mqar")
    options = task.make_options(**MQAR)
    got = teacher_forced_exact_match(model, task, options, seed=5, samples=12, batch=5)  # 3 batches
    right = total = 0
    with torch.no_grad():
        for i in range(12):
            sample = task.generate(options, 5, i)
            logits = model(torch.from_numpy(sample.tokens.copy())[None])[0]  # [T, V]
            for start, end in sample.answer_spans:
                right += int(all(int(logits[t - 1].argmax()) == int(sample.tokens[t]) for t in range(start, end)))
                total += 1
    assert got == right / total
    assert model.training  # restored


def test_resume_refuses_other_settings_and_specs(tmp_path):
    run(tmp_path / "r", steps=4, stop_after=2)
    with pytest.raises(state.CheckpointError, match="different settings .*lr"):
        run(tmp_path / "r", steps=4, lr=5e-3, resume=True)
    other = tiny_spec(tiny_spec().text.replace("d_ff = 32", "d_ff = 24")).model
    with pytest.raises(state.CheckpointError, match="another spec"):
        list(train(other, TrainConfig(task="mqar", out=str(tmp_path / "r"), steps=4, batch=2, options=MQAR,
                                      warmup=2, lr=1e-2, resume=True)))
    with pytest.raises(state.CheckpointError, match="already holds a training run"):
        run(tmp_path / "r")


def test_resume_and_init_take_a_spec_edited_only_in_comments_and_layout(tmp_path):
    """The checkpoint is the model's, not its text's: a comment and a reflowed line change the source hash
    but not `ModelIR.structure_hash`, so --resume continues bit for bit and --init loads; a width does not."""
    edited = tiny_spec("# edited after training\n" + tiny_spec().text.replace("d_ff = 32", "d_ff  =  32")).model
    assert edited.source_hash != IR.source_hash and edited.structure_hash == IR.structure_hash
    straight = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_after=2)
    rest = list(train(edited, TrainConfig(task="mqar", out=str(tmp_path / "b"), steps=4, batch=2, options=MQAR,
                                          warmup=2, lr=1e-2, resume=True)))
    assert without_time(first + rest) == without_time(straight)
    list(train(edited, TrainConfig(task="mqar", out=str(tmp_path / "c"), steps=1, batch=2, options=MQAR,
                                   init=str(tmp_path / "a"))))
    wider = tiny_spec(tiny_spec().text.replace("d_ff = 32", "d_ff = 24")).model
    assert wider.structure_hash != IR.structure_hash


def test_resume_refuses_a_corrupt_checkpoint(tmp_path):
    run(tmp_path / "r", stop_after=2)
    _, where = state.latest(tmp_path / "r")
    (where / state.TRAINER).write_bytes(b"not a torch file")
    with pytest.raises(state.CheckpointError, match="corrupt trainer state"):
        run(tmp_path / "r", resume=True)
    (where / state.MODEL).write_bytes(b"\x00" * 16)
    with pytest.raises(state.CheckpointError, match="corrupt checkpoint"):
        run(tmp_path / "r", resume=True)


def test_a_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    run(tmp_path / "r", stop_after=2)
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.torch, "save", broken)
    with pytest.raises(OSError):
        run(tmp_path / "r", resume=True)
    after = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    assert [n for n in after if n != "metrics.jsonl"] == [n for n in before if n != "metrics.jsonl"]
    assert state.latest(tmp_path / "r")[0] == 2


def test_vocab_too_small_names_both_numbers(tmp_path):
    with pytest.raises(VocabError, match="vocab is 32 but the hashhop task's character tokenizer needs 99"):
        run(tmp_path / "r", task="hashhop", options={"context": 128, "hash_length": 2, "hops": 1})


def test_train_equals_a_plain_torch_loop_on_the_same_batches(tmp_path):
    """The oracle of the whole loop: the same initial weights trained by hand on the same samples with
    F.cross_entropy over full logits at the answer positions, torch's AdamW with decay on matrices only,
    a hand-written warmup + cosine and clipping at 1 give the weights `train` writes (fp32: 1e-5)."""
    import math

    from torch.nn import functional as F

    from ltmdsl.evals import get_task, make_batch
    from ltmdsl.runtime.build import build

    steps, batch, lr, warmup = 3, 4, 1e-2, 2
    run(tmp_path / "r", steps=steps, batch=batch, lr=lr, warmup=warmup)
    _, trained = weights(tmp_path / "r")
    model = build(IR, dtype=torch.float32, seed=0)  # `train` builds with the run's seed, 0
    params = dict(model.named_parameters())
    matrices = [p for name, p in params.items() if p.ndim >= 2 and not name.endswith("_log")]
    rest = [p for name, p in params.items() if not (p.ndim >= 2 and not name.endswith("_log"))]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)

    def factor(step):  # linear warmup to the peak, then cosine to 0.1 of it
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    task = get_task("mqar")
    options = task.make_options(**MQAR)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * factor(step)
        b = make_batch(task, options, 0, range(step * batch, (step + 1) * batch))
        tokens = torch.from_numpy(b.tokens)  # [B, T]
        answer = torch.from_numpy(b.answer_mask.copy())[:, 1:]  # [B, T-1]: token t is predicted at t - 1
        logits = model(tokens)[:, :-1]  # [B, T-1, V]
        loss = F.cross_entropy(logits[answer], tokens[:, 1:][answer])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    for name, p in model.state_dict().items():
        assert torch.allclose(trained[name], p, rtol=0, atol=1e-5), name


def test_init_starts_a_new_run_from_a_checkpoints_weights(tmp_path):
    run(tmp_path / "first", steps=3)
    _, trained = weights(tmp_path / "first")
    # zero steps of learning rate would be ideal; one step at a tiny rate moves no weight by more than 1e-6
    records = run(tmp_path / "next", steps=1, warmup=0, lr=1e-9, weight_decay=0.0, init=str(tmp_path / "first"))
    fresh = run(tmp_path / "fresh", steps=1, warmup=0, lr=1e-9, weight_decay=0.0)
    _, started = weights(tmp_path / "next")
    for name in trained:
        assert torch.allclose(started[name], trained[name], rtol=0, atol=1e-6), name  # Adam moves each <= lr
    assert records[0]["loss"] != fresh[0]["loss"]  # it did not start from the seed's fresh weights
    assert json.loads((tmp_path / "next" / state.RUN).read_text())["init"] == str(tmp_path / "first")
    for where in (tmp_path / "first" / "checkpoints" / "step-00000003",
                  tmp_path / "first" / "checkpoints" / "step-00000003" / state.MODEL):
        run(tmp_path / where.name, steps=1, init=str(where))  # a checkpoint folder or its weights file


def test_init_refuses_another_specs_weights_and_resume(tmp_path):
    run(tmp_path / "first", steps=2)
    other = tiny_spec(tiny_spec().text.replace("d_ff = 32", "d_ff = 24")).model
    with pytest.raises(state.CheckpointError, match="trained from another spec .*--init needs weights of this spec"):
        list(train(other, TrainConfig(task="mqar", out=str(tmp_path / "o"), steps=2, batch=2, options=MQAR,
                                      init=str(tmp_path / "first"))))
    assert not (tmp_path / "o" / state.RUN).exists()  # nothing written for a run that cannot start
    with pytest.raises(ValueError, match="give one of them"):
        run(tmp_path / "first", resume=True, init=str(tmp_path / "first"))
    with pytest.raises(state.CheckpointError, match="no such file or folder"):
        run(tmp_path / "n", init=str(tmp_path / "missing"))
