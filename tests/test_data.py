"""Token shards (llm.c layout) and the loader: format round trip and checks, determinism,
resume equality, rank slices, whole-split eval windows."""

import json

import numpy as np
import pytest
import torch

from gptkit.data import (ShardWriter, SplitTokens, TokenLoader, count_eval_batches, eval_windows, read_header,
                         read_shard, split_files, write_shard)
from gptkit.errors import GptkitError


def llmc_bytes(tokens, wide: bool = False) -> bytes:
    """llm.c's shard layout written by hand from INTERFACES.md (GPT-2's uint16 shard) or llm.c's
    dev/data/data_common.py (Llama 3's uint32 shard, wide=True), independent of gptkit.data."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240801, 7, len(tokens)) if wide else (20240520, 1, len(tokens))
    return header.tobytes() + np.asarray(tokens, dtype="<u4" if wide else "<u2").tobytes()


def make_split(d, split, sizes, seed=0, vocab=50257):
    """Shards of random tokens (uint32 ones for vocab > 65,536); returns the whole split's tokens."""
    rng = np.random.default_rng(seed)
    all_toks = []
    for i, n in enumerate(sizes):
        t = rng.integers(0, vocab, n)
        name = f"{split}.bin" if len(sizes) == 1 else f"{split}_{i:06d}.bin"
        (d / name).write_bytes(llmc_bytes(t, wide=vocab > 65536))
        all_toks.append(t)
    return np.concatenate(all_toks)


def test_shard_roundtrip_matches_llmc_layout(tmp_path):
    toks = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(tmp_path / "a.bin", toks)
    assert (tmp_path / "a.bin").read_bytes() == llmc_bytes(toks)
    assert read_header(tmp_path / "a.bin") == 5
    assert read_shard(tmp_path / "a.bin").tolist() == toks.tolist()
    w = ShardWriter(tmp_path / "b.bin")  # piecewise writer: same bytes
    w.write(toks[:2])
    w.write(toks[2:])
    w.close()
    assert (tmp_path / "b.bin").read_bytes() == llmc_bytes(toks)
    write_shard(tmp_path / "e.bin", [])
    assert len(read_shard(tmp_path / "e.bin")) == 0 and (tmp_path / "e.bin").stat().st_size == 1024


def test_wide_shard_roundtrip_matches_llmc_llama3_layout(tmp_path):
    toks = np.array([0, 65535, 65536, 128255, 7], dtype=np.int64)  # Llama 3's vocabulary: 128,256 ids
    write_shard(tmp_path / "a.bin", toks)  # the largest id picks the layout
    assert (tmp_path / "a.bin").read_bytes() == llmc_bytes(toks, wide=True)
    assert read_header(tmp_path / "a.bin") == 5 and read_shard(tmp_path / "a.bin").tolist() == toks.tolist()
    w = ShardWriter(tmp_path / "b.bin", vocab_size=128256)  # a dataset's shards all take its vocabulary's layout
    w.write([1, 2])
    w.close()
    assert (tmp_path / "b.bin").read_bytes() == llmc_bytes([1, 2], wide=True)
    write_shard(tmp_path / "c.bin", [1, 2], vocab_size=65536)  # every id fits uint16
    assert (tmp_path / "c.bin").read_bytes() == llmc_bytes([1, 2])


def test_shard_refuses_ids_beyond_its_layout(tmp_path):
    for bad in ([65536], [-1]):
        w = ShardWriter(tmp_path / "x.bin")  # uint16 unless told the vocabulary is larger
        with pytest.raises(GptkitError, match=r"\[0, 65535\]"):
            w.write(bad)
        assert not list(tmp_path.glob("x.bin*"))
    with pytest.raises(GptkitError, match="found range"):
        write_shard(tmp_path / "x.bin", [3, -1])
    with pytest.raises(GptkitError, match="4294967295"):
        write_shard(tmp_path / "x.bin", [2 ** 32], vocab_size=2 ** 33)
    assert not list(tmp_path.glob("x.bin*"))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:1000], "truncated"),
    (lambda b: b[:-2], "size mismatch"),
    (lambda b: (1).to_bytes(4, "little") + b[4:], "bad magic"),
    (lambda b: b[:4] + (7).to_bytes(4, "little") + b[8:], "version"),
    (lambda b: b + b"\0\0", "size mismatch"),
    (lambda b: (20240801).to_bytes(4, "little") + b[4:], "version 1 for magic 20240801"),
    (lambda b: (20240801).to_bytes(4, "little") + (7).to_bytes(4, "little") + b[8:], "size mismatch"),
], ids=["short-header", "truncated-tokens", "magic", "version", "oversized", "llama3-magic-gpt2-version",
        "uint16-body-under-uint32-header"])
