"""`cocord-fast compare RUN_DIR...`: runs side by side, from their saved config and log.

One table per student and data set (runs of other students or data sets form their own
table, said so), the first run given of each being the baseline the others are measured
against; a JSON of every row and PNG plots: per table, top-1 against epoch and against
wall-clock, each loss term against step, and images/s and the share of time spent waiting for
data against wall-clock; for the whole comparison, each run's final top-1 against its training
time and its peak memory (`summary.png`), the cost of each method's gain at a glance.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import UserError
from .methods import method_class
from .training.metrics import read_log

COLUMNS = [  # (key, header, format)
    ("run", "run", "{}"), ("method", "method", "{}"), ("teacher", "teacher", "{}"),
    ("encoder_passes", "passes", "{}"),
    ("steps", "steps", "{}"), ("state", "state", "{}"), ("top1", "top-1", "{:.2f}"),
    ("best_top1", "best", "{:.2f}"), ("top5", "top-5", "{:.2f}"),
    ("delta_top1", "Δ top-1", "{:+.2f}"), ("img_per_s", "img/s", "{:.0f}"),
    ("slowest_rank_img_per_s", "slowest rank", "{:.0f}"),
    ("data_wait_share", "data wait", "{:.0%}"),
    ("wall_s", "wall s", "{:.1f}"), ("peak_memory_mb", "peak MB", "{:.0f}"),
    ("bank_mb", "bank MB", "{:.3g}"),
]


def summarize(run_dir: Path) -> dict[str, Any]:
    """One row: the run's settings, progress, accuracy, speed and memory."""
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run directory (it has no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    records = read_log(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    starts = [r for r in records if r["kind"] == "start"]
    step = max((r["step"] for r in records), default=0)
    per_epoch = next((r["step"] / r["epoch"] for r in train if r["epoch"]), None)
    total = round(cfg.train.epochs * per_epoch) if per_epoch else None
    stop = min(total, cfg.train.max_steps or total) if total else None
    finished = bool(evals) and evals[-1]["step"] == stop
    last = evals[-1] if evals else {}
    method = method_class(cfg.method.name)
    return {
        "run": run_dir.name, "path": str(run_dir),
        "method": method.run_label(cfg), "student": cfg.model.student,
        "teacher": cfg.model.teacher if method.needs_teacher else "-",
        # Encoder passes per step (METHOD.md): what a step costs beyond the student's own.
        "encoder_passes": method.encoder_passes.total,
        "dataset": cfg.data.dataset, "steps": f"{step}/{stop or '?'}",
        "state": "finished" if finished else "in progress or stopped",
        "top1": last.get("top1"), "top5": last.get("top5"),
        "best_top1": max((r["top1"] for r in evals), default=None),
        "img_per_s": _median(train, "img_per_s"),
        # Logs of older versions have neither: None ("-" in the table).
        "slowest_rank_img_per_s": _median(train, "slowest_rank_img_per_s"),
        "data_wait_share": _median(train, "data_wait_share"),
        "wall_s": records[-1].get("wall_s") if records else None,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in train
                               if r.get("peak_memory_mb") is not None), default=None),
        "bank_mb": starts[-1]["bank_mb"] if starts else None,
        "curves": {"eval": evals, "train": train},
    }


