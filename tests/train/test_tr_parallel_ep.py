"""`ltmdsl train --nproc 4 --budget NAME` on budgets whose plans combine expert parallelism with ZeRO and with
tensor parallelism (the experts split like tp, or folded over the tp ranks: whole at etp = 1, split over etp
ranks at etp = 2 under tp = 4): the plan the
budget states is the plan that runs (recorded in the run's record), and the
logged steps equal the single-process run's (1e-5 relative on loss, gradient norm, accuracy and lr, as
test_tr_parallel.py)."""

import json

import pytest
from test_tr_parallel import TP_TINY, assert_same_steps, cli_args
from train_specs import TINY

from ltmdsl.cli import main
from ltmdsl.train import metrics, state

TP_MOE = TP_TINY.replace("    stack { a f w f }", "    layer e = moe(experts = 4, top_k = 2, d_ff = 16)\n    stack { a e w f }")

BUDGETS = {
    "ep2-zero3": (TINY, "tiny_train", "ep = 2, zero = 3", "dp=4 tp=1 cp=1 pp=1 ep=2 zero=3"),
    "ep2-zero1": (TINY, "tiny_train", "ep = 2, zero = 1", "dp=4 tp=1 cp=1 pp=1 ep=2 zero=1"),
    "tp2-ep2-zero2": (TP_MOE, "tp_train", "tp = 2, ep = 2, zero = 2", "dp=2 tp=2 cp=1 pp=1 ep=2 zero=2"),
    "tp2-ep4-etp1-zero1": (TP_MOE, "tp_train", "tp = 2, ep = 4, etp = 1, zero = 1",
                           "dp=2 tp=2 cp=1 pp=1 ep=4 zero=1 etp=1"),
    "tp4-ep2-etp2-zero1": (TP_MOE, "tp_train", "tp = 4, ep = 2, etp = 2, zero = 1",
                           "dp=1 tp=4 cp=1 pp=1 ep=2 zero=1 etp=2"),
}


@pytest.mark.parametrize("text, name, plan, described", BUDGETS.values(), ids=BUDGETS.keys())
def test_ep_budget_trains_as_one_process(tmp_path, capfd, text, name, plan, described):
    path = tmp_path / "moe.ltm"
    path.write_text(text + f"budget moe4 for {name} {{\n    training context = 24, batch = 4\n"
                    f"    on 4 x H100 with {plan}\n}}\n")
    assert main(cli_args(str(path), tmp_path / "one")) == 0
    assert main(cli_args(str(path), tmp_path / "four", "--nproc", "4", "--budget", "moe4")) == 0
    capfd.readouterr()
    assert json.loads((tmp_path / "four" / state.RUN).read_text())["plan"] == described
    assert_same_steps(metrics.read(tmp_path / "four" / metrics.METRICS),
                      metrics.read(tmp_path / "one" / metrics.METRICS))
