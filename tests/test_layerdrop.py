"""LayerDrop (Fan et al. 2019): p=0 is no LayerDrop exactly, evaluation runs every layer, a skipped layer is the
identity and costs no compute, the drop rate matches p, the draw is a function of (seed, step, batch) only,
gradient checkpointing and KV caches keep working, and bad values are named."""

from __future__ import annotations

import statistics

import pytest
import torch
from lightning_helpers import LitCausalLM, make_trainer, token_loader
from tiny_models import input_ids, logits, tiny_llama
from torch import nn

from lightning_peft import Composition, LayerDrop, LoRA, PEFTCallback, apply_peft
from lightning_peft.core.injection import remove_adapters
from lightning_peft.integration.strategies import allow_per_step_graphs
from lightning_peft.methods.layerdrop import ATTRIBUTE, skipped_positions


def lora() -> LoRA:
    return LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def train(method, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = LitCausalLM()
    make_trainer(None, max_steps=steps, callbacks=[PEFTCallback(method)]).fit(module, train_dataloaders=token_loader(n_batches=4))
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_p_zero_trains_exactly_what_no_layerdrop_trains():
    plain, dropless = train(lora()), train([lora(), LayerDrop(p=0.0)])
    assert plain.keys() == dropless.keys()
    for name, value in plain.items():
        assert torch.equal(value, dropless[name]), name


def test_layerdrop_changes_training_when_it_skips():
    assert any(skipped_positions(2, 0.5, 0, step, batch) for step, batch in [(0, 0), (1, 1), (2, 2), (3, 3)])  # these steps skip
    plain, dropped = train(lora()), train([lora(), LayerDrop(p=0.5)])
    assert any(not torch.equal(plain[n], dropped[n]) for n in plain)


def test_evaluation_runs_every_layer_whatever_the_draw():
    model = tiny_llama(num_hidden_layers=4)
    reference = logits(model)
    apply_peft(model, LayerDrop(p=0.9))
    model.eval()
    for step in range(5):
        getattr(model, ATTRIBUTE).draw_key = (step, 0)
        torch.testing.assert_close(logits(model), reference, rtol=0, atol=0)


def test_a_skipped_layer_is_the_identity_and_does_not_run():
    model = tiny_llama(num_hidden_layers=4).train()
    apply_peft(model, LayerDrop(p=0.5))
    key = next((s, 0) for s in range(100) if skipped_positions(4, 0.5, 0, s, 0) == [1, 2])
    # A block's first call in a process teaches it its output structure (a skip before that probes it once, see
    # test_a_block_that_returns_a_tuple_gets_a_tuple_back_when_skipped); every later skip runs nothing.
    model(input_ids=input_ids())
    calls: list[int] = []
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(model.model.layers):
        block.self_attn.register_forward_hook(lambda m, a, k, out, i=i: calls.append(i), with_kwargs=True)
        block.register_forward_hook(lambda m, args, kwargs, out, i=i: seen.__setitem__(i, ((args or (kwargs["hidden_states"],))[0], out)), with_kwargs=True)
    getattr(model, ATTRIBUTE).draw_key = key
    ids = input_ids()
    out = model(input_ids=ids).logits
    assert calls == [0, 3]  # the attention of a skipped block never ran
    for i in (1, 2):
        hidden_in, hidden_out = seen[i]
        assert hidden_out is hidden_in
    # Independent reference: the same model with blocks 1 and 2 removed from the list.
    reference = tiny_llama(num_hidden_layers=4)
    reference.model.layers = nn.ModuleList([reference.model.layers[0], reference.model.layers[3]])
    torch.testing.assert_close(out, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_the_drop_rate_over_many_steps_matches_p():
    p, layers, steps = 0.2, 12, 2000
    counts = [len(skipped_positions(layers, p, 0, step, 0)) for step in range(steps)]
    rate = sum(counts) / (layers * steps)
    assert abs(rate - p) < 4 * (p * (1 - p) / (layers * steps)) ** 0.5, rate
    # And through a model: how often each block really ran in training forwards.
    model = tiny_llama(num_hidden_layers=6).train()
    apply_peft(model, LayerDrop(p=0.3, seed=7))
    ran = [0] * 6
    for i, block in enumerate(model.model.layers):
        block.mlp.register_forward_hook(lambda *a, i=i: ran.__setitem__(i, ran[i] + 1))
    forwards = 300
    with torch.no_grad():
        for _ in range(forwards):
            model(input_ids=input_ids(batch=1, length=3))
    rate = 1 - sum(ran) / (6 * forwards)
    assert abs(rate - 0.3) < 0.05, rate
    assert statistics.pstdev(ran) > 0  # not the same layers every time


def test_the_draw_depends_on_seed_step_and_batch_only():
    torch.manual_seed(1)
    first = [skipped_positions(8, 0.5, 3, s, b) for s in range(5) for b in range(3)]
    torch.manual_seed(2)  # the global generator plays no part (every DDP rank draws the same)
    assert [skipped_positions(8, 0.5, 3, s, b) for s in range(5) for b in range(3)] == first
    assert [skipped_positions(8, 0.5, 4, s, b) for s in range(5) for b in range(3)] != first


def test_a_draw_never_skips_every_layer():
    for step in range(500):
        assert len(skipped_positions(2, 0.95, 0, step, 0)) <= 1


def test_only_the_chosen_layers_are_ever_skipped():
    model = tiny_llama(num_hidden_layers=4).train()
    apply_peft(model, LayerDrop(p=0.9, layers=[1, 3]))
    ran = [0] * 4
    for i, block in enumerate(model.model.layers):
        block.mlp.register_forward_hook(lambda *a, i=i: ran.__setitem__(i, ran[i] + 1))
    with torch.no_grad():
        for _ in range(20):
            model(input_ids=input_ids(batch=1, length=3))
    assert ran[0] == ran[2] == 20 and ran[1] < 20 and ran[3] < 20


def test_gradient_checkpointing_recomputes_with_the_same_decision():
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama(num_hidden_layers=4).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        apply_peft(model, Composition([lora(), LayerDrop(p=0.5)]))
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(0.01)  # B away from zero: every adapter gets a gradient
        getattr(model, ATTRIBUTE).draw_key = next((s, 0) for s in range(100) if skipped_positions(4, 0.5, 0, s, 0) == [2])
        ids = input_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and not any(".layers.2." in n for n in grads[0])  # block 2 skipped: no gradient
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_generation_with_a_kv_cache_is_unchanged_and_training_with_one_runs():
    model = tiny_llama(num_hidden_layers=4)
    ids = input_ids(batch=1)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    apply_peft(model, LayerDrop(p=0.5))
    model.eval()
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True), expected)
    model.train()
    getattr(model, ATTRIBUTE).draw_key = next((s, 0) for s in range(100) if skipped_positions(4, 0.5, 0, s, 0) == [0])
    out = model(input_ids=ids, use_cache=True)
    assert out.logits.shape[:2] == ids.shape


