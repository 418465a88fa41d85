"""Sparse fine-tuning (SparseFT): the sparse product against a float64 dense reference, the selections against
an independent float64 recomputation of their scores, regrowth (budget, gradient, optimizer state), exact
merging, the files (HF peft's SHiRA and ours) against peft itself, a 4-bit base, memory, DDP and bad input."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from lightning_peft import PEFTCallback, Quantization, SparseFT, apply_peft, load_adapter, merge_adapters, parameter_summary, save_adapter
from lightning_peft.core.sparse_delta import sparse_delta
from lightning_peft.formats.adapter_dir import FINGERPRINT_KEY, read_adapter_dir
from lightning_peft.formats.merged import save_merged
from lightning_peft.methods.sparse_ft import SparseFTLayer, random_entries, seen_optimizers, sparse_layers
from lightning_peft.operations.merging import merged_state_dict
from lightning_peft.quantization import quantize_model
from lightning_helpers import DestroyProcessGroupAtTeardown, LitCausalLM, make_trainer, token_loader
from lightning_helpers import tiny_llama as lightning_tiny_llama
from tiny_models import input_ids, logits, tiny_llama

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def lm_loss(model: nn.Module):
    return lambda ids: model(input_ids=ids, labels=ids).loss


def assert_top_k(chosen: torch.Tensor, score: torch.Tensor, k: int, what: str) -> None:
    """``chosen`` is a top-k set of ``score`` (float64 reference) up to float32 noise: every entry clearly above
    the k-th largest is in it, and nothing clearly below. Ties within the noise may go either way."""
    flat = score.reshape(-1)
    kth = flat.topk(k).values[-1]
    tol = 1e-4 * flat.max()  # scores are >= 0 (excluded entries are marked negative)
    chosen = chosen.reshape(-1).long()
    assert chosen.numel() == k == torch.unique(chosen).numel(), what
    assert (flat[chosen] >= kth - tol).all(), f"{what}: an entry below the k-th largest score was chosen"
    must = (flat > kth + tol).nonzero().reshape(-1)
    assert torch.isin(must, chosen).all(), f"{what}: an entry clearly in the top k was left out"
    assert ((flat - kth).abs() <= tol).sum() < max(2, k // 4), f"{what}: too many near-ties for a meaningful check"


def dense_delta64(layer: SparseFTLayer) -> torch.Tensor:
    """The (out, in) delta built independently of the package: float64 zeros with the values at the indices."""
    delta = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    delta[layer.indices] = layer.values.detach().double()
    return delta.view(layer.out_features, layer.in_features)


def random_layer(out_features: int = 48, in_features: int = 40, density: float = 0.05, dtype: torch.dtype = torch.float32) -> SparseFTLayer:
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features).to(dtype).requires_grad_(False)  # frozen, as apply_peft leaves it
    k = SparseFT(density=density).entries(out_features, in_features)
    layer = SparseFTLayer(base, k)
    layer.set_indices(random_entries(out_features * in_features, k, torch.Generator().manual_seed(5)))
    with torch.no_grad():
        layer.values.copy_(torch.randn(k) * 0.1)
    return layer


# -- the budget, and a Lightning fit that changes exactly those entries ----------------------------------------
def test_a_fit_trains_exactly_k_entries_per_matrix_and_the_merge_changes_only_those(tmp_path):
    module = LitCausalLM()
    base = {name: tensor.clone() for name, tensor in lightning_tiny_llama(0).state_dict().items()}
    method = SparseFT(density=0.05, selection="fisher", init_batches=2)
    trainer = make_trainer(tmp_path, max_steps=3, callbacks=[PEFTCallback(method)])
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3))

    layers = dict(sparse_layers(module.model))
    assert sorted(name.rsplit(".", 1)[1] for name in layers) == sorted(LLAMA_LINEARS * 2)  # all-linear without lm_head
    for name, layer in layers.items():
        out_features, in_features = base[f"{name}.weight"].shape
        assert layer.values.numel() == layer.indices.numel() == round(0.05 * out_features * in_features), name
        assert layer.values.dtype == torch.float32 and layer.indices.dtype == torch.int64
    trainable = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".values") for n in trainable)
    assert parameter_summary(module.model).trainable == sum(layer.k for layer in layers.values())

    merged = merged_state_dict(module.model)
    for name, layer in layers.items():
        weight = f"{name}.weight"
        assert torch.equal(layer.base_layer.weight, base[weight]), f"{name}: the frozen base moved"
        changed = (merged[weight] != base[weight]).reshape(-1).nonzero().reshape(-1)
        assert torch.equal(changed, torch.sort(layer.indices).values), f"{name}: the merge changed other entries"
        torch.testing.assert_close(
            merged[weight].reshape(-1)[layer.indices] - base[weight].reshape(-1)[layer.indices], layer.values.detach()
        )
    # everything that is not a targeted weight is the base's, bit for bit
    assert all(torch.equal(merged[key], base[key]) for key in base if key.removesuffix(".weight") not in layers)


def test_the_model_is_its_base_before_training():
    model = tiny_llama(0)
    expected = logits(model)
    apply_peft(model, SparseFT(density=0.1, selection="random"))
    assert torch.equal(logits(model), expected)


# -- the sparse product against a dense float64 reference ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_input_gradients_equal_the_dense_float64_reference(dtype):
    layer = random_layer(dtype=dtype)
    x = torch.randn(2, 7, 40, dtype=dtype, requires_grad=True)  # leading dims (batch, sequence)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 7, 48)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    # Reference: the dense layer W + D in float64 with W trainable, by plain autograd.
    weight = (layer.base_layer.weight.detach().double() + dense_delta64(layer)).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y64 = F.linear(x64, weight, layer.base_layer.bias.detach().double())
    y64.backward(grad_y.double())

    assert layer.values.grad.dtype == torch.float32
    # dL/dv = dL/dW at the indices; computed from the (exact) inputs and output gradients in float32 whatever x's dtype
    torch.testing.assert_close(layer.values.grad.double(), weight.grad.reshape(-1)[layer.indices], rtol=1e-5, atol=1e-6)
    loose = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}  # bf16: the base's own rounding
    torch.testing.assert_close(x.grad.double(), x64.grad, **loose)
    torch.testing.assert_close(y.double(), y64, **loose)
    assert layer.base_layer.weight.grad is None  # the frozen base weight never gets a gradient


@pytest.mark.parametrize("kernel, budget", [("csr", None), ("gather", 1), ("gather", 250), ("gather", 1 << 24)])
def test_both_kernels_and_every_chunking_give_the_dense_float64_product_and_gradients(kernel, budget):
    layer = random_layer()
    x = torch.randn(3, 5, 40, dtype=torch.float64, requires_grad=True)  # float64 in, float64 arithmetic
    values = layer.values.detach().double().requires_grad_()
    kwargs = {} if budget is None else {"budget": budget}  # 1: one token per chunk; 250: two; 2^24: all at once
    y = sparse_delta(x, values, layer.indices, 48, 40, kernel=kernel, **kwargs)
    grad_y = torch.randn_like(y)
    gx, gv = torch.autograd.grad(y, (x, values), grad_y)
    delta = dense_delta64(layer).requires_grad_()
    x64 = x.detach().clone().requires_grad_()
    reference = x64 @ delta.T
    rgx, rgd = torch.autograd.grad(reference, (x64, delta), grad_y)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gv, rgd.reshape(-1)[layer.indices], rtol=1e-12, atol=1e-12)


class RecordAllocations(TorchDispatchMode):
    """The shape of every tensor an op allocates (views and in-place results share an input's storage: left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.allocated: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        strided = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.layout == torch.strided]
        inputs = {t.untyped_storage().data_ptr() for t in strided}
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout != torch.strided:  # a sparse result: its index and value tensors are what it holds
                self.allocated += [(str(func), tuple(part.shape)) for part in (t.crow_indices(), t.col_indices(), t.values())]
            elif t.untyped_storage().data_ptr() not in inputs:
                self.allocated.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("kernel", ["csr", "gather"])
def test_forward_and_backward_allocate_no_dense_out_by_in_tensor(kernel, monkeypatch):
    # out * in = 1920 entries; the largest legitimate temporaries: (k, tokens) = 96 x 14, (tokens, out) = 14 x 48.
    import lightning_peft.core.sparse_delta as module

    monkeypatch.setattr(module, "CSR_DEVICES", ("cpu",) if kernel == "csr" else ())
    layer = random_layer(out_features=48, in_features=40, density=0.05)
    x = torch.randn(2, 7, 40, requires_grad=True)
    forward, backward = RecordAllocations(), RecordAllocations()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        with forward:
            y = layer(x)
            loss = (y * y).sum()
        with backward:
            loss.backward()
    assert layer.values.grad is not None and x.grad is not None
    mark = "sampled_addmm" if kernel == "csr" else "index_add"
    assert any(mark in op for op in backward.ops), backward.ops  # the kernel asked for, and the backward, were seen
    # Every tensor an op returned (the dispatcher's view) ...
    for op, shape in forward.allocated + backward.allocated:
        assert torch.Size(shape).numel() < 48 * 40, f"{op} allocated {shape}: as large as the dense (out, in) delta"
    # ... and every allocation, also those made inside a kernel (the profiler's view), is smaller than an (out, in) float32.
    allocations = [e.cpu_memory_usage for e in profiler.events() if e.name in ("aten::empty", "aten::empty_strided", "[memory]")]
    assert allocations and max(allocations) < 48 * 40 * 4, max(allocations)


# -- selection from data against an independent float64 recomputation ------------------------------------------
def float64_scores(batches: list[torch.Tensor], targets: list[str], selection: str) -> dict[str, torch.Tensor]:
    reference = tiny_llama(0).double()
    weights = [reference.get_submodule(t).weight for t in targets]
    for param in reference.parameters():
        param.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    scores = [torch.zeros_like(w) for w in weights]
    for ids in batches:
        grads = torch.autograd.grad(reference(input_ids=ids, labels=ids).loss, weights)
        for score, grad in zip(scores, grads):
            score += grad**2 if selection == "fisher" else grad
    return {t: s if selection == "fisher" else s.abs() for t, s in zip(targets, scores)}


@pytest.mark.parametrize("selection", ["fisher", "magnitude"])
def test_data_driven_selection_is_the_top_k_of_a_float64_recomputation(selection):
    model = tiny_llama(0)
    method = SparseFT(density=0.05, selection=selection, init_batches=3)
    apply_peft(model, method)
    batches = [input_ids(batch=2, length=8, seed=s) for s in (1, 2, 3)]
    reduced: list[torch.Size] = []

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        reduced.append(tensor.shape)
        return tensor

    method.initialise_from_data(model, batches, lm_loss(model), reduce)
    layers = dict(sparse_layers(model))
    assert reduced == [torch.Size((layer.out_features, layer.in_features)) for layer in layers.values()]  # one reduce per matrix
    reference = float64_scores(batches, list(layers), selection)
    for name, layer in layers.items():
        assert_top_k(layer.indices, reference[name], layer.k, f"{selection} {name}")
        assert torch.equal(layer.values.detach(), torch.zeros(layer.k))
        assert layer.values.requires_grad and layer.values.grad is None
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(".values"))


