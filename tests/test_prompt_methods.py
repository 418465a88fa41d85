"""Prompt tuning, P-tuning and prefix tuning: HF peft as the oracle (same tensors in both, logits within
1e-5, on tiny Llama with grouped-query attention and GPT-2), files that load both ways, cached generation
against full recomputation, the loss against a hand computation, padding, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from torch import nn

from lightning_peft import (
    PrefixTuning,
    PromptTuning,
    PTuning,
    apply_peft,
    disable_adapters,
    load_adapter,
    merge_adapters,
    parameter_summary,
    save_adapter,
)
from lightning_peft.integration.checkpoints import adapter_state_names
from lightning_peft.core.injection import remove_adapters
from lightning_peft.core.transformers_compat import cache_argument
from tiny_models import VOCAB, input_ids, tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
P = 4
METHODS = {
    "prompt": lambda: PromptTuning(P),
    "p_tuning_mlp": lambda: PTuning(P, encoder="mlp", encoder_hidden_size=16),
    "p_tuning_lstm": lambda: PTuning(P, encoder="lstm", encoder_hidden_size=16),
    "prefix": lambda: PrefixTuning(P),
    "prefix_projection": lambda: PrefixTuning(P, projection=True, projection_hidden_size=16),
}
PEFT_CONFIGS = {
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "p_tuning_mlp": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16),
    "p_tuning_lstm": lambda: PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=16, encoder_reparameterization_type="LSTM"
    ),
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
    "prefix_projection": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16),
}
CASES = [(arch, method) for arch in BUILDERS for method in METHODS]
ADDS_POSITIONS = {"prompt", "p_tuning_mlp", "p_tuning_lstm"}


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Adapter tensors of a trained-looking size (the random inits are N(0, 1): too loud for a tiny model)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def ours(arch: str, method: str, seed: int = 0) -> nn.Module:
    model = BUILDERS[arch](0)
    apply_peft(model, METHODS[method]())
    _randomize(model, seed)
    return model


def _peft_with_our_tensors(model: nn.Module, arch: str, method: str) -> nn.Module:
    """peft's model for the same base, its prompt encoder holding our tensors (copied in parameter order)."""
    theirs = get_peft_model(BUILDERS[arch](0), PEFT_CONFIGS[method]()).eval()
    mine = list(model.prompt_encoder.parameters())
    their_params = list(theirs.prompt_encoder["default"].parameters())
    assert [p.shape for p in mine] == [p.shape for p in their_params]
    with torch.no_grad():
        for target, source in zip(their_params, mine):
            target.copy_(source)
    return theirs


def _logits(model: nn.Module, ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


@pytest.mark.parametrize("arch, method", CASES)
def test_logits_match_peft_with_the_same_tensors(arch, method):
    model = ours(arch, method)
    theirs = _peft_with_our_tensors(model, arch, method)
    mine, reference = _logits(model), _logits(theirs)
    if method in ADDS_POSITIONS:
        reference = reference[:, P:]  # peft keeps the virtual positions in its logits; ours are aligned with the input
    assert mine.shape == (2, 7, VOCAB)
    with disable_adapters(model):
        assert (mine - _logits(model)).abs().max() > 1e-2  # the virtual tokens really change the output
    torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, method", CASES)
def test_our_file_loads_in_peft_and_back(arch, method, tmp_path):
    model = ours(arch, method)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == METHODS[method]().peft_type and "target_modules" not in config
    loaded = PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "adapter").eval()
    reference = _logits(loaded)[:, P:] if method in ADDS_POSITIONS else _logits(loaded)
    torch.testing.assert_close(_logits(model), reference, atol=1e-5, rtol=0)
    # Ours reads it back as the folded form (no encoder, no projection): the same outputs.
    again = load_adapter(BUILDERS[arch](0), tmp_path / "adapter")
    assert again.prompt_encoder.reparameterization is None
    torch.testing.assert_close(_logits(again), _logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch, method", [(a, m) for a in BUILDERS for m in ("prompt", "p_tuning_mlp", "prefix")])
def test_peft_file_loads_in_ours(arch, method, tmp_path):
    theirs = get_peft_model(BUILDERS[arch](0), PEFT_CONFIGS[method]()).eval()
    with torch.no_grad():
        for param in theirs.prompt_encoder["default"].parameters():
            param.mul_(0.5)
    theirs.save_pretrained(tmp_path / "peft")
    reloaded = PeftModel.from_pretrained(BUILDERS[arch](0), tmp_path / "peft").eval()  # peft's own inference view
    model = load_adapter(BUILDERS[arch](0), tmp_path / "peft")
    reference = _logits(reloaded)[:, P:] if method in ADDS_POSITIONS else _logits(reloaded)
    torch.testing.assert_close(_logits(model), reference, atol=1e-5, rtol=0)


def _greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), use_cache=False).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequence


