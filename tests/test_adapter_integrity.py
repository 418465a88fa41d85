"""What an adapter directory must refuse on load (issue 14, part 4): damaged data behind an intact header
(checksum), non-finite tensors, an adapter_config.json that contradicts the config recorded when the
adapter was written (peft and lightning_peft would read two different models), and what must be said about
a peft-written file that carries no fingerprint."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adapter_files import as_peft_written, edit_config, rewrite_recorded_config, rewrite_tensors
from lightning_peft import Adapter, AdapterFileError, LoRA, apply_peft, load_adapter, save_adapter
from lightning_peft.formats.adapter_dir import CHECKSUM_KEY, CONFIG_COPY_KEY, WEIGHTS_NAME, read_adapter_dir, tensors_checksum
from tiny_models import logits, randomize_adapters, tiny_bert, tiny_llama

Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def trained(method=None, build=tiny_llama) -> torch.nn.Module:
    model = build(0)
    apply_peft(model, method or LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=3)
    return model


@pytest.fixture
def saved(tmp_path) -> Path:
    return save_adapter(trained(), tmp_path / "adapter")


def test_the_checksum_covers_names_dtypes_shapes_and_bytes():
    base = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
    reference = tensors_checksum(base)
    assert tensors_checksum(dict(reversed(list(base.items())))) == reference  # order of the dict does not matter
    for changed in (
        {"a": torch.ones(2, 3), "c": torch.zeros(4)},
        {"a": torch.ones(3, 2), "b": torch.zeros(4)},
        {"a": torch.ones(2, 3, dtype=torch.float64), "b": torch.zeros(4)},
        {"a": torch.ones(2, 3).index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(1.0 + 2**-20)), "b": torch.zeros(4)},
    ):
        assert tensors_checksum(changed) != reference
    assert tensors_checksum({"x": torch.ones(2, dtype=torch.bfloat16)}) != tensors_checksum({"x": torch.ones(2, dtype=torch.float16)})


def test_damaged_data_behind_an_intact_header_is_refused(saved):
    file = saved / WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x40  # one bit in the last tensor's data; the JSON header is untouched
    file.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"do not match the checksum recorded when they were written"):
        load_adapter(tiny_llama(0), saved)


def test_a_consistent_rewrite_with_other_values_still_loads(saved):
    rewrite_tensors(saved, lambda t: t.update({Q_B: t[Q_B] * 2}))
    model = load_adapter(tiny_llama(0), saved)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_B, read_adapter_dir(saved)[1][Q_B])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused_on_load(saved, value):
    rewrite_tensors(saved, lambda t: t[Q_B].view(-1).__setitem__(0, value))
    with pytest.raises(AdapterFileError, match=r"non-finite values \(NaN or inf\) in 1 tensors .*q_proj\.lora_B"):
        load_adapter(tiny_llama(0), saved)


def test_non_finite_adapters_are_refused_on_save_and_nothing_is_written(tmp_path):
    model = trained()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_A.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values.*v_proj\.lora_A.*diverged"):
        save_adapter(model, tmp_path / "nan")
    assert not (tmp_path / "nan").exists() and list(tmp_path.iterdir()) == []


def test_edited_lora_alpha_is_a_contradiction_that_names_both_values(saved):
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8
    edit_config(saved, lora_alpha=32)
    # The two readers would disagree: peft would use alpha 32, our metadata says 8.
    with pytest.raises(AdapterFileError, match=r"contradicts the config recorded.*lora_alpha: adapter_config\.json says 32, the adapter was written with 8"):
        load_adapter(tiny_llama(0), saved)


def test_the_same_directory_means_the_same_model_to_peft_and_to_us(saved):
    ours = load_adapter(tiny_llama(0), saved)
    theirs = PeftModel.from_pretrained(tiny_llama(0), saved).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-5)


def test_native_format_contradiction_is_refused(tmp_path):
    path = save_adapter(trained(Adapter(style="pfeiffer", reduction_factor=4), tiny_bert), tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    config["method"]["init_args"]["reduction_factor"] = 8
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"method: adapter_config\.json says .*'reduction_factor': 8.*written with .*'reduction_factor': 4"):
        load_adapter(tiny_bert(0), path)


def test_a_config_rewritten_consistently_is_accepted(saved):
    edit_config(saved, revision="main")  # informational field, and the recorded copy follows
    rewrite_recorded_config(saved)
    load_adapter(tiny_llama(0), saved)


def test_our_files_record_checksum_and_config(saved):
    _, tensors, metadata = read_adapter_dir(saved)
    assert metadata[CHECKSUM_KEY] == tensors_checksum(tensors)
    assert json.loads(metadata[CONFIG_COPY_KEY]) == json.loads((saved / "adapter_config.json").read_text())


def test_peft_file_without_fingerprint_warns_and_names_the_missing_fingerprint(saved):
    as_peft_written(saved)
    with pytest.warns(UserWarning, match=r"carries no base-model fingerprint \(lightning_peft\.base_fingerprint.*files written by HF peft have none\)"):
        load_adapter(tiny_llama(1), saved)  # another base: nothing can tell, so the user is told


def test_our_file_loads_without_a_warning(saved):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tiny_llama(0), saved)


def test_checksumming_leaves_the_callers_storage_resizable():
    # FSDP1 frees the full parameters it gathered for an export by resizing their storage to 0; a checksum
    # that went through .numpy() on that storage made it unresizable and crashed every FSDP1 export.
    from lightning_peft.formats.adapter_dir import tensors_checksum

    tensor = torch.arange(6, dtype=torch.float32)
    assert tensors_checksum({"a": tensor}) == tensors_checksum({"a": tensor.clone()})
    tensor.untyped_storage().resize_(0)
    assert tensor.untyped_storage().size() == 0
