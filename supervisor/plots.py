"""Plots of a run's experiment record (the report `supervisor report --format json` prints): training loss, eval
metrics and learning rate against the run's positions, with a marker at every restart.

matplotlib is optional (`pip install 'train-supervisor[plots]'`) and imported only when a plot is drawn. Figures
are drawn on the Agg canvas without pyplot, so a notebook's own backend and pyplot's figure list stay untouched.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from supervisor.durable import atomic_write

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

MISSING_MATPLOTLIB = "plots need matplotlib: pip install 'train-supervisor[plots]'"
STRIP_LABEL = "restarts"  # label of the thin axes above the panels that holds the restart labels
RESTART_GID = "restart"  # gid of every restart marker line, in the strip and in each panel
WIDTH_IN, PANEL_H_IN, DPI = 10.0, 2.0, 100
LABEL_PT = 8
ROW_H_IN = 0.26  # one row of restart labels
MAX_ROWS = 6  # more restart labels than fit in this many rows are summed up, not stacked ever higher
# Restarts of a single run are coloured by reason; blue stays the data's colour.
MARKERS = ("o", "s", "^", "D", "v", "P")
REASON_COLOURS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


@dataclass(frozen=True)
class Panel:
    """One stacked panel: `field` of the report's `source` table ("train" or "metrics") per position."""

    source: str
    field: str
    ylabel: str


@dataclass(frozen=True)
class Restart:
    position: int  # the row's epoch (or step): the first position the new attempt trained
    label: str  # "#1 nan · seed 28": numbered, as a rollback puts a later restart left of an earlier one
    reason: str


@dataclass(frozen=True)
class Run:
    """A report reduced to what the plots draw, positions as ints whatever the JSON made of them."""

    name: str
    status: str
    noun: str
    tables: dict[str, dict[int, dict[str, Any]]]
    restarts: list[Restart]

    def series(self, panel: Panel) -> tuple[list[int], list[float]]:
        """(positions, values) of `panel`'s field; a None or non-finite value is NaN, a gap in the line."""
        rows = self.tables.get(panel.source, {})
        xs = [p for p, row in rows.items() if panel.field in row]
        return xs, [_number(rows[p][panel.field]) for p in xs]


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


def _positions(table: Any) -> dict[int, dict[str, Any]]:
    """{position: row} sorted by position, from int keys (report.build) or str keys (its JSON)."""
    out: dict[int, dict[str, Any]] = {}
    for key, row in (table or {}).items() if isinstance(table, dict) else ():
        try:
            position = int(key)
        except (TypeError, ValueError):
            log.debug("plots: position %r is not a whole number, left out", key)
            continue
        if isinstance(row, dict):
            out[position] = row
    return dict(sorted(out.items()))


def restart_label(row: dict[str, Any], number: int) -> str:
    """The marker text of restart `number` (1: the first after the normal start): reason, seed and (in a run of
    several processes) rank."""
    parts = [f"#{number} {row.get('reason') or 'restart'}"]
    if row.get("seed") is not None:
        parts.append(f"seed {row['seed']}")
    if row.get("rank") is not None:
        parts.append(f"rank {row['rank']}")
    return " · ".join(parts)


def read_run(rep: dict[str, Any]) -> Run:
    """The parts of a report (report.build's dict, or its JSON) the plots use; missing parts are empty."""
    noun = "step" if rep.get("unit") == "steps" else "epoch"
    restarts = []
    for number, row in enumerate((rep.get("restarts") or [])[1:], 1):  # the first row is the run's normal start
        where = row.get(noun, row.get("step" if noun == "epoch" else "epoch"))
        try:
            restarts.append(Restart(int(where), restart_label(row, number), str(row.get("reason"))))
        except (TypeError, ValueError):
            log.debug("plots: restart row without a position, no marker: %s", row)
    tables = {"train": _positions(rep.get("train")), "metrics": _positions(rep.get("metrics"))}
    return Run(str(rep.get("name", "run")), str(rep.get("status", "")), noun, tables, restarts)


def panels_for(runs: list[Run]) -> list[Panel]:
    """Training loss (always), one panel per eval metric, the learning rate where any run reported one."""
    panels = [Panel("train", "loss", "train loss")]
    names = sorted({k for r in runs for row in r.tables["metrics"].values() for k in row})
    panels += [Panel("metrics", name, "eval loss" if name == "loss" else name) for name in names]  # not train's
    if any(not math.isnan(v) for r in runs for v in r.series(Panel("train", "lr", ""))[1]):
        panels.append(Panel("train", "lr", "learning rate"))
    return panels


