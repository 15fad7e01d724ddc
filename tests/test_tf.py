"""OpenAI's TF checkpoints, read without TensorFlow.

The fixture tests/fixtures/tf-gpt2-tiny was written by TensorFlow itself
(tests/fixtures/make_tf_checkpoint.py, tf.compat.v1.train.Saver), together with the logits that
TensorFlow computed for a fixed batch (expected.npz).
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT
from gptkit.errors import GptkitError

FIXTURE = ROOT / "tests" / "fixtures" / "tf-gpt2-tiny"


def expected():
    e = np.load(FIXTURE / "expected.npz", allow_pickle=False)
    return torch.from_numpy(e["ids"]).long(), torch.from_numpy(e["logits"])


def test_tensorflow_is_not_needed():
    import gptkit.formats.tf  # noqa: F401

    assert "tensorflow" not in sys.modules


def test_bundle_holds_openai_names_and_shapes():
    from gptkit.formats.tf import read_bundle

    arrays = read_bundle(FIXTURE / "model.ckpt")
    V, T, C = 64, 16, 8
    assert arrays["model/wte"].shape == (V, C) and arrays["model/wpe"].shape == (T, C)
    assert arrays["model/h0/attn/c_attn/w"].shape == (1, C, 3 * C)
    assert arrays["model/h1/mlp/c_fc/w"].shape == (1, C, 4 * C)
    assert arrays["model/h1/mlp/c_proj/w"].shape == (1, 4 * C, C)
    assert arrays["model/h0/ln_1/g"].shape == (C,)
    assert len(arrays) == 2 + 2 * 12 + 2
    assert all(a.dtype == np.float32 for a in arrays.values())


def test_tf_checkpoint_gives_tensorflows_logits():
    from gptkit.loading import load_model

    loaded = load_model(FIXTURE)
    assert loaded.kind == "tf"
    c = loaded.model.config
    assert (c.vocab_size, c.block_size, c.n_embd, c.n_head, c.n_layer) == (64, 16, 8, 2, 2)
    ids, logits = expected()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids), logits, atol=1e-5, rtol=0)


def test_cli_converts_tf_checkpoint_to_hf_that_transformers_loads(tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "gptkit", "convert", str(FIXTURE), str(out), "--to", "hf"],
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    ids, logits = expected()
    with torch.no_grad():
        torch.testing.assert_close(GPT2LMHeadModel.from_pretrained(out).eval()(ids).logits, logits,
                                   atol=1e-5, rtol=0)


@pytest.fixture
def copy(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, d)
    return d


def test_truncated_data_shard_is_a_one_line_error(copy):
    from gptkit.loading import load_model

    data = copy / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(GptkitError, match="truncated checkpoint data") as e:
        load_model(copy)
    assert str(data) in e.value.line() and "\n" not in e.value.line()


def test_damaged_index_is_a_one_line_error(copy):
    from gptkit.loading import load_model

    index = copy / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-10])
    with pytest.raises(GptkitError, match="not a TensorFlow checkpoint index"):
        load_model(copy)


def test_missing_hparams_and_variables_are_errors(copy):
    from gptkit.loading import load_model

    (copy / "hparams.json").write_text('{"n_vocab": 64, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 3}')
    with pytest.raises(GptkitError, match="model/h2/ln_1/g is missing"):
        load_model(copy)
    (copy / "hparams.json").unlink()
    with pytest.raises(GptkitError, match="missing hparams.json"):
        load_model(copy)


def test_big_endian_bundle_reads_the_same_tensors(tmp_path, monkeypatch):
    """A bundle whose header says big-endian (BundleHeaderProto field 2 = BIG) holds byte-swapped
    data; it loads to the same weights."""
    from gptkit.formats import tf

    d = tmp_path / "be"
    shutil.copytree(FIXTURE, d)
    data = d / "model.ckpt.data-00000-of-00001"
    np.fromfile(data, dtype="<f4").astype(">f4").tofile(data)  # every variable is float32
    read_table = tf.read_table

    def big_endian_table(path):
        table = read_table(path)
        table[b""] = table[b""] + bytes([0x10, 0x01])  # field 2 (endianness), varint 1 = BIG
        return table

    monkeypatch.setattr(tf, "read_table", big_endian_table)
    _, big = tf.load_tf(d)
    monkeypatch.setattr(tf, "read_table", read_table)
    _, little = tf.load_tf(FIXTURE)
    assert big.keys() == little.keys() and all(torch.equal(big[k], little[k]) for k in big)