def test_the_selection_uses_the_reduced_score():
    """What ``reduce`` returns (the mean over the ranks) is what is ranked, not the rank's own score."""
    model = tiny_llama(0)
    method = SparseFT(density=0.05, selection="fisher", init_batches=1)
    apply_peft(model, method)
    planted: list[torch.Tensor] = []

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        planted.append(torch.rand(tensor.shape, generator=torch.Generator().manual_seed(len(planted))))
        return planted[-1].clone()

    method.initialise_from_data(model, [input_ids()], lm_loss(model), reduce)
    for (name, layer), score in zip(sparse_layers(model), planted, strict=True):
        assert torch.equal(layer.indices, torch.sort(score.reshape(-1).topk(layer.k).indices).values), name


def test_random_selection_is_the_same_in_two_fresh_models_and_depends_on_the_seed():
    def indices(seed: int) -> dict[str, torch.Tensor]:
        model = tiny_llama(seed=7)
        apply_peft(model, SparseFT(density=0.05, selection="random", seed=seed))
        return {name: layer.indices.clone() for name, layer in sparse_layers(model)}

    first, again, other = indices(3), indices(3), indices(4)
    assert first.keys() == again.keys() and all(torch.equal(first[n], again[n]) for n in first)  # what every DDP rank draws
    assert any(not torch.equal(first[n], other[n]) for n in first)
    assert len({tuple(t.tolist()) for t in first.values()}) > 2  # each matrix draws its own entries
    # Far past torch.multinomial's 2^24 categories, in O(k) memory: distinct and in range.
    big = random_entries(1 << 26, 5000, torch.Generator().manual_seed(0))
    assert big.numel() == torch.unique(big).numel() == 5000 and 0 <= int(big.min()) and int(big.max()) < 1 << 26


