"""Transformers (issue 9): tiny BERT / GPT-2 / Llama built from configs (random weights, nothing
downloaded) and an ``nn.TransformerEncoder`` classifier compress data-free and data-aware on token
inputs, under budgets measured on the built model (``numel``; MACs with ``FlopCounterMode``, fused
attention path off, on the same token example), with finite outputs and exact save/load.
"""
from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import rankslim
from tests._measure import count_macs, count_params

transformers = pytest.importorskip("transformers")

VOCAB, T = 96, 12


def n_params(model: nn.Module) -> int:
    """Stored numbers (sparse parts as COO), counted on the modules by tests/_measure.py."""
    return count_params(model)


class _Keywords(nn.Module):
    """Calls ``model(**inputs)`` for a tensor of token ids, so tests/_measure.count_macs can run it."""

    def __init__(self, model: nn.Module, inputs: dict) -> None:
        super().__init__()
        self.model, self.rest = model, {k: v for k, v in inputs.items() if k != "input_ids"}

    def forward(self, ids: torch.Tensor):
        return first_output(self.model(input_ids=ids, **self.rest))


def measured_macs(model: nn.Module, inputs: dict) -> int:
    """MACs of one forward pass on ``inputs`` (batch of 1) by FlopCounterMode, fused attention off."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # the wrapper in eval mode: count_macs restores the mode it finds, which must stay eval
        return count_macs(_Keywords(model, inputs).eval(), inputs["input_ids"])
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def tiny_bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


class EncoderClassifier(nn.Module):
    """Token ids -> Embedding -> nn.TransformerEncoder (batch_first, eval fast path possible) -> mean -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(input_ids)).mean(1))


def encoder_classifier() -> nn.Module:
    return EncoderClassifier().eval()


class TokenDicts(Dataset):
    """Hugging Face style items: ``{"input_ids", "attention_mask", "labels"}`` (labels are dropped)."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, VOCAB, (n, T), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "labels": self.ids[i]}


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "encoder": encoder_classifier}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def example(name: str) -> dict:
    ids = torch.randint(1, VOCAB, (1, T), generator=torch.Generator().manual_seed(2))
    return {"input_ids": ids} if name == "encoder" else {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method,budget", [("svd", {"params": 0.75}), ("zhang", {"macs": 0.8}),
                                           ("grebdec", {"params": 0.8})])
def test_transformers_compress_under_measured_budgets(name, method, budget, tmp_path):
    model = build(name)
    ex = example(name)
    data = TokenDicts() if name != "encoder" else TensorDataset(TokenDicts().ids)
    wrap = (lambda item: {"input_ids": item[0]}) if name == "encoder" else None
    res = rankslim.compress(model, method, example_inputs=ex, data=data if method != "svd" else None,
                            transform=wrap, calib_samples=32, **budget)
    built = res.model.eval()
    types = {type(m).__name__ for m in built.modules()}
    assert types & {"LowRankLinear", "LowRankSparseLinear", "LowRankPlusSparseLinear"} or any(
        r.method != "dense" for r in res.report.rows)
    if "params" in budget:
        assert n_params(built) <= budget["params"] * n_params(model)
    else:
        assert measured_macs(built, ex) <= budget["macs"] * measured_macs(model, ex)
    with torch.no_grad():
        out = first_output(built(**ex))
        ref = first_output(model(**ex))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert any("tokens" in n for n in res.report.notes)  # MACs are said to be per sequence of T tokens
    path = rankslim.save(built, tmp_path / "m.rankslim")
    back = rankslim.load(path, model=build(name))
    with torch.no_grad():
        assert torch.equal(first_output(back(**ex)), out)


def test_gpt2_conv1d_full_rank_exact_packed_qkv_and_generate():
    model = build("gpt2")
    ex = example("gpt2")
    ranks = {"*.c_attn": 32, "*.attn.c_proj": 32, "*.c_fc": 32, "*.mlp.c_proj": 32}
    res = rankslim.compress(model, "svd", ranks=ranks, example_inputs=ex)
    rows = {r.name: r for r in res.report.rows}
    # the packed q/k/v Conv1D (32 -> 96) is factorized as one matrix
    assert rows["transformer.h.0.attn.c_attn"].type == "Conv1D"
    assert type(res.model.transformer.h[0].attn.c_attn).__name__ == "LowRankLinear"
    with torch.no_grad():
        torch.testing.assert_close(res.model(**ex).logits, model(**ex).logits, rtol=1e-4, atol=1e-5)
    small = rankslim.compress(model, "svd", params=0.8, example_inputs=ex).model
    out = small.generate(ex["input_ids"], attention_mask=ex["attention_mask"], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, T + 4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_hf_save_pretrained_round_trip_and_plain_from_pretrained_would_not(name, tmp_path):
    from rankslim import hf

    model = build(name)
    ex = example(name)
    small = rankslim.compress(model, "svd", params=0.7, example_inputs=ex).model
    out = hf.save_pretrained(small, tmp_path / "hf")
    again = hf.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(again(**ex).logits, small(**ex).logits, rtol=0, atol=0)
    gen = again.generate(ex["input_ids"], attention_mask=ex["attention_mask"], max_new_tokens=3, do_sample=False)
    assert torch.equal(gen, small.generate(ex["input_ids"], attention_mask=ex["attention_mask"], max_new_tokens=3,
                                           do_sample=False))
    # the library's own round trip silently re-initializes the factorized layers: the reason hf.py exists
    small.save_pretrained(tmp_path / "plain")
    plain = type(model).from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert not torch.allclose(plain(**ex).logits, small(**ex).logits, atol=1e-3)
    # a directory the user owns is not written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(rankslim.RankslimError, match="did not write"):
        hf.save_pretrained(small, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_llama_generate_after_data_aware_compression():
    model = build("llama")
    ex = example("llama")
    res = rankslim.compress(model, "zhang", params=0.8, example_inputs=ex, data=TokenDicts(), calib_samples=16)
    out = res.model.generate(ex["input_ids"], attention_mask=ex["attention_mask"], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, T + 3) and int(out.max()) < VOCAB


def test_transformer_encoder_macs_counted_and_fast_path_left_for_low_rank():
    model = build("encoder")
    ex = example("encoder")
    # MultiheadAttention's packed in_proj (half the MACs here) is not a target: 0.7 is reachable, 0.5 is not
    res = rankslim.compress(model, "svd", macs=0.7, example_inputs=ex)
    reported = res.report.original.macs
    assert reported == measured_macs(model, ex) > 0  # the fused path used to hide every MAC
    assert measured_macs(res.model, ex) <= 0.7 * reported
    assert any("fast path" in n for n in res.report.notes)
    # the compressed layers are called (low-rank compute), not read as dense weights by the fused kernel
    calls = []
    lin = res.model.encoder.layers[0].linear1
    h = lin.first.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        res.model(**ex)
    h.remove()
    assert calls
    skipped = {s["name"]: s["reason"] for s in res.report.skipped}
    assert "encoder.layers.0.self_attn" in skipped  # packed in_proj_weight: reported, not silently squeezed
