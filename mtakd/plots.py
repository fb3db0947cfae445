"""Loss curves of a distillation run: ``losses.png`` in the run directory.

`mtakd distill` calls :func:`write_loss_plot` at the end of training with ``trainer.state.log_history``;
:func:`plot_run_losses` draws the same figure from a finished run directory (``log_history.json``, and
``mtakd_run.json`` for λ_DSA and λ_Hid); ``benchmarks/plot_losses.py`` is its command line.

The log has one entry per ``logging_steps`` with ``loss`` and the components the objective logs, each the
mean over the steps since the previous entry: ``loss_base`` (L_base) and its parts (``loss_ce``,
``loss_kd``), the MTA terms ``loss_dsa`` and ``loss_hid`` (logged unweighted; the optimised loss is
``L_base + λ_DSA·L_DSA + λ_Hid·L_Hid``, MTA_SPEC.md §1) and any other component (e.g. FDD's
``loss_layer_kd``/``loss_delta_kd``, DistiLLM's ``loss_sgo``). Validation entries (``eval_loss``,
``eval_loss_*``) are drawn as crosses on the panel of their training counterpart.

Panels (Agg backend, no display needed):

1. what each term adds to the optimised loss, on a log axis: total, L_base, λ_DSA·L_DSA, λ_Hid·L_Hid,
   with MTA's share of the total at the first and last logged step in the legend title;
2. L_base, with its cross-entropy and KD parts when logged;
3. L_DSA (unweighted); 4. L_Hid (unweighted) — or a note when the run has no such term;
5. … one panel for every other logged ``loss_*`` component.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

LOSS_PLOT = "losses.png"
_BASE_PARTS = ("loss_ce", "loss_kd")
_MTA_TERMS = (("loss_dsa", "lambda_dsa", "C1", "λ_DSA·L_DSA", "L_DSA (unweighted)"),
              ("loss_hid", "lambda_hid", "C2", "λ_Hid·L_Hid", "L_Hid (unweighted)"))


def training_entries(history: list[dict]) -> list[dict]:
    """The training log entries (those with ``loss`` and ``step``), sorted by step."""
    return sorted((e for e in history if "loss" in e and "step" in e), key=lambda e: e["step"])


def mta_lambdas(run_info: dict) -> dict:
    """``{"lambda_dsa", "lambda_hid"}`` from a run config dict (``mtakd_run.json``), or ``{}`` without MTA."""
    mta = ((run_info or {}).get("objective") or {}).get("mta") or {}
    if not mta or not mta.get("enabled", True):
        return {}
    return {"lambda_dsa": float(mta.get("lambda_dsa", 2.0)), "lambda_hid": float(mta.get("lambda_hid", 0.2))}


def load_history(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(training log entries sorted by step, λ values or {} without MTA) of a finished run directory."""
    run_dir = Path(run_dir)
    path = run_dir / "log_history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} the training.output_dir of a finished run?)")
    entries = training_entries(json.loads(path.read_text()))
    if not entries:
        raise ValueError(f"{path} holds no training loss entries")
    run_file = run_dir / "mtakd_run.json"
    return entries, mta_lambdas(json.loads(run_file.read_text())) if run_file.is_file() else {}


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(e["step"], float(e[key])) for e in entries if e.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(history: list[dict], out: str | Path, *, lambdas: dict | None = None, title: str | None = None) -> Path:
    """Draw every logged loss component of ``history`` (a Trainer ``log_history``) per step into ``out``.

    ``lambdas`` (``{"lambda_dsa", "lambda_hid"}``, see :func:`mta_lambdas`) weights the MTA terms in the
    first panel; without it they are drawn with weight 1. Raises ValueError without training entries."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    entries = training_entries(history)
    if not entries:
        raise ValueError("the log holds no training loss entries")
    evals = sorted((e for e in history if "eval_loss" in e and "step" in e), key=lambda e: e["step"])
    lambdas = lambdas or {}
    keys = {k for e in entries for k in e if k.startswith("loss_")}
    extras = sorted(keys - {"loss_base", *_BASE_PARTS, *(t[0] for t in _MTA_TERMS)})
    marker = "o" if len(entries) <= 40 else None

    rows = 2 + (len(extras) + 1) // 2
    fig = Figure(figsize=(11, 3.75 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 2).ravel()
    ax_total, ax_base = axes[0], axes[1]

    def draw(ax, key, **style):
        ax.plot(*_series(entries, key), marker=marker, ms=3, **style)
        if any(f"eval_{key}" in e for e in evals):
            ax.plot(*_series(evals, f"eval_{key}"), ls="none", marker="x", color=style.get("color"),
                    label=f"{style.get('label') or key} (validation)")

    # 1. contributions to the optimised loss (log scale: base and MTA terms differ by orders of magnitude)
    steps, total = _series(entries, "loss")
    draw(ax_total, "loss", color="black", lw=2, label="total loss")
    if "loss_base" in keys:
        draw(ax_total, "loss_base", color="C0", label="L_base")
    mta_total: dict[int, float] = {}
    for key, lam_key, color, weighted_name, _ in _MTA_TERMS:
        if key not in keys:
            continue
        lam = lambdas.get(lam_key, 1.0)
        s, v = _series(entries, key)
        weighted = [lam * x for x in v]
        for st, w in zip(s, weighted):
            mta_total[st] = mta_total.get(st, 0.0) + w
        if any(w > 0 for w in weighted):
            ax_total.plot(s, weighted, color=color, marker=marker, ms=3, label=f"{weighted_name} (λ={lam:g})")
    by_step = dict(zip(steps, total))
    shares = [(st, 100 * m / by_step[st]) for st, m in sorted(mta_total.items()) if by_step.get(st)]
    share_txt = (f"MTA share of total: {shares[0][1]:.1f}% (step {shares[0][0]}) → {shares[-1][1]:.1f}% "
                 f"(step {shares[-1][0]})" if shares else None)
    ax_total.set_yscale("log", nonpositive="mask")
    ax_total.set_title("terms of the optimised loss (log scale)")
    ax_total.legend(fontsize="small", title=share_txt, title_fontsize="small")

    # 2. the base objective and its parts
    if "loss_base" in keys:
        draw(ax_base, "loss_base", color="C0", lw=2, label="L_base")
        for key, style, name in (("loss_ce", "--", "CE"), ("loss_kd", ":", "KD")):
            if key in keys:
                draw(ax_base, key, ls=style, color="C0", alpha=0.8, label=name)
    else:
        draw(ax_base, "loss", color="black", label="total loss")
    ax_base.legend(fontsize="small")
    ax_base.set_title("L_base = (1 − kd_ratio)·CE + kd_ratio·KD")

    # 3./4. the MTA terms, unweighted, each on its own scale; then every other logged component
    panels = [(key, color, name) for key, _, color, _, name in _MTA_TERMS] + [(k, "C3", k) for k in extras]
    for ax, (key, color, name) in zip(axes[2:], panels):
        ax.set_title(name)
        if key in keys:
            draw(ax, key, color=color, lw=2, label=name)
        else:
            ax.text(0.5, 0.5, f"no {key} in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[2 + len(panels):]:
        ax.set_visible(False)

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    lam_txt = f"λ_DSA {lambdas['lambda_dsa']:g}, λ_Hid {lambdas['lambda_hid']:g}" if lambdas else "no MTA"
    fig.suptitle(f"{title or 'training losses'} ({lam_txt}; {len(entries)} log points)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_run_losses(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """:func:`plot_losses` of a finished run directory (its ``log_history.json`` and ``mtakd_run.json``)."""
    entries, lambdas = load_history(run_dir)
    return plot_losses(entries, out, lambdas=lambdas,
                       title=title or f"training losses of {Path(run_dir).resolve().name}")


def write_loss_plot(history: list[dict], out_dir: str | Path, lambdas: dict | None = None) -> Path | None:
    """``out_dir/losses.png`` from a Trainer log; never raises: a run is not failed by its plot, a problem
    (no logged step, matplotlib missing or failing) is a warning and gives None."""
    out = Path(out_dir) / LOSS_PLOT
    if not training_entries(history):
        log.info("no training loss was logged (fewer steps than training.logging_steps?): no %s", LOSS_PLOT)
        return None
    try:
        plot_losses(history, out, lambdas=lambdas, title=f"training losses of {Path(out_dir).resolve().name}")
    except Exception as e:  # noqa: BLE001 — the trained student is what matters
        log.warning("could not draw %s: %s: %s", out, type(e).__name__, e)
        return None
    return out