# -- regrowth --------------------------------------------------------------------------------------------------
def test_regrow_schedule():
    assert [SparseFT(regrow_every=n).regrow_capture_steps for n in (1, 2, 7, 8, 20, 100)] == [1, 1, 1, 2, 5, 5]
    assert SparseFT().regrow_capture_steps == 0


def test_regrowth_keeps_the_budget_regrows_by_gradient_and_resets_the_optimizer_state():
    model = tiny_llama(0)
    method = SparseFT(density=0.05, selection="random", regrow_every=2, regrow_fraction=0.25)
    apply_peft(model, method)
    layers = dict(sparse_layers(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train_step(ids: torch.Tensor) -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    train_step(input_ids(seed=1))
    method.after_optimizer_step(model, 1, identity)
    assert all(layer.capturing for layer in layers.values())  # step 2 is the one captured before the regrowth at 2

    # The reference gradient of step 2: dL/dW at W + D, by plain autograd on a merged copy.
    ids = input_ids(seed=2)
    twin = merge_adapters(copy.deepcopy(model))
    weights = {name: twin.get_submodule(name).weight.requires_grad_(True) for name in layers}
    reference = dict(zip(weights, torch.autograd.grad(twin(input_ids=ids, labels=ids).loss, list(weights.values()))))

    train_step(ids)
    before = {
        name: (layer.indices.clone(), layer.values.detach().clone(), {k: v.clone() for k, v in optimizer.state[layer.values].items()})
        for name, layer in layers.items()
    }
    assert all(seen_optimizers(layer.values) == [optimizer] for layer in layers.values())  # found without being told
    method.after_optimizer_step(model, 2, identity)

    for name, layer in layers.items():
        old_indices, old_values, old_state = before[name]
        assert layer.indices.numel() == layer.k == torch.unique(layer.indices).numel(), name
        moved = (layer.indices != old_indices).nonzero().reshape(-1)
        kept = (layer.indices == old_indices).nonzero().reshape(-1)
        assert moved.numel() == round(0.25 * layer.k), name
        assert not torch.isin(layer.indices[moved], old_indices).any(), f"{name}: regrown where it already was"
        assert old_values[moved].abs().max() <= old_values[kept].abs().min(), f"{name}: not the smallest |v| dropped"
        score = reference[name].double().abs().reshape(-1).clone()
        score[old_indices] = -1.0  # only unheld positions compete
        assert_top_k(layer.indices[moved], score, moved.numel(), f"regrowth of {name}")
        assert torch.equal(layer.values.detach()[moved], torch.zeros(moved.numel()))
        assert torch.equal(layer.values.detach()[kept], old_values[kept])
        state = optimizer.state[layer.values]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][moved], torch.zeros(moved.numel())), f"{name}: {key} of a regrown slot kept"
            assert torch.equal(state[key][kept], old_state[key][kept])
            assert old_state[key][moved].abs().sum() > 0  # there was state to reset
        assert torch.equal(state["step"], old_state["step"])
        assert not layer.capturing  # the dense accumulator is gone until the next window

    train_step(input_ids(seed=3))
    method.after_optimizer_step(model, 3, identity)
    train_step(input_ids(seed=4))
    second = {name: layer.indices.clone() for name, layer in layers.items()}
    method.after_optimizer_step(model, 4, identity)
    for name, layer in layers.items():
        assert layer.indices.numel() == layer.k and (layer.indices != second[name]).sum() == round(0.25 * layer.k)