def test_damaged_shards_are_user_errors(tmp_path, damage, message):
    p = tmp_path / "train.bin"
    p.write_bytes(damage(llmc_bytes(range(100))))
    with pytest.raises(GptkitError, match=message) as e:
        read_shard(p)
    assert str(p) in e.value.line()


def test_split_files_orders_numbered_shards(tmp_path):
    make_split(tmp_path, "train", [10, 10, 10])
    (tmp_path / "train_1.bin").write_bytes(llmc_bytes([1]))  # not a shard name: ignored
    assert [f.name for f in split_files(tmp_path, "train")] == [f"train_{i:06d}.bin" for i in range(3)]
    with pytest.raises(GptkitError, match="no val shards"):
        split_files(tmp_path, "val")
    with pytest.raises(GptkitError, match="not found"):
        split_files(tmp_path / "nope", "train")


def _is_window(row_x, row_y, shards) -> bool:
    """(x, y) is tokens[s:s+T], tokens[s+1:s+T+1] of one shard."""
    w = np.concatenate([row_x[:1], row_y])
    for sh in shards:
        if len(sh) < len(w):
            continue
        view = np.lib.stride_tricks.sliding_window_view(sh, len(w))
        if (view == w).all(axis=1).any():
            return True
    return False


def test_random_batches_are_seeded_windows_and_resume_exactly(tmp_path):
    make_split(tmp_path, "train", [300, 50, 7, 400])  # the 7-token shard is too short for T=8
    shards = [np.asarray(read_shard(f), dtype=np.int64) for f in split_files(tmp_path, "train")]
    a = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    batches = [a.next_batch() for _ in range(12)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert all(_is_window(x[r].numpy(), y[r].numpy(), shards) for r in range(4))
    # same seed -> same batches; another seed or rank -> other batches
    b = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    assert all(torch.equal(b.next_batch()[0], x) for x, _ in batches)
    assert not torch.equal(TokenLoader(tmp_path, "train", 4, 8, seed=4).next_batch()[0], batches[0][0])
    assert not torch.equal(TokenLoader(tmp_path, "train", 4, 8, seed=3, rank=1, world_size=2).next_batch()[0],
                           batches[0][0])
    # resume: a fresh loader given the state after 5 batches serves batches 5..11
    c = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    for _ in range(5):
        c.next_batch()
    st = c.state_dict()
    d = TokenLoader(tmp_path, "train", 4, 8, seed=3)
    d.load_state_dict(st)
    for x, y in batches[5:]:
        x2, y2 = d.next_batch()
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # every shard long enough is sampled, in proportion to its windows
    e = TokenLoader(tmp_path, "train", 64, 8, seed=0)
    hits = np.zeros(4)
    for _ in range(20):
        x, y = e.next_batch()
        for r in range(64):
            for k, sh in enumerate(shards):
                if _is_window(x[r].numpy(), y[r].numpy(), [sh]):
                    hits[k] += 1
                    break
    assert hits[2] == 0 and (hits[[0, 1, 3]] > 0).all()


def _numbered_split(d, bases_sizes):
    """Shards whose tokens are base, base+1, ...: a window names its shard and offset."""
    for i, (base, n) in enumerate(bases_sizes):
        (d / f"train_{i:06d}.bin").write_bytes(llmc_bytes(base + np.arange(n)))


def _batch_of(base, start, B, T):
    """llm.c's batch: B*T+1 tokens from `start`, row b = tokens [b*T, b*T+T] of them (x: first T, y: last T)."""
    buf = base + start + np.arange(B * T + 1)
    return (np.stack([buf[b * T: b * T + T] for b in range(B)]), np.stack([buf[b * T + 1: b * T + T + 1] for b in range(B)]))


def test_sequential_batches_follow_llmc_dataloader_and_resume(tmp_path):
    # B=3, T=8: a batch is 24 tokens and needs 25. Shard 0 (100 tokens) serves batches at 0, 24, 48,
    # 72 (72+25 <= 100); shard 1 (5 tokens) holds no batch; shard 2 (61) at 0, 24; then shard 0 again.
    _numbered_split(tmp_path, [(0, 100), (1000, 5), (2000, 61)])
    expected = [(0, 0), (0, 24), (0, 48), (0, 72), (2000, 0), (2000, 24)] * 2
    ld = TokenLoader(tmp_path, "train", 3, 8, mode="sequential")
    for i, (base, start) in enumerate(expected):
        x, y = ld.next_batch()
        ex, ey = _batch_of(base, start, 3, 8)
        assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey), i
    # resume mid-epoch (and across the shard change) gives the same next batches
    a = TokenLoader(tmp_path, "train", 3, 8, mode="sequential")
    for _ in range(3):
        a.next_batch()
    b = TokenLoader(tmp_path, "train", 3, 8, mode="sequential")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(6):
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_sequential_ranks_take_interleaved_batches_as_llmc(tmp_path):
    # world=2, B=2, T=4: a global batch is 16 tokens (needs 17); 50 tokens hold global batches at 0,
    # 16, 32, then wrap. Rank r reads its B*T+1 tokens at offset r*B*T inside each global batch.
    _numbered_split(tmp_path, [(0, 50)])
    starts = {0: [0, 16, 32, 0], 1: [8, 24, 40, 8]}
    for r in (0, 1):
        ld = TokenLoader(tmp_path, "train", 2, 4, mode="sequential", rank=r, world_size=2)
        for i, s in enumerate(starts[r]):
            x, y = ld.next_batch()
            ex, ey = _batch_of(0, s, 2, 4)
            assert np.array_equal(x.numpy(), ex) and np.array_equal(y.numpy(), ey), (r, i)