@pytest.mark.parametrize("arch, method", CASES)
def test_cached_generate_equals_full_recomputation(arch, method):
    model = ours(arch, method, seed=3)
    ids = input_ids(batch=2, length=5, seed=4)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    generated = model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert torch.equal(generated.sequences, _greedy_without_cache(model, ids, 6))
    with disable_adapters(model):
        base = model.generate(input_ids=ids, **kwargs)
    assert not torch.allclose(generated.logits[-1], base.logits[-1], atol=1e-3)  # the adapters act at every step


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_left_padded_batch_generates_like_each_row_alone(method):
    model = ours("llama", method, seed=5)
    rows = [input_ids(1, 6, seed=6), input_ids(1, 3, seed=7)]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, 6 - row.shape[1] :], mask[i, 6 - row.shape[1] :] = row[0], 1
    generated = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=5, do_sample=False)
        assert torch.equal(generated[i, -5:], alone[0, -5:]), i


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_right_padding_and_inputs_embeds(method):
    model = ours("gpt2", method, seed=8)
    ids = input_ids(2, 7, seed=9)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # row 1 has 4 real tokens and 3 padding tokens on the right
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone = model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
        embeds = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask).logits
    torch.testing.assert_close(batch[1, :4], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds, batch, atol=1e-6, rtol=0)