def test_a_block_that_returns_a_tuple_gets_a_tuple_back_when_skipped():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, hidden_states):
            return (self.linear(hidden_states), None)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for block in self.layers:
                x = block(x)[0]
            return x

    net = Net().train()
    apply_peft(net, LayerDrop(p=0.5))
    getattr(net, ATTRIBUTE).draw_key = next((s, 0) for s in range(100) if skipped_positions(2, 0.5, 0, s, 0) == [0])
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), net.layers[1].linear(x), rtol=0, atol=0)  # block 0 skipped, on its first call


def test_removing_layerdrop_restores_the_blocks():
    model = tiny_llama()
    apply_peft(model, LayerDrop(p=0.5))
    assert "forward" in vars(model.model.layers[0])
    remove_adapters(model)
    assert "forward" not in vars(model.model.layers[0]) and not hasattr(model, ATTRIBUTE)


@pytest.mark.parametrize("p", [1.0, -0.1, float("nan"), "0.1", True])
def test_p_outside_zero_one_is_refused(p):
    with pytest.raises(ValueError, match=r"LayerDrop p must be a probability in \[0, 1\)"):
        LayerDrop(p=p)


def test_a_layer_index_out_of_range_is_named_and_the_model_is_left_as_it_was():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"LayerDrop layers=\[0, 5\]: index 5 is out of range; model.layers of LlamaForCausalLM has 2 layers"):
        apply_peft(model, LayerDrop(p=0.1, layers=[0, 5]))
    assert not hasattr(model, ATTRIBUTE) and "forward" not in vars(model.model.layers[0])
    with pytest.raises(ValueError, match=r"LayerDrop layers must be a non-empty list of layer indices or None"):
        LayerDrop(p=0.1, layers=[])


def test_sharded_strategies_are_refused_and_ddp_looks_for_unused_parameters():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    with pytest.raises(ValueError, match=r"runs different layers at each step, which FSDPStrategy .* cannot follow; use DDP or one device"):
        allow_per_step_graphs(SimpleNamespace(strategy=FSDPStrategy()), None, LayerDrop(p=0.1))
    ddp = DDPStrategy()
    allow_per_step_graphs(SimpleNamespace(strategy=ddp), tiny_llama(), LayerDrop(p=0.1))
    assert ddp._ddp_kwargs["find_unused_parameters"] is True
    untouched = DDPStrategy()
    allow_per_step_graphs(SimpleNamespace(strategy=untouched), tiny_llama(), lora())
    assert "find_unused_parameters" not in untouched._ddp_kwargs
    reentrant = tiny_llama()
    reentrant.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match=r"fails with reentrant gradient checkpointing"):
        allow_per_step_graphs(SimpleNamespace(strategy=DDPStrategy()), reentrant, LayerDrop(p=0.1))


def test_pruning_a_model_trained_with_layerdrop_leaves_its_other_methods(tmp_path):
    from tiny_models import randomize_adapters

    from lightning_peft import load_adapter, save_adapter
    from lightning_peft.core.injection import injected_method
    from lightning_peft.operations.pruning import prune_layers

    model = tiny_llama(num_hidden_layers=4)
    apply_peft(model, Composition([lora(), LayerDrop(p=0.2)]))
    randomize_adapters(model, seed=5)
    pruned = prune_layers(model, keep="every_other").eval()
    assert not hasattr(pruned, ATTRIBUTE) and not any("forward" in vars(block) for block in pruned.model.layers)
    assert injected_method(pruned) == lora() and isinstance(injected_method(model), Composition)  # the original keeps both
    save_adapter(pruned, tmp_path / "adapter")
    fresh = prune_layers(tiny_llama(num_hidden_layers=4), keep="every_other")
    load_adapter(fresh, tmp_path / "adapter")
    ids = input_ids()
    torch.testing.assert_close(logits(fresh.eval(), ids), logits(pruned, ids), rtol=0, atol=0)
