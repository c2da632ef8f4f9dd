"""FCPTS's cost, phase by phase, on a full-width ResNet-18 at 224x224 (issue item 4).

Times one `prune(model, "fcpts", ...)` at a few steps and splits its wall time into
phases by wrapping the functions that do each one (no change to the library): the model
copies, the initial thresholds, the calibration inputs, the teacher's outputs, the SGD
steps (and, inside them, the control loss with its density estimates), the exact final
step and BatchNorm re-estimation. The fixed part is everything but the steps. A run at
the defaults (1600 steps, 1024 calibration images) would take a day on this machine, so it
is extrapolated: 1600 median steps, and the passes over the calibration images scaled to
1024 images.

    .venv/bin/python -m bench.fcpts_cost                     # 3 steps, 128 images: ~4 min here
    .venv/bin/python -m bench.fcpts_cost --steps 10 --calib 1024 --section fcpts-cost-full
    .venv/bin/python -m bench.fcpts_cost --load fcpts-cost   # re-tabulate a saved run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.common import OUT, machine, markdown_table, write_json, write_section
from compressor.data import Data
from compressor.methods import base, fcpts, prune
from compressor.methods.fcpts import bridge as fcpts_bridge
from compressor.methods.fcpts import recon as fcpts_recon

DEFAULT_STEPS = fcpts.FcptsConfig.steps
DEFAULT_CALIB = fcpts.FcptsConfig.calib_samples
SPARSITY = 0.9


# --- a torchvision-layout ResNet-18 (torchvision is not installed here) ------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus the identity or a 1x1 conv-BN downsample shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """ResNet-18 as torchvision lays it out: 7x7/2 stem, max-pool, 4 stages of 2 blocks."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def synthetic_data(samples: int, seed: int = 0) -> Data:
    """`samples` random 3x224x224 inputs (FCPTS reads no labels), batch 64."""
    x = torch.randn((samples, 3, 224, 224), generator=torch.Generator().manual_seed(seed))
    y = torch.full((samples,), -1, dtype=torch.long)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    return Data(loader, None, None, (3, 224, 224), None, "synthetic:3x224x224", False, seed)


# --- phase timing ------------------------------------------------------------------------

# (owner, attribute, phase); a phase's time excludes the phases nested inside it
PHASES = [
    (base, "clone_model", "model copy (prune)"),
    (base, "check_task_output", "output check"),
    (fcpts_recon, "frozen_copy", "teacher copy"),
    (fcpts.Fcpts, "prepare", "initial thresholds"),
    (fcpts_recon, "calibration_inputs", "calibration inputs"),
    (fcpts_recon, "teacher_outputs", "teacher outputs"),
    (fcpts_recon, "reconstruct_", "SGD steps"),
    (fcpts.Fcpts, "penalty", "control loss (per step)"),
    (fcpts_bridge, "sparsity_slope", "density estimates (per step)"),
    (fcpts.Fcpts, "finalize", "exact step + bake"),
    (fcpts_recon, "recalibrate_batchnorm_", "BN re-estimation"),
    (base, "check_target", "target check"),
]
PER_STEP = ("SGD steps", "control loss (per step)", "density estimates (per step)")
TARGET_STEPS = (10, DEFAULT_STEPS)  # the short run and the default
PER_IMAGE = ("calibration inputs", "teacher outputs", "BN re-estimation")


class PhaseTimer:
    """Exclusive wall and CPU time per phase, from wrappers installed on the phase functions.

    CPU time (this process, all threads) is the steadier figure on a shared machine: other
    jobs stretch the wall time of whichever phase they happen to overlap.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.stack: list[list[float]] = []  # [wall, cpu] spent in nested phases, per open one
        self.step_marks: list[float] = []

    def wrap(self, fn, phase: str):
        def timed(*args, **kwargs):
            self.stack.append([0.0, 0.0])
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                nested = self.stack.pop()
                self.seconds[phase] = self.seconds.get(phase, 0.0) + wall - nested[0]
                self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu - nested[1]
                if self.stack:
                    self.stack[-1][0] += wall
                    self.stack[-1][1] += cpu

        return timed

    @contextlib.contextmanager
    def progress(self, total: int, description: str):
        """Stands in for the step loop's progress bar, to time every step."""
        self.step_marks = [time.perf_counter()]
        yield lambda n=1, **_: self.step_marks.append(time.perf_counter())

    @contextlib.contextmanager
    def installed(self):
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in PHASES]
        saved.append((fcpts_recon, "progress", fcpts_recon.progress))
        try:
            for owner, name, phase in PHASES:
                setattr(owner, name, self.wrap(getattr(owner, name), phase))
            fcpts_recon.progress = self.progress
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)


def profile(steps: int, calib: int) -> dict:
    """One timed FCPTS run: per-phase seconds, per-step times and the total."""
    torch.manual_seed(0)
    model, data = ResNet18().eval(), synthetic_data(calib)
    timer = PhaseTimer()
    with timer.installed():
        start, cpu = time.perf_counter(), time.process_time()
        prune(model, "fcpts", SPARSITY, data, steps=steps, calib_samples=calib)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    marks = timer.step_marks
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "seconds": timer.seconds,
        "cpu": timer.cpu,
        "step_times": step_times,
        "total": total,
        "total_cpu": cpu,
    }


