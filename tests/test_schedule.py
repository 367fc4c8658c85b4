"""CompreSSM schedule: cuts mid-training and keeps learning; stability gating; rollback; DDP on 2 CPU ranks."""

from __future__ import annotations

import gc
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from compress_models import TinyLM, lm_loss, token_batches
from compressm_kernels.calibration import find_mixers
from compressm_kernels.schedule import CompreSSM


def _loop(model, opt, sched, steps: int, seed: int = 1) -> list[float]:
    losses = []
    for ids in token_batches(steps, seed=seed):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def test_cut_mid_training_and_loss_keeps_falling() -> None:
    model = TinyLM(d_state=12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = CompreSSM(model, opt, total_steps=40, tau=0.05)  # attempts at steps 1, 2, 3, 4
    losses = _loop(model, opt, sched, 40)
    cuts = [e for e in sched.log if e["action"] == "cut"]
    assert cuts, sched.log
    assert all(e["step"] <= 4 for e in sched.log)
    sizes = [m.d_state for m in find_mixers(model).values()]
    assert max(sizes) < 12, sizes
    assert sched._capture is None  # hooks removed after the last attempt
    last_cut = cuts[-1]["step"]
    after = losses[last_cut:]
    assert sum(after[-5:]) / 5 < 0.7 * sum(after[:5]) / 5, losses
    assert {"overlap", "spearman", "sizes"} <= set(cuts[-1])


def test_compiled_model_cuts_with_calib_batches_and_says_why_without() -> None:
    # A torch.compile'd graph does not call the capture hooks armed after it compiled: without calib= the attempt
    # says so; with calib= the calibration runs eagerly and the cut happens.
    for calib in (None, token_batches(2, seed=9)):
        torch._dynamo.reset()
        model = TinyLM(d_state=8)
        model.compile(backend="eager")  # in place: even calling the module itself runs the compiled graph
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        sched = CompreSSM(model, opt, total_steps=10, rank=3, at=[0.6], calib_steps=2, calib=calib)
        _loop(model, opt, sched, 10)
        actions = [e["action"] for e in sched.log]
        if calib is None:
            assert actions == ["skip"] and "torch.compile'd model" in sched.log[0]["reason"], sched.log
            assert {m.d_state for m in find_mixers(model).values()} == {8}
        else:
            assert actions == ["cut"], sched.log
            assert {m.d_state for m in find_mixers(model).values()} == {3}


def test_calibration_of_a_compiled_model_runs_eagerly() -> None:
    # The graph compiled by an eval forward (same mode, same grad mode as calibration) has no hooks in it.
    from compressm_kernels import plan_compression

    torch._dynamo.reset()
    model = TinyLM(d_state=8)
    model.compile(backend="eager")
    model.eval()
    with torch.no_grad():
        model(token_batches(1)[0])
    plan = plan_compression(model, token_batches(2, seed=9), rank=3)
    assert [lp.n_after for lp in plan.layers] == [3, 3]


def test_a_refused_cut_is_logged_and_training_goes_on() -> None:
    # Adafactor's factored state cannot be sliced: the surgery refuses, changing nothing; the schedule logs the
    # attempt as skipped and calls on_change(None) to undo whatever before_change did.
    if not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor arrived in torch 2.5")
    model = TinyLM(d_state=8)
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    events = []
    sched = CompreSSM(model, opt, total_steps=10, rank=3, at=[0.5], calib_steps=2,
                      before_change=lambda: events.append("before"), on_change=events.append)
    _loop(model, opt, sched, 10)
    assert [e["action"] for e in sched.log] == ["skip"] and "don't know how to slice it" in sched.log[0]["reason"]
    assert events == ["before", None]
    assert {m.d_state for m in find_mixers(model).values()} == {8}


def test_waits_for_a_stable_ranking_or_says_so() -> None:
    model = TinyLM(d_state=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # An impossible requirement: the schedule keeps trying until 30 % of training, then gives up, unchanged.
    sched = CompreSSM(model, opt, total_steps=20, tau=0.05, min_overlap=1.01, max_fraction=0.3)
    _loop(model, opt, sched, 8)
    actions = [e["action"] for e in sched.log]
    assert "cut" not in actions and actions[-1] == "give-up", sched.log
    assert all(e["step"] <= 6 for e in sched.log)
    assert [m.d_state for m in find_mixers(model).values()] == [8, 8]
    # Attainable: cut once two attempts agree.
    model = TinyLM(d_state=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = CompreSSM(model, opt, total_steps=40, rank=3, min_overlap=0.3, min_spearman=-1.0)
    _loop(model, opt, sched, 5)
    actions = [e["action"] for e in sched.log]
    assert actions[0] == "wait" and "cut" in actions, sched.log  # the first attempt has nothing to compare with


def test_rollback_when_validation_drops() -> None:
    model = TinyLM(d_state=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    held_out = token_batches(1, seed=11)[0]

    def validate() -> float:
        with torch.no_grad():
            return -lm_loss(model, held_out).item()

    sched = CompreSSM(model, opt, total_steps=40, rank=1, at=[0.05], validate=validate, margin=-1.0)  # any cut "drops"
    losses = _loop(model, opt, sched, 5)
    assert [e["action"] for e in sched.log] == ["rollback"], sched.log
    assert [m.d_state for m in find_mixers(model).values()] == [8, 8]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_user_calibration_and_bad_arguments() -> None:
    model = TinyLM(d_state=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = CompreSSM(model, opt, total_steps=10, rank=2, at=[0.2], calib=token_batches(2, seed=4))
    _loop(model, opt, sched, 3)
    assert [e["action"] for e in sched.log] == ["cut"]
    assert [m.d_state for m in find_mixers(model).values()] == [2, 2]
    with pytest.raises(ValueError, match="tau"):
        CompreSSM(model, opt, 10, tau=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        CompreSSM(model, opt, 0)
    with pytest.raises(ValueError, match="fractions"):
        CompreSSM(model, opt, 10, at=[0.0])
    sched = CompreSSM(model, opt, total_steps=10, rank=1, at=[0.2], calib=[])
    _loop(model, opt, sched, 3)
    assert sched.log[0]["action"] == "skip" and "non-empty" in sched.log[0]["reason"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, result_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    warnings.simplefilter("error")  # a parameter that could not be re-seated must fail the test, not warn
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        base = TinyLM(d_state=8)  # same seed: same initial weights on both ranks
        holder = {"model": DDP(base)}
        opt = torch.optim.AdamW(base.parameters(), lr=1e-2)

        def unwrap() -> None:  # DDP holds references to the parameters: drop it before the cut
            holder["model"] = None
            gc.collect()

        def rewrap(report) -> None:
            holder["model"] = DDP(base)

        sched = CompreSSM(base, opt, total_steps=12, tau=0.2, at=[0.25], calib_steps=2,
                          before_change=unwrap, on_change=rewrap)
        losses = []
        for ids in token_batches(12, seed=100 + rank):  # each rank sees different data
            loss = lm_loss(holder["model"], ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        torch.save({"params": {k: v.detach() for k, v in base.named_parameters()}, "log": sched.log,
                    "losses": losses}, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_cut_identically_and_keep_training(tmp_path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert [e["action"] for e in r0["log"]] == ["cut"], r0["log"]
    assert r0["log"][0]["sizes"] == r1["log"][0]["sizes"]
    assert any(a != b for a, b in r0["log"][0]["sizes"].values())
    for name, p in r0["params"].items():  # identical shapes and values after cut + 9 more synchronised steps
        assert p.shape == r1["params"][name].shape, name
        torch.testing.assert_close(p, r1["params"][name], rtol=0, atol=0)
    assert all(torch.isfinite(torch.tensor(r0["losses"] + r1["losses"])))
