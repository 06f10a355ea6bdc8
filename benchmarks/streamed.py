"""Layer-streamed compression of a ~1B-parameter Llama-style model with far less memory than the model's size.

    python benchmarks/streamed.py                 # the 1B runs: benchmarks/results/streamed.json + docs page
    python benchmarks/streamed.py --tiny          # a seconds-long smoke run (streamed.tiny.json / .md)
    python benchmarks/streamed.py --docs          # regenerate docs/results/streamed.md from the JSON
    python benchmarks/streamed.py --cleanup       # ... and remove the checkpoint and outputs it wrote

* **Model**: ``transformers.LlamaForCausalLM`` with TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 layers,
  32 heads, 4 KV heads, vocabulary 32,000), random weights (normal, std 0.02, norms 1; nothing can be downloaded
  here).  The checkpoint is written shard by shard (one per block, Hugging Face layout with
  ``model.safetensors.index.json`` and ``config.json``) from the meta-device skeleton, so the full model is never
  built, not even to write it; it is reused when ``--workdir`` already holds it.
* **Calibration**: real English text shipped with Python (standard-library docstrings, the text helper and word
  tokenizer of ``benchmarks/transformers.py``): the sentences are tokenized, joined into one token stream and cut
  into ``--samples`` sequences of ``--tokens`` tokens (no padding: streamed mode needs one length).
* **Runs** (``--runs METHOD[:BLOCKS],...``, default ``svd,zhang:1``): :func:`rankslim.compress_streamed` keeping
  ``--params`` of each block's Linear parameters (CPTV inside each block), sequential.  ``zhang:1`` streams only
  the first block (of the same checkpoint): data-aware ``zhang`` costs minutes per block on 2 shared cores
  (dense float64 ``eigh``/SVD of each layer's statistics), so one block measures its per-block time and peak;
  ``--runs zhang`` streams all 22.
* **Measured**: wall seconds (total and per block), the process's peak resident memory during each run
  (``VmHWM`` after resetting it with ``/proc/self/clear_refs``, so checkpoint writing and earlier runs do not
  count), the model's size on disk and in memory, the compressed size, each block's hidden-state error on the
  calibration text, and the load average (the machine is shared).  ``--tiny`` also checks the streamed model
  against the in-memory ``rankslim.compress`` with the same ranks.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

# run as a script, this file's folder comes first on sys.path and `import transformers` would import
# benchmarks/transformers.py instead of Hugging Face's package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "streamed.json"
DOC = ROOT / "docs" / "results" / "streamed.md"
INDEX = "model.safetensors.index.json"
#: TinyLlama-1.1B's shape
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=256)

sys.path.insert(0, str(ROOT))
import rankslim  # noqa: E402
from rankslim.bench import reset_peak_rss, rss_bytes  # noqa: E402
from rankslim.stream import empty_model, find_blocks  # noqa: E402


def _text_helpers():
    """``stdlib_sentences`` and ``WordTokenizer`` from benchmarks/transformers.py (loaded by path: its name would
    shadow Hugging Face's package)."""
    spec = importlib.util.spec_from_file_location("_bench_transformers", ROOT / "benchmarks" / "transformers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod.stdlib_sentences, mod.WordTokenizer


def llama_config(shape: dict):
    import transformers
    cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def write_checkpoint(cfg, directory: Path, seed: int = 0) -> list[Path]:
    """A random-weight checkpoint of ``cfg`` in Hugging Face's sharded layout, one shard per block (plus one for the
    embeddings and one for the final norm and LM head), generated shard by shard from the meta skeleton.

    Reused when ``directory`` already holds a complete checkpoint of the same config."""
    import transformers
    from safetensors.torch import save_file
    directory.mkdir(parents=True, exist_ok=True)
    stamp = directory / "config.json"
    index_file = directory / INDEX
    if stamp.is_file() and index_file.is_file():
        old = json.loads(stamp.read_text())
        index = json.loads(index_file.read_text())
        files = sorted({directory / f for f in index["weight_map"].values()})
        if all(old.get(k) == v for k, v in cfg.to_diff_dict().items() if k in FULL) and all(f.is_file() for f in files):
            return files
    skeleton = empty_model(lambda: transformers.LlamaForCausalLM(cfg))
    path, blocks = find_blocks(skeleton, "model.layers")
    state = skeleton.state_dict()
    groups: list[list[str]] = [[k for k in state if not k.startswith(path + ".") and "embed" in k]]
    groups += [[k for k in state if k.startswith(f"{path}.{i}.")] for i in range(len(blocks))]
    groups.append([k for k in state if not k.startswith(path + ".") and "embed" not in k])
    weight_map, files = {}, []
    for g, keys in enumerate(groups):
        gen = torch.Generator().manual_seed(seed * 1000 + g)
        tensors = {}
        for k in keys:
            shape = tuple(state[k].shape)
            tensors[k] = (torch.ones(shape) if "norm" in k
                          else torch.randn(shape, generator=gen).mul_(cfg.initializer_range))
        name = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        tmp = directory / (name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / name)
        weight_map.update({k: name for k in keys})
        files.append(directory / name)
        del tensors
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg.to_json_file(str(stamp))
    return files


def calibration_tokens(samples: int, tokens: int, vocab: int) -> tuple[torch.Tensor, dict]:
    """``(samples, tokens)`` token ids cut from one stream of tokenized standard-library sentences."""
    stdlib_sentences, WordTokenizer = _text_helpers()
    sentences = stdlib_sentences()
    tok = WordTokenizer(sentences, size=min(1000, vocab - 2))
    stream = [tok.vocab.get(w, 1) for s in sentences for w in tok.words(s)]
    need = samples * tokens
    if len(stream) < need:
        raise SystemExit(f"the text gives {len(stream):,} tokens; {need:,} are needed: lower --samples/--tokens")
    ids = torch.tensor(stream[:need]).reshape(samples, tokens)
    return ids, {"sentences": len(sentences), "vocab": len(tok.vocab), "stream_tokens": len(stream)}


def _commit() -> str | None:
    """The repository's HEAD (short hash, ``+`` when the tree has changes), or None outside a git checkout.
    Read once, when the script starts: the code a run imports is the code of that moment."""
    return _COMMIT


def _read_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


_COMMIT = _read_commit()


def _du(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def parse_runs(text: str) -> list[tuple[str, int | None]]:
    """``"svd,zhang:1"`` -> ``[("svd", None), ("zhang", 1)]``: a method and how many blocks (``None``: all)."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        method, _, blocks = item.partition(":")
        out.append((method, int(blocks) if blocks else None))
    return out


STAGES = ("calibrate", "cost_table", "allocate", "build")


@contextlib.contextmanager
def stage_peaks(record: list) -> Iterator[list]:
    """Record the resident memory at the start, peak and end of each pipeline stage of every block
    (``rankslim.pipeline``'s functions, wrapped while the context is open).  The peak counter is reset at
    each stage, so the run's overall peak is kept in the yielded ``[bytes]`` instead."""
    from rankslim import pipeline
    saved = {n: getattr(pipeline, n) for n in STAGES}
    best = [0]

    def wrap(name: str, fn):
        def staged(*a, **k):
            best[0] = max(best[0], rss_bytes()[1])
            start = rss_bytes()[0]
            reset_peak_rss()
            try:
                return fn(*a, **k)
            finally:
                cur, peak = rss_bytes()
                best[0] = max(best[0], peak)
                record.append({"stage": name, "start_bytes": start, "peak_bytes": peak, "end_bytes": cur})
        return staged
    for n in STAGES:
        setattr(pipeline, n, wrap(n, saved[n]))
    try:
        yield best
    finally:
        for n, fn in saved.items():
            setattr(pipeline, n, fn)


def stream_one(cfg, ckpt_dir: Path, out_dir: Path, ids: torch.Tensor, method: str, params: float,
               blocks: int | None, in_memory_check: bool, stages: bool = False, compact_heap: bool = True) -> dict:
    """One streamed run (``blocks``: the first N blocks only, read from the same checkpoint) and its figures."""
    import transformers
    from safetensors.torch import load_file
    shape = cfg.to_dict()
    if blocks is not None:
        cfg = transformers.LlamaConfig.from_dict({**shape, "num_hidden_layers": blocks})
    build = lambda: transformers.LlamaForCausalLM(cfg)  # noqa: E731
    n_params = sum(p.numel() for p in empty_model(build).parameters())
    load_before = os.getloadavg()[0]
    reset = reset_peak_rss()
    rss0 = rss_bytes()[0]
    staged: list = []
    with (stage_peaks(staged) if stages else contextlib.nullcontext([0])) as best:
        res = rankslim.compress_streamed(build, ckpt_dir, out_dir, data=ids, method=method, params=params,
                                         calib_samples=len(ids), progress=True, compact_heap=compact_heap)
    peak = max(best[0], rss_bytes()[1]) if stages else res.peak_rss_bytes
    out_files = [out_dir / f for f in json.loads((out_dir / "streamed.json").read_text())["files"]]
    row = {
        "method": method, "blocks": cfg.num_hidden_layers, "parameters": n_params, "params_per_block": params,
        "sequential": True, "model_memory_bytes": 4 * n_params,
        "output_disk_bytes": _du(out_files), "output_tensor_bytes": res.output_bytes,
        "params_before": res.params_before, "params_after": res.params_after,
        "target_params_before": sum(b.target_params_before for b in res.blocks),
        "target_params_after": sum(b.target_params_after for b in res.blocks),
        "seconds": res.seconds, "block_seconds": [b.seconds for b in res.blocks],
        "hidden_rel_error": [b.hidden_rel_error for b in res.blocks],
        "rss_after_block_bytes": [b.rss_bytes for b in res.blocks],
        "rss_at_start_bytes": rss0, "peak_rss_bytes": peak, "peak_reset": reset,
        "load_before": load_before, "load_after": os.getloadavg()[0], "notes": res.notes, "commit": _commit(),
        "compact_heap": compact_heap,
    }
    if stages:
        row["stages"] = staged
    if in_memory_check:
        # the small model fits in memory: the streamed result must equal the in-memory run with the same ranks
        model = build().eval()
        state = {k: v for f in sorted(ckpt_dir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
        model.load_state_dict({k: state[k] for k in model.state_dict()})
        ranks = {lp.name: lp.info["rank"] for lp in res.plan.layers}
        ref = rankslim.compress(model, method, ranks=ranks, data=ids, calib_samples=len(ids))
        loaded = rankslim.load_streamed(out_dir, build)
        with torch.no_grad():
            row["max_abs_logit_diff_vs_in_memory"] = float((loaded(ids).logits - ref.model(ids).logits).abs().max())
    return row


def run(args: argparse.Namespace) -> dict:
    import transformers
    torch.set_num_threads(args.threads)
    cfg = llama_config(dict(TINY if args.tiny else FULL))
    work = Path(args.workdir) / ("tiny" if args.tiny else "full")
    ckpt_dir = work / "checkpoint"
    t0 = time.perf_counter()
    files = write_checkpoint(cfg, ckpt_dir)
    write_s = time.perf_counter() - t0
    ids, text = calibration_tokens(args.samples, args.tokens, cfg.vocab_size)
    n_params = sum(p.numel() for p in empty_model(lambda: transformers.LlamaForCausalLM(cfg)).parameters())
    print(f"checkpoint: {n_params:,} parameters, {_du(files) / 2**30:.2f} GiB in {len(files)} shards "
          f"({write_s:.0f}s to write); calibration {tuple(ids.shape)} tokens", flush=True)
    runs = {}
    for method, blocks in parse_runs(args.runs):
        key = f"{method}:{blocks if blocks else 'all'}"
        print(f"--- {key}", flush=True)
        out_dir = work / f"compressed-{method}-{blocks if blocks else 'all'}"
        runs[key] = stream_one(cfg, ckpt_dir, out_dir, ids, method, args.params, blocks, args.tiny, args.stages,
                               not args.no_compact_heap)
        if args.cleanup:
            shutil.rmtree(out_dir)  # the streamed output this run wrote
    ckpt_bytes = _du(files)  # before --cleanup deletes the files
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "threads": args.threads, "cpus": os.cpu_count(), "machine": platform.machine(),
           "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    if args.cleanup:
        for f in [*files, ckpt_dir / INDEX, ckpt_dir / "config.json"]:
            f.unlink(missing_ok=True)
        for d in (ckpt_dir, work):
            try:
                d.rmdir()
            except OSError:
                pass
    return {"env": env, "tiny": bool(args.tiny), "config": cfg.to_diff_dict() | {k: getattr(cfg, k) for k in FULL},
            "parameters": n_params, "checkpoint_files": len(files), "checkpoint_disk_bytes": ckpt_bytes,
            "checkpoint_write_seconds": write_s,
            "calibration": {"samples": args.samples, "tokens_per_sample": args.tokens, "tokens": int(ids.numel()),
                            **text},
            "runs": runs,
            "commands": {key: "OMP_NUM_THREADS={t} python benchmarks/streamed.py{tiny} --threads {t} --samples {s} "
                              "--tokens {n} --params {p} --runs {r}".format(
                                  t=args.threads, tiny=" --tiny" if args.tiny else "", s=args.samples, n=args.tokens,
                                  p=args.params, r=key.replace(":all", "")) for key in runs}}


def merge(old: dict | None, new: dict) -> dict:
    """``new`` with the runs of ``old`` it did not redo, when both used the same model, checkpoint and calibration
    (each run can then have a fresh process: its peak memory owes nothing to an earlier run)."""
    same = old is not None and all(old.get(k) == new.get(k) for k in ("tiny", "config", "calibration", "parameters"))
    if not same:
        return new
    runs = {**old.get("runs", {}), **new["runs"]}
    for key, row in new["runs"].items():  # a redone run keeps the figures it replaces, for the docs' history
        prev = old.get("runs", {}).get(key)
        if prev is not None:
            runs[key] = {**row, "previous": [*prev.get("previous", []), {
                k: prev.get(k) for k in ("peak_rss_bytes", "seconds", "block_seconds", "hidden_rel_error", "commit")}]}
    commands = {**old.get("commands", {}), **new["commands"]}
    return {**new, "runs": runs, "commands": commands}


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def write_docs(res: dict, doc: Path = DOC) -> str:
    env, c, cal = res["env"], res["config"], res["calibration"]
    runs = res["runs"]
    full = [r for r in runs.values() if r["blocks"] == c["num_hidden_layers"]]
    lines = [
        "# Layer-streamed compression of a 1B-parameter model", "",
        "*Generated by `python benchmarks/streamed.py` (raw numbers in `benchmarks/results/streamed.json`)"
        + ("; this is a --tiny smoke run" if res.get("tiny") else "") + ".*", "",
        f"A Llama-style model of **{res['parameters'] / 1e9:.2f} B parameters** (`LlamaForCausalLM` with TinyLlama-1.1B's "
        f"shape: hidden {c['hidden_size']}, MLP {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
        f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, vocabulary {c['vocab_size']:,}; "
        f"random weights, std 0.02), written as a float32 safetensors checkpoint of **{_gib(res['checkpoint_disk_bytes'])}** "
        f"({res['checkpoint_files']} shards, generated shard by shard: the full model was never built), compressed "
        "by `rankslim.compress_streamed` one block at a time, keeping half of each block's Linear parameters "
        "(CPTV inside each block), sequential.", "",
        f"Calibration: {cal['samples']} sequences of {cal['tokens_per_sample']} tokens ({cal['tokens']:,} tokens) of "
        f"English text shipped with Python (standard-library docstrings, {cal['sentences']:,} sentences, word-level "
        f"vocabulary of {cal['vocab']:,} entries built from them; not a pretrained tokenizer), cut from one token "
        "stream (no padding).", "",
        "| run | blocks streamed | wall time | s per block | **peak RSS** | RSS at start | model (float32) | Linear params kept | output on disk | hidden-state error after the last block |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in runs.items():
        per = r["block_seconds"]
        lines.append(
            f"| `{r['method']}` | {r['blocks']} of {c['num_hidden_layers']} | {r['seconds']['total'] / 60:.1f} min | "
            f"{sum(per) / len(per):.0f} | **{_gib(r['peak_rss_bytes'])}** | {_gib(r['rss_at_start_bytes'])} | "
            f"{_gib(r['model_memory_bytes'])} | {100 * r['target_params_after'] / r['target_params_before']:.1f}% | "
            f"{_gib(r['output_disk_bytes'])} | {r['hidden_rel_error'][-1]:.4f} |")
    lines += [
        "", "- **peak RSS**: the process's `VmHWM`, reset (`/proc/self/clear_refs`) just before the run, so it covers "
        "the compression alone; it includes what was resident at the start (Python, torch, transformers, the "
        "calibration tokens). **model (float32)**: the parameters the run streamed, at 4 bytes each.",
        "- **hidden-state error**: `‖h_compressed − h_original‖ / ‖h_original‖` after the block, on the calibration "
        "sequences. With random weights it says how well the compressed blocks reproduce the original function, "
        "not a task accuracy. Random Gaussian weights have flat spectra, so the data-free `svd` at half the "
        "parameters loses about as much as it keeps, while `zhang` fits the (far from white) hidden states.", ""]
    zh = [r for r in runs.values() if r["method"] != "svd" and r["blocks"] < c["num_hidden_layers"]]
    zh_full = [r for r in full if r["method"] != "svd"]
    model_bytes = res["checkpoint_disk_bytes"]
    pct = lambda b: f"{100 * b / model_bytes:.0f}%"  # noqa: E731
    if (zh or zh_full) and not res.get("tiny"):
        lines += ["## The data-aware run: time and peak", ""]
        if zh_full:
            f = zh_full[0]
            per_full = sum(f["block_seconds"]) / len(f["block_seconds"])
            lines += [
                f"`zhang` streamed all {f['blocks']} blocks in **{f['seconds']['total'] / 60:.0f} min** "
                f"({per_full:.0f} s per block) with a **peak of {_gib(f['peak_rss_bytes'])}**, {pct(f['peak_rss_bytes'])} "
                f"of the {_gib(model_bytes)} model; between blocks the resident memory stays at "
                f"{_gib(max(f['rss_after_block_bytes']))}, so a deeper model of the same width peaks at the same "
                "figure.", ""]
        else:
            lines += ["Run all blocks with `--runs zhang`.", ""]
        history = [(r, p) for r in [*zh_full, *zh] for p in r.get("previous", [])]
        if history:
            lines += ["The runs above (now) and earlier runs of the same command (same checkpoint and calibration; "
                      "the one-block run at bd8dd58 used one thread), before the changes described below:", "", "| run | commit | s per block | peak RSS | share of the model | hidden-state error |",
                      "|---|---|---|---|---|---|"]
            for r, p in [(r, None) for r in [*zh_full, *zh]] + history:
                q = p or r
                per = sum(q["block_seconds"]) / len(q["block_seconds"])
                lines.append(f"| {r['blocks']} block(s){'' if p else ' (now)'} | {q.get('commit') or '?'} | {per:.0f} | "
                             f"{_gib(q['peak_rss_bytes'])} | {pct(q['peak_rss_bytes'])} | {q['hidden_rel_error'][-1]:.4f} |")
            lines.append("")
        staged = next((r for r in [*zh, *zh_full] if r.get("stages")), None)
        if staged is not None:
            lines += [
                f"Where the peak comes from (`--stages`, the {staged['blocks']}-block run: resident memory around each "
                "pipeline stage of the block, the peak counter reset at each):", "",
                "| stage | RSS at start | peak | RSS at end |", "|---|---|---|---|"]
            for st in staged["stages"]:
                lines.append(f"| `{st['stage']}` | {_gib(st['start_bytes'])} | {_gib(st['peak_bytes'])} | "
                             f"{_gib(st['end_bytes'])} |")
            lines.append("")
        lines += [
            "The process holds Python, torch and transformers before any block is read "
            + (f"({_gib(zh_full[0]['rss_at_start_bytes'])} at the start). " if zh_full else ". ")
            + "During a block it also holds the block, the calibrator's original copy of it, the hidden states and "
            "each layer's float64 statistics (`XXᵀ` of the 5632-wide MLP input alone is 254 MB); the top of the peak "
            "is the data-aware solve of that widest layer. That solve whitens through a Cholesky factor of the damped "
            "input covariance, computed in its own storage (`rankslim.linalg.psd_factor`), and truncates the "
            "whitened weight from the Gram matrix of its smaller side, so it holds one `k × k` float64 matrix "
            "beside the statistics; it used to build `A^{-1/2}` from `eigh` (eigenvectors, workspace, a scaled "
            "copy and the result: five such matrices at once, and four times the time). The allocation spectra "
            "take the same route and are no longer kept in the SVD cache until the block is built. The solution "
            "is the same (the hidden-state errors above agree to four digits)."
            + (" The runs now fix glibc's malloc thresholds (`compress_streamed(compact_heap=True)`, the CLI's "
               "default): with them left dynamic, one block's freed float64 temporaries fragmented the heap for the "
               "next and the peak grew from block to block (the 7b10a78 row)."
               if any(r.get("compact_heap") for r in [*zh, *zh_full]) else ""), ""]
    for r in full:
        lines += [f"## `{r['method']}`, all {r['blocks']} blocks: resident memory after each block", "",
                  "| block | seconds | hidden-state error | RSS after it |", "|---|---|---|---|"]
        for i, (s, e, m) in enumerate(zip(r["block_seconds"], r["hidden_rel_error"], r["rss_after_block_bytes"])):
            lines.append(f"| {i} | {s:.1f} | {e:.4f} | {_gib(m)} |")
        lines.append("")
    loads = [x for r in runs.values() for x in (r["load_before"], r["load_after"])]
    lines += [
        "## Reproduce", "",
        "Each run in its own process (the checkpoint, under `--workdir`, default `/tmp/rankslim-1b`, is written by "
        "the first and reused; `--cleanup` removes it and the outputs afterwards):", "",
        "```bash", *res["commands"].values(), "```", "",
        f"Environment: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}, "
        f"{env['cpus']} CPUs ({env['threads']} thread(s) used), {_gib(env['memory_total_bytes'])} RAM; 1-minute load "
        f"average {min(loads):.1f}–{max(loads):.1f} during the runs"
        + (" — **measured under load** on a machine shared with other jobs: the times are indicative." if max(loads) > 1.5
           else "."), ""]
    checks = {k: r["max_abs_logit_diff_vs_in_memory"] for k, r in runs.items() if "max_abs_logit_diff_vs_in_memory" in r}
    if checks:
        lines += ["In-memory check (tiny run only): max |logit difference| against `rankslim.compress` with the same "
                  "ranks: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()) + ".", ""]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke run on a tiny config")
    ap.add_argument("--docs", action="store_true", help="only regenerate the docs page from the JSON")
    ap.add_argument("--workdir", default="/tmp/rankslim-1b", help="where the checkpoint and output are written")
    ap.add_argument("--runs", default=None, help="METHOD[:BLOCKS],... streamed runs on the same checkpoint "
                    "(BLOCKS: only the first N blocks); default 'svd,zhang:1' (--tiny: 'svd,zhang')")
    ap.add_argument("--params", type=float, default=0.5, help="fraction of each block's Linear parameters kept")
    ap.add_argument("--samples", type=int, default=16, help="calibration sequences")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per calibration sequence")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--cleanup", action="store_true", help="remove the checkpoint and output this run wrote")
    ap.add_argument("--no-compact-heap", action="store_true", help="leave glibc's malloc thresholds dynamic "
                    "(compress_streamed(compact_heap=False), the API's default)")
    ap.add_argument("--stages", action="store_true", help="also record each pipeline stage's resident memory "
                    "(start, peak, end) per block")
    args = ap.parse_args(argv)
    results = RESULTS.with_name("streamed.tiny.json") if args.tiny else RESULTS
    doc = DOC.with_name("streamed.tiny.md") if args.tiny else DOC
    if args.docs:
        res = json.loads(results.read_text())
    else:
        args.runs = args.runs or ("svd,zhang" if args.tiny else "svd,zhang:1")
        res = run(args)
        res = merge(json.loads(results.read_text()) if results.is_file() else None, res)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(res, indent=2) + "\n")
    write_docs(res, doc)
    print(f"wrote {results} and {doc}")


if __name__ == "__main__":
    main()
