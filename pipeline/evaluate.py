"""Before/after comparison: score both models on every split, check the targets, write the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import confusion_matrix
from torch import nn
from tqdm.auto import tqdm

from pipeline.config import MAX_EPOCHS, Config
from pipeline.data import Split
from pipeline.device import memory_format, to_device_tensor
from pipeline.scoring import predict, score

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def evaluate_model(model: nn.Module, splits: dict[str, Split], device: torch.device, batch_size: int,
                   num_classes: int, bf16: bool = False, label: str = "model") -> dict:
    """Loss and accuracy on each split; per-class accuracy and confusion matrix on test."""
    model = model.to(device, memory_format=memory_format(device)).eval()
    result: dict = {}
    images_total = sum(len(split.labels) for split in splits.values())
    bar = tqdm(total=images_total, desc=f"scoring {label}", unit="img", unit_scale=True, leave=False)
    for name, split in splits.items():
        bar.set_postfix(split=name)
        images, labels = to_device_tensor(split, device)
        logits = predict(model, images, batch_size, bf16)
        result[f"{name}_loss"], result[f"{name}_acc"] = score(logits, labels)
        if name == "test":
            predicted = logits.argmax(1).cpu().numpy()
            matrix = confusion_matrix(split.labels, predicted, labels=list(range(num_classes)))
            result["confusion"] = matrix
            result["predicted"] = predicted
            result["per_class_acc"] = (matrix.diagonal() / np.maximum(matrix.sum(1), 1)).tolist()
        bar.update(len(split.labels))
    bar.close()
    result["gap"] = result["train_acc"] - result["val_acc"]
    return result


def check_targets(config: Config, resnet: dict, trained: dict, classes: list[str]) -> dict[str, dict]:
    """Each target with its figure and whether it holds, for the report and the registry alias."""
    targets = config.evaluate.targets
    epochs = config.train.resnet.epochs
    return {
        "val_acc": {
            "rule": f"validation accuracy > {targets.val_acc_min:.0%}",
            "value": f"{resnet['val_acc']:.2%}", "holds": resnet["val_acc"] > targets.val_acc_min,
        },
        "train_running_acc": {
            "rule": f"training accuracy (running, training mode, selected epoch) < {targets.train_acc_max:.0%}",
            "value": f"{trained['train_running_acc']:.2%}",
            "holds": trained["train_running_acc"] < targets.train_acc_max,
        },
        "epochs": {
            "rule": f"at most {targets.max_epochs} training epochs",
            "value": str(epochs), "holds": epochs <= min(targets.max_epochs, MAX_EPOCHS),
        },
        "no_augmentation": {
            # The config has no augmentation option and refuses any; the loader indexes fixed tensors.
            "rule": "no data augmentation of any kind",
            "value": "none (the config refuses augmentation keys)", "holds": True,
        },
        "cifar10_only": {
            "rule": "CIFAR-10 only",
            "value": f"classes {', '.join(classes)}", "holds": classes == CIFAR10_CLASSES,
        },
    }


def comparison_table(rows: dict[str, dict]) -> pd.DataFrame:
    """The before/after table of the report, one column per model."""
    table = pd.DataFrame({
        name: {
            "training accuracy, running (train mode)": f"{r['trained']['train_running_acc']:.2%}",
            "training accuracy, clean (eval mode)": f"{r['train_acc']:.2%}",
            "validation accuracy": f"{r['val_acc']:.2%}",
            "test accuracy": f"{r['test_acc']:.2%}",
            "generalization gap (clean train - val)": f"{r['gap']:.2%}",
            "selected epoch / epochs": f"{r['trained']['selected_epoch']} / {r['trained']['epochs']}",
            "parameters": f"{r['trained']['parameters']:,}",
            "training time": f"{r['trained']['train_time_s']:.0f} s",
        }
        for name, r in rows.items()
    })
    table.index.name = "figure"
    return table


def write_report(path: Path, table: pd.DataFrame, targets: dict[str, dict], per_class: pd.DataFrame,
                 device: str) -> None:
    lines = [
        "# Did the skip connections fix the overfitting?",
        "",
        f"Before: the simple CNN. After: the ResNet. Scored on `{device}`; model selection used the validation "
        "split only, the test split is scored once here.",
        "",
        table.to_markdown(),
        "",
        "## Targets (ResNet)",
        "",
        *[f"- {'✅ holds' if t['holds'] else '❌ missed'}: {t['rule']} — {t['value']}" for t in targets.values()],
        "",
        "**Every target holds.**" if all(t["holds"] for t in targets.values()) else "**Not every target holds.**",
        "",
        "## Learning curves",
        "",
        "Training accuracy is the running figure in training mode (solid); validation is dashed.",
        "",
        "![learning curves](learning_curves.png)",
        "",
        "## Test confusion matrices",
        "",
        "![confusion matrices](confusion_matrices.png)",
        "",
        "## Per-class test accuracy",
        "",
        per_class.to_markdown(floatfmt=".2%"),
        "",
    ]
    path.write_text("\n".join(lines))
