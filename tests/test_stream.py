"""Layer-streamed compression (issue 11): a tiny Llama (random weights from a config, saved to safetensors)
compressed block by block equals the in-memory ``rankslim.compress`` run on the whole model, the streamed output
reloads into a model with the same logits, at most one block's weights are loaded at any time, and bad inputs
fail with rankslim errors before any work.

Tolerance: the streamed and in-memory runs do the same float32 operations on the same batches, so logits are
compared with ``atol=1e-5`` (they are bitwise equal on this machine); the compressed model differs from the
original by ~0.1-0.4, so a mismatch would show.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankslim
from rankslim import stream
from rankslim.errors import CheckpointError, DataError, OptionError, RankslimError

transformers = pytest.importorskip("transformers")

VOCAB, T, N, LAYERS = 128, 16, 10, 3
ATOL = 1e-5


def config() -> "transformers.LlamaConfig":
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def build() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(config())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(model, checkpoint path, token ids): random weights (seed 0) saved as one safetensors file."""
    torch.manual_seed(0)
    model = build().eval()
    d = tmp_path_factory.mktemp("llama")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    config().to_json_file(str(d / "config.json"))
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    return model, d / "model.safetensors", ids


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def plan_ranks(plan) -> dict[str, int]:
    return {lp.name: lp.info["rank"] for lp in plan.layers}


@pytest.mark.parametrize("method,sequential", [("zhang", True), ("zhang", False), ("svd", True)])
def test_streamed_equals_in_memory(llama, tmp_path, method, sequential):
    model, ckpt, ids = llama
    res = rankslim.compress_streamed(build, ckpt, tmp_path / "out", data=ids, method=method, ratio=0.25,
                                     sequential=sequential)
    ref = rankslim.compress(model, method, ratio=0.25, data=ids, sequential=sequential)
    assert plan_ranks(res.plan) == plan_ranks(ref.plan)
    assert len(res.plan.layers) == 7 * LAYERS  # every Linear of every block; the LM head is outside the blocks
    loaded = rankslim.load_streamed(tmp_path / "out", build)
    got, want = logits(loaded, ids), logits(ref.model, ids)
    assert torch.allclose(got, want, rtol=0, atol=ATOL), float((got - want).abs().max())
    assert float((got - logits(model, ids)).abs().max()) > 100 * ATOL  # compression did change the model


def test_original_stream_carries_the_targets(llama, tmp_path, monkeypatch):
    """Targets come from the ORIGINAL model's hidden states: running the blocks on the compressed stream alone
    (GPTQ-style) would give another model, so the equality above tests the two streams."""
    model, ckpt, ids = llama
    monkeypatch.setattr(stream.BlockCall, "forward", lambda self, x: self.run(x[:, 0]))
    rankslim.compress_streamed(build, ckpt, tmp_path / "out", data=ids, method="zhang", ratio=0.5)
    ref = rankslim.compress(model, "zhang", ratio=0.5, data=ids)
    diff = (logits(rankslim.load_streamed(tmp_path / "out", build), ids) - logits(ref.model, ids)).abs().max()
    assert float(diff) > 1e-3


@pytest.mark.parametrize("sequential", [True, False])
def test_params_budget_is_per_block(llama, tmp_path, sequential):
    model, ckpt, ids = llama
    res = rankslim.compress_streamed(build, ckpt, tmp_path / "out", data=ids, method="zhang", params=0.5,
                                     sequential=sequential)
    for b in res.blocks:
        assert 0.4 < b.target_params_after / b.target_params_before <= 0.5
    # the same ranks in memory give the same model: the per-block allocation is the only difference
    ref = rankslim.compress(model, "zhang", ranks=plan_ranks(res.plan), data=ids, sequential=sequential)
    got, want = logits(rankslim.load_streamed(tmp_path / "out", build), ids), logits(ref.model, ids)
    assert torch.allclose(got, want, rtol=0, atol=ATOL)
    assert res.params_after < res.params_before
    embed = VOCAB * 64
    assert res.params_before == sum(p.numel() for p in model.parameters()) and res.params_before > 2 * embed


