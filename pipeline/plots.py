"""Figures for people: learning curves and confusion matrices (matplotlib, headless)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from sklearn.metrics import ConfusionMatrixDisplay

# Figures are built without pyplot: pyplot keeps every figure it makes until closed, so a process that
# trains and evaluates many runs (scripts/acceptance.py) would pile them up. No display is needed either.


def learning_curves(histories: dict[str, pd.DataFrame], target_val: float | None = None,
                    target_train: float | None = None) -> Figure:
    """Accuracy and loss per epoch, train (running, training mode) solid and validation dashed."""
    fig = Figure(figsize=(11, 4))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for (name, history), color in zip(histories.items(), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]):
        # Markers, so that a run of one epoch still shows its point.
        style = {"color": color, "marker": "o", "markersize": 3}
        acc_ax.plot(history["epoch"], history["train_running_acc"], **style, label=f"{name} train")
        acc_ax.plot(history["epoch"], history["val_acc"], **style, linestyle="--", label=f"{name} validation")
        loss_ax.plot(history["epoch"], history["train_running_loss"], **style, label=f"{name} train")
        loss_ax.plot(history["epoch"], history["val_loss"], **style, linestyle="--", label=f"{name} validation")
    if target_val is not None:
        acc_ax.axhline(target_val, color="gray", linewidth=0.8, linestyle=":", label=f"val target > {target_val:.0%}")
    if target_train is not None:
        acc_ax.axhline(target_train, color="black", linewidth=0.8, linestyle=":",
                       label=f"train target < {target_train:.0%}")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def tried_runs(tried: pd.DataFrame, target_val: float, target_train: float, minutes_bound: float) -> Figure:
    """The finished runs of docs/tried.csv that had an epoch with running training accuracy under
    `target_train`, as points, one colour per width and one marker per precision (runs that did not record
    it trained in fp32): validation accuracy at the best such epoch, against minutes of training."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    finished = tried[(tried["epochs_run"] == tried["epochs_planned"]) & tried["val_acc"].notna()]
    widths = finished["model"].str.extract(r"width (\d+)", expand=False).astype(int).rename("width")
    precision = (finished["precision"] if "precision" in finished else pd.Series("fp32", finished.index))
    precision = precision.fillna("fp32").rename("precision")
    for (width, runs_precision), runs in finished.groupby([widths, precision]):
        ax.scatter(runs["seconds"] / 60, runs["val_acc"], zorder=3, marker="o" if runs_precision == "fp32" else "^",
                   label=f"width {width}, {runs_precision}")
    ax.axhline(target_val, color="gray", linewidth=0.8, linestyle=":", label=f"val target > {target_val:.0%}")
    ax.axvline(minutes_bound, color="black", linewidth=0.8, linestyle=":",
               label=f"{minutes_bound:.0f} minutes of training")
    ax.set_ylim(top=max([target_val, *finished["val_acc"]]) + 0.005)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    ax.set(xlabel="minutes of training (with per-epoch evaluation)", ylabel="validation accuracy",
           title=f"Finished runs: validation accuracy at running training accuracy < {target_train:.0%}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def confusion_matrices(matrices: dict[str, np.ndarray], classes: list[str]) -> Figure:
    fig = Figure(figsize=(6.5 * len(matrices), 6))
    axes = fig.subplots(1, len(matrices))
    for ax, (name, matrix) in zip(np.atleast_1d(axes), matrices.items()):
        ConfusionMatrixDisplay(matrix, display_labels=classes).plot(
            ax=ax, colorbar=False, xticks_rotation=45, values_format="d"
        )
        ax.set_title(f"{name} (test)")
    fig.tight_layout()
    return fig
