"""P-tuning: Liu et al., 2021, "GPT Understands, Too" (arXiv:2103.10385).

Like prompt tuning, ``P`` virtual tokens are prepended to the input embeddings, but they are not free
parameters: a prompt encoder produces them from trainable inputs, which couples the virtual tokens and
made optimisation more stable in the paper (section 3.2)::

    "lstm":  h = MLP([LSTM_fwd(e); LSTM_bwd(e)])     bidirectional 2-layer LSTM, then Linear-ReLU-Linear
    "mlp":   h = MLP(e)                               Linear-ReLU-Linear-ReLU-Linear (HF peft's default)

with ``e`` the (P, hidden) trainable inputs and ``h`` the (P, hidden) virtual token embeddings.

The encoder only serves training: the paper (and HF peft) keep only its output at inference. So the
saved adapter is the prompt ``h`` it produced, in HF peft's format (``peft_type: "P_TUNING"``, tensor
``prompt_embeddings`` (P, hidden)), and a loaded one is plain prompt embeddings
(:class:`~lightning_peft.PromptTuning`). vLLM does not serve it.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn

from lightning_peft.core.model_geometry import ModelGeometry
from lightning_peft.methods.prompt_tuning import PromptTuning, VirtualPrompt
from lightning_peft.methods.virtual_tokens import VirtualTokenMethod, VirtualTokens, check_choice, check_positive

Encoder = Literal["mlp", "lstm"]
#: Layers of the bidirectional LSTM (Liu et al. and HF peft use 2).
LSTM_LAYERS = 2


class LSTMPromptEncoder(nn.Module):
    """Bidirectional LSTM over the P inputs, then a two-layer MLP back to the hidden size."""

    def __init__(self, hidden: int, width: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(hidden, width, num_layers=LSTM_LAYERS, dropout=dropout, bidirectional=True, batch_first=True)
        self.head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, hidden))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(inputs[None])  # (1, P, 2 * width): both directions at each virtual token
        return self.head(states[0])  # (P, hidden)


def mlp_prompt_encoder(hidden: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, hidden))


class PTuning(VirtualTokenMethod):
    """P-tuning config: ``PEFTCallback(PTuning(num_virtual_tokens=20, encoder="mlp"))``.

    Args:
        num_virtual_tokens: the prompt length ``P``.
        encoder: ``"mlp"`` or ``"lstm"`` (bidirectional LSTM + MLP, the paper's).
        encoder_hidden_size: width of the encoder's hidden layers; default: the model's hidden size.
        encoder_dropout: dropout between the LSTM's layers (``"lstm"`` only).
        modules_to_save: modules trained in full (e.g. ``["classifier"]``).

    Example::

        >>> PTuning(num_virtual_tokens=8, encoder="lstm").exported()
        PromptTuning(num_virtual_tokens=8, init='random', init_text=None, tokenizer=None, modules_to_save=[])
    """

    resume_safe_arguments = ("encoder_dropout",)

    name = "p_tuning"
    peft_type = "P_TUNING"

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        encoder: Encoder = "mlp",
        encoder_hidden_size: Optional[int] = None,
        encoder_dropout: float = 0.0,
        modules_to_save: Optional[list[str]] = None,
    ) -> None:
        super().__init__(num_virtual_tokens, modules_to_save)
        check_choice(encoder, Encoder, "P-tuning encoder")
        if encoder_hidden_size is not None:
            check_positive("encoder_hidden_size", encoder_hidden_size, 128)
        if not 0.0 <= encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout must be in [0, 1), got encoder_dropout={encoder_dropout!r}")
        self.encoder = encoder
        self.encoder_hidden_size = encoder_hidden_size
        self.encoder_dropout = encoder_dropout

    def build(self, model: nn.Module, geometry: ModelGeometry) -> VirtualTokens:
        hidden = geometry.hidden_size
        width = self.encoder_hidden_size or hidden
        device = model.get_input_embeddings().weight.device
        encoder = LSTMPromptEncoder(hidden, width, self.encoder_dropout) if self.encoder == "lstm" else mlp_prompt_encoder(hidden, width)
        # The encoder's inputs start like an nn.Embedding's (standard normal), as in the paper's code and peft.
        inputs = torch.randn(self.num_virtual_tokens, hidden, device=device)
        return VirtualPrompt(inputs, geometry, encoder.to(device))

    def peft_config(self, model: nn.Module, targets: list[str]) -> dict[str, Any]:
        return {
            **super().peft_config(model, targets),
            "encoder_reparameterization_type": self.encoder.upper(),
            "encoder_hidden_size": self.encoder_hidden_size or model.get_input_embeddings().embedding_dim,
            "encoder_num_layers": LSTM_LAYERS,
            "encoder_dropout": self.encoder_dropout,
        }

    def exported(self) -> PromptTuning:
        return PromptTuning(self.num_virtual_tokens, modules_to_save=self.modules_to_save or None)

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> PromptTuning:
        """A P-tuning file holds the encoder's output: it loads as plain prompt embeddings."""
        return PromptTuning.from_peft_config(config)