def _median(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def group(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by student and data set, in the order given."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(f"{row['student']} on {row['dataset']}", []).append(row)
    for members in groups.values():
        baseline = members[0]["top1"]
        for row in members:
            known = row["top1"] is not None and baseline is not None
            row["delta_top1"] = row["top1"] - baseline if known else None
    return groups


def format_table(rows: list[dict]) -> str:
    return aligned([[header for _, header, _ in COLUMNS]] + [
        ["-" if row[key] is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        for row in rows])


def aligned(cells: list[list[str]]) -> str:
    """Rows of cells as text columns, each as wide as its widest cell."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def plot(title: str, rows: list[dict], stem: Path) -> list[Path]:
    """top-1 against epoch and wall-clock, every loss term against step, and images/s and
    data wait against wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for color, row in enumerate(rows):  # one colour per run in every panel
        evals = row["curves"]["eval"]
        for ax, x in zip(axes, ("epoch", "wall_s")):
            ax.plot([r.get(x) for r in evals], [r["top1"] for r in evals], marker="o", ms=3,
                    color=f"C{color}", label=f"{row['run']} ({row['method']})")
    for ax, label in zip(axes, ("epoch", "wall-clock (s)")):
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
    axes[0].legend(fontsize=7)
    accuracy = _saved(fig, stem.with_name(stem.name + "_top1.png"), title)

    terms = sorted({k for row in rows for r in row["curves"]["train"] for k in r
                    if k.startswith("loss")})
    fig, axes = plt.subplots(1, len(terms), figsize=(3.2 * len(terms), 3), squeeze=False)
    for ax, term in zip(axes[0], terms):
        for color, row in enumerate(rows):
            points = [(r["step"], r[term]) for r in row["curves"]["train"] if term in r]
            if points:
                ax.plot(*zip(*points), color=f"C{color}", label=row["run"])
        ax.set_title(term, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    losses = _saved(fig, stem.with_name(stem.name + "_losses.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for color, row in enumerate(rows):
        for ax, key in zip(axes, ("img_per_s", "data_wait_share")):
            points = [(r["wall_s"], r[key]) for r in row["curves"]["train"]
                      if r.get(key) is not None and r.get("wall_s") is not None]
            if points:
                ax.plot(*zip(*points), color=f"C{color}", label=row["run"])
    for ax, label in zip(axes, ("images/s (all ranks)", "share of time waiting for data")):
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    return [accuracy, losses, _saved(fig, stem.with_name(stem.name + "_speed.png"), title)]


def plot_summary(rows: list[dict], path: Path) -> Path:
    """Each run's final top-1 against its training time and against its peak memory, a point
    per run named by its method: the price of each method's gain in seconds and megabytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("wall_s", "peak_memory_mb"),
                              ("training time (s, wall-clock)", "peak memory (MB)")):
        for color, row in enumerate(rows):
            if row["top1"] is None or row[key] is None:
                continue
            ax.scatter(row[key], row["top1"], color=f"C{color % 10}", s=30)
            passes = row["encoder_passes"]
            ax.annotate(f"{row['method']} ({passes} pass{'' if passes == 1 else 'es'})",
                        (row[key], row["top1"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("final top-1 (%)")
        ax.grid(alpha=0.3)
    students = sorted({f"{row['student']} on {row['dataset']}" for row in rows})
    return _saved(fig, path, f"accuracy against cost: {', '.join(students)}")


def _saved(fig, path: Path, title: str | None = None) -> Path:
    import matplotlib.pyplot as plt

    if title is not None:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def seed_summary(rows_by_seed: dict[int, list[dict]]) -> list[dict[str, Any]]:
    """Per run, over the seeds: the mean and sample standard deviation of top-1, of its
    difference to the baseline and of wall-clock. Runs are matched by position: each seed's
    rows are the same stages in the same order."""
    seeds = sorted(rows_by_seed)
    summary = []
    for position, row in enumerate(rows_by_seed[seeds[0]]):
        same = [rows_by_seed[seed][position] for seed in seeds]
        entry = {"run": row["run"], "method": row["method"], "student": row["student"],
                 "seeds": seeds}
        for key in ("top1", "delta_top1", "wall_s"):
            values = [r.get(key) for r in same]
            entry[key] = None if None in values else {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        summary.append(entry)
    return summary


def format_seed_summary(summary: list[dict[str, Any]]) -> str:
    def spread(stats: dict | None, digits: int, sign: str = "") -> str:
        if stats is None:
            return "-"
        return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"

    return aligned([["run", "method", "model", "top-1", "Δ top-1", "wall s"]] + [
        [e["run"], e["method"], e["student"], spread(e["top1"], 2),
         spread(e["delta_top1"], 2, "+"), spread(e["wall_s"], 0)] for e in summary])


def compare(run_dirs: list[Path], out: Path) -> str:
    """The report for `run_dirs`; writes `out/compare.json` and the plots."""
    groups = group([summarize(Path(run)) for run in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    lines, written = [], [out / "compare.json"]
    if len(groups) > 1:
        lines.append(f"{len(groups)} tables: runs compare within one student and data set")
    for title, rows in groups.items():
        lines += ["", f"{title} (baseline: {rows[0]['run']})", format_table(rows)]
        slug = "".join(c if c.isalnum() else "_" for c in title)
        written += plot(title, rows, out / slug)
    written.append(plot_summary([row for rows in groups.values() for row in rows],
                                out / "summary.png"))
    table = [{k: v for k, v in row.items() if k != "curves"}
             for rows in groups.values() for row in rows]
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    lines += ["", "wrote " + ", ".join(str(path) for path in written)]
    return "\n".join(lines)
