"""`ltmdsl train` and `ltmdsl eval` from the command line: outputs, exit codes and messages."""

import json

import pytest

from ltmdsl.cli import main
from ltmdsl.train import metrics


@pytest.fixture
def spec(tmp_path):
    from train_specs import TINY

    path = tmp_path / "tiny.ltm"
    path.write_text(TINY)
    return str(path)


def train_args(spec, out, *extra):
    return ["train", spec, "--task", "mqar", "--context", "24", "--num-kv-pairs", "2", "--vocab-size", "32",
            "--steps", "3", "--batch", "2", "--warmup", "1", "--out", str(out), *extra]


def test_train_writes_metrics_checkpoint_and_plot(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "run", "--json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert set(lines[0]) >= {"loss", "answer_token_acc", "lr", "grad_norm"}
    logged = metrics.read(tmp_path / "run" / "metrics.jsonl")
    assert [r["loss"] for r in logged] == [r["loss"] for r in lines]
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "training.png").read_bytes()[:4] == b"\x89PNG"


def test_train_then_eval_and_compare(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "a")) == 0
    assert main(train_args(spec, tmp_path / "b", "--seed", "1")) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "a"), "--samples", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "mqar" and len(result["results"]) == 1
    row = result["results"][0]
    assert row["context"] == 24 and row["samples"] == 3 and 0 <= row["accuracy"] <= 1
    checkpoint = tmp_path / "b" / "checkpoints" / "step-00000003" / "model.safetensors"
    assert main(["eval", str(tmp_path / "a"), "--compare", str(checkpoint), "--samples", "2",
                 "--context", "24", "48", "--plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert str(checkpoint) in out.splitlines()[0] and len(out.splitlines()) == 4  # header, 2 contexts, plot
    assert (tmp_path / "cmp.png").is_file()


def test_a_mixed_hops_run_is_scored_one_depth_at_a_time(tmp_path, capsys, monkeypatch):
    from train_specs import TINY

    import ltmdsl.train.scoring as scoring

    path = tmp_path / "chars.ltm"
    path.write_text(TINY.replace("vocab = 32", "vocab = 128"))  # the character tokenizer needs 99
    assert main(["train", str(path), "--task", "hashhop", "--context", "96", "--hops", "2", "--hash-length", "2",
                 "--cot", "true", "--mixed-hops", "true", "--steps", "1", "--batch", "2",
                 "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "run.json").read_text())["options"]["mixed_hops"] is True
    scored = []
    real = scoring.score

    def recording(model, task, options, *rest, **kwargs):
        scored.append(options)
        return real(model, task, options, *rest, **kwargs)

    monkeypatch.setattr(scoring, "score", recording)  # what `eval` scores
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--hops", "1", "2", "--samples", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["hops"] for r in rows] == [1, 2]
    assert [(o.hops, o.mixed_hops, o.cot) for o in scored] == [(1, False, True), (2, False, True)]


def test_eval_warns_when_windows_cannot_recall(tmp_path, capsys):
    local = tmp_path / "local.ltm"
    from train_specs import TINY

    local.write_text(TINY.replace("stack { m1 f m2 e w f a f }", "stack { m2 f w f }"))
    assert main(train_args(str(local), tmp_path / "r", "--steps", "1")) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--samples", "1", "--context", "64"]) == 0
    err = capsys.readouterr().err
    assert "needs recall across the whole context" in err and "sliding window (at most 8 tokens)" in err


@pytest.mark.parametrize("extra,message", [
    (["--task", "mqr"], "unknown task 'mqr'; did you mean 'mqar'?"),
    (["--hops", "2"], "mqar: unknown option 'hops'"),
    (["--vocab-size", "64"], "vocab is 32 but the mqar task (its vocab_size option) needs 64"),
    (["--lr", "-1"], "--lr must be positive"),
], ids=["unknown-task", "option-of-another-task", "vocab-too-small", "bad-lr"])
def test_train_usage_errors_exit_two(spec, tmp_path, capsys, extra, message):
    assert main(train_args(spec, tmp_path / "r", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_of_a_corrupt_run_exits_one(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "r", "--stop-after", "1")) == 0
    (tmp_path / "r" / "latest.json").write_text("{not json")
    assert main(train_args(spec, tmp_path / "r", "--resume")) == 1
    assert "latest.json: unreadable" in capsys.readouterr().err


def test_eval_of_a_missing_run_exits_one(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope"), "--task", "mqar"]) == 1
    assert "no such file or folder" in capsys.readouterr().err


def test_train_on_a_text_file(tmp_path, capsys):
    from train_specs import TINY

    spec = tmp_path / "bytes.ltm"
    spec.write_text(TINY.replace("vocab = 32", "vocab = 259"))
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", str(spec), "--task", "text", "--data", str(data), "--context", "32", "--steps", "2",
                 "--batch", "2", "--out", str(tmp_path / "r"), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == 2
    spec.write_text(TINY.replace("vocab = 32", "vocab = 200"))
    assert main(["train", str(spec), "--task", "text", "--data", str(data), "--context", "32", "--steps", "2",
                 "--out", str(tmp_path / "r2")]) == 2
    assert "byte tokenizer needs 259" in capsys.readouterr().err


def test_bf16_autocast_trains(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "r", "--dtype", "bf16", "--json")) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(0 < r["loss"] < 10 for r in lines)


def test_without_matplotlib_the_run_says_so(spec, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(metrics, "have_matplotlib", lambda: False)
    assert main(train_args(spec, tmp_path / "r")) == 0
    assert "matplotlib is not installed, so no plot was drawn" in capsys.readouterr().err
    assert not (tmp_path / "r" / "training.png").exists()


def test_init_of_another_specs_run_exits_one(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "a")) == 0
    other = tmp_path / "other.ltm"
    other.write_text(open(spec).read().replace("d_ff = 32", "d_ff = 24"))
    assert main(train_args(str(other), tmp_path / "b", "--init", str(tmp_path / "a"))) == 1
    assert "--init needs weights of this spec" in capsys.readouterr().err
    assert main(train_args(spec, tmp_path / "c", "--init", str(tmp_path / "a"))) == 0


def test_init_of_a_run_of_the_same_seed_warns_that_it_repeats_its_samples(spec, tmp_path, capsys):
    assert main(train_args(spec, tmp_path / "a")) == 0
    capsys.readouterr()
    assert main(train_args(spec, tmp_path / "b", "--init", str(tmp_path / "a"))) == 0
    err = capsys.readouterr().err
    assert "draws the same samples again" in err and "another --seed" in err
    assert main(train_args(spec, tmp_path / "c", "--init", str(tmp_path / "a"), "--seed", "1")) == 0
    assert "same samples" not in capsys.readouterr().err


def test_eval_counts_every_sample_of_every_setting_on_a_terminal(spec, tmp_path, capsys, monkeypatch):
    """On a terminal `ltmdsl eval` shows a bar over (runs x settings x samples); with --json, or off a
    terminal, none (as `ltmdsl train`)."""
    import sys

    assert main(train_args(spec, tmp_path / "a")) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(["eval", str(tmp_path / "a"), "--samples", "3", "--context", "24", "48"]) == 0
    err = capsys.readouterr().err
    assert "mqar: 100%" in err and "6/6" in err, err
    assert main(["eval", str(tmp_path / "a"), "--samples", "3", "--json"]) == 0
    assert "mqar:" not in capsys.readouterr().err
