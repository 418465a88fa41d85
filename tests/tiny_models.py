"""Tiny random-init transformers models for the unit tests (no downloads, no assets).

Every builder seeds torch first, so two calls with the same ``seed`` give identical weights (one copy for
peft, one for lightning_peft) and a different ``seed`` gives a same-architecture, different-weights
model. Models are float32 and in eval mode; config token ids are inside the vocabulary.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

VOCAB = 128

# Matrices this small gain nothing from intra-op threads, and on a busy machine the thread hand-offs
# make each forward ~50x slower (measured: 0.5 s vs 7 ms for the tiny Llama on 2 loaded cores).
torch.set_num_threads(1)


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval()


def llama_config(hidden: int = 32, **overrides) -> LlamaConfig:
    # GQA: 4 query heads share 2 key/value heads, so k_proj/v_proj are (16 x 32), not square.
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, hidden: int = 32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return _finish(LlamaForCausalLM(llama_config(hidden, **overrides)))


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return _finish(LlamaForSequenceClassification(llama_config(num_labels=num_labels)))


def tiny_gpt2(seed: int = 0, hidden: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    return _finish(GPT2LMHeadModel(config))


def tiny_bert(seed: int = 0, hidden: int = 32, num_labels: int = 3) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
        num_labels=num_labels,
    )
    return _finish(BertForSequenceClassification(config))


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
# Every linear layer of a Llama decoder block, by its suffix.
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def input_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    """Token ids in [3, VOCAB) (no special ids), deterministic."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def logits(model: torch.nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    ids = input_ids() if ids is None else ids
    return model(input_ids=ids).logits


# -- helpers shared by the LoRA tests ---------------------------------------------------------------
def peft_lora_names(peft_model: torch.nn.Module) -> list[str]:
    """Qualified names (in the base model) of the modules HF peft wrapped with LoRA."""
    from peft.tuners.lora import LoraLayer

    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    )


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every lightning_peft adapter tensor random non-zero values (B starts at zero)."""
    from lightning_peft.core.adapter_layer import adapter_layers

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for _, param in layer.adapter_named_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def peft_adapter_params(peft_model: torch.nn.Module, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """(A, B) of peft's LoRA layer at ``name`` in the same (r, in) / (out, r) layout as ours."""
    module = peft_model.base_model.model.get_submodule(name)
    if len(module.lora_embedding_A):
        return module.lora_embedding_A["default"], module.lora_embedding_B["default"]
    return module.lora_A["default"].weight, module.lora_B["default"].weight


def copy_adapters_to_peft(ours: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    """Copy our adapter tensors into the same positions of a peft model (same targets required)."""
    from lightning_peft.core.adapter_layer import adapter_layers

    layers = dict(adapter_layers(ours))
    assert sorted(layers) == peft_lora_names(peft_model), "ours and peft adapt different modules"
    with torch.no_grad():
        for name, layer in layers.items():
            a, b = peft_adapter_params(peft_model, name)
            assert a.shape == layer.lora_A.shape and b.shape == layer.lora_B.shape, name
            a.copy_(layer.lora_A)
            b.copy_(layer.lora_B)
