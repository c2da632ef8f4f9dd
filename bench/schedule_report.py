"""The schedule study's report: tables, the goals, the plot, from schedule_results.json."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.common import machine, markdown_table, write_section

PLOT = Path(__file__).with_name("schedule.png")
NAMES = {"probmask": "ProbMask", "gmp": "GMP", "magnitude-ft": "magnitude+FT"}
STYLES = {"lenet5": "-o", "resnet20": "--s"}  # the plot's line per model
COLUMNS = [
    "schedule",
    "epochs",
    "sparsity",
    "ProbMask",
    "GMP",
    "magnitude+FT",
    "PM - GMP",
    "PM - mag",
]


def medians(cells: dict) -> dict[tuple, tuple[float, int]]:
    """(model, schedule, sparsity, method) -> (median top-1 in %, n seeds); failures left out."""
    groups: dict[tuple, list[float]] = {}
    for key, cell in cells.items():
        model, schedule, sparsity, method, _seed = key.split("/")
        if cell.get("top1") is not None:
            groups.setdefault((model, schedule, sparsity, method), []).append(100 * cell["top1"])
    return {k: (statistics.median(v), len(v)) for k, v in groups.items()}


def model_table(model: str, cells: dict, schedules: dict, sparsities) -> list[dict]:
    """One row per schedule x sparsity that has at least one finished cell."""
    med = medians(cells)
    rows = []
    for name, schedule in schedules.items():
        for sparsity in sparsities:
            at = {m: med.get((model, name, f"{sparsity:g}", m)) for m in NAMES}
            if not any(at.values()):
                continue
            row = {"schedule": name, "epochs": f"{schedule.epochs} + {schedule.finetune_epochs}"}
            row["sparsity"] = f"{sparsity:.0%}"
            for method, label in NAMES.items():
                row[label] = _cell_text(at[method], _failed(cells, model, name, sparsity, method))
            row["PM - GMP"] = _delta(at["probmask"], at["gmp"])
            row["PM - mag"] = _delta(at["probmask"], at["magnitude-ft"])
            rows.append(row)
    return rows


def _failed(cells: dict, model: str, schedule: str, sparsity: float, method: str) -> bool:
    prefix = f"{model}/{schedule}/{sparsity:g}/{method}/"
    return any(k.startswith(prefix) and "error" in c for k, c in cells.items())


def _cell_text(value: tuple[float, int] | None, failed: bool) -> str:
    if value is None:
        return "failed" if failed else "-"
    return f"{value[0]:.2f} (n={value[1]})"


def _delta(a: tuple[float, int] | None, b: tuple[float, int] | None) -> str:
    return "-" if a is None or b is None else f"{a[0] - b[0]:+.2f}"


def goals(cells: dict) -> list[str]:
    """The issue's LeNet-5 goals against the finished cells (medians)."""
    med = medians(cells)
    checks = [("long", s, "gmp", 0.0) for s in ("0.95", "0.98")]
    checks += [("medium", s, "gmp", -0.5) for s in ("0.9", "0.95", "0.98")]
    checks += [("short", s, "magnitude-ft", 0.0) for s in ("0.9", "0.95", "0.98")]
    lines = []
    for schedule, sparsity, peer, margin in checks:
        pm, other = (
            med.get(("lenet5", schedule, sparsity, "probmask")),
            med.get(("lenet5", schedule, sparsity, peer)),
        )
        what = f"{schedule} {float(sparsity):.0%}: ProbMask >= {NAMES[peer]}"
        what += f" - {-margin:g} pt" if margin else ""
        if pm is None or other is None:
            lines.append(f"{what}: not finished")
            continue
        verdict = "met" if pm[0] - other[0] >= margin else "missed"
        lines.append(f"{what}: {pm[0]:.2f} vs {other[0]:.2f} ({verdict})")
    return lines


def unfinished(cells: dict, tasks) -> list[str]:
    """'model schedule sparsity: n of m cells to run' for every row with cells left."""
    missing: dict[tuple, list[int]] = {}
    for task in tasks:
        counts = missing.setdefault((task.model, task.schedule, task.sparsity), [0, 0])
        counts[1] += 1
        counts[0] += task.key not in cells
    return [
        f"{m} {s} {p:.0%}: {left} of {total} cells to run"
        for (m, s, p), (left, total) in missing.items()
        if left
    ]


