"""pipeline/plots.py: the figures render to PNG, and pyplot keeps none of them alive."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipeline import plots


def test_figures_render_and_are_not_retained(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2], "train_running_acc": [0.5, 0.7], "val_acc": [0.4, 0.6],
                            "train_running_loss": [1.2, 0.8], "val_loss": [1.4, 1.0]})
    open_before = len(plt.get_fignums())
    for i in range(25):  # more than pyplot's 20-figure warning
        curves = plots.learning_curves({"baseline": history, "resnet": history}, 0.85, 0.92)
        confusion = plots.confusion_matrices({"resnet": np.eye(3, dtype=int) * 5}, ["a", "b", "c"])
    assert len(plt.get_fignums()) == open_before
    for name, fig in (("curves.png", curves), ("confusion.png", confusion)):
        fig.savefig(tmp_path / name, dpi=50)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(curves.axes) == 2 and len(curves.axes[0].lines) == 4 + 2  # train/val per model, two target lines


def test_a_one_epoch_history_still_draws_its_points():
    history = pd.DataFrame({"epoch": [1], "train_running_acc": [0.5], "val_acc": [0.4], "train_running_loss": [1.2], "val_loss": [1.4]})
    curves = plots.learning_curves({"resnet": history})
    for ax in curves.axes:
        assert all(line.get_marker() not in (None, "None", "") for line in ax.lines), "a single point needs a marker"


def test_the_tried_runs_plot_shows_finished_runs_by_width():
    tried = pd.DataFrame({
        "run": ["a", "b", "c", "d"],
        "model": ["width 24 blocks [1, 0, 1] pool, conv stem", "width 32 blocks [1, 0, 1] pool, conv stem",
                  "width 24 blocks [1, 0, 1] pool, conv stem, dirac init", "width 16 blocks [1, 0, 1] pool, conv stem"],
        "epochs_planned": [9, 9, 9, 18], "epochs_run": [9, 9, 9, 7],
        "val_acc": [0.83, 0.845, 0.832, 0.80], "seconds": [1800, 2460, 1600, 600],
        "precision": [None, "bf16", None, None],  # older runs recorded none: fp32
    })
    ax = plots.tried_runs(tried, 0.85, 0.92, 30).axes[0]
    points = {collection.get_label(): collection.get_offsets().tolist() for collection in ax.collections}
    assert points == {"width 24, fp32": [[30.0, 0.83], [1600 / 60, 0.832]], "width 32, bf16": [[41.0, 0.845]]}, \
        "one series per width and precision; the run stopped early is left out"
    assert ax.lines[0].get_ydata()[0] == 0.85 and ax.lines[1].get_xdata()[0] == 30
    assert "< 92%" in ax.get_title()


def test_the_tried_runs_plot_draws_its_bounds_when_no_run_qualifies():
    tried = pd.DataFrame({"run": ["a"], "model": ["width 24 blocks [1] stride, conv stem"], "epochs_planned": [2],
                          "epochs_run": [2], "val_acc": [float("nan")], "seconds": [60]})
    ax = plots.tried_runs(tried, 0.85, 0.92, 30).axes[0]
    assert not ax.collections and len(ax.lines) == 2 and ax.get_ylim()[1] > 0.85
