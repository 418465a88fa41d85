"""LLaMA-Adapter: Zhang et al., 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention" (arXiv:2303.16199).

In each of the top ``adapter_layers`` decoder layers a learnable adaption prompt ``A_l`` (adapter_len x
hidden) is attended to beside the real tokens, through a separate softmax and a zero-initialised gate::

    K_A = k_proj(A_l),  V_A = v_proj(A_l)             the layer's own frozen projections, no rotary embedding
    S_A = softmax(Q K_A^T / sqrt(d))                  Q: the layer's rotated queries, (B, heads, T, adapter_len)
    out = attention(x) + o_proj(g * S_A V_A)          g: the gate

Gate: the paper gives every head its own gating factor and squashes it with tanh, ``g_h = tanh(a_h)``
with ``a_h = 0`` at the start (``gate="per_head"``, the default; the authors' code does the same). The
model is then exactly unchanged at init, and each head can learn how much of the prompt to let in, by
at most a factor of 1. HF peft uses one scalar per layer, without tanh (``gate="scalar"``): unbounded
and shared by all heads. Both start at zero, so both leave the model unchanged at step 0.

Any decoder whose attention modules have ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` and receive
rotary ``position_embeddings`` works: Llama, Mistral, Qwen2/Qwen3 (their query/key norms are applied),
SmolLM2. Grouped-query attention is handled by sharing each key/value head across its query group.
Other architectures are refused with the reason.

Adapter files: with ``gate="scalar"`` on a model type peft's adaption prompt supports (llama, mistral),
HF peft's format (``peft_type: "ADAPTION_PROMPT"``, tensors ``<attention>.adaption_prompt`` (1, len,
hidden) and ``<attention>.adaption_gate`` (1,)); otherwise lightning_peft's own format, since peft's
cannot hold per-head gates. The adapter adds an attention branch, so it cannot be merged into weights,
and vLLM does not serve it.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from torch import nn

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.core.blocks import transformer_blocks
from lightning_peft.core.transformers_compat import attention_rotary_tables, rotary_function, split_attention_output
from lightning_peft.methods.base import PEFTMethod
from lightning_peft.methods.virtual_tokens import check_choice, check_positive

Gate = Literal["per_head", "scalar"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Model types whose adaption prompts HF peft reads (its own list has gpt2 too, which has no rotary embedding).
PEFT_MODEL_TYPES = ("llama", "mistral")


def _describe(attention: nn.Module) -> str:
    children = ", ".join(name for name, _ in attention.named_children()) or "no submodules"
    return f"{type(attention).__name__} ({children})"


class AdaptedAttention(AdapterLayer):
    """An attention module (``base_layer``) plus the gated adaption-prompt branch."""

    def __init__(self, attention: nn.Module, adapter_len: int, gate: Gate) -> None:
        super().__init__(attention)
        self.head_dim = attention.head_dim
        hidden = attention.q_proj.in_features
        self.num_heads = attention.q_proj.out_features // self.head_dim
        self.num_kv_heads = attention.k_proj.out_features // self.head_dim
        self.scaling = getattr(attention, "scaling", self.head_dim**-0.5)
        self.gate = gate
        self.apply_rotary = rotary_function(attention)
        self._signature = inspect.signature(attention.forward)
        device = attention.q_proj.weight.device
        # The authors' code keeps the prompt in an nn.Embedding: standard normal values.
        self.adaption_prompt = nn.Parameter(torch.randn(adapter_len, hidden, device=device))  # (len, hidden)
        self.adaption_gate = nn.Parameter(torch.zeros(self.num_heads if gate == "per_head" else 1, device=device))

    @property
    def can_merge(self) -> bool:
        return False  # a second softmax over the prompt has no weight-space equivalent

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.base_layer(*args, **kwargs)
        if self.disabled:
            return output
        call = self._signature.bind_partial(*args, **kwargs).arguments
        hidden_states, rotary = call["hidden_states"], attention_rotary_tables(call)
        if rotary is None:
            raise ValueError(f"{type(self.base_layer).__name__} was called without position_embeddings (cos, sin); LlamaAdapter needs rotary attention")
        attn_output, rest = split_attention_output(output)
        adapted = attn_output + self.prompt_attention(hidden_states, rotary)
        return adapted if isinstance(output, torch.Tensor) else (adapted, *rest)

    def prompt_attention(self, hidden_states: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``o_proj(g * softmax(Q K_A^T / sqrt(d)) V_A)`` without o_proj's bias (it is in the base output already)."""
        attention = self.base_layer
        batch, length, _ = hidden_states.shape
        queries = attention.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3-style per-head query norm, before the rotation as in the layer
            queries = attention.q_norm(queries)
        cos, sin = rotary
        queries, _ = self.apply_rotary(queries.transpose(1, 2), queries.transpose(1, 2), cos, sin)  # (B, heads, T, d)
        prompt = self.adaption_prompt.to(hidden_states.dtype)
        keys = attention.k_proj(prompt).view(-1, self.num_kv_heads, self.head_dim)  # (len, kv_heads, d)
        if hasattr(attention, "k_norm"):
            keys = attention.k_norm(keys)
        values = attention.v_proj(prompt).view(-1, self.num_kv_heads, self.head_dim)
        group = self.num_heads // self.num_kv_heads  # query heads per key/value head
        keys = keys.transpose(0, 1).repeat_interleave(group, dim=0)  # (heads, len, d)
        values = values.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(queries, keys.transpose(1, 2)) * self.scaling  # (B, heads, T, len)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        gate = torch.tanh(self.adaption_gate) if self.gate == "per_head" else self.adaption_gate
        weights = (weights * gate.view(1, -1, 1, 1)).to(values.dtype)
        mixed = torch.matmul(weights, values).transpose(1, 2).reshape(batch, length, -1)  # (B, T, heads * d)
        out = attention.o_proj(mixed)
        bias = getattr(attention.o_proj, "bias", None)
        return out - bias if isinstance(bias, torch.Tensor) else out

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"adaption_prompt": self.adaption_prompt[None], "adaption_gate": self.adaption_gate}

    @torch.no_grad()
    def load_peft_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.adaption_prompt.copy_(tensors["adaption_prompt"].reshape(self.adaption_prompt.shape))
        self.adaption_gate.copy_(tensors["adaption_gate"].reshape(self.adaption_gate.shape))

    def extra_repr(self) -> str:
        return f"adapter_len={self.adaption_prompt.shape[0]}, gate={self.gate}"


