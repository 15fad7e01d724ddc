"""optimizer=muon: torch.optim.Muon for the blocks' 2-D matrices, AdamW for the rest.

The split is checked against the parameter names of each family (not against the rule that
builds it); the Muon half's update is checked against a torch.optim.Muon driven by hand; a run
with Muon trains, resumes bit for bit (Muon's momentum goes through optimizer.safetensors) and
runs with bf16 weights + fp32 master weights.
"""

import json
import re

import pytest
import torch

from gptkit.config import GPTConfig, TrainConfig, model_preset, resolve_config
from gptkit.errors import GptkitError
from gptkit.model import GPT
from gptkit.optim import make_optimizer, set_lr
from gptkit.train import train

TEXT = "".join(f"line {i}: to be or not to be, that is the question.\n" for i in range(400))
HIDDEN = re.compile(r"transformer\.h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))\.weight")


def _split(model, cfg):
    opt, names = make_optimizer(model, cfg)
    n_adamw = sum(len(g["params"]) for g in opt.adamw.param_groups)
    muon = {names[i] for i in range(n_adamw, len(names))}
    adamw = {names[i] for i in range(n_adamw)}
    return opt, muon, adamw


@pytest.mark.parametrize("preset,untied", [("shakespeare-char", False), ("llama-char", False), ("llama-char", True)])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(preset, untied):
    mc = model_preset(preset).to_dict()
    if untied:
        mc["tie_embeddings"] = False
    model = GPT(GPTConfig.from_dict(mc))
    _, muon, adamw = _split(model, TrainConfig(optimizer="muon"))
    all_names = {n for n, _ in model.named_parameters()}
    assert muon == {n for n in all_names if HIDDEN.fullmatch(n)}
    assert len(muon) == 4 * model.config.n_layer
    assert adamw == all_names - muon and "transformer.wte.weight" in adamw
    assert ("lm_head.weight" in adamw) == untied
    if preset == "shakespeare-char":
        assert "transformer.wpe.weight" in adamw and "transformer.h.0.attn.c_attn.bias" in adamw


def test_schedule_scales_muons_peak_like_adamws():
    model = GPT(model_preset("shakespeare-char"))
    opt, _, _ = _split(model, TrainConfig(optimizer="muon", lr=6e-3, muon_lr=0.03))
    set_lr(opt, 1.5e-3, 6e-3)  # a quarter of the peak
    assert [g["lr"] for g in opt.adamw.param_groups] == [pytest.approx(1.5e-3)] * 2
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.0075)


def test_muon_half_updates_as_torch_muon_does():
    torch.manual_seed(0)
    model = GPT(model_preset("shakespeare-char"))
    ref = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters() if HIDDEN.fullmatch(n)}
    ref_opt = torch.optim.Muon(list(ref.values()), lr=0.02, weight_decay=0.1, momentum=0.95)
    opt, _, _ = _split(model, TrainConfig(optimizer="muon", muon_lr=0.02, weight_decay=0.1))
    params = dict(model.named_parameters())
    for _ in range(2):
        x = torch.randint(0, 65, (2, 16))
        _, loss = model(x, x)
        loss.backward()
        for n, p in ref.items():
            p.grad = params[n].grad.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
    for n, p in ref.items():
        torch.testing.assert_close(params[n].detach(), p.detach(), rtol=0, atol=0)


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), n_layer=2, n_head=2, n_embd=32, batch_size=4, block_size=16,
                max_steps=8, decay_steps=8, warmup_steps=2, eval_interval=0, log_interval=1, final_eval=False,
                sample_tokens=1, progress=False, dtype="float32", optimizer="muon", lr=3e-3, muon_lr=0.03)
    base.update(kw)
    return resolve_config(None, {k: str(v) for k, v in base.items()})


def _losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", [{}, {"dtype": "bfloat16", "param_dtype": "bfloat16"}], ids=["fp32", "bf16"])
def test_muon_run_trains_and_resumes_exactly(char_data, tmp_path, precision):
    silent = lambda *a, **k: None  # noqa: E731
    cfg, mov = _cfg(char_data, tmp_path / "straight", **precision)
    train(cfg, mov, log=silent)
    cfg, mov = _cfg(char_data, tmp_path / "split", **{**precision, "max_steps": 4})
    train(cfg, mov, log=silent)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "split" / "ckpt_00000004" / "optimizer.safetensors")
    assert "transformer.h.1.mlp.c_fc.weight.momentum_buffer" in saved  # Muon's state
    assert "transformer.wte.weight.exp_avg" in saved  # AdamW's
    cfg, mov = _cfg(char_data, tmp_path / "split", **precision)
    train(cfg, mov, resume=True, log=silent)
    straight = _losses(tmp_path / "straight")
    assert straight == _losses(tmp_path / "split")
    assert straight[-1] < straight[0] - 0.3


def test_resuming_an_adamw_run_with_muon_is_refused(char_data, tmp_path):
    silent = lambda *a, **k: None  # noqa: E731
    cfg, mov = _cfg(char_data, tmp_path / "run", optimizer="adamw", max_steps=2)
    train(cfg, mov, log=silent)
    cfg, mov = _cfg(char_data, tmp_path / "run", max_steps=4)
    with pytest.raises(GptkitError, match="Muon"):
        train(cfg, mov, resume=True, log=silent)


def test_bad_optimizer_keys_are_one_line_errors():
    with pytest.raises(GptkitError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(GptkitError, match="muon_lr"):
        TrainConfig(muon_lr=0)


def test_auto_is_muon_from_scratch_adamw_with_init_and_a_resume_keeps_it(char_data, tmp_path):
    """`optimizer=auto` (the default) is resolved once and written down: config.toml names the
    optimizer the run uses, and a resume goes on with it."""
    from safetensors.torch import load_file

    from gptkit.cli import main
    tiny = ["batch_size=2", "block_size=8", "warmup_steps=1", "eval_interval=0", "final_eval=false",
            "sample_tokens=0", "progress=false", "dtype=float32"]
    run = tmp_path / "scratch"
    assert main(["train", "--data", str(char_data), "--out", str(run), "n_layer=1", "n_head=2", "n_embd=16", *tiny,
                 "max_steps=2"]) == 0
    assert re.search(r'^optimizer = "muon"$', (run / "config.toml").read_text(), re.M)
    assert main(["train", "--out", str(run), "--resume", "max_steps=4"]) == 0
    saved = load_file(run / "ckpt_00000004" / "optimizer.safetensors")
    assert any(k.endswith(".momentum_buffer") for k in saved)  # still Muon
    tuned = tmp_path / "tuned"
    assert main(["train", "--data", str(char_data), "--out", str(tuned), "--init", str(run), *tiny,
                 "max_steps=1"]) == 0
    assert re.search(r'^optimizer = "adamw"$', (tuned / "config.toml").read_text(), re.M)
    saved = load_file(tuned / "ckpt_00000001" / "optimizer.safetensors")
    assert not any(k.endswith(".momentum_buffer") for k in saved)
