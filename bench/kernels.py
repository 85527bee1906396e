"""Kernel benchmark: CoCoRD's calls of the two fused ops against what a user would otherwise
run, on a CUDA GPU.

    python bench/kernels.py           # the whole grid: 24 shapes x 5 impls x 2 precisions
                                      # (about 10 minutes, mostly torch.compile and autotuning)
    python bench/kernels.py --quick   # the target rows only: B=256 E=2048 N=16384, ResNet-50

queue_infonce: the loss exactly as CoCoRD's training step calls it (`contrast_inputs` on the
projector's output and the keys, in the autocast dtype, and the fp32 queue; then
`queue_infonce`) with impl auto (what training runs), triton and torch (the reference), against
MoCo-style logits + cross-entropy under the same autocast, eager and torch.compile'd. Forward,
backward and both, B in {64, 256}, E in {128, 2048}, N in {2048, 16384, 65536}, bf16 autocast
and fp32; peak memory of forward + backward beside each time; `ran` says which implementation
auto picked.
momentum_update_: the EMA pairs of ResNet-18 and ResNet-50 with the CoCoRD heads (projector
Linear(d, 2048) + BN + Linear(2048, 2048), predictor Linear(2048, 512) + BN + Linear(512, 2048),
their EMA copies, and the teacher head tracking the projector), against the bandwidth floor:
(bytes read + written) / the copy bandwidth of a large `copy_`. Momentum times come from CUDA
graph replays (GPU time, like the floor); `host_us` is the Python cost of one call.

bank_scores: CRD's scoring at ImageNet's shapes (B 256, C = K + 1 = 16,385, E 128, a bank of
1.28M rows; `bench/bank_scores.py` times the same over bank sizes, on the CPU too): the Triton
gather-dot against the gather and bmm RepDistiller runs and the two torch paths.

Targets (H100), B=256 E=2048 N=16384: the bf16 call at least 2x eager and 1.2x torch.compile,
the fp32 call at least as fast as eager; momentum update of ResNet-50 + heads at most 1.5x its
floor, and its host cost at most foreach's.

Writes bench/results/kernels_<gpu>.json and .csv (rows keyed by GPU, torch, triton, commit) and a
PNG plot. Without CUDA it only runs a small correctness smoke under Triton's interpreter and
exits 0, so it cannot produce CPU timings by mistake.
"""
import argparse
import copy
import csv
import json
import os
import runpy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cocord_fast.throughput.provenance import commit, slug
from cocord_fast.throughput.settings import RESULTS

TEMPERATURE = 0.07


# ------------------------------------------------------------------------------ queue_infonce

def moco_style_loss(z, keys, queue, temperature):
    """What a user would otherwise write (MoCo's logits and cross-entropy), on the same inputs
    as CoCoRD's call: under autocast its matmul runs in bf16 with a bf16 result."""
    q, k = F.normalize(z, dim=1), F.normalize(keys, dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    logits = torch.cat([positive, q @ queue.clone().T], dim=1) / temperature  # (B, N+1)
    targets = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets), None


def cocord_loss(impl: str):
    """CoCoRD's call, exactly as training makes it: `contrast_inputs` (normalise, round to the
    autocast dtype, snapshot the fp32 queue), then `queue_infonce`."""
    from cocord_fast.kernels import queue_infonce
    from cocord_fast.methods.cocord import contrast_inputs

    def loss(z, keys, queue, temperature):
        return queue_infonce(*contrast_inputs(z, keys, queue), temperature, impl=impl)
    return loss