def _matplotlib() -> tuple[Any, Any, Any]:
    """(Figure, FigureCanvasAgg, MaxNLocator), or the one-line RuntimeError that says how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise RuntimeError(MISSING_MATPLOTLIB) from exc
    return Figure, FigureCanvasAgg, MaxNLocator


def _x_range(runs: list[Run]) -> tuple[float, float]:
    """The x limits every panel shares: all positions and restarts, padded, at least two positions wide."""
    xs = [p for r in runs for table in r.tables.values() for p in table] + [s.position for r in runs
                                                                             for s in r.restarts]  # fmt: skip
    lo, hi = (min(xs), max(xs)) if xs else (0, 0)
    if hi - lo < 2:  # a single point: give it room instead of an axis of hundredths, and no epoch -1
        lo = max(lo - 1, min(lo, 0))
        hi = lo + 2
    pad = 0.04 * (hi - lo)
    return lo - pad, hi + pad


def _label_rows(marks: list[tuple[float, str, str]], xlim: tuple[float, float]) -> tuple[list, int, int]:
    """Stack restart labels into rows so none overlaps another: ([(x, text, colour, row, align)], rows, left out).
    Widths are estimated from the text length, so the layout does not need a drawn figure."""
    span = xlim[1] - xlim[0]
    axes_in = WIDTH_IN - 1.4  # the figure less the y labels and tick labels beside the panels
    rows: list[list[tuple[float, float]]] = []
    placed, left_out = [], 0
    for x, text, colour in sorted(marks, key=lambda m: m[0]):
        frac = (x - xlim[0]) / span
        width = (len(text) * LABEL_PT * 0.55 + 6) / 72 / axes_in  # 6 pt: the offset from the line
        align = "left" if frac + width <= 1 else "right"
        start, end = (frac, frac + width) if align == "left" else (frac - width, frac)
        free = [i for i, row in enumerate(rows) if all(end + 0.01 < a or start > b + 0.01 for a, b in row)]
        if free:
            i = free[0]
        elif len(rows) == MAX_ROWS:
            left_out += 1
            continue
        else:
            i = len(rows)
            rows.append([])
        rows[i].append((start, end))
        placed.append((x, text, colour, i, align))
    return placed, max(1, len(rows)), left_out


def _draw_strip(ax: Axes, placed: list, nrows: int, left_out: int) -> None:
    """Restart labels in rows above the panels, each tied to its marker by a line down to the panels."""
    ax.set_ylim(0, nrows)
    ax.set_yticks([])
    ax.set_ylabel(STRIP_LABEL, fontsize=LABEL_PT, rotation=0, ha="right", va="center")
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(axis="x", bottom=False, labelbottom=False)
    for x, text, colour, row, align in placed:
        y = nrows - row - 0.5  # the first row on top, nearest the title
        ax.plot([x, x], [0, y], color=colour, lw=1, ls="--", gid=RESTART_GID, label="_restart")
        ax.annotate(text, (x, y), xytext=(3 if align == "left" else -3, 0), textcoords="offset points",
                    ha=align, va="center", fontsize=LABEL_PT, color=colour,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    if left_out:
        ax.text(1, 1, f"+{left_out} more restarts: supervisor report", transform=ax.transAxes, ha="right",
                va="bottom", fontsize=LABEL_PT, color="dimgray")  # fmt: skip


def _draw_panel(ax: Axes, panel: Panel, runs: list[Run], colours: list[str]) -> None:
    """`panel`'s series of every run in its colour; a note instead where no run has a value, log y over decades."""
    finite: list[float] = []
    for i, (run, colour) in enumerate(zip(runs, colours, strict=True)):
        xs, ys = run.series(panel)
        if xs:  # markers as well as lines: a single point, or one between gaps, is still seen
            # Each later run thinner, with its own marker: runs whose curves coincide stay told apart.
            later = len(runs) - 1 - i  # runs drawn over this one
            ax.plot(xs, ys, color=colour, marker=MARKERS[i % len(MARKERS)], ms=3 + 1.5 * min(later, 2),
                    lw=1.5 + 1.2 * min(later, 3), label=run.name)  # fmt: skip
        finite += [v for v in ys if not math.isnan(v)]
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if not finite:
        ax.text(0.5, 0.5, f"no {panel.ylabel} recorded", transform=ax.transAxes, ha="center", va="center",
                color="dimgray")  # fmt: skip
        ax.set_yticks([])  # an empty panel's default 0-to-1 scale would read as data
    elif min(finite) > 0 and max(finite) / min(finite) >= 20:  # losses and lr schedules span decades
        ax.set_yscale("log")


