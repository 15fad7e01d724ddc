"""`gptkit validate`: llm.c's test_gpt2, against a debug state.

A debug state (gptkit.formats.llmc) holds a batch x, y and the reference logits, loss and
gradients on it. We load the model, run forward and backward on that batch, and report the
largest |difference| of the logits (real vocab), the loss and each of the 16 gradient tensors in
llm.c's order. Then, as test_gpt2 does, we take `steps` AdamW steps on the same batch (lr 1e-4,
betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every parameter, llm.c's `gpt2_update`) and print
each step's loss, measured before its update.

Pass: logits and loss within 1e-2, every gradient within 2e-2 (test_gpt2's tolerances).

`write_state_from_data` writes such a state itself, as llm.c's train_gpt2.py does: x, y are the first
batch of a split read in file order (llm.c's loader, B*T+1 tokens), with B=4, T=64 by default;
train_gpt2.py reads tiny_shakespeare_val.bin by default, hence split "val".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptkit.data import TokenLoader
from gptkit.errors import GptkitError
from gptkit.formats.llmc import MODEL_ORDER, DebugState, read_state, stack_param, write_state
from gptkit.loading import load_model

LOGITS_TOL, LOSS_TOL, GRAD_TOL = 1e-2, 1e-2, 2e-2
LR, BETA1, BETA2, EPS, WEIGHT_DECAY = 1e-4, 0.9, 0.999, 1e-8, 0.01


@dataclass
class ValidateResult:
    ok: bool
    logits_diff: float
    loss_diff: float
    grad_diffs: dict[str, float]
    losses: list[float]
    failed: list[str] = field(default_factory=list)


def debug_state(model, x: torch.Tensor, y: torch.Tensor) -> DebugState:
    """What llm.c's train_gpt2.py writes: the model's logits, loss and gradients on (x, y).
    x, y (B, T) int64. Leaves the model's .grad fields set."""
    model.zero_grad(set_to_none=True)
    logits, loss = model(x, y)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return DebugState(x, y, logits.detach().float(), loss.detach().float(), grads)


class LlmcAdamW:
    """llm.c's gpt2_update: AdamW with bias correction and decoupled weight decay on every parameter.
    p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)."""

    def __init__(self, params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY):
        self.params = [p for p in params]
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.mul_(self.b1).add_(g, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            update = (m / c1) / ((v / c2).sqrt() + self.eps)
            p.sub_(self.lr * (update + self.wd * p))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def validate(model_path: str | Path, state_path: str | Path, steps: int = 10,
             log: Callable[[str], None] = print) -> ValidateResult:
    """Compare MODEL against the debug state and run `steps` AdamW updates; see the module docstring."""
    if steps < 0:
        raise GptkitError(f"--steps must be >= 0, got {steps}", "--steps", "give 0 or more steps")
    loaded = load_model(model_path)
    model = loaded.model.float()
    config = model.config
    state = read_state(state_path, config)
    B, T = state.x.shape
    log(f"model {model_path} ({loaded.kind}): L={config.n_layer} C={config.n_embd} V={config.vocab_size}; "
        f"debug state {state_path}: B={B} T={T}")
    model.train(False)
    ours = debug_state(model, state.x, state.y)

    failed = []
    logits_diff = _max_diff(ours.logits, state.logits)
    loss_diff = abs(float(ours.loss) - float(state.loss))
    ok_l, ok_loss = logits_diff < LOGITS_TOL, loss_diff < LOSS_TOL
    log(f"logits max|Δ| {logits_diff:.3e} {'OK' if ok_l else 'FAIL'}")
    log(f"loss   max|Δ| {loss_diff:.3e} {'OK' if ok_loss else 'FAIL'} "
        f"(expected {float(state.loss):.6f}, got {float(ours.loss):.6f})")
    failed += [] if ok_l else ["logits"]
    failed += [] if ok_loss else ["loss"]
    grad_diffs = {}
    for short, name in MODEL_ORDER:
        d = _max_diff(stack_param(ours.grads, config, short, name), stack_param(state.grads, config, short, name))
        grad_diffs[short] = d
        ok = d <= GRAD_TOL
        if not ok:
            failed.append(f"d{short}")
        log(f"grad {short:<8} max|Δ| {d:.3e} {'OK' if ok else 'FAIL'}")

    opt = LlmcAdamW(model.parameters())
    losses = []
    for i in range(steps):
        if i > 0:
            ours = debug_state(model, state.x, state.y)
        losses.append(float(ours.loss))
        log(f"step {i}: loss {losses[-1]:.6f}")
        opt.step()
    model.zero_grad(set_to_none=True)
    ok = not failed
    log("OK: matches the debug state" if ok else f"FAILED: {', '.join(failed)} differ beyond the tolerance "
        f"(logits, loss < {LOGITS_TOL}; gradients <= {GRAD_TOL})")
    return ValidateResult(ok, logits_diff, loss_diff, grad_diffs, losses, failed)


def write_debug_state(model, x: torch.Tensor, y: torch.Tensor, path: str | Path) -> DebugState:
    """Write the debug state of a gptkit model on (x, y), as llm.c's train_gpt2.py does."""
    st = debug_state(model, x, y)
    write_state(path, st, model.config)
    return st


def write_state_from_data(model_path: str | Path, data_dir: str | Path, out: str | Path, batch_size: int = 4,
                          block_size: int = 64, split: str = "val", log: Callable[[str], None] = print) -> DebugState:
    """`gptkit validate --write-state`: MODEL's debug state on the first sequential (B, T) batch of
    `split` in `data_dir`, written to `out` for llm.c's test_gpt2 (or `gptkit validate`)."""
    for name, v in (("--batch-size", batch_size), ("--block-size", block_size)):
        if v <= 0:
            raise GptkitError(f"must be > 0, got {v}", name, "give a positive size")
    loaded = load_model(model_path)
    model = loaded.model.float()
    config = model.config
    if config.family != "gpt2":
        raise GptkitError(f"llm.c's debug state holds GPT-2 models only, this one is {config.family}", "--model",
                          "write states for a GPT-2 family model")
    if block_size > config.block_size:
        raise GptkitError(f"block size {block_size} exceeds the model's context {config.block_size}", "--block-size",
                          f"use --block-size {config.block_size} or less")
    x, y = TokenLoader(data_dir, split, batch_size, block_size, mode="sequential",
                       vocab_size=config.vocab_size).next_batch()
    model.train(False)
    st = write_debug_state(model, x, y, out)
    model.zero_grad(set_to_none=True)
    log(f"wrote {out}: B={batch_size} T={block_size} from the first batch of {split} in {data_dir}; "
        f"loss {float(st.loss):.6f}")
    return st