def test_loss_and_accuracy_ignore_the_virtual_tokens():
    """The loss scores the same targets as the base model's, each predicted with the prompt in its context:
    checked against the prompt prepended by hand to the frozen base model."""
    model = ours("llama", "prompt", seed=10)
    ids = input_ids(2, 7, seed=11)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 2] = -100
    with torch.no_grad():
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        with disable_adapters(model):
            prompt = model.prompt_encoder.values().expand(2, -1, -1)
            embeds = torch.cat([prompt, model.get_input_embeddings()(ids)], dim=1)
            full_mask = torch.cat([torch.ones(2, P, dtype=torch.long), mask], dim=1)
            by_hand = model(inputs_embeds=embeds, attention_mask=full_mask).logits[:, P:]
    torch.testing.assert_close(output.logits, by_hand, atol=1e-6, rtol=0)
    predictions, targets = by_hand[:, :-1], labels[:, 1:]
    scored = targets != -100
    expected_loss = nn.functional.cross_entropy(predictions[scored], targets[scored])
    assert output.loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    accuracy = (output.logits[:, :-1].argmax(-1) == targets)[scored].float().mean()
    assert accuracy.item() == pytest.approx((predictions.argmax(-1) == targets)[scored].float().mean().item())


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_classification_on_bert(method):
    """BERT (encoder, sequence-level labels): the labels are left alone and only prompt + head train."""
    model = tiny_bert(0)
    if method == "prefix" and cache_argument(model) is None:
        # transformers 4.x: BertForSequenceClassification neither names a cache nor passes **kwargs to BertModel,
        # so a prefix has no way in; that must be a clear refusal, not a TypeError inside the forward.
        with pytest.raises(ValueError, match=r"BertForSequenceClassification takes no key/value cache argument.*use PromptTuning"):
            apply_peft(model, PrefixTuning(P))
        return
    apply_peft(model, METHODS[method]().__class__(P, modules_to_save=["classifier"]))
    ids = input_ids(2, 7)
    labels = torch.tensor([0, 2])
    output = model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids), labels=labels)
    assert output.logits.shape == (2, 3)
    assert output.loss.item() == pytest.approx(nn.functional.cross_entropy(output.logits, labels).item(), rel=1e-6)
    output.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder.embedding", "classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    "method, count",
    [
        ("prompt", P * 32),  # P x hidden
        ("prefix", P * 2 * 2 * 16),  # P x layers x (key, value) x kv_dim (2 kv heads of 8)
        ("p_tuning_mlp", P * 32 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32)),
    ],
)
def test_only_the_virtual_tokens_train(method, count):
    model = tiny_llama(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_peft(model, METHODS[method]())
    assert parameter_summary(model).trainable == count
    assert adapter_state_names(model) == {n for n, p in model.named_parameters() if n.startswith("prompt_encoder.")}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = input_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name
    remove_adapters(model)
    assert not hasattr(model, "prompt_encoder") and not model._forward_pre_hooks and not model._forward_hooks


def test_merge_is_refused_with_the_reason():
    model = ours("llama", "prompt")
    with pytest.raises(ValueError, match=r"cannot be merged into their base weights"):
        merge_adapters(model)


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [PromptTuning, PTuning, PrefixTuning])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_virtual_tokens_must_be_positive(cls, bad):
    with pytest.raises(ValueError, match=rf"num_virtual_tokens must be a positive integer \(e.g. 20\), got num_virtual_tokens={bad!r}"):
        cls(bad)


def test_prompt_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match=r"num_virtual_tokens=64 fills the model's whole context of 64 positions.*use at most 63"):
        apply_peft(tiny_llama(0), PromptTuning(64))
    model = tiny_gpt2(0)
    apply_peft(model, PrefixTuning(10))
    with pytest.raises(ValueError, match=r"an input of 60 tokens needs 70 positions with num_virtual_tokens=10.*context of 64.*at most 54 tokens"):
        model(input_ids=input_ids(1, 60))


def test_prefix_tuning_needs_a_model_that_takes_a_cache():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match=r"DistilBertForSequenceClassification takes no key/value cache argument.*use PromptTuning or PTuning"):
        apply_peft(model, PrefixTuning(P))
    apply_peft(model, PromptTuning(P))  # prompt tuning needs no cache


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match=r"unknown prompt init 'words'; choose one of 'random', 'vocab', 'text'"):
        PromptTuning(init="words")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init='text' needs init_text"):
        PromptTuning(init="text")
    with pytest.raises(ValueError, match=r"unknown P-tuning encoder 'gru'; choose one of 'mlp', 'lstm'"):
        PTuning(encoder="gru")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init='vocab' sets the prefix to real keys and values"):
        PrefixTuning(projection=True, init="vocab")


def test_inits():
    model = tiny_llama(0)
    apply_peft(model, PromptTuning(P, init="vocab"))
    table = model.get_input_embeddings().weight
    assert all(any(torch.equal(row, t) for t in table) for row in model.prompt_encoder.embedding)
    random = tiny_llama(0)
    apply_peft(random, PromptTuning(P))
    assert random.prompt_encoder.embedding.abs().max() <= 0.5  # Lester et al.: uniform in [-0.5, 0.5]
    prefix = tiny_llama(0)
    apply_peft(prefix, PrefixTuning(P, init="vocab"))  # the model's own keys and values of sampled tokens
    assert prefix.prompt_encoder.embedding.shape == (P, 2 * 2 * 16)
