"""mtakd.plots: losses.png from a Trainer log_history (every logged component per step)."""

import json
import logging

import pytest

from mtakd import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _history(steps=8, extra=()):
    """A log_history as the DistillTrainer writes it: training entries, a validation entry, the summary."""
    rows = [{"loss": 5.0 - 0.1 * s, "grad_norm": 1.0, "learning_rate": 1e-4, "loss_base": 4.7 - 0.1 * s,
             "loss_ce": 6.0 - 0.1 * s, "loss_kd": 3.4 - 0.1 * s, "loss_dsa": 0.1 / s, "loss_hid": 0.5 - 0.01 * s,
             **{k: 0.3 for k in extra}, "epoch": s / steps, "step": s} for s in range(steps, 0, -1)]  # unsorted
    return rows + [{"eval_loss": 4.0, "eval_loss_base": 3.9, "eval_loss_dsa": 0.05, "step": steps},
                   {"train_runtime": 10.0, "train_loss": 4.5, "step": steps}]


def _panels(monkeypatch):
    """Record (title, labels of the plotted lines) of every visible panel that plot_losses draws."""
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig

    def record(fig, *args, **kwargs):
        drawn.extend((ax.get_title(), [line.get_label() for line in ax.get_lines()]) for ax in fig.axes
                     if ax.get_visible())
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return drawn


def test_every_logged_component_gets_drawn(tmp_path, monkeypatch):
    drawn = _panels(monkeypatch)
    out = plots.plot_losses(_history(extra=("loss_layer_kd", "loss_delta_kd")), tmp_path / "a" / "losses.png",
                            lambdas={"lambda_dsa": 2.0, "lambda_hid": 0.2})
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    panels = dict(drawn)
    assert panels["terms of the optimised loss (log scale)"][:2] == ["total loss", "total loss (validation)"]
    assert {"L_base", "λ_DSA·L_DSA (λ=2)", "λ_Hid·L_Hid (λ=0.2)"} <= set(panels["terms of the optimised loss (log scale)"])
    assert set(panels["L_base = (1 − kd_ratio)·CE + kd_ratio·KD"]) == {"L_base", "L_base (validation)", "CE", "KD"}
    assert panels["L_DSA (unweighted)"] == ["L_DSA (unweighted)", "L_DSA (unweighted) (validation)"]
    assert panels["L_Hid (unweighted)"] == ["L_Hid (unweighted)"]
    assert panels["loss_delta_kd"] == ["loss_delta_kd"] and panels["loss_layer_kd"] == ["loss_layer_kd"]
    assert len(panels) == 6


def test_a_run_without_mta_and_the_run_directory_reader(tmp_path, monkeypatch):
    drawn = _panels(monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log_history.json").write_text(json.dumps(
        [{"loss": 3.0 - 0.1 * s, "loss_base": 3.0 - 0.1 * s, "loss_ce": 3.0 - 0.1 * s, "step": s} for s in (1, 2, 3)]))
    entries, lambdas = plots.load_history(run)
    assert [e["step"] for e in entries] == [1, 2, 3] and lambdas == {}
    assert plots.plot_run_losses(run, tmp_path / "sft.png").read_bytes()[:8] == PNG
    panels = dict(drawn)
    assert panels["L_DSA (unweighted)"] == [] and panels["L_Hid (unweighted)"] == []  # "no loss_dsa in this run"
    (run / "mtakd_run.json").write_text(json.dumps({"objective": {"mta": {"lambda_dsa": 3.0, "lambda_hid": 0.3}}}))
    assert plots.load_history(run)[1] == {"lambda_dsa": 3.0, "lambda_hid": 0.3}


def test_write_loss_plot_never_fails_the_run(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="mtakd"):
        assert plots.write_loss_plot([{"train_runtime": 1.0, "step": 0}], tmp_path) is None
        assert "no training loss was logged" in caplog.text

        def broken(*args, **kwargs):
            raise RuntimeError("no backend")

        monkeypatch.setattr(plots, "plot_losses", broken)
        assert plots.write_loss_plot(_history(), tmp_path) is None
    assert "could not draw" in caplog.text and "RuntimeError: no backend" in caplog.text
    assert not (tmp_path / "losses.png").exists()
    (tmp_path / "log_history.json").write_text("[]")
    with pytest.raises(ValueError, match="no training loss entries"):
        plots.load_history(tmp_path)