def bench_queue_infonce(quick: bool) -> list[dict]:
    from triton.testing import do_bench

    from cocord_fast.kernels import implementations_used

    impls = {"eager": moco_style_loss,
             "compile": torch.compile(moco_style_loss, dynamic=False),
             "reference": cocord_loss("torch"), "triton": cocord_loss("triton"),
             "auto": cocord_loss("auto")}
    shapes = ([(256, 2048, 16384)] if quick else
              [(b, e, n) for b in (64, 256) for e in (128, 2048) for n in (2048, 16384, 65536)])
    rows = []
    for precision in ("bf16", "fp32"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        for B, E, N in shapes:
            # The projector's output and the keys come out of Linear layers in the autocast
            # dtype; the queue is the fp32 buffer.
            z = torch.randn(B, E, device="cuda", dtype=dtype, requires_grad=True)
            keys = torch.randn(B, E, device="cuda", dtype=dtype)
            queue = F.normalize(torch.randn(N, E, device="cuda"), dim=1)
            for name, fn in impls.items():
                row = {"kind": "queue_infonce", "impl": name, "B": B, "E": E, "N": N,
                       "precision": precision}
                try:
                    with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                        implementations_used(reset=True)
                        row.update(_time_queue_infonce(fn, z, keys, queue, do_bench))
                    row["ran"] = implementations_used().get("queue_infonce", "torch ops")
                except Exception as error:  # noqa: BLE001 - a failed impl is a row, not a crash
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                print(_describe(row), flush=True)
            del z, keys, queue
            torch.cuda.empty_cache()
    return rows


def _time_queue_infonce(fn, z, keys, queue, do_bench) -> dict:
    def forward():
        return fn(z, keys, queue, TEMPERATURE)[0]

    def both():
        forward().backward()

    for _ in range(2):  # compiles, autotunes
        both()
    torch.cuda.synchronize()
    z.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    both()
    torch.cuda.synchronize()
    result = {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
              "fwd_ms": do_bench(forward, grad_to_none=[z]),
              "both_ms": do_bench(both, grad_to_none=[z])}
    try:  # backward alone: one graph, backpropagated again and again
        loss = forward()
        result["bwd_ms"] = do_bench(lambda: loss.backward(retain_graph=True), grad_to_none=[z])
    except RuntimeError as error:  # e.g. a compiled graph that cannot retain its buffers
        result["bwd_error"] = str(error)[:200]
    return result


# --------------------------------------------------------------------------- momentum update

def momentum_pairs(arch: str):
    """(targets, sources, momenta) of a CoCoRD student `arch` with its heads, on the GPU."""
    import torchvision

    from cocord_fast.methods.heads import build_mlp

    encoder = getattr(torchvision.models, arch)(num_classes=1000)
    width = encoder.fc.in_features
    student = torch.nn.ModuleList([encoder, build_mlp(width, 2048, 2048),  # projector
                                   build_mlp(2048, 512, 2048)]).cuda()  # predictor
    ema = copy.deepcopy(student)
    teacher_head = copy.deepcopy(student[1])  # follows the projector (same-width teacher)
    sources = [*student.parameters(), *student[1].parameters()]
    targets = [*ema.parameters(), *teacher_head.parameters()]
    momenta = [0.99] * len(list(ema.parameters())) + [0.999] * len(list(teacher_head.parameters()))
    return [t.detach() for t in targets], [s.detach() for s in sources], momenta


def copy_bandwidth(do_bench) -> float:
    """Bytes per second of a 1 GiB device-to-device copy_ (read + write counted)."""
    src = torch.empty(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def bench_momentum(quick: bool, bandwidth: float) -> list[dict]:
    from triton.testing import do_bench, do_bench_cudagraph

    from cocord_fast.kernels import momentum_update_, momentum_update_ref

    compiled = torch.compile(momentum_update_ref, dynamic=False)
    impls = {"eager": momentum_update_ref, "compile": compiled,
             "triton": lambda *a: momentum_update_(*a, impl="triton")}
    rows = []
    for arch in (["resnet50"] if quick else ["resnet18", "resnet50"]):
        targets, sources, momenta = momentum_pairs(arch)
        moved = sum(3 * t.numel() * t.element_size() for t in targets)  # read t, s; write t
        floor_ms = moved / bandwidth * 1e3
        for name, fn in impls.items():
            row = {"kind": "momentum_update", "impl": name, "set": f"{arch}+heads",
                   "tensors": len(targets), "params": sum(t.numel() for t in targets),
                   "bytes": moved, "floor_ms": floor_ms}
            try:
                call = lambda: fn(targets, sources, momenta)  # noqa: E731
                for _ in range(3):  # compiles; builds the triton launch plan
                    call()
                torch.cuda.synchronize()
                row["ms"] = do_bench_cudagraph(call)  # GPU time, as the floor is
                row["wall_ms"] = do_bench(call)  # with the host's per-call work
                started = time.perf_counter()
                for _ in range(20):
                    call()
                row["host_us"] = (time.perf_counter() - started) / 20 * 1e6
                torch.cuda.synchronize()
                row["x_floor"] = row["ms"] / floor_ms
            except Exception as error:  # noqa: BLE001
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(_describe(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ report

def _describe(row: dict) -> str:
    if "error" in row:
        return f"{row['kind']} {row['impl']}: {row['error']}"
    if row["kind"] == "bank_scores":
        return (f"bank_scores B={row['B']} C={row['C']} N={row['N']} {row['impl']:10s} "
                f"fwd+bwd {row['ms']:.3f} ms, peak {row['peak_mb']:.0f} MiB, "
                f"x{row['x_gather']:.2f} the gather's speed")
    if row["kind"] == "queue_infonce":
        bwd = f"{row['bwd_ms']:.3f}" if "bwd_ms" in row else "n/a"
        return (f"queue_infonce B={row['B']} E={row['E']} N={row['N']} {row['precision']} "
                f"{row['impl']:9s} fwd {row['fwd_ms']:.3f} bwd {bwd} "
                f"both {row['both_ms']:.3f} ms, peak {row['peak_mb']:.0f} MiB ({row['ran']})")
    return (f"momentum {row['set']} ({row['params'] / 1e6:.1f}M) {row['impl']:7s} "
            f"{row['ms']:.3f} ms (floor {row['floor_ms']:.3f}, x{row['x_floor']:.2f}), "
            f"wall {row['wall_ms']:.3f} ms, host {row['host_us']:.0f} us")


def check_targets(rows: list[dict]) -> list[str]:
    lines = []
    def pick(**kw):
        return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())
                     and "error" not in r), None)
    for precision in ("bf16", "fp32"):
        case = dict(kind="queue_infonce", B=256, E=2048, N=16384, precision=precision)
        auto, eager, compiled = (pick(**case, impl=i) for i in ("auto", "eager", "compile"))
        if auto and eager:  # what training runs (train.kernels=auto) against a user's code
            s = eager["both_ms"] / auto["both_ms"]
            lines.append(f"{precision} queue_infonce fwd+bwd ({auto['ran']}) vs eager: {s:.2f}x "
                         f"(target >= {2 if precision == 'bf16' else 1}): "
                         f"{'met' if s >= (2 if precision == 'bf16' else 1) else 'MISSED'}")
        if auto and compiled and precision == "bf16":
            s = compiled["both_ms"] / auto["both_ms"]
            lines.append(f"bf16 queue_infonce fwd+bwd vs torch.compile: {s:.2f}x (target >= "
                         f"1.2): {'met' if s >= 1.2 else 'MISSED'}")
    crd = pick(kind="bank_scores", impl="triton")
    if crd:
        lines.append(f"CRD's scoring (Triton) at N={crd['N']}: x{crd['x_gather']:.2f} the "
                     f"gather's speed")
    mom = [pick(kind="momentum_update", set="resnet50+heads", impl=i) for i in ("triton", "eager")]
    if all(mom):
        lines.append(f"momentum host cost per call: {mom[0]['host_us']:.0f} us (Triton) vs "
                     f"{mom[1]['host_us']:.0f} us (foreach): "
                     f"{'met' if mom[0]['host_us'] <= mom[1]['host_us'] else 'MISSED'}")
    mom = pick(kind="momentum_update", set="resnet50+heads", impl="triton")
    if mom:
        lines.append(f"momentum ResNet-50+heads: {mom['x_floor']:.2f}x its floor (target <= 1.5):"
                     f" {'met' if mom['x_floor'] <= 1.5 else 'MISSED'}")
    return lines


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5),
                                      gridspec_kw={"width_ratios": [3, 1]})
    ok = [r for r in rows if r["kind"] == "queue_infonce" and "error" not in r]
    cases = sorted({(r["precision"], r["B"], r["E"], r["N"]) for r in ok})
    for i, impl in enumerate(("eager", "compile")):
        speedups = []
        for case in cases:
            mine = [r for r in ok if (r["precision"], r["B"], r["E"], r["N"]) == case]
            base = next((r for r in mine if r["impl"] == impl), None)
            tri = next((r for r in mine if r["impl"] == "auto"), None)
            speedups.append(base["both_ms"] / tri["both_ms"] if base and tri else 0)
        left.bar([x + 0.4 * i for x in range(len(cases))], speedups, width=0.4,
                 label=f"CoCoRD's call (auto) vs {impl}")
    left.axhline(1, color="grey", lw=0.8)
    left.set_xticks([x + 0.2 for x in range(len(cases))],
                    [f"{d} B{b} E{e}\nN{n}" for d, b, e, n in cases], fontsize=6,
                    rotation=90)
    left.set_ylabel("queue_infonce fwd+bwd speedup")
    left.legend(fontsize=8)
    mom = [r for r in rows if r["kind"] == "momentum_update" and "error" not in r]
    labels = [f"{r['set'].split('+')[0]}\n{r['impl']}" for r in mom]
    right.bar(range(len(mom)), [r["x_floor"] for r in mom], color="#4477aa")
    right.axhline(1.5, color="red", lw=0.8, label="target 1.5x")
    right.set_xticks(range(len(mom)), labels, fontsize=7)
    right.set_ylabel("momentum update time / bandwidth floor")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(rows: list[dict], meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"kernels_{slug(meta['gpu'])}"
    keyed = [{**{k: meta[k] for k in ("gpu", "torch", "triton", "commit")}, **r} for r in rows]
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": keyed}, indent=2) + "\n")
    fields = list(dict.fromkeys(k for r in keyed for k in r))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keyed)
    plot(rows, f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, "
               f"commit {meta['commit']}", stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .csv, .png")


# ------------------------------------------------------------------------------------- smoke

def smoke() -> bool:
    """Triton's interpreter on tiny shapes: the kernels still agree with their references."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first defined
    from cocord_fast.kernels import (bank_scores, bank_scores_ref, momentum_update_,
                                     momentum_update_ref, queue_infonce, queue_infonce_ref)

    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        q, k, queue = (F.normalize(torch.randn(n, 33), dim=1).to(dtype) for n in (5, 5, 77))
        grads = []
        for fn in (queue_infonce_ref, lambda *a: queue_infonce(*a, impl="triton")):
            x = q.clone().requires_grad_()
            loss, top1 = fn(x, k, queue, TEMPERATURE)
            (0.37 * loss).backward()
            grads.append((loss.detach(), top1, x.grad.float()))
        (l0, t0, g0), (l1, t1, g1) = grads
        good = (torch.allclose(l0, l1, rtol=1e-5) and t0 == t1
                and torch.allclose(g0, g1, rtol=1e-2, atol=1e-5))
        print(f"queue_infonce {str(dtype):15s} {'ok' if good else 'MISMATCH'}")
        ok &= good
    targets = [torch.randn(n) for n in (1, 7, 300)]
    sources = [torch.randn(n) for n in (1, 7, 300)]
    expected = [t.clone() for t in targets]
    momentum_update_ref(expected, sources, [0.9, 0.0, 0.999])
    momentum_update_(targets, sources, [0.9, 0.0, 0.999], impl="triton")
    good = all(torch.allclose(t, e, rtol=1e-6, atol=1e-7) for t, e in zip(targets, expected))
    print(f"momentum_update_ {'ok' if good else 'MISMATCH'}")
    ok &= good
    embedding, bank = (F.normalize(torch.randn(n, 40), dim=1) for n in (3, 50))
    index = torch.randint(0, 50, (3, 37))
    scores = [fn(embedding, bank, index) for fn in
              (bank_scores_ref, lambda *a: bank_scores(*a, impl="triton"))]
    good = torch.allclose(*scores, rtol=1e-5, atol=1e-6)
    print(f"bank_scores {'ok' if good else 'MISMATCH'}")
    return ok and good


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target rows only")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["queue_infonce", "momentum", "bank_scores"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py times GPU kernels and needs a CUDA GPU; no timings on this "
              "machine. Running the interpreter correctness smoke instead.")
        sys.exit(0 if smoke() else 1)

    import triton

    # One compile per shape: allow more recompiles than dynamo's default before it gives up.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    from triton.testing import do_bench

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "copy_gbs": copy_bandwidth(do_bench) / 1e9}
    print(f"{meta['gpu']}: copy bandwidth {meta['copy_gbs']:.0f} GB/s", flush=True)
    rows = []
    if "queue_infonce" not in args.skip:
        rows += bench_queue_infonce(args.quick)
    if "momentum" not in args.skip:
        rows += bench_momentum(args.quick, meta["copy_gbs"] * 1e9)
    if "bank_scores" not in args.skip:
        crd_scoring = runpy.run_path(str(Path(__file__).with_name("bank_scores.py")))
        rows += [{"kind": "bank_scores", **row} for row in crd_scoring["run"](
            torch.device("cuda"), 256, [crd_scoring["IMAGENET_ROWS"]], warmup=2, repeats=5)]
    for line in check_targets(rows):
        print(line)
    write(rows, meta, args.out)


if __name__ == "__main__":
    main()
