"""Exports never lose a user's files or a trained result (lightning_peft/formats/atomic.py).

- only our files are written and deleted; a file is never turned into a directory;
- a process killed (SIGKILL-like ``os._exit``) at any step of a replacement leaves a directory that loads as
  the old export or the new one, whole, and the staging is cleaned up by the next call;
- faults (disk full through a real ``RLIMIT_FSIZE``, permission denied, a read-only filesystem) give a
  clear error, the previous files intact and no partial directory;
- directories and files follow the user's umask.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lightning_peft.formats.atomic as atomic
from lightning_peft import LoRA, apply_peft, load_adapter, save_adapter
from lightning_peft.core.adapter_layer import adapter_layers
from tiny_models import randomize_adapters, tiny_llama

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "v_proj"]


def trained(seed: int):
    model = tiny_llama(0)
    apply_peft(model, LoRA(r=2, alpha=4, target_modules=TARGETS))
    randomize_adapters(model, seed=seed)
    return model


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {f"{name}.{attr}": getattr(layer, attr).detach().clone() for name, layer in adapter_layers(model) for attr in ("lora_A", "lora_B")}


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def no_staging_left(directory: Path) -> bool:
    return not list(directory.glob(atomic.STAGING_PREFIX + "*")) and not list(directory.parent.glob(f".{directory.name}.*-*"))


# -- only our files --------------------------------------------------------------------------------


def test_exporting_onto_a_file_is_refused_and_the_file_kept(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(atomic.ExportPathError, match=r"notes\.txt' is a file.*never replaces a file"):
        save_adapter(trained(1), notes)
    assert notes.read_text() == "my notes"


def test_exporting_into_a_directory_keeps_the_users_other_files(tmp_path):
    target = tmp_path / "release"
    target.mkdir()
    (target / "README.md").write_text("# my model card")
    (target / "tokenizer.json").write_text("{}")
    save_adapter(trained(1), target)
    save_adapter(trained(2), target)  # and a second export over the first
    assert (target / "README.md").read_text() == "# my model card" and (target / "tokenizer.json").read_text() == "{}"
    loaded = load_adapter(tiny_llama(0), target)
    assert all(torch.equal(a, b) for a, b in zip(adapter_tensors(loaded).values(), adapter_tensors(trained(2)).values()))


def test_files_only_our_previous_export_wrote_are_removed(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "notes.md").write_text("mine")
    with atomic.atomic_directory(target) as staging:
        (staging / "model-00001-of-00002.safetensors").write_text("1")
        (staging / "model-00002-of-00002.safetensors").write_text("2")
    with atomic.atomic_directory(target) as staging:
        (staging / "model.safetensors").write_text("whole")
    assert sorted(p.name for p in target.iterdir()) == [atomic.MANIFEST, "model.safetensors", "notes.md"]


def test_export_directories_and_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_adapter(trained(1), tmp_path / "out" / "adapter")
    finally:
        os.umask(previous)
    for path in (tmp_path / "out", tmp_path / "out" / "adapter"):
        assert path.stat().st_mode & 0o777 == 0o755, path
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


# -- kills at every step ---------------------------------------------------------------------------

KILL_CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from safetensors.torch import save_file
    import lightning_peft.formats.atomic as atomic
    from lightning_peft import save_adapter
    from test_export_writes import trained, adapter_tensors
    target, reference, where, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    old, new = trained(1), trained(2)
    save_adapter(old, target)
    save_file(adapter_tensors(old), reference + "/old.safetensors")
    save_file(adapter_tensors(new), reference + "/new.safetensors")
    calls = 0
    def killing(real):
        def call(*args, **kwargs):
            global calls
            calls += 1
            if calls == nth:
                os._exit(137)  # no cleanup, no finally: what SIGKILL leaves
            return real(*args, **kwargs)
        return call
    if where == "write":  # half a tensor file on disk, then death
        def half(tensors, file, metadata):
            file.write_bytes(b"\\0" * 100)
            os._exit(137)
        atomic.write_adapter_tensors = half
        import lightning_peft.formats.adapter_dir as adapter_dir
        adapter_dir.write_adapter_tensors = half
    elif where == "fsync":
        atomic._fsync = killing(atomic._fsync)
    else:
        os.replace = killing(os.replace)  # this child's only renames are the export's
    save_adapter(new, target)
    print("survived")
    """
)
# fsync: 2 files, the pending mark, the staging folder, the manifest, the target; replace: the mark (the commit
# point), 2 files, the manifest.
KILL_POINTS = [("write", 1)] + [("fsync", n) for n in range(1, 7)] + [("replace", n) for n in range(1, 5)]