def test_report_matches_the_loaded_model(llama, tmp_path):
    """The hidden-state error the run reports after the last block is that of the model it wrote."""
    model, ckpt, ids = llama
    res = rankslim.compress_streamed(build, ckpt, tmp_path / "out", data=ids, method="svd", ratio=0.25)
    loaded = rankslim.load_streamed(tmp_path / "out", build)
    outs = {}
    for name, m in (("c", loaded), ("o", model)):
        h = m.model.layers[-1].register_forward_hook(lambda _m, _a, out, name=name: outs.__setitem__(name, out))
        logits(m, ids)
        h.remove()
    err = float((outs["c"].double() - outs["o"].double()).norm() / outs["o"].double().norm())
    assert res.blocks[-1].hidden_rel_error == pytest.approx(err, rel=1e-5)
    manifest = json.loads((tmp_path / "out" / "streamed.json").read_text())
    assert manifest["files"] == ["pre.safetensors", *[f"block-{i:05d}.safetensors" for i in range(LAYERS)],
                                 "post.safetensors"]
    # each block shard is a rankslim file: its plan (full names) in the header
    assert [lp.name.split(".")[2] for lp in rankslim.read_plan(tmp_path / "out" / "block-00001.safetensors").layers
            ] == ["1"] * 7
    assert set(load_file(str(tmp_path / "out" / "post.safetensors"))) == {"model.norm.weight", "lm_head.weight"}
    assert res.peak_rss_bytes >= res.start_rss_bytes > 0


def test_at_most_one_block_loaded_at_a_time(llama, tmp_path, monkeypatch):
    """Every time weights are loaded, at most one block holds real (non-meta) parameters, and nothing outside
    the blocks is resident while a block is."""
    _, ckpt, ids = llama
    seen = []
    real = stream.materialize

    def spy(model, keys, source):
        real(model, keys, source)
        blocks = model.model.layers
        outside = sum(p.numel() for n, p in model.named_parameters()
                      if not n.startswith("model.layers.") and p.device.type != "meta")
        seen.append(([stream.resident_params(b) > 0 for b in blocks], outside))
    monkeypatch.setattr(stream, "materialize", spy)
    rankslim.compress_streamed(build, ckpt, tmp_path / "out", data=ids, method="zhang", ratio=0.5)
    front, per_block = seen[0], seen[1:]
    assert front == ([False] * LAYERS, VOCAB * 64)  # the front pass loaded the embeddings only
    assert len(per_block) == LAYERS
    for i, (resident, outside) in enumerate(per_block):
        assert resident == [j == i for j in range(LAYERS)] and outside == 0


def test_blocks_auto_detected_and_bad_path(llama, tmp_path):
    _, ckpt, ids = llama
    skeleton = stream.empty_model(build)
    assert stream.find_blocks(skeleton)[0] == "model.layers"
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    with pytest.raises(RankslimError, match="names no submodule"):
        rankslim.compress_streamed(build, ckpt, tmp_path / "o", data=ids, ratio=0.5, blocks="model.blocks")
    with pytest.raises(RankslimError, match="not a non-empty nn.ModuleList"):
        rankslim.compress_streamed(build, ckpt, tmp_path / "o", data=ids, ratio=0.5, blocks="model.norm")
    assert not (tmp_path / "o").exists()


