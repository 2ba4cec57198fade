"""supervisor.plots on real runs: the fake trainer restarts after a NaN and a crash under the real CLI, the
report comes from `supervisor report --format json`, and the PNG and the figure behind it are checked.

matplotlib is the optional `plots` extra; without it these tests skip, except the one that checks the message a
user without it gets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import clean_env, cli, write_run

from supervisor import plots
from supervisor import report as report_mod

FAULTS = [{"kind": "nan", "attempt": 0, "epoch": 1, "step": 1}, {"kind": "crash", "attempt": 1, "epoch": 2, "step": 1}]


def start_and_report(where: Path, name: str, faults: list[dict], epochs: int = 4) -> dict:
    """Run the fake trainer under `supervisor start` and return the JSON report (positions as str keys)."""
    where.mkdir(parents=True, exist_ok=True)
    toml = write_run(where, name=name, epochs=epochs, params={"faults": faults})
    out = cli("start", "-q", str(toml), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    out = cli("report", str(toml), "--format", "json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def mpl():
    return pytest.importorskip("matplotlib", reason="plots need the extra: pip install -e '.[plots]'")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, mpl) -> tuple[Path, dict]:
    """A real run of 4 epochs: a NaN in epoch 1 of attempt 0, a crash in epoch 2 of attempt 1."""
    where = tmp_path_factory.mktemp("restarted")
    rep = start_and_report(where, "restarted", FAULTS)
    assert rep["status"] == "completed"
    assert [(r["epoch"], r["reason"]) for r in rep["restarts"]] == [(0, "normal start"), (1, "nan"), (2, "crash")]
    return where / "runs" / "restarted", rep


def panels(fig) -> dict:
    return {ax.get_label(): ax for ax in fig.axes}


def data_lines(ax) -> list:
    return [line for line in ax.get_lines() if line.get_gid() != plots.RESTART_GID]


def restart_xs(ax) -> list[float]:
    return sorted(float(line.get_xdata()[0]) for line in ax.get_lines() if line.get_gid() == plots.RESTART_GID)


def assert_png(path: Path, mpl, min_ink: float = 0.02) -> None:
    """A PNG that decodes, of the size the module draws, with a real share of non-white pixels."""
    import matplotlib.image

    assert path.is_file() and path.stat().st_size > 2_000
    img = matplotlib.image.imread(path)
    height, width = img.shape[:2]
    assert 800 <= width <= 1200 and 250 <= height <= 2500, img.shape
    ink = (img[..., :3] < 0.9).any(axis=-1).mean()
    assert min_ink < ink < 0.6, ink
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # the write was atomic


def test_plot_run_of_a_restarted_run_writes_a_png_through_the_cli_report(restarted, tmp_path, mpl):
    _, rep = restarted
    target = tmp_path / "plots" / "run.png"
    assert plots.plot_run(rep, target) == target
    assert_png(target, mpl)
    assert plots.plot_run(rep, target) == target  # an existing plot is replaced
    assert_png(target, mpl)


def test_figure_has_a_panel_per_series_lines_at_the_positions_and_a_labelled_marker_per_restart(restarted, mpl):
    _, rep = restarted
    fig = plots.figure_for(rep)
    by_label = panels(fig)
    assert list(by_label) == [plots.STRIP_LABEL, "train:loss", "metrics:AP50", "metrics:VOCmAP"]  # no lr reported
    for label, table, field in [("train:loss", "train", "loss"), ("metrics:AP50", "metrics", "AP50")]:
        (line,) = data_lines(by_label[label])
        assert list(line.get_xdata()) == [int(p) for p in rep[table]]
        assert list(line.get_ydata()) == pytest.approx([row[field] for row in rep[table].values()])
    rows = rep["restarts"][1:]
    for ax in fig.axes:
        assert restart_xs(ax) == [1.0, 2.0]
    texts = [t.get_text() for t in by_label[plots.STRIP_LABEL].texts]
    assert texts == [f"#1 nan · seed {rows[0]['seed']}", f"#2 crash · seed {rows[1]['seed']}"]
    assert fig.axes[-1].get_xlabel() == "epoch"
    assert "restarted" in fig.get_suptitle() and "completed" in fig.get_suptitle()


def test_the_report_dict_with_int_positions_draws_what_its_json_draws(restarted, mpl):
    run_dir, rep = restarted
    built = report_mod.build(run_dir, "restarted", running=False)
    assert all(isinstance(p, int) for p in built["train"])
    from_json, from_dict = panels(plots.figure_for(rep)), panels(plots.figure_for(built))
    assert list(from_json) == list(from_dict)
    for label in from_json:
        assert [list(x.get_xydata().ravel()) for x in from_json[label].get_lines()] == [
            list(x.get_xydata().ravel()) for x in from_dict[label].get_lines()]  # fmt: skip


def test_compare_draws_one_line_per_run_and_each_runs_restarts_in_its_colour(restarted, tmp_path, mpl):
    from matplotlib.colors import to_rgba

    _, first = restarted
    second = start_and_report(tmp_path / "b", "crashed-once", [{"kind": "crash", "attempt": 0, "epoch": 3, "step": 0}])
    fig = plots.compare_figure([first, second])
    by_label = panels(fig)
    loss = by_label["train:loss"]
    lines = {line.get_label(): line for line in data_lines(loss)}
    assert set(lines) == {"restarted", "crashed-once"}
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["restarted", "crashed-once"]
    assert list(lines["crashed-once"].get_xdata()) == [int(p) for p in second["train"]]
    markers = {float(m.get_xdata()[0]): to_rgba(m.get_color()) for m in loss.get_lines()
               if m.get_gid() == plots.RESTART_GID and m.get_xdata()[0] == 3}  # fmt: skip
    assert markers == {3.0: to_rgba(lines["crashed-once"].get_color())}
    assert restart_xs(loss) == [1.0, 2.0, 3.0]
    strip = [t.get_text() for t in by_label[plots.STRIP_LABEL].texts]
    assert f"#1 crash · seed {second['restarts'][1]['seed']}" in strip and len(strip) == 3
    target = plots.plot_compare([first, second], tmp_path / "compare.png")
    assert_png(target, mpl)


SYNTHETIC = {
    "no metrics, no lr": {"name": "bare", "unit": "epochs", "status": "running", "train": {"0": {"loss": 2.0},
                          "1": {"loss": 1.5}}, "restarts": [{"epoch": 0, "seed": 29, "reason": "normal start"}]},
    "a single point": {"name": "one", "unit": "epochs", "status": "failed", "train": {0: {"loss": 1.0, "lr": 0.1}},
                       "metrics": {0: {"AP50": 0.2}}, "restarts": [{"epoch": 0, "seed": 1, "reason": "normal start"},
                                                                   {"epoch": 0, "seed": 2, "reason": "crash"}]},
    "None values": {"name": "holes", "unit": "steps", "status": "completed",
                    "train": {"10": {"loss": None, "steps": 10}, "20": {"loss": 0.5, "lr": None}, "30": {"loss": 0.4}},
                    "metrics": {"10": {"val_loss": None}, "20": {"val_loss": 0.7, "acc": None}},
                    "restarts": [{"step": 1, "seed": 5, "reason": "normal start"},
                                 {"step": 21, "load_step": 20, "seed": 6, "reason": "nan", "rank": 1}]},
    "nothing yet": {"name": "new", "status": "running"},
}  # fmt: skip


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_sparse_reports_still_plot(case, tmp_path, mpl):
    rep = SYNTHETIC[case]
    target = plots.plot_run(rep, tmp_path / "p.png")
    assert_png(target, mpl, min_ink=0.005)
    by_label = panels(plots.figure_for(rep))
    assert "train:loss" in by_label and ("train:lr" in by_label) == (case == "a single point")
    if case == "None values":
        assert list(by_label) == [plots.STRIP_LABEL, "train:loss", "metrics:acc", "metrics:val_loss"]
        (loss,) = data_lines(by_label["train:loss"])
        assert list(loss.get_xdata()) == [10, 20, 30] and loss.get_ydata()[0] != loss.get_ydata()[0]  # NaN: a gap
        assert restart_xs(by_label["train:loss"]) == [21.0]
        assert [t.get_text() for t in by_label[plots.STRIP_LABEL].texts] == ["#1 nan · seed 6 · rank 1"]
        assert by_label["metrics:acc"].get_xlabel() == "" and list(by_label.values())[-1].get_xlabel() == "step"


def test_close_restarts_get_labels_that_do_not_overlap(tmp_path, mpl):
    restarts = [{"epoch": 0, "seed": 0, "reason": "normal start"}]
    restarts += [{"epoch": 5 + i % 3, "seed": 100 + i, "reason": "preempted"} for i in range(8)]
    rep = {"name": "busy", "unit": "epochs", "status": "completed", "restarts": restarts,
           "train": {str(e): {"loss": 1 / (e + 1)} for e in range(40)}}  # fmt: skip
    fig = plots.figure_for(rep)
    fig.canvas.draw()
    strip = panels(fig)[plots.STRIP_LABEL]
    boxes = [t.get_window_extent() for t in strip.texts if "preempted" in t.get_text()]
    for i, a in enumerate(boxes):
        assert not any(a.overlaps(b) for b in boxes[i + 1 :]), [t.get_text() for t in strip.texts]
    assert len(boxes) == 6 and strip.texts[-1].get_text() == "+2 more restarts: supervisor report"


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=clean_env())  # fmt: skip


def test_without_matplotlib_plotting_says_how_to_install_it_and_nothing_imports_torch(tmp_path):
    out = run_python(f"""
        import sys
        sys.modules["matplotlib"] = None  # as if the extra were not installed
        from supervisor import plots
        assert "torch" not in sys.modules
        try:
            plots.plot_run({{"name": "r", "train": {{"0": {{"loss": 1.0}}}}}}, {str(tmp_path / "x.png")!r})
        except RuntimeError as exc:
            print(exc)
    """, tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "plots need matplotlib: pip install 'train-supervisor[plots]'"
    assert not (tmp_path / "x.png").exists()


def test_display_inline_is_false_outside_a_kernel_and_imports_nothing(tmp_path, mpl):
    out = run_python("""
        import sys
        from supervisor import plots
        print(plots.display_inline("x.png"), "IPython" in sys.modules, "matplotlib" in sys.modules)
        from IPython.core.interactiveshell import InteractiveShell
        InteractiveShell.instance()  # a terminal-style shell: get_ipython() answers, but no kernel shows images
        print(plots.display_inline("x.png"))
    """, tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False", "False"]


@pytest.mark.kernel
def test_display_inline_shows_the_png_in_a_real_jupyter_kernel(restarted, tmp_path, mpl):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    target = plots.plot_run(restarted[1], tmp_path / "run.png")
    cell = f"from supervisor.plots import display_inline\nprint(display_inline({str(target)!r}))"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute(env=clean_env())  # fmt: skip
    outputs = nb.cells[0].outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
    assert any(o.get("name") == "stdout" and o["text"].strip() == "True" for o in outputs), outputs


@pytest.mark.kernel
def test_report_show_displays_the_record_and_its_plot_in_a_notebook(restarted, tmp_path, mpl):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cell = f"from supervisor import report\nrep = report.show({str(restarted[0])!r})"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute(env=clean_env())  # fmt: skip
    outputs = nb.cells[0].outputs
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert markdown and "| 1 | 0 |" in markdown[0] and "| nan |" in markdown[0], outputs
    assert any("image/png" in o.get("data", {}) for o in outputs), outputs