def extrapolate(seconds: dict, median_step: float, calib: int, to_steps: int) -> dict:
    """Per-phase seconds of a run at `to_steps` steps and `DEFAULT_CALIB` images.

    Per-step phases scale to `to_steps` median steps (the first step pays one-off
    allocations that belong to no step count); phases that make one pass per calibration
    image scale to `DEFAULT_CALIB` images; the rest is paid once whatever the sizes.
    """
    per_step = sum(seconds.get(p, 0.0) for p in PER_STEP)
    at = {}
    for phase, value in seconds.items():
        if phase in PER_STEP:
            at[phase] = value / per_step * median_step * to_steps if per_step else 0.0
        else:
            at[phase] = value * (DEFAULT_CALIB / calib if phase in PER_IMAGE else 1.0)
    return at


def breakdown(run: dict, steps: int, calib: int) -> tuple[list[dict], dict]:
    """Table rows: the measured run, then runs at `TARGET_STEPS` extrapolated from it."""
    seconds, cpu = dict(run["seconds"]), dict(run.get("cpu", {}))
    seconds["other"] = run["total"] - sum(seconds.values())
    if "total_cpu" in run:
        cpu["other"] = run["total_cpu"] - sum(cpu.values())
    median_step = statistics.median(run["step_times"]) if run["step_times"] else 0.0
    targets = {n: extrapolate(seconds, median_step, calib, n) for n in TARGET_STEPS}
    totals = {n: sum(at.values()) for n, at in targets.items()}
    rows = []
    for phase, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        row = {
            "phase": phase,
            "kind": "per step" if phase in PER_STEP else "fixed",
            f"s @{steps}": f"{value:.2f}",
            f"CPU s @{steps}": f"{cpu[phase]:.2f}" if phase in cpu else "",
            f"% @{steps}": f"{100 * value / run['total']:.1f}",
        }
        for n, at in targets.items():
            row[f"s @{n}"] = f"{at[phase]:.1f}"
            row[f"% @{n}"] = f"{100 * at[phase] / totals[n]:.2f}"
        rows.append(row)
    fixed = {n: sum(v for p, v in at.items() if p not in PER_STEP) for n, at in targets.items()}
    summary = {
        "total": run["total"],
        "fixed": run["total"] - sum(seconds.get(p, 0.0) for p in PER_STEP),
        "median_step": median_step,
        "totals": totals,
        "fixed_at": fixed,
        "fixed_share": {n: fixed[n] / totals[n] for n in TARGET_STEPS},
    }
    summary["fixed_share_measured"] = summary["fixed"] / run["total"]
    return rows, summary


def commit() -> str:
    """The checked-out commit, `+changes` when the tree differs from it."""
    git = ["git", "-C", str(OUT.parent)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True)
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty.stdout.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--calib", type=int, default=128, help="calibration samples")
    parser.add_argument("--section", default="fcpts-cost", help="RESULTS.md section name")
    parser.add_argument("--load", help="tabulate bench/out/LOAD.json instead of running")
    parser.add_argument("--note", default="", help="a sentence appended to the section")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.load:
        saved = json.loads((OUT / f"{args.load}.json").read_text())
        run, args.steps, args.calib = saved["run"], saved["args"]["steps"], saved["args"]["calib"]
        revision = saved.get("commit", "unknown")
    else:
        run, revision = profile(args.steps, args.calib), commit()
    rows, summary = breakdown(run, args.steps, args.calib)
    table = markdown_table(rows, list(rows[0]))
    command = f"python -m bench.fcpts_cost --steps {args.steps} --calib {args.calib}"
    text = (
        f"## FCPTS cost breakdown ({args.section}, code at commit {revision})\n\n"
        f"Full-width ResNet-18 (torchvision layout, 1000 classes), random 3x224x224 inputs, "
        f"batch 64, sparsity {SPARSITY}: {args.steps} steps and {args.calib} calibration "
        f"images measured (`{command}`); runs at 10 and {DEFAULT_STEPS} (default) steps with "
        f"{DEFAULT_CALIB} images are extrapolated from it, not run. {machine()}, a 2-core "
        f"machine shared with other jobs (timings are noisy).\n\n{table}\n\n"
        f"Measured run: {summary['total']:.1f} s wall ({run.get('total_cpu', 0):.1f} s CPU), "
        f"fixed part {summary['fixed']:.1f} s "
        f"({100 * summary['fixed_share_measured']:.1f} %); median step "
        f"{summary['median_step']:.2f} s. Extrapolated with {DEFAULT_CALIB} images: "
        + "; ".join(
            f"{n} steps ~{summary['totals'][n] / 60:.0f} min, fixed part "
            f"{summary['fixed_at'][n]:.0f} s = {100 * summary['fixed_share'][n]:.1f} %"
            for n in TARGET_STEPS
        )
        + f".{' ' + args.note if args.note else ''}"
    )
    print(text)
    if not args.load:
        write_json(args.section, {"args": vars(args), "run": run, "commit": revision})
    if not args.no_write:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
