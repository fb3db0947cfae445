"""Plot the training loss components of an `mtakd distill` run over steps.

    python benchmarks/plot_losses.py RUN_DIR --out losses.png [--title TEXT]

Reads ``RUN_DIR/log_history.json`` (the Trainer's log: one entry per ``logging_steps`` with ``loss`` and
the components ``loss_base``, ``loss_dsa``, ``loss_hid``, and for KD bases ``loss_ce``/``loss_kd``, each
the mean over the steps since the previous entry) and, when present, ``RUN_DIR/mtakd_run.json`` for
λ_DSA and λ_Hid. ``loss_dsa`` and ``loss_hid`` are logged unweighted; the total is
``loss = loss_base + λ_DSA·loss_dsa + λ_Hid·loss_hid``.

Four panels (Agg backend, no display needed):

1. what each term adds to the optimised loss, on a log axis: total, L_base, λ_DSA·L_DSA, λ_Hid·L_Hid,
   with MTA's share of the total at the first and last logged step in the legend title;
2. L_base, with its cross-entropy and KD parts when logged;
3. L_DSA (unweighted);
4. L_Hid (unweighted).

Panels of components the run does not have (e.g. no MTA) say so instead of plotting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_history(run_dir: str | Path) -> tuple[list[dict], dict]:
    """(training log entries sorted by step, {"lambda_dsa", "lambda_hid"} or {} without MTA)."""
    run_dir = Path(run_dir)
    path = run_dir / "log_history.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} the training.output_dir of a finished run?)")
    history = json.loads(path.read_text())
    entries = sorted((e for e in history if "loss" in e and "step" in e), key=lambda e: e["step"])
    if not entries:
        raise ValueError(f"{path} holds no training loss entries")
    lambdas: dict = {}
    run_file = run_dir / "mtakd_run.json"
    if run_file.is_file():
        mta = (json.loads(run_file.read_text()).get("objective") or {}).get("mta") or {}
        if mta and mta.get("enabled", True):
            lambdas = {"lambda_dsa": float(mta.get("lambda_dsa", 2.0)), "lambda_hid": float(mta.get("lambda_hid", 0.2))}
    return entries, lambdas


def _series(entries: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(e["step"], float(e[key])) for e in entries if key in e and e[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_losses(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries, lambdas = load_history(run_dir)
    has = {k: any(k in e for e in entries) for k in ("loss_base", "loss_dsa", "loss_hid", "loss_ce", "loss_kd")}
    lam_dsa = lambdas.get("lambda_dsa", 1.0)
    lam_hid = lambdas.get("lambda_hid", 1.0)
    marker = "o" if len(entries) <= 40 else None

    fig = Figure(figsize=(11, 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax_total, ax_base, ax_dsa, ax_hid = axes.ravel()

    # 1. contributions to the optimised loss (log scale: base and MTA terms differ by orders of magnitude)
    steps, total = _series(entries, "loss")
    ax_total.plot(steps, total, color="black", lw=2, marker=marker, ms=3, label="total loss")
    if has["loss_base"]:
        ax_total.plot(*_series(entries, "loss_base"), color="C0", marker=marker, ms=3, label="L_base")
    share_txt = None
    if has["loss_dsa"] or has["loss_hid"]:
        mta_total = {}
        for key, lam, color, name in (("loss_dsa", lam_dsa, "C1", "λ_DSA·L_DSA"), ("loss_hid", lam_hid, "C2", "λ_Hid·L_Hid")):
            if not has[key]:
                continue
            s, v = _series(entries, key)
            weighted = [lam * x for x in v]
            for st, w in zip(s, weighted):
                mta_total[st] = mta_total.get(st, 0.0) + w
            if any(w > 0 for w in weighted):
                ax_total.plot(s, weighted, color=color, marker=marker, ms=3, label=f"{name} (λ={lam:g})")
        by_step = dict(zip(steps, total))
        shares = [(st, 100 * m / by_step[st]) for st, m in sorted(mta_total.items()) if by_step.get(st)]
        if shares:
            share_txt = f"MTA share of total: {shares[0][1]:.1f}% (step {shares[0][0]}) → {shares[-1][1]:.1f}% (step {shares[-1][0]})"
    ax_total.set_yscale("log")
    ax_total.set_title("terms of the optimised loss (log scale)")
    ax_total.legend(fontsize="small", title=share_txt, title_fontsize="small")

    # 2. the base objective and its parts
    if has["loss_base"]:
        ax_base.plot(*_series(entries, "loss_base"), color="C0", lw=2, marker=marker, ms=3, label="L_base")
        for key, style, name in (("loss_ce", "--", "CE"), ("loss_kd", ":", "KD")):
            if has[key]:
                ax_base.plot(*_series(entries, key), ls=style, color="C0", alpha=0.8, label=name)
        ax_base.legend(fontsize="small")
    else:
        ax_base.plot(steps, total, color="black", marker=marker, ms=3, label="total loss")
        ax_base.legend(fontsize="small")
    ax_base.set_title("L_base = (1 − kd_ratio)·CE + kd_ratio·KD")

    # 3./4. the MTA terms, unweighted, each on its own scale
    for ax, key, color, name in ((ax_dsa, "loss_dsa", "C1", "L_DSA (unweighted)"), (ax_hid, "loss_hid", "C2", "L_Hid (unweighted)")):
        ax.set_title(name)
        if has[key]:
            ax.plot(*_series(entries, key), color=color, lw=2, marker=marker, ms=3)
        else:
            ax.text(0.5, 0.5, f"no {key} in this run", ha="center", va="center", transform=ax.transAxes, color="gray")

    from matplotlib.ticker import MaxNLocator

    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_total.set_ylabel("loss")
    ax_dsa.set_ylabel("loss")
    run_name = Path(run_dir).resolve().name
    lam_txt = f"λ_DSA {lam_dsa:g}, λ_Hid {lam_hid:g}" if lambdas else "no MTA"
    fig.suptitle(title or f"training losses of {run_name} ({lam_txt}; {len(entries)} log points)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="training.output_dir of an `mtakd distill` run")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        out = plot_losses(args.run_dir, args.out, args.title)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_losses: error: {e}", file=sys.stderr)
        return 2
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
