"""Benchmark of the decomposition catalogue (svd, spatial, tucker, cp, tt) at equal parameter budgets.

Three parts, all written to ``benchmarks/results/decompositions.json``:

* ``layers``: single layers of the reference ResNet-20 (trained on Fashion-MNIST; inputs are real
  Fashion-MNIST calibration images captured at the layer) and of torchvision ResNet-18 / VGG-16
  (**random initialisation**: no pretrained weights are available offline; their inputs are
  Fashion-MNIST images resized to 224x224, replicated to 3 channels and ImageNet-normalised, run
  through the random network up to the layer).  For each method and each budget (fraction of the
  layer's parameters) we pick the largest rank knob that fits and record: relative weight error,
  relative output error on the captured inputs, decomposition time, and single-thread CPU latency
  of the factorized and the dense layer at batch 1 and 32.
* ``model``: whole ResNet-20 compressed through ``rankslim.compress`` with every conv at 0.5 /
  0.25 of the conv parameters (budget expressed on the whole model), test accuracy on held-out
  Fashion-MNIST test images before any fine-tuning.
* ``tensorly``: rankslim's CP-ALS and Tucker-2 (HOSVD + HOOI) against TensorLy's ``parafac`` and
  ``partial_tucker`` on the same kernels, same ranks, same iteration count (``tol=0``).

Run ``python benchmarks/decompositions.py`` (``--quick`` for a smoke run) and then
``python benchmarks/decompositions.py --docs`` to regenerate ``docs/results/decompositions.md``.
Everything runs single-threaded (``torch.set_num_threads(1)``) so timings are comparable.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "decompositions.json"
DOCS = ROOT / "docs" / "results" / "decompositions.md"

CONV_METHODS = ["svd", "spatial", "tucker", "cp"]
LINEAR_METHODS = ["svd", "tt"]
BUDGETS = [0.5, 0.25]
CP_ITERS = 25  # ALS sweeps in the layer benchmark (tol 1e-6 may stop earlier): big kernels at rank ~1000 cost ~1 s a sweep
CP_ITERS_MODEL = 100  # ALS sweeps for whole ResNet-20 (small kernels)


class _Stop(Exception):
    """Raised by a hook to stop a forward pass once the wanted layer input is captured."""


def capture_input(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Inputs reaching ``layer`` when ``model`` runs on ``x`` (the rest of the network is skipped)."""
    got: list[torch.Tensor] = []

    def hook(mod, args):
        got.append(args[0].detach())
        raise _Stop

    h = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                try:
                    model(x[i:i + batch])
                except _Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(got)