def test_sequential_loader_needs_one_global_batch_in_some_shard(tmp_path):
    _numbered_split(tmp_path, [(0, 40), (100, 40)])
    TokenLoader(tmp_path, "train", 3, 13, mode="sequential")  # 39 + 1 tokens fit
    with pytest.raises(GptkitError, match="world\\*B\\*T\\+1 = 41"):
        TokenLoader(tmp_path, "train", 2, 10, mode="sequential", world_size=2)


def test_loader_state_refuses_other_mode_or_changed_data(tmp_path):
    make_split(tmp_path, "train", [100])
    st = TokenLoader(tmp_path, "train", 2, 8).state_dict()
    with pytest.raises(GptkitError, match="random"):
        TokenLoader(tmp_path, "train", 2, 8, mode="sequential").load_state_dict(st)
    make_split(tmp_path, "train", [120])
    with pytest.raises(GptkitError, match="data changed"):
        TokenLoader(tmp_path, "train", 2, 8).load_state_dict(st)


def test_loader_errors(tmp_path):
    make_split(tmp_path, "train", [5, 6])
    with pytest.raises(GptkitError, match="fewer than block_size"):
        TokenLoader(tmp_path, "train", 2, 8)
    d = tmp_path / "v"
    d.mkdir()
    make_split(d, "train", [100], vocab=1000)
    with pytest.raises(GptkitError, match="vocab_size 65"):
        TokenLoader(d, "train", 2, 8, vocab_size=65)
    (d / "meta.json").write_text('{"vocab_size": 50257}')
    with pytest.raises(GptkitError, match="vocabulary has 50257"):
        TokenLoader(d, "train", 2, 8, vocab_size=65)


def test_loaders_read_uint32_shards(tmp_path):
    """Llama 3's vocabulary: ids past 65,535 come back whole (not wrapped to 16 bits)."""
    toks = make_split(tmp_path, "train", [100], vocab=128256, seed=3)
    assert toks.max() > 65535
    x, y = TokenLoader(tmp_path, "train", 3, 8, mode="sequential", vocab_size=128256).next_batch()
    assert x.reshape(-1).tolist() == toks[:24].tolist() and y.reshape(-1).tolist() == toks[1:25].tolist()
    x, y = TokenLoader(tmp_path, "train", 4, 16, seed=1).next_batch()  # random rows: windows of the shard
    text = ",".join(map(str, toks.tolist()))
    assert all(",".join(map(str, r)) in text for r in torch.cat([x, y[:, -1:]], 1).tolist())


@pytest.mark.parametrize("vocab", [50257, 128256])
def test_eval_windows_predict_every_token_once_across_shards(tmp_path, vocab):
    toks = make_split(tmp_path, "val", [37, 20, 50], vocab=vocab)
    assert len(SplitTokens(tmp_path, "val")) == 107
    assert SplitTokens(tmp_path, "val")[30:60].tolist() == toks[30:60].tolist()
    for T, B in ((8, 3), (16, 1), (106, 2), (200, 4)):
        xs, ys = [], []
        batches = list(eval_windows(tmp_path, "val", T, B))
        assert len(batches) == count_eval_batches(tmp_path, "val", T, B)
        for x, y in batches:
            assert x.shape == y.shape and x.shape[1] == T and x.shape[0] <= B
            xs.append(x.reshape(-1))
            ys.append(y.reshape(-1))
        x, y = torch.cat(xs), torch.cat(ys)
        keep = y != -1
        assert y[keep].tolist() == toks[1:].tolist()  # every target once, in order
        assert x[keep].tolist() == toks[:-1].tolist()  # each with its own previous token as input
