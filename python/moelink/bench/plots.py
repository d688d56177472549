"""PNG plots of a ``--sweep``: per mode and swept axis, bandwidth per rank against the axis, moelink
beside the baseline and the memcpy floor, one panel per direction (dispatch, combine).

matplotlib is an optional extra (``pip install 'moelink[bench]'``); without it :func:`write_plots`
writes nothing and says how to get the plots from the saved ``sweep.json`` later
(``python -m moelink.bench --plot DIR/sweep.json``).
"""

from __future__ import annotations

import os
from typing import Optional

from .modes import get_mode

__all__ = ["MISSING_MATPLOTLIB", "matplotlib_missing", "write_plots"]

MISSING_MATPLOTLIB = ("matplotlib is not installed, so no PNG plots are written (the sweep's figures are in "
                      "sweep.json and the tables above); install it with pip install 'moelink[bench]' "
                      "(or pip install matplotlib), then plot the saved sweep with "
                      "python -m moelink.bench --plot {json}")

_AXIS_LABELS = {"tokens": "tokens per rank", "hidden": "hidden size", "ranks": "ranks (processes)",
                "sms": "SM budget (num_sms)"}


def matplotlib_missing() -> Optional[str]:
    """None when matplotlib can be imported, else the reason."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return str(exc) or "ImportError"
    return None


def _series(points: list[dict], variant: Optional[str]):
    xs, med, lo, hi = [], [], [], []
    for point in points:
        s = point["summary"]
        spread = s["memcpy_floor"]["GBps"] if variant is None else s["variants"][variant]["GBps"]
        xs.append(point["value"])
        med.append(spread["median"])
        lo.append(spread["median"] - spread["min"])
        hi.append(spread["max"] - spread["median"])
    return xs, med, [lo, hi]


def write_plots(sweep: dict, out_dir: str) -> tuple[list[str], Optional[str]]:
    """Writes ``<mode>_bandwidth_vs_<axis>.png`` into ``out_dir`` for every mode and axis of the
    sweep. Returns (paths written, None) or ([], why not) when matplotlib is missing."""
    missing = matplotlib_missing()
    if missing is not None:
        return [], MISSING_MATPLOTLIB.format(json=os.path.join(out_dir, "sweep.json"))
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    paths = []
    load = sweep.get("load_average_before"), sweep.get("load_average_after")
    for mode_name, axes in sweep["modes"].items():
        mode = get_mode(mode_name)
        panels = mode.panels
        for axis, points in axes.items():
            points = [p for p in points if "summary" in p]
            if not points:
                continue
            fig, axs = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False)
            for ax, (panel, rows) in zip(axs[0], panels.items()):
                for row in rows:
                    xs, ys, err = _series(points, row.variant)
                    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=row.label,
                                linestyle="--" if row.is_baseline else "-")
                xs, ys, err = _series(points, None)
                ax.errorbar(xs, ys, yerr=err, marker="s", capsize=3, color="grey", linestyle=":",
                            label="memcpy floor (interleaved)")
                ax.set_title(f"{panel}")
                ax.set_xlabel(_AXIS_LABELS.get(axis, axis))
                ax.set_ylabel("GB/s per rank (log; median, bars: min..max over ranks)")
                if axis == "tokens":
                    ax.set_xscale("log", base=2)
                # The floor is often 10-100x the variants on the host target: a log scale keeps both legible.
                ax.set_yscale("log")
                ax.set_xticks(xs)
                ax.set_xticklabels([str(x) for x in xs])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            base = sweep.get("base", {})
            fig.suptitle(f"{mode.title}: bandwidth vs {axis}\n"
                         + ", ".join(f"{k} {v}" for k, v in base.items() if k != axis)
                         + (f"; load {load[0]:.1f} -> {load[1]:.1f}" if None not in load else ""), fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{mode_name}_bandwidth_vs_{axis}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths, None
