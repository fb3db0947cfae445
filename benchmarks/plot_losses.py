"""Plot the training loss components of an `mtakd distill` run over steps.

    python benchmarks/plot_losses.py RUN_DIR --out losses.png [--title TEXT]

The command line of :mod:`mtakd.plots` (which `mtakd distill` already uses to write ``RUN_DIR/losses.png``):
reads ``RUN_DIR/log_history.json`` and, when present, ``RUN_DIR/mtakd_run.json`` for λ_DSA and λ_Hid; the
panels are described there.
"""

from __future__ import annotations

import argparse
import sys

from mtakd.plots import load_history, plot_run_losses as plot_losses  # noqa: F401  (used by quality.py, study.py)


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