@pytest.mark.parametrize(("where", "nth"), KILL_POINTS, ids=[f"{w}-{n}" for w, n in KILL_POINTS])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_export_whole(tmp_path, where, nth):
    target, reference = tmp_path / "adapter", tmp_path / "reference"
    reference.mkdir()
    script = KILL_CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", script, str(target), str(reference), where, str(nth)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 137, (done.returncode, done.stdout, done.stderr[-2000:])
    old, new = load_file(reference / "old.safetensors"), load_file(reference / "new.safetensors")
    loaded = adapter_tensors(load_adapter(tiny_llama(0), target))  # the load finishes a committed move
    got = [name for name, expected in (("old", old), ("new", new)) if all(torch.equal(loaded[k], expected[k]) for k in expected)]
    assert len(got) == 1, "the directory holds neither export whole"
    committed = (where == "replace" and nth >= 2) or (where == "fsync" and nth >= 4)
    assert got == (["new"] if committed else ["old"])
    assert no_staging_left(target) or not committed  # an uncommitted staging folder goes on the next write
    save_adapter(trained(3), target)
    assert no_staging_left(target)


def test_an_export_left_by_the_previous_scheme_is_restored(tmp_path):
    target = tmp_path / "adapter"
    save_adapter(trained(1), target)
    before = snapshot(target)
    aside = tmp_path / ".adapter.old-abc123"  # killed between "move the old aside" and "move the new in"
    aside.mkdir()
    os.replace(target, aside / "adapter")
    (tmp_path / ".adapter.tmp-def456").mkdir()
    load_adapter(tiny_llama(0), target)
    assert snapshot(target) == before and no_staging_left(target)


# -- faults ----------------------------------------------------------------------------------------

DISK_FULL_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from lightning_peft import save_adapter
    from lightning_peft.formats.atomic import ExportWriteError
    from test_export_writes import trained
    model = trained(2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600))
    try:
        save_adapter(model, sys.argv[1])
    except ExportWriteError as err:
        print("ERROR:", err)
    """
)


def test_disk_full_is_a_clear_error_and_the_previous_export_survives(tmp_path):
    target = tmp_path / "adapter"
    save_adapter(trained(1), target)
    before = snapshot(target)
    script = DISK_FULL_CHILD.format(tests=str(REPO / "tests"), repo=str(REPO))
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR: " in done.stdout and str(target) in done.stdout and "nothing in it was changed" in done.stdout, done.stdout
    assert snapshot(target) == before and no_staging_left(target)


@pytest.mark.parametrize(
    ("code", "what"), [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system"), (errno.ENOSPC, "No space left on device")]
)
def test_os_errors_while_writing_leave_the_previous_export(tmp_path, monkeypatch, code, what):
    target = tmp_path / "adapter"
    save_adapter(trained(1), target)
    before = snapshot(target)
    import lightning_peft.formats.adapter_dir as adapter_dir

    def failing(tensors, file, metadata):
        raise OSError(code, os.strerror(code), str(file))

    monkeypatch.setattr(adapter_dir, "write_adapter_tensors", failing)
    with pytest.raises(atomic.ExportWriteError, match=rf"{target}.*{what}.*nothing in it was changed"):
        save_adapter(trained(2), target)
    assert snapshot(target) == before and no_staging_left(target)


def test_a_failed_first_export_leaves_no_directory(tmp_path, monkeypatch):
    import lightning_peft.formats.adapter_dir as adapter_dir

    def failing(tensors, file, metadata):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(adapter_dir, "write_adapter_tensors", failing)
    with pytest.raises(atomic.ExportWriteError):
        save_adapter(trained(2), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_parent_that_is_a_file_is_found_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(atomic.ExportPathError, match=r"'.*file' is a file, not a directory"):
        atomic.check_export_target(tmp_path / "file" / "adapter")
