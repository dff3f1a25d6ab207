"""Tests for ByteTransformer: shapes, causality, tied embeddings, sizing from the config, generate."""

from __future__ import annotations

import pytest
import torch

from utils.training.config import TrainingConfig
from utils.training.engine.data import VOCAB_SIZE
from utils.training.engine.model import ByteTransformer, parameter_group


@pytest.fixture
def model() -> ByteTransformer:
    torch.manual_seed(0)
    return ByteTransformer(n_layer=2, n_head=2, n_embd=32, context_length=16).eval()


def test_logits_have_one_row_per_position_over_256_bytes(model: ByteTransformer):
    idx = torch.randint(0, VOCAB_SIZE, (3, 10))
    logits = model(idx)
    assert logits.shape == (3, 10, VOCAB_SIZE)
    assert torch.isfinite(logits).all()


def test_a_changed_future_token_does_not_change_past_logits(model: ByteTransformer):
    idx = torch.randint(0, VOCAB_SIZE, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % VOCAB_SIZE
    before, after = model(idx), model(changed)
    assert torch.equal(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])  # the change is seen from its position on


def test_a_prefix_gives_the_same_logits_as_the_full_sequence(model: ByteTransformer):
    idx = torch.randint(0, VOCAB_SIZE, (1, 12))
    torch.testing.assert_close(model(idx[:, :5]), model(idx)[:, :5])


def test_embeddings_are_tied_and_stored_once(model: ByteTransformer):
    assert model.head.weight is model.tok_emb.weight
    names = [name for name, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "head.weight" not in names  # one parameter, counted once
    with torch.no_grad():
        model.tok_emb.weight[5, 0] += 1.0
    assert model.head.weight[5, 0] == model.tok_emb.weight[5, 0]


def test_from_config_sizes_the_model():
    config = TrainingConfig.from_preset("tiny", n_layer=3, n_head=4, n_embd=32, context_length=24)
    model = ByteTransformer.from_config(config)
    assert len(model.blocks) == 3
    assert model.blocks[0].attn.n_head == 4
    assert model.tok_emb.weight.shape == (VOCAB_SIZE, 32)
    assert model.pos_emb.weight.shape == (24, 32)
    expected = VOCAB_SIZE * 32 + 24 * 32 + 3 * (12 * 32 * 32 + 13 * 32) + 2 * 32
    assert model.num_parameters() == expected


def test_the_same_seed_builds_the_same_weights():
    torch.manual_seed(3)
    a = ByteTransformer(n_layer=1, n_head=1, n_embd=16, context_length=8)
    torch.manual_seed(3)
    b = ByteTransformer(n_layer=1, n_head=1, n_embd=16, context_length=8)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_a_training_step_lowers_the_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    model = ByteTransformer(n_layer=1, n_head=2, n_embd=32, context_length=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, VOCAB_SIZE, (4, 17))
    losses = []
    for _ in range(20):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB_SIZE), idx[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_generate_appends_tokens_and_keeps_the_prompt(model: ByteTransformer):
    prompt = torch.tensor([[100, 101, 102]])
    out = model.generate(prompt, 25, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 28)  # runs past context_length=16 by cropping the window
    assert torch.equal(out[:, :3], prompt)
    assert out.min() >= 0 and out.max() < VOCAB_SIZE


def test_generate_is_reproducible_with_a_generator(model: ByteTransformer):
    prompt = torch.tensor([[65, 66], [67, 68]])
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(4))
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_generate_with_top_k_1_is_greedy(model: ByteTransformer):
    prompt = torch.tensor([[10, 20, 30]])
    out = model.generate(prompt, 1, top_k=1)
    assert out[0, -1] == model(prompt)[0, -1].argmax()


def test_parameter_groups_cover_every_parameter(model: ByteTransformer):
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert groups["tok_emb.weight"] == "embed"
    assert groups["blocks.0.attn.qkv.weight"] == "attn"
    assert groups["blocks.0.mlp.0.weight"] == "mlp"
    assert groups["ln_f.weight"] == "norm"
    assert set(groups.values()) == {"embed", "attn", "mlp", "norm"}
