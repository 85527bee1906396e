"""CRD's scoring (`kernels.bank_scores`, forward and the embedding's backward) by each
implementation against the gather RepDistiller runs, over bank sizes, on the CPU or a GPU.

    python bench/bank_scores.py                     # CPU: B 64, C 16,385, E 128; N 4k to 1.28M
    python bench/bank_scores.py --device cuda       # GPU: B 256, and ImageNet's 1.28M rows

One bank, one direction (CRD scores two). Rows: `gather` (the (B, C, E) rows gathered, then
bmm: today's reference), `whole bank`, `chunked` and, on CUDA, `triton`; `rule` names the torch
path `bank_scores` picks for that N, and `x_gather` is the gather's time over each one's (above
1: faster). Steady state only: each is run `--warmup` times before it is timed (median of
`--repeats`). Writes bench/results/bank_scores_<device>.json and .png.
"""
import argparse
import importlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cocord_fast.kernels import bank_scores, bank_scores_ref
from cocord_fast.throughput.provenance import device_name, provenance, slug
from cocord_fast.throughput.settings import RESULTS

bmod = importlib.import_module("cocord_fast.kernels.bank_scores")
EMBED_DIM, COLUMNS = 128, 16385  # CRD's E and K + 1
IMAGENET_ROWS = 1_281_167
CPU_ROWS = (4_000, 16_384, 50_000, 100_000, 200_000, IMAGENET_ROWS)
GPU_ROWS = (50_000, IMAGENET_ROWS)


def forced(path: str):
    """bank_scores on the torch path `path`, whatever the rule says."""
    def call(embedding, bank, index):
        with_rule = bmod.WHOLE_BANK_MAX_ROWS_PER_COLUMN
        bmod.WHOLE_BANK_MAX_ROWS_PER_COLUMN = float("inf") if path == "whole bank" else 0
        try:
            return bank_scores(embedding, bank, index, impl="torch")
        finally:
            bmod.WHOLE_BANK_MAX_ROWS_PER_COLUMN = with_rule
    return call


def timed(fn, embedding, bank, index, grad, warmup: int, repeats: int) -> dict:
    def step():
        embedding.grad = None
        (fn(embedding, bank, index) * grad).sum().backward()
        if bank.is_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    if bank.is_cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1e3)
    row = {"ms": statistics.median(times)}
    if bank.is_cuda:
        row["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return row


def run(device: torch.device, batch: int, rows_list, warmup: int, repeats: int) -> list[dict]:
    impls = {"gather": bank_scores_ref, "whole bank": forced("whole bank"),
             "chunked": forced("chunked")}
    if device.type == "cuda":
        impls["triton"] = lambda *a: bank_scores(*a, impl="triton")
    results = []
    for rows in rows_list:
        g = torch.Generator(device=device).manual_seed(0)
        bank = F.normalize(torch.randn(rows, EMBED_DIM, device=device, generator=g), dim=1)
        embedding = F.normalize(torch.randn(batch, EMBED_DIM, device=device, generator=g),
                                dim=1).requires_grad_()
        index = torch.randint(0, rows, (batch, COLUMNS), device=device, generator=g)
        grad = torch.randn(batch, COLUMNS, device=device, generator=g)
        measured = {}
        for name, fn in impls.items():
            measured[name] = timed(fn, embedding, bank, index, grad, warmup, repeats)
        for name, row in measured.items():
            row.update(impl=name, N=rows, B=batch, C=COLUMNS, E=EMBED_DIM,
                       rule=bmod.torch_path(rows, COLUMNS),
                       x_gather=measured["gather"]["ms"] / row["ms"])
            results.append(row)
            print(f"N {rows:>9,} {name:10s} {row['ms']:9.2f} ms  x{row['x_gather']:.2f} of "
                  f"the gather's speed" + (f", peak {row['peak_mb']:.0f} MiB"
                                            if "peak_mb" in row else ""), flush=True)
        print(f"N {rows:>9,} the rule picks: {bmod.torch_path(rows, COLUMNS)}", flush=True)
    return results


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name in dict.fromkeys(r["impl"] for r in results):
        mine = [r for r in results if r["impl"] == name]
        ax.plot([r["N"] for r in mine], [r["ms"] for r in mine], marker="o", label=name)
    ratio = bmod.WHOLE_BANK_MAX_ROWS_PER_COLUMN
    ax.axvline(ratio * COLUMNS, color="grey", lw=0.8, ls="--",
               label=f"rule: whole bank up to N = {ratio} C")
    ax.set(xscale="log", yscale="log", xlabel="bank rows N",
           ylabel="forward + backward, ms (one bank)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rows", type=int, nargs="*", help="bank sizes N")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    batch = args.batch_size or (256 if on_gpu else 64)
    results = run(device, batch, args.rows or (GPU_ROWS if on_gpu else CPU_ROWS), args.warmup,
                  args.repeats)
    meta = provenance(device_name(str(device)))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bank_scores_{slug(meta['device'])}"
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": results}, indent=2) + "\n")
    plot(results, f"{meta['device']}, B {batch}, C {COLUMNS}, E {EMBED_DIM}, torch "
                  f"{meta['torch']}, commit {meta['commit']}", stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .png")


if __name__ == "__main__":
    main()