class LlamaAdapter(PEFTMethod):
    """LLaMA-Adapter config: ``PEFTCallback(LlamaAdapter(adapter_len=10, adapter_layers=8))``.

    Args:
        adapter_len: tokens in each layer's adaption prompt (the paper: 10).
        adapter_layers: how many of the top decoder layers get a prompt (the paper: 30 of LLaMA-7B's 32).
        gate: ``"per_head"`` (the paper's tanh gate per head) or ``"scalar"`` (HF peft's, one per layer).
        modules_to_save: modules trained in full.

    Example::

        >>> LlamaAdapter(adapter_len=10, adapter_layers=8).gate
        'per_head'
    """

    name = "llama_adapter"
    peft_type = "ADAPTION_PROMPT"
    supported_description = "attention modules with q_proj, k_proj, v_proj, o_proj and rotary position embeddings"

    def __init__(self, adapter_len: int = 10, adapter_layers: int = 8, gate: Gate = "per_head", modules_to_save: list[str] | None = None) -> None:
        super().__init__(modules_to_save=modules_to_save)
        check_positive("adapter_len", adapter_len, 10)
        check_positive("adapter_layers", adapter_layers, 8)
        check_choice(gate, Gate, "LlamaAdapter gate")
        self.adapter_len = adapter_len
        self.adapter_layers = adapter_layers
        self.gate = gate

    def supports(self, module: nn.Module) -> bool:
        return all(isinstance(getattr(module, p, None), nn.Module) for p in PROJECTIONS) and isinstance(getattr(module, "head_dim", None), int)

    def find_targets(self, model: nn.Module) -> list[str]:
        """The attention module of each of the top ``adapter_layers`` blocks."""
        blocks = transformer_blocks(model)
        if not blocks:
            raise ValueError(f"LlamaAdapter found no decoder layers (a ModuleList of blocks) in {type(model).__name__}")
        if self.adapter_layers > len(blocks):
            raise ValueError(f"adapter_layers={self.adapter_layers} but {type(model).__name__} has {len(blocks)} decoder layers; use at most {len(blocks)}")
        targets = []
        for block in blocks[-self.adapter_layers :]:
            found = [f"{block}.{name}" for name, module in model.get_submodule(block).named_modules() if name and self.supports(module)]
            if not found:
                children = [_describe(m) for n, m in model.get_submodule(block).named_children()]
                raise ValueError(
                    f"LlamaAdapter needs {self.supported_description} (Llama, Mistral, Qwen2, SmolLM2); block {block!r} of "
                    f"{type(model).__name__} has none: {', '.join(children)}"
                )
            attention = model.get_submodule(found[0])
            if rotary_function(attention) is None or not any(name.endswith("rotary_emb") for name, _ in model.named_modules()):
                raise ValueError(
                    f"LlamaAdapter needs rotary position embeddings; {type(model).__name__}'s {type(attention).__name__} at "
                    f"{found[0]!r} has none (no apply_rotary_pos_emb in {type(attention).__module__}, or no rotary_emb module)"
                )
            targets.append(found[0])
        return targets

    def wrap(self, name: str, module: nn.Module) -> AdaptedAttention:
        return AdaptedAttention(module, self.adapter_len, self.gate)

    # -- adapter files ------------------------------------------------------------------------------
    def writes_peft_format(self, model: nn.Module) -> bool:
        return self.gate == "scalar" and getattr(getattr(model, "config", None), "model_type", None) in PEFT_MODEL_TYPES

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        # peft matches target_modules as the attention's attribute name (a string, not a list).
        return {"peft_type": "ADAPTION_PROMPT", "adapter_len": self.adapter_len, "adapter_layers": self.adapter_layers, "target_modules": targets[0].rsplit(".", 1)[-1]}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> LlamaAdapter:
        return cls(config["adapter_len"], config["adapter_layers"], gate="scalar", modules_to_save=config.get("modules_to_save"))