class _RecordIndices(L.Callback):
    def __init__(self) -> None:
        self.before_last: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before_last = {name: layer.indices.clone() for name, layer in sparse_layers(pl_module.model)}


def test_regrowth_under_the_trainer_resets_the_adam_state_of_the_regrown_slots(tmp_path):
    module, recorder = LitCausalLM(), _RecordIndices()
    method = SparseFT(density=0.05, selection="random", regrow_every=2, regrow_fraction=0.2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[PEFTCallback(method), recorder])
    trainer.fit(module, train_dataloaders=token_loader(n_batches=3))
    (optimizer,) = trainer.optimizers
    for name, layer in sparse_layers(module.model):
        moved = layer.indices != recorder.before_last[name]
        assert moved.sum() == round(0.2 * layer.k), name
        state = optimizer.state[layer.values]
        assert (state["exp_avg"][moved] == 0).all() and (state["exp_avg_sq"][moved] == 0).all(), name
        assert (state["exp_avg"][~moved] != 0).all(), name


def test_resuming_restores_the_regrown_entries_and_continues_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # Regrowth after steps 3 and 6; the checkpoint at 3 (an epoch boundary: the same batches follow) holds the
    # entries regrown at 3, and the resumed run captures step 6 and regrows exactly as the straight one.
    method = SparseFT(density=0.05, selection="fisher", init_batches=2, regrow_every=3, regrow_fraction=0.2)
    straight = LitCausalLM()
    make_trainer(tmp_path / "a", max_steps=6, callbacks=[PEFTCallback(method)]).fit(straight, train_dataloaders=token_loader())

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    first = LitCausalLM()
    make_trainer(tmp_path / "b", max_steps=3, callbacks=[PEFTCallback(method), saver], enable_checkpointing=True).fit(
        first, train_dataloaders=token_loader()
    )
    path = saver.last_model_path or saver.best_model_path
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.endswith(".indices") for k in state) and not any(k.endswith("base_layer.weight") for k in state)
    selected = {name: layer.indices.clone() for name, layer in sparse_layers(first.model)}

    resumed = LitCausalLM()  # fresh placeholder entries: the regrown ones must come from the checkpoint
    make_trainer(tmp_path / "c", max_steps=6, callbacks=[PEFTCallback(method)]).fit(
        resumed, train_dataloaders=token_loader(), ckpt_path=path
    )
    assert sorted(resumed.step_losses) == [4, 5, 6]  # no new selection on resume (it would have run training_step)
    for step in (4, 5, 6):
        assert resumed.step_losses[step] == pytest.approx(straight.step_losses[step], rel=1e-6, abs=1e-7), step
    ours, theirs = dict(sparse_layers(resumed.model)), dict(sparse_layers(straight.model))
    for name, layer in ours.items():
        assert torch.equal(layer.indices, theirs[name].indices), name
        assert not torch.equal(layer.indices, selected[name]), f"{name}: no regrowth at step 6"
        torch.testing.assert_close(layer.values, theirs[name].values, rtol=1e-5, atol=1e-7)


