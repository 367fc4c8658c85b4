"""The main job, at its smallest: three runs, a cut in the CompreSSM run, the table and the plots."""

from __future__ import annotations

from pathlib import Path

from compressm_kernels.digits_demo import load_digits_sequences, run_demo


def test_digits_are_sequences_of_pixels() -> None:
    data = load_digits_sequences()
    assert data.x_train.shape[1:] == (64, 1) and len(data.x_train) + len(data.x_test) == 1797
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0


def test_demo_runs_cuts_and_plots(tmp_path: Path, capsys) -> None:
    runs = run_demo(d_state=8, d_model=16, steps=24, seeds=1, tau=0.05, out_dir=tmp_path)
    cut, small = runs["compressm"][0], runs["small"][0]
    assert cut.cut_step is not None and cut.cut_step <= 3, "the cut happens within the first 10 % of training"
    assert max(cut.final_states) < 8 and small.final_states == cut.final_states
    assert runs["full"][0].final_states == [8, 8]
    out = capsys.readouterr().out
    for name in ("full", "compressm", "small"):
        assert f"\n{name} " in out
    for png in ("hankel_spectra.png", "loss_curves.png", "accuracy_vs_state.png"):
        assert (tmp_path / png).stat().st_size > 1000
