"""Checkpoints: atomic writes, keep-last pruning, failed writes, NaN guards, RNG and optimizer round trips."""

import errno
import json
import random

import numpy as np
import pytest
import torch

from gptkit import GPT, GPTConfig
from gptkit import checkpoint as ck
from gptkit.errors import GptkitError
from gptkit.loading import load_checkpoint_model
from gptkit.optim import make_adamw


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=30))


def _trained(seed=0):
    m = _model(seed)
    opt, names = make_adamw(m, 1e-2, 0.1)
    x = torch.randint(0, 30, (2, 8))
    for _ in range(2):
        _, loss = m(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return m, opt, names


def _state(m):
    return {"model_config": m.config.to_dict()}


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_save_and_load_round_trip_model_and_optimizer(tmp_path):
    m, opt, names = _trained()
    path = ck.save_checkpoint(tmp_path / "run", 2, m, _state(m), opt, names)
    assert path.name == "ckpt_00000002" and ck.find_checkpoint(tmp_path / "run") == path
    loaded = load_checkpoint_model(path).model
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    m2 = _model(1)
    opt2, names2 = make_adamw(m2, 1e-2, 0.1)
    st = ck.read_state(path)
    opt2.load_state_dict(ck.optimizer_from_flat(ck.read_tensors(path / ck.OPTIM_FILE), st["optimizer"], names2))
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for slot in a["state"][i]:
            assert torch.equal(a["state"][i][slot], b["state"][i][slot])


def test_rng_state_survives_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    st = json.loads(json.dumps(ck.rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.set_rng_state(st)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])


def test_keep_last_prunes_only_after_the_new_checkpoint_is_complete(tmp_path, monkeypatch):
    m, opt, names = _trained()
    run = tmp_path / "run"
    for step in (1, 2, 3):
        ck.save_checkpoint(run, step, m, _state(m), opt, names, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt_00000002", "ckpt_00000003"]
    # a save that dies midway must not have pruned anything
    real = ck._write_tensors
    calls = []

    def dying(tensors, file):
        calls.append(file.name)
        if file.name == ck.OPTIM_FILE:
            raise KeyboardInterrupt  # the process being stopped mid-save
        real(tensors, file)

    monkeypatch.setattr(ck, "_write_tensors", dying)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(run, 4, m, _state(m), opt, names, keep_last=1)
    assert calls == [ck.MODEL_FILE, ck.OPTIM_FILE]
    assert [p.name for p in ck.list_checkpoints(run)] == ["ckpt_00000002", "ckpt_00000003"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_a_kill_while_pruning_never_leaves_a_visible_half_deleted_checkpoint(tmp_path, monkeypatch):
    """kill -9 in the middle of deleting an old checkpoint: here the deletion removes one file and
    the process dies. Every visible ckpt_* must still be complete, and resume's clean-up removes the rest."""
    m, opt, names = _trained()
    run = tmp_path / "run"
    for step in (1, 2):
        ck.save_checkpoint(run, step, m, _state(m), opt, names, keep_last=2)

    def killed_mid_delete(path, ignore_errors=False):
        (path / ck.STATE_FILE).unlink()  # the first file is gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(ck.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(run, 3, m, _state(m), opt, names, keep_last=2)
    monkeypatch.undo()
    visible = sorted(p for p in run.iterdir() if p.name.startswith("ckpt_"))
    assert [p.name for p in visible] == ["ckpt_00000002", "ckpt_00000003"]
    assert all(ck.is_checkpoint_dir(p) and (p / ck.OPTIM_FILE).is_file() for p in visible)
    ck.clean_partial(run)
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_00000002", "ckpt_00000003"]


def test_full_disk_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    m, opt, names = _trained()
    run = tmp_path / "run"
    ck.save_checkpoint(run, 1, m, _state(m), opt, names, keep_last=1)
    before = _snapshot(run)

    def full(tensors, file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_tensors", full)
    for step in (1, 2):  # a new step, and re-saving the existing one
        with pytest.raises(GptkitError, match="No space left on device") as e:
            ck.save_checkpoint(run, step, m, _state(m), opt, names, keep_last=1)
        assert "existing checkpoints are intact" in e.value.line()
        assert _snapshot(run) == before
        assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_weights_with_nan_are_never_saved(tmp_path):
    m, opt, names = _trained()
    run = tmp_path / "run"
    ck.save_checkpoint(run, 1, m, _state(m), opt, names)
    before = _snapshot(run)
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(GptkitError, match="NaN or inf"):
        ck.save_checkpoint(run, 1, m, _state(m), opt, names)
    with pytest.raises(GptkitError, match="NaN or inf"):
        ck.save_checkpoint(run, 2, m, _state(m), opt, names)
    assert _snapshot(run) == before


def test_clean_partial_removes_temporaries_and_restores_a_checkpoint_moved_aside(tmp_path):
    m, _, _ = _trained()
    run = tmp_path / "run"
    path = ck.save_checkpoint(run, 5, m, _state(m))
    (run / ".tmp_ckpt_00000006_abc").mkdir()
    (run / ".tmp_ckpt_00000006_abc" / "model.safetensors").write_bytes(b"partial")
    aside = run / ".old_ckpt_00000005_1234"
    path.rename(aside)  # killed between moving the old one aside and renaming the new one in
    assert ck.list_checkpoints(run) == []
    ck.clean_partial(run)
    assert [p.name for p in run.iterdir()] == ["ckpt_00000005"]
    load_checkpoint_model(run / "ckpt_00000005")


def test_checkpoint_directory_gets_the_umask_permissions_not_mkdtemp_0700(tmp_path):
    """The temporary directory behind the atomic write is 0700; the checkpoint a teammate reads
    must follow the umask like any other directory the run writes."""
    import os
    import stat

    m, opt, names = _trained()
    old = os.umask(0o022)
    try:
        path = ck.save_checkpoint(tmp_path / "run", 2, m, _state(m), opt, names)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    for f in path.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
