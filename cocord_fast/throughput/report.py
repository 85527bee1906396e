"""The report of `cocord-fast bench`: JSON with provenance, a console table, a PNG."""
from __future__ import annotations

import json
from pathlib import Path

from .provenance import device_name, provenance, slug
from .settings import BenchSettings


def report_stem(settings: BenchSettings, device: str) -> str:
    """Named by pair, resolution, batch, precision, compile mode, data mode and device."""
    parts = [f"bench_{settings.teacher}_{settings.student}", f"{settings.image_size}px",
             f"b{settings.batch_size}", settings.precision]
    if settings.compile != "off":
        parts.append(f"compile-{settings.compile}")
    if settings.data != "resident":
        parts.append(settings.data)
    return "_".join(parts + [slug(device)])


def build_report(settings: BenchSettings, measured: dict) -> dict:
    device = measured["device"]
    cuda = device.type == "cuda"
    return {
        **provenance(device_name(str(device))),
        "settings": {**settings.describe(), "num_train": measured["num_train"],
                     "num_classes": measured["num_classes"], "loader": measured["loader"]},
        "timing": ("CUDA events around each step, one sync per entry and round" if cuda
                   else "host clock around each step (CPU ops run synchronously)"),
        "memory": ("CUDA allocator: held_mb (between steps) + the most a step allocated "
                   "on top" if cuda else
                   "peak_memory_mb is null: torch keeps no allocator statistics on the CPU"),
        "telemetry": measured["telemetry"],
        "compiled_graphs": measured["compiled_graphs"],
        "methods": measured["methods"],
        "floors": measured["floors"],
    }


def format_table(report: dict) -> str:
    lines = [f"{'':20s} {'img/s':>9s} {'median ms':>10s} {'p90 ms':>9s} {'warm-up s':>10s} "
             f"{'peak MB':>9s} {'bank MB':>8s} {'of floor':>9s}"]
    for row in [*report["methods"], *report["floors"]]:
        name = row.get("method") or "floor of " + ", ".join(row["floor_of"])
        peak = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        bank = f"{row['bank_bytes'] / 2 ** 20:.1f}" if "bank_bytes" in row else ""
        share = f"{row['fraction_of_floor']:.2f}" if "fraction_of_floor" in row else ""
        lines.append(f"{name:20s} {row['img_per_s']:9.1f} {row['step_ms_median']:10.1f} "
                     f"{row['step_ms_p90']:9.1f} {row['warmup_s']:10.1f} {peak:>9s} "
                     f"{bank:>8s} {share:>9s}")
    if loader := report["settings"]["loader"]:
        lines.append(f"methods read the trainer's loader ({loader}); floors use resident batches")
    if (graphs := report["compiled_graphs"]) and graphs["after_rounds"] > graphs["after_warmup"]:
        lines.append(f"warning: torch.compile built graphs during the timed rounds "
                     f"({graphs['after_warmup']} -> {graphs['after_rounds']}): raise --warmup")
    return "\n".join(lines)


def plot(report: dict, title: str, path: Path) -> None:
    """Images/s of each method beside its floor, and step times (median, p90)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    floors = {row["floor"]: row for row in report["floors"]}
    names = [row["method"] for row in methods]
    x = range(len(methods))
    fig, (rate, times) = plt.subplots(1, 2, figsize=(10, 3.8))
    rate.bar([i - 0.2 for i in x], [floors[r["floor"]]["img_per_s"] for r in methods], 0.4,
             label="model-only floor", color="#bbbbbb")
    rate.bar([i + 0.2 for i in x], [r["img_per_s"] for r in methods], 0.4,
             label="training step", color="#4477aa")
    for i, row in zip(x, methods):
        rate.text(i + 0.2, row["img_per_s"], f"{row['fraction_of_floor']:.0%}", ha="center",
                  va="bottom", fontsize=8)
    rate.set_xticks(list(x), names)
    rate.set_ylabel("images/s (label: share of floor)")
    rate.legend(fontsize=8)
    medians = [r["step_ms_median"] for r in methods]
    spread = [r["step_ms_p90"] - r["step_ms_median"] for r in methods]
    times.bar(list(x), medians, yerr=[[0] * len(methods), spread], capsize=4, color="#4477aa")
    times.set_xticks(list(x), names)
    times.set_ylabel("step ms (median, bar to p90)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, settings: BenchSettings) -> Path:
    """Writes OUT/<stem>.json and OUT/<stem>.png; returns the JSON's path."""
    settings.out.mkdir(parents=True, exist_ok=True)
    stem = settings.out / report_stem(settings, report["device"])
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    title = (f"{settings.teacher} -> {settings.student}, {settings.image_size} px, batch "
             f"{settings.batch_size}, {settings.precision}, compile {settings.compile}, "
             f"{settings.data} data, {report['device']}")
    plot(report, title, stem.with_suffix(".png"))
    print(f"wrote {json_path} and {stem.with_suffix('.png').name}")
    return json_path