def _figure(runs: list[Run], title: str) -> Figure:
    """The restart strip (when any run restarted) over the panels of panels_for(runs), sharing one x axis."""
    Figure, FigureCanvasAgg, MaxNLocator = _matplotlib()
    panels = panels_for(runs)
    compare = len(runs) > 1
    colours = [f"C{i % 10}" for i in range(len(runs))] if compare else ["C0"]
    reasons: dict[str, str] = {}
    marks = []
    for run, colour in zip(runs, colours, strict=True):
        for s in run.restarts:
            c = colour if compare else reasons.setdefault(s.reason, REASON_COLOURS[len(reasons) % len(REASON_COLOURS)])
            marks.append((float(s.position), s.label, c))
    xlim = _x_range(runs)
    placed, nrows, left_out = _label_rows(marks, xlim)
    strip_h = nrows * ROW_H_IN + 0.1 if marks else 0.0
    heights = ([strip_h] if marks else []) + [PANEL_H_IN] * len(panels)
    fig = Figure(figsize=(WIDTH_IN, sum(heights) + 0.9), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(len(heights), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0])
    if marks:
        strip = axes.pop(0)
        strip.set_label(STRIP_LABEL)
        _draw_strip(strip, placed, nrows, left_out)
    for ax, panel in zip(axes, panels, strict=True):
        ax.set_label(f"{panel.source}:{panel.field}")
        _draw_panel(ax, panel, runs, colours)
        for x, _, colour in marks:
            ax.axvline(x, color=colour, lw=1, ls="--", alpha=0.8, gid=RESTART_GID, label="_restart")
    axes[0].set_xlim(*xlim)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    nouns = sorted({r.noun for r in runs})
    axes[-1].set_xlabel(" / ".join(nouns))
    if compare:
        axes[0].legend(loc="best", fontsize=LABEL_PT)
    fig.suptitle(title)
    return fig


def figure_for(rep: dict[str, Any]) -> Figure:
    """The figure of one run's report: restart labels on top (axes labelled STRIP_LABEL, when it restarted),
    then one panel per series (axes labelled "train:loss", "metrics:<name>", "train:lr")."""
    run = read_run(rep)
    n = len(run.restarts)
    restarts = f" · {n} restart{'s' if n != 1 else ''}" if n else ""
    return _figure([run], f"{run.name} — {run.status or 'unknown'}{restarts}")


def compare_figure(reps: list[dict[str, Any]]) -> Figure:
    """The panels of figure_for with one line per run (legend by name), each run's restarts in its colour."""
    if not reps:
        raise ValueError("compare_figure needs at least one report")
    runs = [read_run(rep) for rep in reps]
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):  # two runs of one name would share a legend entry
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            runs[i] = Run(f"{run.name} ({seen[run.name]})", run.status, run.noun, run.tables, run.restarts)
    if len({r.noun for r in runs}) > 1:
        log.warning("plots: comparing runs of epochs with runs of steps; the x axis mixes both")
    return _figure(runs, "compare: " + ", ".join(f"{r.name} ({r.status or 'unknown'})" for r in runs))


def _save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path` atomically (a temp file beside it, then a rename)."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_run(rep: dict[str, Any], path: Path) -> Path:
    """Write figure_for(rep) as a PNG at `path` (atomically, creating its folder) and return the path."""
    return _save(figure_for(rep), Path(path))


def plot_compare(reps: list[dict[str, Any]], path: Path) -> Path:
    """Write compare_figure(reps) as a PNG at `path` (atomically, creating its folder) and return the path."""
    return _save(compare_figure(reps), Path(path))


def in_kernel() -> bool:
    """True in a Jupyter/IPython kernel (where display() shows things); imports nothing: a kernel has always
    imported IPython already, and a terminal IPython has no kernel to show them."""
    ipython = sys.modules.get("IPython")
    get_ipython = getattr(ipython, "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def display_inline(path: Path) -> bool:
    """Show the PNG at `path` inline and return True in a Jupyter/IPython kernel; False anywhere else."""
    if not in_kernel():
        return False
    from IPython.display import Image, display

    display(Image(filename=str(path)))
    return True
