"""Training speed of both models on this machine's device, at the batch sizes params.yaml gives.

Prints (and with --json writes) images per second, milliseconds per optimizer step, the model's
training FLOPs per image (forward + backward, counted by torch.utils.flop_counter) and the achieved
FLOP rate. Data is random: speed does not depend on pixel values.

    python bench/train_speed.py [--params params.yaml] [--steps 20] [--json out.json] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import nn

from pipeline import config as config_module
from pipeline.compute import training_flops_per_image
from pipeline.models import build_model, count_parameters
from pipeline.paths import MODEL_NAMES
from pipeline.device import device_name, memory_format, select_device, uses_bf16
from pipeline.device import cpu_model
from pipeline.train import make_optimizer, train_step


def bench(train_cfg, device: torch.device, bf16: bool, compile: bool, steps: int, warmup: int,
          val_size: int) -> dict:
    model = build_model(train_cfg.model).to(device, memory_format=memory_format(device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.train()
    net = torch.compile(model) if compile else model  # as train.compile does: the warm-up steps compile
    optimizer = make_optimizer(train_cfg, model.parameters())
    criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
    batch = train_cfg.batch_size
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=memory_format(device))
    labels = torch.randint(0, 10, (batch,), device=device)

    for _ in range(warmup):
        train_step(net, criterion, optimizer, images, labels, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        train_step(net, criterion, optimizer, images, labels, bf16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    flops = training_flops_per_image(train_cfg.model)
    train_images = 50_000 - val_size
    return {
        "train_pflops_run": flops * train_images * train_cfg.epochs / 1e15,
        "batch_size": batch,
        "parameters": count_parameters(model),
        "ms_per_step": 1000 * elapsed / steps,
        "images_per_s": batch * steps / elapsed,
        "train_gflops_per_image": flops / 1e9,
        "achieved_tflops": flops * batch * steps / elapsed / 1e12,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    config = config_module.load(args.params, args.overrides)
    device = select_device(config.train.device)
    bf16 = uses_bf16(config.train.precision, device)
    results = {"device": device_name(device), "cpu": cpu_model(), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "precision": "bf16" if bf16 else "fp32", "compile": config.train.compile,
               "models": {name: bench(getattr(config.train, name), device, bf16, config.train.compile, args.steps,
                                      args.warmup, config.data.val_size)
                          for name in MODEL_NAMES}}
    print(f"device {results['device']}, torch {results['torch']}, {results['threads']} threads, {results['precision']}"
          f"{', compiled' if results['compile'] else ''}")
    for name, r in results["models"].items():
        print(f"{name:9s} batch {r['batch_size']:4d}  {r['images_per_s']:9.0f} img/s  {r['ms_per_step']:8.1f} ms/step"
              f"  {r['train_gflops_per_image']:.3f} GFLOP/img (train)  {r['achieved_tflops']:.3f} TFLOP/s"
              f"  {r['parameters']:,} params  {r['train_pflops_run'] * 1e15:.2e} FLOP over the epochs run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