def test_checkpoint_errors(llama, tmp_path):
    model, ckpt, ids = llama
    state = load_file(str(ckpt))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*model.layers.1.mlp.up_proj.weight"):
        rankslim.compress_streamed(build, tmp_path / "missing.safetensors", tmp_path / "o", data=ids, ratio=0.5)
    state = load_file(str(ckpt))
    state["model.norm.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match="shapes differ.*model.norm.weight"):
        rankslim.compress_streamed(build, tmp_path / "shape.safetensors", tmp_path / "o", data=ids, ratio=0.5)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        rankslim.compress_streamed(build, tmp_path / "nope.safetensors", tmp_path / "o", data=ids, ratio=0.5)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        rankslim.compress_streamed(build, tmp_path / "junk.safetensors", tmp_path / "o", data=ids, ratio=0.5)
    assert not (tmp_path / "o").exists()


def test_sharded_checkpoint_and_option_errors(llama, tmp_path):
    model, ckpt, ids = llama
    state = load_file(str(ckpt))
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[::2]}, str(shards / "a.safetensors"))
    save_file({k: state[k] for k in keys[1::2]}, str(shards / "b.safetensors"))
    res = rankslim.compress_streamed(build, shards, tmp_path / "out", data=ids, method="svd",
                                     ranks={"model.layers.*.mlp.*": 8})
    assert set(plan_ranks(res.plan).values()) == {8} and len(res.plan.layers) == 3 * LAYERS
    with pytest.raises(OptionError, match="match"):
        rankslim.compress_streamed(build, shards, tmp_path / "o2", data=ids, ranks={"model.layers.*.mlp.nope": 8})
    with pytest.raises(RankslimError, match="cannot be combined"):
        rankslim.compress_streamed(build, shards, tmp_path / "o2", data=ids, ratio=0.5, params=0.5)
    with pytest.raises(DataError, match="calibration inputs"):
        rankslim.compress_streamed(build, shards, tmp_path / "o2", data=None, ratio=0.5)
    assert not (tmp_path / "o2").exists()


def test_output_directory_rules(llama, tmp_path):
    _, ckpt, ids = llama
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RankslimError, match="did not write"):
        rankslim.compress_streamed(build, ckpt, foreign, data=ids, ratio=0.5)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    rankslim.compress_streamed(build, ckpt, out, data=ids, method="svd", ratio=0.5)
    rankslim.compress_streamed(build, ckpt, out, data=ids, method="svd", ratio=0.25)  # our own output: replaced
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    (out / "block-00001.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError):
        rankslim.load_streamed(out, build)
    with pytest.raises(CheckpointError, match="not a streamed rankslim output"):
        rankslim.load_streamed(foreign, build)


def _heap_calls(monkeypatch) -> list:
    """Record compact_heap's mallopt calls instead of changing the test process's heap."""
    calls: list = []
    monkeypatch.setattr(stream, "fix_heap_thresholds", lambda *a: calls.append(a) or True)
    return calls


def test_compact_heap_is_asked_for_and_changes_nothing_else(llama, tmp_path, monkeypatch):
    model, ckpt, ids = llama
    calls = _heap_calls(monkeypatch)
    plain = rankslim.compress_streamed(build, ckpt, tmp_path / "a", data=ids, method="zhang", ratio=0.5)
    assert calls == [] and not any("compact heap" in n for n in plain.notes)  # the API leaves the process alone
    compact = rankslim.compress_streamed(build, ckpt, tmp_path / "b", data=ids, method="zhang", ratio=0.5,
                                         compact_heap=True)
    assert calls == [stream.COMPACT_HEAP] and any(n.startswith("compact heap: glibc") for n in compact.notes)
    a, b = (logits(rankslim.load_streamed(tmp_path / d, build), ids) for d in ("a", "b"))
    assert torch.equal(a, b)


def test_cli(llama, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from rankslim.cli import app
    _, ckpt, ids = llama
    torch.save(ids, tmp_path / "ids.pt")
    runner = CliRunner()
    calls = _heap_calls(monkeypatch)
    r = runner.invoke(app, ["compress-streamed", str(ckpt), "--data", str(tmp_path / "ids.pt"), "--out",
                            str(tmp_path / "out"), "--method", "zhang", "--params", "0.5"])
    assert r.exit_code == 0, r.output
    assert "hidden-state error" in r.output and (tmp_path / "out" / "streamed.json").is_file()
    assert calls == [stream.COMPACT_HEAP] and "compact heap" in r.output  # the CLI's process is its own
    r = runner.invoke(app, ["compress-streamed", str(ckpt), "--data", str(tmp_path / "ids.pt"), "--out",
                            str(tmp_path / "o3"), "--ratio", "0.5", "--no-compact-heap"])
    assert r.exit_code == 0, r.output
    assert len(calls) == 1
    r = runner.invoke(app, ["compress-streamed", str(ckpt), "--data", str(tmp_path / "ids.pt"), "--out",
                            str(tmp_path / "o2"), "--ratio", "0.5", "--blocks", "model.nope"])
    assert r.exit_code == 2 and "error:" in r.output and "names no submodule" in r.output