# -- files and merging --------------------------------------------------------------------------------------------
def trained(density: float, seed: int = 0) -> nn.Module:
    """A tiny Llama with SparseFT whose values were trained two AdamW steps (random entries from ``seed``)."""
    model = tiny_llama(0)
    apply_peft(model, SparseFT(density=density, selection="random", seed=seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for s in (1, 2):
        model(input_ids=input_ids(seed=s), labels=input_ids(seed=s)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("density, peft_type", [(0.05, "SHIRA"), (0.9, None)], ids=["shira", "native"])
def test_save_and_load_adapter_reproduce_the_model_exactly(tmp_path, density, peft_type):
    model = trained(density)
    save_adapter(model, tmp_path / "adapter")
    config, tensors, metadata = read_adapter_dir(tmp_path / "adapter")
    assert FINGERPRINT_KEY in metadata
    assert config.get("peft_type") == peft_type
    if peft_type is None:  # 0.9: K = r * (in + out) would exceed k_proj's 16 x 32 entries, so our own format
        assert config["format"] == "lightning_peft"
        assert any(key.endswith(".indices") and tensor.dtype == torch.int64 for key, tensor in tensors.items())
    fresh = tiny_llama(0)
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), logits(model))
    ours = dict(sparse_layers(model))
    for name, layer in sparse_layers(fresh):
        assert torch.equal(layer.indices, ours[name].indices) and torch.equal(layer.values, ours[name].values), name


def test_the_shira_file_loads_in_peft_with_exactly_our_delta(tmp_path):
    model = trained(0.05)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    layers = dict(sparse_layers(model))
    assert config["r"] == max(-(-layer.k // (layer.in_features + layer.out_features)) for layer in layers.values())
    assert sorted(config["target_modules"]) == sorted(LLAMA_LINEARS)

    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=1e-5)
    ours = merged_state_dict(model)
    peft_merged = peft_model.merge_and_unload().state_dict()
    for name in layers:  # peft adds its sparse COO delta to W: the same float32 sums, bit for bit
        assert torch.equal(peft_merged[f"{name}.weight"], ours[f"{name}.weight"]), name

    # A SHiRA file peft wrote itself (r * (in + out) entries per matrix) is refused with the reason.
    peft_model = PeftModel.from_pretrained(tiny_llama(0), tmp_path / "adapter")
    peft_model.save_pretrained(tmp_path / "from_peft")
    with pytest.raises(ValueError, match=r"was not written by lightning_peft: peft's SHiRA trains r \* \(in \+ out\) entries per matrix"):
        load_adapter(tiny_llama(0), tmp_path / "from_peft")


def test_shira_padding_that_is_not_zero_is_refused():
    layer = random_layer()
    tensors = {key: value.clone() for key, value in layer.peft_state_dict().items()}
    assert tensors["shira_weight"].numel() == layer.shira_entries > layer.k
    assert not torch.isin(tensors["shira_indices"][0, layer.k :] * 40 + tensors["shira_indices"][1, layer.k :], layer.indices).any()
    tensors["shira_weight"][-1] = 0.5
    with pytest.raises(ValueError, match=r"non-zero values beyond the first 96 entries of a matrix"):
        layer.load_peft_state_dict(tensors)


def test_merged_model_and_merged_export_match_the_unmerged_logits(tmp_path):
    model = trained(0.05)
    expected = logits(model)
    save_merged(model, tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(logits(exported), expected, rtol=0, atol=1e-5)
    merged = merge_adapters(copy.deepcopy(model))
    assert not any(isinstance(m, SparseFTLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)


# -- a 4-bit base ------------------------------------------------------------------------------------------------
def test_on_a_4bit_base_the_codes_never_change_and_the_export_reloads(tmp_path):
    import bitsandbytes as bnb

    def quantized() -> nn.Module:
        model = tiny_llama(0)
        quantize_model(model, Quantization(compute_dtype="float32"))
        return model

    model = quantized()
    method = SparseFT(density=0.05, selection="fisher", init_batches=2)
    apply_peft(model, method)
    layers = dict(sparse_layers(model))
    assert layers and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers.values())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    method.initialise_from_data(model, [input_ids(seed=1), input_ids(seed=2)], lm_loss(model), identity)  # through the 4-bit layers
    assert all(not torch.equal(layer.indices, torch.arange(layer.k)) for layer in layers.values())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for s in (1, 2):
        model(input_ids=input_ids(seed=s), labels=input_ids(seed=s)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad), "the 4-bit codes changed"
    assert all(layer.values.abs().min() > 0 for layer in layers.values())

    save_adapter(model, tmp_path / "adapter")
    fresh = quantized()
    load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(logits(fresh), logits(model))


# -- DDP --------------------------------------------------------------------------------------------------------
class _SameEntriesOnEveryRank(L.Callback):
    """After the selection and before any forward (DDP's buffer broadcast would hide a rank that chose its own):
    every rank holds the same entries, though the ranks estimated on different data."""

    def on_train_start(self, trainer, pl_module):
        layers = dict(sparse_layers(pl_module.model))
        assert layers
        for name, layer in layers.items():
            gathered = trainer.strategy.all_gather(layer.indices)
            assert torch.equal(gathered[0], gathered[1]), f"ranks selected different entries for {name}"
            assert not torch.equal(layer.indices, torch.arange(layer.k)), f"{name} kept its placeholder entries"
        first = next(iter(trainer.train_dataloader))["input_ids"]
        shards = trainer.strategy.all_gather(first)
        assert not torch.equal(shards[0], shards[1]), "both ranks saw the same batch"


def test_fisher_selection_is_identical_on_every_ddp_rank(tmp_path):
    method = SparseFT(density=0.05, selection="fisher", init_batches=2)
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=1,
        callbacks=[PEFTCallback(method), _SameEntriesOnEveryRank(), DestroyProcessGroupAtTeardown()],
    )
    trainer.fit(LitCausalLM(), train_dataloaders=token_loader(n_batches=4))


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan")])
def test_density_outside_zero_one_is_named(density):
    with pytest.raises(
        ValueError, match=r"SparseFT density must be in \(0, 1\] \(the fraction of each matrix's entries that train\), got density="
    ):
        SparseFT(density=density)


def test_unknown_selection_is_named():
    with pytest.raises(ValueError, match=r"unknown SparseFT selection 'top'; choose one of 'fisher', 'magnitude', 'random'"):
        SparseFT(selection="top")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5, 2])