def plot(cells: dict, schedules_for, sparsities, path: Path = PLOT) -> bool:
    """Top-1 against training epochs, one panel per sparsity; False without matplotlib.

    `schedules_for(model)` gives the model's schedules by name (their lengths may differ).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    med = medians(cells)
    fig, axes = plt.subplots(1, len(sparsities), figsize=(4 * len(sparsities), 3.6))
    for ax, sparsity in zip(axes, sparsities):
        for model, style in STYLES.items():
            schedules = schedules_for(model)
            for method, label in NAMES.items():
                points = [
                    (schedules[s].total, med[model, s, f"{sparsity:g}", method][0])
                    for s in schedules
                    if (model, s, f"{sparsity:g}", method) in med
                ]
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, label=f"{model} {label}")
        ax.set_xscale("log")
        totals = sorted({s.total for m in STYLES for s in schedules_for(m).values()})
        ax.set_xticks(totals, [str(t) for t in totals], minor=False)
        ax.set_xticks([], minor=True)  # the log axis's minor labels overlap the ticks
        ax.set_title(f"{sparsity:.0%} sparsity")
        ax.set_xlabel("training epochs (pruning + fine-tuning)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 on Fashion-MNIST test (%)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def body(results: dict) -> str:
    """The RESULTS.md section: command, settings, a table per model, goals, what is left."""
    from bench import schedule as study

    cells = results["cells"]
    parts = [
        "## Schedule study: ProbMask vs GMP vs magnitude + fine-tuning (issue 18)",
        "Command: `.venv/bin/python -m bench.schedule --workers 2` (resumes from "
        "bench/schedule_results.json; `--report` rewrites this section and the plot). "
        f"Fashion-MNIST, top-1 (%) on the 10k test set, median over seeds (n). {SETTINGS} "
        f"Machine: {machine(load=False)} per process, the cores shared.",
    ]
    for model in study.DENSE:
        rows = model_table(model, cells, study.schedules_for(model), study.SPARSITIES)
        if not rows:
            continue
        dense = [c["dense_top1"] for k, c in cells.items() if k.startswith(model + "/")]
        settings = study.DENSE[model]
        split = "54k" if settings["limit"] is None else f"{settings['limit'] // 1000}k"
        parts.append(
            f"### {model}: dense start {100 * dense[0]:.2f} % ({settings['epochs']} epochs, "
            f"{split} training images, seed 0)"
        )
        parts.append(markdown_table(rows, COLUMNS))
    parts.append("Goals (LeNet-5): " + "; ".join(goals(cells)) + ".")
    left = unfinished(cells, study.plan())
    parts.append("Not finished yet: " + ("; ".join(left) if left else "none") + ".")
    return "\n\n".join(parts)


SETTINGS = (
    "Every method in a row gets the same epochs (pruning + fine-tuning), batch 64, weight "
    "SGD momentum 0.9, weight decay 5e-4, cosine lr, then fine-tuning at lr 1e-3 with the "
    "mask fixed. short / medium start from the trained dense model, weight lr 0.01: "
    "ProbMask warm start (K = 1 mask sample, score lr 0.05 x 200 / steps: 0.0059 short, 0.0012 "
    "medium on LeNet-5; rows before 2026-12-02 used 0.05 unscaled and were rerun), GMP's cubic ramp over 16-60 % "
    "of the pruning epochs, magnitude+FT = one-shot global magnitude then the same epochs of "
    "training with the mask fixed. long starts from random init (seed = the cell's), weight "
    "lr 0.05: ProbMask with the paper's init and schedules (`from_scratch`, score lr 6e-3, "
    "K = 1), GMP from the dense random net, magnitude+FT = dense training (the dense "
    "recipe: one warm-up epoch, cosine), one-shot global magnitude, fine-tuning. Deltas are "
    "differences of the medians, in points."
)


def report(results: dict, write: bool = True) -> str:
    """Prints the section; with `write`, puts it in RESULTS.md and draws bench/schedule.png."""
    from bench import schedule as study

    text = body(results)
    if write:
        drawn = plot(results["cells"], study.schedules_for, study.SPARSITIES)
        text += "\n\n" + (
            "Plot: bench/schedule.png (top-1 against training epochs per sparsity)."
            if drawn
            else "No plot: matplotlib is not installed."
        )
        write_section("schedule", text)
    print(text)
    return text