def latency_ms(layer: nn.Module, x: torch.Tensor, budget_s: float = 0.6) -> float:
    """Median wall time (ms) of ``layer(x)`` over enough repetitions to fill about ``budget_s``."""
    with torch.inference_mode():
        layer(x)  # warm-up
        t0 = time.perf_counter()
        layer(x)
        first = time.perf_counter() - t0
        reps = max(3, min(30, int(budget_s / max(first, 1e-6))))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def knob_for_budget(method, target, budget: float) -> int | None:
    """Largest knob whose factorized layer stores at most ``budget`` of the dense parameters (bisection)."""
    limit = budget * target.dense_cost.params
    lo, hi = 1, method.max_rank(target)
    if method.cost(target, lo).params > limit:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if method.cost(target, mid).params <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F`` in float64."""
    a, b = a.double(), b.double()
    return float(torch.linalg.norm(a - b) / (torch.linalg.norm(b) or 1.0))


def fashion_inputs(n: int, size: int | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """``n`` Fashion-MNIST training images (optionally resized to ``size`` x ``size``, 3 channels, ImageNet-normalised).

    Falls back to Gaussian noise (and says so) when the dataset module is not available.
    """
    try:
        from rankslim.data import calibration_batches, load_dataset
        data = load_dataset("fashion-mnist", "train")  # calibration from train; accuracy is measured on test
        x = torch.cat(calibration_batches(data, n, batch_size=n, seed=seed))[:n]
        what = f"{n} Fashion-MNIST training images"
    except Exception as exc:  # the data module is written by another engineer; never crash the benchmark
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 28, 28, generator=g)
        what = f"{n} Gaussian-noise images (Fashion-MNIST unavailable: {type(exc).__name__})"
    if size is not None:
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        # undo the dataset normalisation only approximately: rescale to unit range, then ImageNet-normalise
        x = (x - x.amin()) / (x.amax() - x.amin() + 1e-12)
        x = x.repeat(1, 3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        x = (x - mean) / std
        what += f", resized to {size}x{size}, 3 channels, ImageNet-normalised"
    return x, what


def layer_targets(model: nn.Module, input_shape: tuple[int, ...], names: list[str]):
    from rankslim.cost import trace_shapes
    from rankslim.surgery import select_targets
    targets, _ = select_targets(model, trace_shapes(model, input_shape))
    by = {t.name: t for t in targets}
    return [by[n] for n in names if n in by]


def bench_layer(model_name: str, weights: str, target, X: torch.Tensor, input_desc: str, budgets: list[float],
                quick: bool) -> dict:
    """Every applicable method at every budget on one target; ``X``: captured inputs of the layer."""
    from rankslim.methods import DecomposeContext, get_method
    mod = target.module
    Y = None
    with torch.no_grad():
        Y = mod(X)
    x1, x32 = X[:1], X[:32] if X.shape[0] >= 32 else X.repeat(math.ceil(32 / X.shape[0]), *[1] * (X.dim() - 1))[:32]
    dense = {"params": target.dense_cost.params, "macs": target.dense_cost.macs,
             "lat_b1_ms": latency_ms(mod, x1), "lat_b32_ms": latency_ms(mod, x32)}
    W = mod.weight.detach()
    methods = CONV_METHODS if target.kind == "conv" else LINEAR_METHODS
    rows = []
    for name in methods:
        m = get_method(name)
        why = m.supports(target)
        if why:
            rows.append({"method": name, "skipped": why})
            continue
        for b in budgets:
            r = knob_for_budget(m, target, b)
            if r is None:
                rows.append({"method": name, "budget": b, "skipped": "smallest rank exceeds the budget"})
                continue
            ctx = DecomposeContext(generator=torch.Generator().manual_seed(0),
                                   options={"n_iter": 10 if quick else CP_ITERS, "tol": 1e-6})
            t0 = time.perf_counter()
            try:
                layer, info = m.decompose(target, r, ctx)
            except Exception as exc:  # e.g. the CP memory guard
                rows.append({"method": name, "budget": b, "knob": r, "skipped": f"{type(exc).__name__}: {exc}"})
                continue
            secs = time.perf_counter() - t0
            layer.eval()
            with torch.no_grad():
                out = layer(X)
                w_err = rel(layer.weight.detach(), W)
            c = m.cost(target, r)
            rows.append({"method": name, "budget": b, "knob": r, "ranks": info.get("ranks", r),
                         "params": c.params, "macs": c.macs, "weight_rel_err": w_err,
                         "output_rel_err": rel(out, Y), "decompose_s": secs,
                         "lat_b1_ms": latency_ms(layer, x1), "lat_b32_ms": latency_ms(layer, x32),
                         "n_iter": info.get("n_iter")})
            print(f"  {model_name}:{target.name} {name} b={b} r={r} w_err={w_err:.3f} "
                  f"out_err={rows[-1]['output_rel_err']:.3f} t={secs:.2f}s", flush=True)
    return {"model": model_name, "layer": target.name, "weights": weights, "input": input_desc,
            "shape": list(W.shape), "in_shape": list(target.in_shape), "out_shape": list(target.out_shape),
            "dense": dense, "results": rows}


def resnet20_part(quick: bool, budgets: list[float], n_test: int) -> tuple[list[dict], dict | None, str | None]:
    """Layer rows and the whole-model accuracy table of the reference ResNet-20 (Fashion-MNIST)."""
    try:
        from rankslim.zoo import resolve_model
        spec = resolve_model("zoo:resnet20")
    except Exception as exc:
        return [], None, f"zoo:resnet20 unavailable: {type(exc).__name__}: {exc}"
    model, shape = spec.model.eval(), tuple(spec.input_shape)
    from rankslim.cost import trace_shapes
    from rankslim.surgery import select_targets
    targets, _ = select_targets(model, trace_shapes(model, shape))
    # one representative 3x3 conv per width (16, 32, 64 channels) and the classifier
    picks, seen = [], set()
    for t in targets:
        key = (t.kind, t.module.weight.shape[0], t.module.weight.shape[1]) if t.kind == "conv" else ("linear",)
        if t.kind == "conv" and (t.module.kernel_size != (3, 3) or t.module.in_channels != t.module.out_channels):
            continue
        if key not in seen:
            seen.add(key)
            picks.append(t)
    if quick:
        picks = picks[:2]
    X, desc = fashion_inputs(64 if quick else 256)
    rows = []
    for t in picks:
        Xi = capture_input(model, t.module, X)
        rows.append(bench_layer("zoo:resnet20", "trained on Fashion-MNIST", t, Xi, desc + " (calibration)",
                                budgets, quick))
    return rows, whole_model(model, shape, targets, budgets, n_test, quick), None


def whole_model(model: nn.Module, shape, targets, budgets: list[float], n_test: int, quick: bool) -> dict:
    """Whole-model compression of the convs at a fraction of their parameters; test accuracy before fine-tuning.

    Two scopes: every conv, and every conv but the first (the 1-channel stem, which many papers leave
    dense: its error reaches every later layer while it holds almost no parameters).
    """
    import rankslim
    from rankslim.data import evaluate_accuracy, load_dataset
    test = load_dataset("fashion-mnist", "test")
    convs = [t for t in targets if t.kind == "conv"]
    total = rankslim.model_cost(model, shape).total.params
    conv_params = sum(t.dense_cost.params for t in convs)
    out = {"spec": "zoo:resnet20", "test_samples": n_test, "conv_params": conv_params, "total_params": total,
           "dense_acc": evaluate_accuracy(model, test, max_samples=n_test), "rows": []}
    scopes = [("all convs", convs), (f"convs except {convs[0].name}", convs[1:])]
    for scope, inc in scopes:
        inc_params = sum(t.dense_cost.params for t in inc)
        for name in CONV_METHODS:
            for b in budgets:
                frac = (total - inc_params + b * inc_params) / total
                t0 = time.perf_counter()
                row = {"scope": scope, "method": name, "conv_budget": b, "whole_params_fraction": frac}
                try:
                    res = rankslim.compress(model, name, params=frac, include=[t.name for t in inc], input_shape=shape, keep_head=False,
                                            method_options={"n_iter": 10 if quick else CP_ITERS_MODEL, "tol": 1e-6})
                except Exception as exc:
                    out["rows"].append({**row, "error": f"{type(exc).__name__}: {exc}"})
                    continue
                secs = time.perf_counter() - t0
                acc = evaluate_accuracy(res.model, test, max_samples=n_test)
                after = res.report.compressed
                out["rows"].append({**row, "included_params": inc_params,
                                    "included_params_after": after.params - (total - inc_params),
                                    "params": after.params, "macs": after.macs,
                                    "orig_macs": res.report.original.macs, "acc": acc, "seconds": secs,
                                    "factorized_layers": sum(1 for r in res.report.rows if r.method != "dense"),
                                    "conv_layers": len(inc)})
                print(f"  resnet20 whole [{scope}] {name} b={b} acc={acc:.4f} ({secs:.1f}s)", flush=True)
    return out


def torchvision_part(quick: bool, budgets: list[float]) -> list[dict]:
    """Representative layers of torchvision ResNet-18 and VGG-16 with random weights."""
    import torchvision
    specs = [("torchvision:resnet18", torchvision.models.resnet18, ["layer1.0.conv1", "layer4.0.conv1"]),
             ("torchvision:vgg16", torchvision.models.vgg16, ["features.10", "features.28", "classifier.6"])]
    if quick:
        specs = [("torchvision:resnet18", torchvision.models.resnet18, ["layer3.0.conv2"]),
                 ("torchvision:vgg16", torchvision.models.vgg16, ["classifier.6"])]
    X, desc = fashion_inputs(8 if quick else 32, size=224)
    rows = []
    for spec, ctor, names in specs:
        torch.manual_seed(0)
        model = ctor(weights=None).eval()
        for t in layer_targets(model, (3, 224, 224), names):
            Xi = capture_input(model, t.module, X, batch=8)
            rows.append(bench_layer(spec, "random init (no pretrained weights offline)", t, Xi,
                                    desc + "; propagated through the random network", budgets, quick))
        del model
    return rows


def tensorly_part(kernels: list[tuple[str, torch.Tensor]], n_iter: int, budget: float = 0.25,
                  max_tl_bytes: int = 2 * 1024 ** 3) -> list[dict]:
    """CP and Tucker-2: rankslim vs TensorLy on the same kernels, same rank, same iterations (tol=0)."""
    import warnings

    import tensorly as tl
    from tensorly.decomposition import parafac, partial_tucker
    # TensorLy warns when the rank exceeds a mode size (it pads the SVD init); expected here
    warnings.filterwarnings("ignore", module="tensorly")

    from rankslim.decompose.cp import cp_als, cp_to_tensor
    from rankslim.decompose.tucker import tucker2
    tl.set_backend("pytorch")
    rows = []
    for name, W in kernels:
        W64 = W.detach().double()
        N, C, kh, kw = W64.shape
        numel = W64.numel()
        # equal-parameter ranks at ``budget`` of the kernel
        R = max(1, int(budget * numel / (N + C + kh + kw)))
        t0 = time.perf_counter()
        ours = cp_als(W64, R, n_iter_max=n_iter, tol=0.0, init="svd")
        ours_s = time.perf_counter() - t0
        row = {"kernel": name, "shape": list(W64.shape), "kind": "cp", "rank": R, "n_iter": n_iter,
               "ours_s": ours_s, "ours_err": rel(cp_to_tensor(ours.weights, ours.factors), W64)}
        # TensorLy's MTTKRP forms the Khatri-Rao product of the other factors: (numel / I_k) x R
        tl_bytes = 8 * (numel // min(W64.shape)) * R * 2
        if tl_bytes > max_tl_bytes:
            row["tl_skipped"] = f"would allocate ~{tl_bytes / 2**30:.1f} GiB for the Khatri-Rao product"
        else:
            t0 = time.perf_counter()
            cp = parafac(W64, R, n_iter_max=n_iter, init="svd", tol=0.0)
            row["tl_s"] = time.perf_counter() - t0
            row["tl_err"] = rel(tl.cp_to_tensor(cp), W64)
        rows.append(row)
        print(f"  tensorly cp {name} R={R}: ours {row['ours_s']:.2f}s err {row['ours_err']:.4f} | "
              f"tl {row.get('tl_s', float('nan')):.2f}s err {row.get('tl_err', float('nan')):.4f}", flush=True)
        # Tucker-2 at ranks proportional to (C, N) with the same parameter budget
        big = max(C, N)
        r = 1
        while r < big:
            r3, r4 = math.ceil((r + 1) * C / big), math.ceil((r + 1) * N / big)
            if C * r3 + r3 * r4 * kh * kw + N * r4 > budget * numel:
                break
            r += 1
        r3, r4 = math.ceil(r * C / big), math.ceil(r * N / big)
        t0 = time.perf_counter()
        f = tucker2(W64, (r3, r4), n_iter=n_iter, tol=-1.0)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        (core, factors), _ = partial_tucker(W64, rank=[r4, r3], modes=[0, 1], n_iter_max=n_iter, init="svd", tol=0.0)
        tl_s = time.perf_counter() - t0
        approx = torch.einsum("abij,na,cb->ncij", core, factors[0], factors[1])
        rows.append({"kernel": name, "shape": list(W64.shape), "kind": "tucker2", "rank": [r3, r4], "n_iter": n_iter,
                     "ours_s": ours_s, "ours_err": f.rel_error, "tl_s": tl_s, "tl_err": rel(approx, W64)})
        print(f"  tensorly tucker {name} ({r3},{r4}): ours {ours_s:.3f}s err {f.rel_error:.4f} | "
              f"tl {tl_s:.3f}s err {rows[-1]['tl_err']:.4f}", flush=True)
    return rows


PARTS = ("resnet20", "torchvision", "tensorly")


def run(quick: bool, parts: tuple[str, ...] = PARTS, previous: dict | None = None) -> dict:
    """Run the selected ``parts``; sections not run are taken from ``previous`` (an earlier JSON)."""
    torch.set_num_threads(1)
    budgets = [0.5] if quick else BUDGETS
    t_start = time.perf_counter()
    prev = previous or {}
    out: dict = {"meta": {"torch": torch.__version__, "python": platform.python_version(),
                          "machine": platform.machine(), "processor": platform.processor() or "unknown",
                          "threads": torch.get_num_threads(), "quick": quick, "budgets": budgets,
                          "cp_iters": 10 if quick else CP_ITERS, "cp_iters_model": 10 if quick else CP_ITERS_MODEL,
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "parts_run": list(parts),
                          "seconds_by_part": dict(prev.get("meta", {}).get("seconds_by_part", {}))},
                 "notes": []}
    prev_layers = prev.get("layers", [])
    if "resnet20" in parts:
        print("ResNet-20 (Fashion-MNIST) ...", flush=True)
        t0 = time.perf_counter()
        r20_rows, model_table, why = resnet20_part(quick, budgets, 500 if quick else 2000)
        out["meta"]["seconds_by_part"]["resnet20"] = time.perf_counter() - t0
        if why:
            out["notes"].append(why)
    else:
        r20_rows = [r for r in prev_layers if r["model"].startswith("zoo:")]
        model_table = prev.get("model")
        out["notes"] += [n for n in prev.get("notes", []) if "resnet20" in n]
    if "torchvision" in parts:
        print("torchvision layers (random weights) ...", flush=True)
        t0 = time.perf_counter()
        tv_rows = torchvision_part(quick, budgets)
        out["meta"]["seconds_by_part"]["torchvision"] = time.perf_counter() - t0
    else:
        tv_rows = [r for r in prev_layers if r["model"].startswith("torchvision:")]
    out["layers"] = r20_rows + tv_rows
    out["model"] = model_table
    if "tensorly" in parts:
        # the kernels are not stored in the JSON: rebuild them (zoo checkpoint / seeded torchvision init)
        kernels = [row for row in out["layers"] if len(row["shape"]) == 4 and row["shape"][2] * row["shape"][3] > 1]
        print("rankslim vs TensorLy ...", flush=True)
        t0 = time.perf_counter()
        out["tensorly"] = tensorly_part(rebuild_kernels(kernels, quick), n_iter=10 if quick else 25)
        out["meta"]["seconds_by_part"]["tensorly"] = time.perf_counter() - t0
    else:
        out["tensorly"] = prev.get("tensorly", [])
    out["meta"]["seconds"] = sum(out["meta"]["seconds_by_part"].values())
    return out


def rebuild_kernels(rows: list[dict], quick: bool) -> list[tuple[str, torch.Tensor]]:
    """The kernels of the benchmarked conv layers (re-created: zoo checkpoint / seeded torchvision init)."""
    import torchvision
    out = []
    cache: dict[str, nn.Module] = {}
    for row in rows:
        spec = row["model"]
        if spec not in cache:
            if spec.startswith("zoo:"):
                from rankslim.zoo import resolve_model
                cache[spec] = resolve_model(spec).model
            else:
                torch.manual_seed(0)
                cache[spec] = getattr(torchvision.models, spec.split(":")[1])(weights=None)
        out.append((f"{spec}:{row['layer']}", cache[spec].get_submodule(row["layer"]).weight.detach()))
    return out[:2] if quick else out


# ----------------------------------------------------------------------------------------------- docs

def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _f(x, fmt="{:.3f}") -> str:
    return "—" if x is None else fmt.format(x)


def write_docs(data: dict, path: Path = DOCS, source: Path = RESULTS) -> Path:
    """Markdown tables generated from the benchmark JSON (never edited by hand)."""
    m = data["meta"]
    L = ["# Decomposition catalogue: benchmark results", "",
         f"Generated by `python benchmarks/decompositions.py --docs` from `{_rel(source)}` "
         f"({m['date']}, torch {m['torch']}, {m['threads']} CPU thread(s){', QUICK smoke run' if m['quick'] else ''}; "
         f"compute {m.get('seconds', 0):.0f} s). Reproduce with `python benchmarks/decompositions.py` "
         "(add `--quick` for a smoke run).", "",
         "**Data.** ResNet-20 is the reference model trained on Fashion-MNIST; its layer inputs are real "
         "Fashion-MNIST images. torchvision ResNet-18 / VGG-16 have **random initial weights** (no pretrained "
         "weights offline): their spectra are flat, so their errors show how each scheme copes with an "
         "incompressible kernel, not what a trained ImageNet network would give. Their inputs are Fashion-MNIST "
         "images resized to 224x224, replicated to 3 channels, ImageNet-normalised and propagated through the "
         "random network up to the layer.", "",
         f"**Budget** = fraction of the layer's parameters; each method gets the largest rank knob that fits. "
         f"CP-ALS runs at most {m['cp_iters']} sweeps per layer here and {m.get('cp_iters_model', m['cp_iters'])} "
         "in the whole-model table (tol 1e-6). Latency: median wall time of the layer alone, "
         "single thread, float32, `torch.inference_mode`, measured on a shared 2-core machine while other jobs ran: "
         "treat latency differences under ~30 % as noise.", ""]
    for note in data.get("notes", []):
        L += [f"> Note: {note}", ""]
    # summary generated from the rows: which scheme reconstructs best at each budget
    L += ["## Summary: lowest output error per layer and budget", "",
          "| model | layer | budget | best method (output rel. err) | runner-up | fastest batch-32 factorized (ms) "
          "vs dense |", "|---|---|---|---|---|---|"]
    for row in data["layers"]:
        for b in m["budgets"]:
            ok = [r for r in row["results"] if r.get("budget") == b and "skipped" not in r]
            if not ok:
                continue
            ok.sort(key=lambda r: r["output_rel_err"])
            fast = min(ok, key=lambda r: r["lat_b32_ms"])
            second = f"{ok[1]['method']} ({ok[1]['output_rel_err']:.3f})" if len(ok) > 1 else "—"
            L.append(f"| {row['model']} | `{row['layer']}` | {b} | {ok[0]['method']} ({ok[0]['output_rel_err']:.3f}) | "
                     f"{second} | {fast['method']} {fast['lat_b32_ms']:.2f} vs {row['dense']['lat_b32_ms']:.2f} |")
    L += ["", "## Per-layer results", ""]
    for row in data["layers"]:
        d = row["dense"]
        L += [f"### {row['model']} `{row['layer']}` — weight {'x'.join(map(str, row['shape']))}, "
              f"input {'x'.join(map(str, row['in_shape']))} ({row['weights']})", "",
              f"Dense: {d['params']:,} params, {d['macs']:,} MACs/sample, latency {d['lat_b1_ms']:.3f} ms (batch 1), "
              f"{d['lat_b32_ms']:.2f} ms (batch 32). Input: {row['input']}.", "",
              "| method | budget | rank(s) | params | MACs | weight rel. err | output rel. err | decompose s | "
              "batch-1 ms | batch-32 ms |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in row["results"]:
            if "skipped" in r:
                L.append(f"| {r['method']} | {r.get('budget', '—')} | — | — | — | — | — | — | — | {r['skipped']} |")
                continue
            L.append(f"| {r['method']} | {r['budget']} | {r['ranks']} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['weight_rel_err']:.4f} | {r['output_rel_err']:.4f} | {r['decompose_s']:.3f} | "
                     f"{r['lat_b1_ms']:.3f} | {r['lat_b32_ms']:.2f} |")
        L.append("")
    mt = data.get("model")
    if mt:
        L += ["## Whole ResNet-20, convs compressed, before fine-tuning", "",
              f"Test accuracy on {mt['test_samples']} Fashion-MNIST test images. Dense accuracy "
              f"{mt['dense_acc']:.4f}; conv parameters {mt['conv_params']:,} of {mt['total_params']:,}. "
              "Budget = fraction of the included convs' parameters (passed to `rankslim.compress` as the "
              "equivalent whole-model `params` fraction, default CPTV allocator; layers whose factorization would "
              "not save stay dense; `spatial` and `cp` skip the two 1x1 shortcut convs). Two scopes: every conv, "
              "and every conv but the 1-channel stem.", "",
              "| scope | method | budget | included params after | model params | MACs (of original) | accuracy | "
              "factorized convs | seconds |", "|---|---|---|---|---|---|---|---|---|"]
        for r in mt["rows"]:
            scope = r.get("scope", "all convs")
            if "error" in r:
                L.append(f"| {scope} | {r['method']} | {r['conv_budget']} | — | — | — | — | — | {r['error']} |")
                continue
            L.append(f"| {scope} | {r['method']} | {r['conv_budget']} | {r['included_params_after']:,} of "
                     f"{r['included_params']:,} | {r['params']:,} | {r['macs'] / r['orig_macs']:.3f} | {r['acc']:.4f} | "
                     f"{r['factorized_layers']}/{r['conv_layers']} | {r['seconds']:.1f} |")
        L.append("")
    if data.get("tensorly"):
        L += ["## rankslim vs TensorLy (same kernel, rank, iterations; `tol=0`)", "",
              "CP: rankslim `cp_als` vs `tensorly.decomposition.parafac` (both `init='svd'`, float64, PyTorch "
              "backend). Tucker-2: rankslim `tucker2` (HOSVD + HOOI) vs `partial_tucker` on modes (out, in). "
              "Ranks: the equal-parameter rank at 0.25 of the kernel.", "",
              "| kernel | shape | kind | rank | iters | rankslim s | rankslim rel. err | TensorLy s | "
              "TensorLy rel. err |", "|---|---|---|---|---|---|---|---|---|"]
        for r in data["tensorly"]:
            tl_s = _f(r.get("tl_s"), "{:.3f}") if "tl_skipped" not in r else "skipped"
            tl_e = _f(r.get("tl_err"), "{:.4f}") if "tl_skipped" not in r else r["tl_skipped"]
            L.append(f"| {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['kind']} | {r['rank']} | "
                     f"{r['n_iter']} | {r['ours_s']:.3f} | {r['ours_err']:.4f} | {tl_s} | {tl_e} |")
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run (fewer layers, budget 0.5 only)")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs table from the JSON")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated subset of resnet20,torchvision,tensorly; the others are kept from --out")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/decompositions.json; .quick.json with --quick)")
    args = ap.parse_args(argv)
    out = args.out or (RESULTS.with_name("decompositions.quick.json") if args.quick else RESULTS)
    # a smoke run never overwrites the real table in docs/
    docs = out.with_suffix(".md") if out != RESULTS else DOCS
    if args.docs:
        print(write_docs(json.loads(out.read_text()), docs, out))
        return
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    previous = json.loads(out.read_text()) if out.exists() and set(parts) != set(PARTS) else None
    data = run(args.quick, parts, previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    print(out, write_docs(data, docs, out))


if __name__ == "__main__":
    sys.exit(main())