def test_regrow_fraction_outside_zero_one_is_named(fraction):
    with pytest.raises(
        ValueError, match=r"regrow_fraction must be in \(0, 1\) \(the fraction of entries dropped and regrown\), got regrow_fraction="
    ):
        SparseFT(regrow_fraction=fraction)


@pytest.mark.parametrize("every", [0, -3, 2.5])
def test_regrow_every_that_is_not_a_positive_integer_is_named(every):
    with pytest.raises(
        ValueError, match=r"regrow_every must be None \(no regrowth\) or a positive integer number of steps, got regrow_every="
    ):
        SparseFT(regrow_every=every)


def test_init_batches_that_is_not_positive_is_named():
    with pytest.raises(ValueError, match=r"init_batches must be a positive integer, got init_batches=0"):
        SparseFT(init_batches=0)


def test_data_driven_selection_without_a_training_dataloader_names_sparse_ft(tmp_path):
    class NoTrainData(LitCausalLM):
        def train_dataloader(self):
            return None

    trainer = make_trainer(tmp_path, callbacks=[PEFTCallback(SparseFT(density=0.05, init_batches=2))])
    with pytest.raises(
        ValueError, match=r"SparseFT initialises its adapters from the training data, but this Trainer has no train dataloader"
    ):
        trainer.fit(NoTrainData())


def test_indices_that_do_not_fit_the_layer_are_refused():
    layer = random_layer()
    with pytest.raises(ValueError, match=r"SparseFT indices must lie in \[0, 1920\) for a 48 x 40 weight"):
        layer.set_indices(torch.arange(96) + 1900)
    with pytest.raises(ValueError, match=r"SparseFT indices must be distinct"):
        layer.set_indices(torch.zeros(96, dtype=torch.long))
