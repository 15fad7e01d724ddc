"""AdamW with GPT-2's parameter groups, and the learning-rate schedule as a pure function.

Weight decay applies to parameters with >= 2 dimensions (matmul weights and embeddings) and not to
biases or LayerNorm gains, as in nanoGPT and llm.c.

`make_adamw(..., state_dtype=torch.bfloat16)` keeps AdamW's two moments in bf16 (half the
optimizer memory); the update itself is computed in fp32 and the parameters stay fp32.
For a wall-clock budget, `lr_at(..., time_ratio=...)` runs the cosine over whichever budget is
further spent, the steps or the time, so a run that is not short of time gets exactly the
step schedule.

`optimizer=muon` (`make_optimizer`): torch.optim.Muon for the 2-D matrices inside the blocks
(attention and MLP weights), AdamW for the embeddings, the head and the gains/biases, as
modded-nanogpt and nanochat split them. Muon has its own peak LR (`muon_lr`); the schedule scales
every group's peak by the same factor, lr_at(step) / lr. `optimizer=auto` (the default) is Muon
for a model trained from scratch and AdamW for fine-tuning (`init`, LoRA) and under FSDP.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from gptkit.errors import GptkitError


def param_groups(model: torch.nn.Module, weight_decay: float, exclude: set[int] = frozenset()) -> list[dict]:
    """Decay and no-decay groups of the trainable parameters whose id() is not in `exclude`."""
    decay, no_decay = [], []
    for p in model.parameters():  # the tied wte/lm_head weight appears once
        if p.requires_grad and id(p) not in exclude:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def param_names(model: torch.nn.Module, groups: list[dict]) -> dict[int, str]:
    """The optimizer's parameter index -> the parameter's name (for checkpoints)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out, i = {}, 0
    for g in groups:
        for p in g["params"]:
            out[i] = by_id[id(p)]
            i += 1
    return out


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) whose moments `exp_avg` and
    `exp_avg_sq` are stored in `state_dtype`; each update is computed in fp32. The state's names
    match torch.optim.AdamW's, so checkpoints read the same way."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad.float()
                m = st["exp_avg"].float().lerp_(grad, 1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(grad, grad, value=1 - b2)
                _store(st["exp_avg"], m)
                _store(st["exp_avg_sq"], v)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p32 = p.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                p32.addcdiv_(m, denom, value=-lr / (1 - b1**t))
                p.copy_(p32)
        return loss


def _store(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src (fp32), rounding stochastically when dst is bf16: plain rounding would drop the
    small per-step changes of the moments (a factor 0.999 is below bf16's resolution)."""
    if dst.dtype != torch.bfloat16:
        dst.copy_(src)
        return
    bits = src.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    dst.copy_(((bits + noise) & -65536).view(torch.float32))  # truncating to bf16 is now exact


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
               device_type: str = "cpu", fused: bool | None = None, state_dtype: torch.dtype = torch.float32,
               exclude: set[int] = frozenset()):
    """AdamW over GPT-2's groups (less the parameters whose id() is in `exclude`): fused where
    PyTorch has it for the device, else foreach; with a `state_dtype` other than fp32,
    LowPrecisionAdamW. Returns (optimizer, index -> parameter name)."""
    groups = param_groups(model, weight_decay, exclude)
    if state_dtype != torch.float32:
        opt = LowPrecisionAdamW(groups, lr=lr, betas=betas, eps=eps, state_dtype=state_dtype)
        return opt, param_names(model, opt.param_groups)
    if fused is None:
        fused = device_type in ("cuda", "cpu", "mps")
    kw = dict(lr=lr, betas=betas, eps=eps)
    try:
        opt = torch.optim.AdamW(groups, fused=fused, **kw) if fused else torch.optim.AdamW(groups, foreach=True, **kw)
    except (RuntimeError, TypeError):  # fused not built for this device/dtype
        opt = torch.optim.AdamW(param_groups(model, weight_decay, exclude), foreach=True, **kw)
    return opt, param_names(model, opt.param_groups)


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int,
          time_ratio: float = 0.0) -> float:
    """Linear warmup from lr/warmup to lr over `warmup_steps`, then cosine to `min_lr` at
    `decay_steps`, then flat at min_lr. `step` counts from 0. `time_ratio` in [0, 1] is the
    fraction of a time budget spent since the warmup ended; the cosine follows it where it is
    ahead of the steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps or time_ratio >= 1.0:
        return min_lr
    ratio = max((step - warmup_steps) / max(1, decay_steps - warmup_steps), time_ratio)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class TimeBudget:
    """The wall-clock budget of `max_time`: when to stop, and how far the LR schedule has got.

    Training stops early enough for the final full-split eval (and the checkpoint and sample) to
    finish by `max_time` seconds after the process started. The eval's cost is extrapolated from
    the periodic evals, or from the training speed before the first one.
    """

    def __init__(self, max_time: float, process_start: float, val_tokens: int, start_ratio: float = 0.0):
        self.enabled = max_time > 0
        self.end = process_start + max_time
        self.val_tokens = val_tokens
        # how far the schedule had got when a resumed run stopped: it goes on from there (and stays
        # there without a budget), so the LR does not jump back up
        self.start_ratio = min(1.0, max(0.0, start_ratio))
        self.ratio = self.start_ratio  # fraction of the budget spent since the warmup ended
        self.t_warm = None  # time at which the warmup ended
        self.last_t, self.last_step, self.ticks = None, 0, 0
        self.train_s_per_tok = None  # a running average that skips the first steps (compilation, warm-up)
        self.eval_s_per_tok = None
        self.eval_since = 0.0  # eval time since the last tick
        self.tasks_s = 0.0  # the last scoring of eval_tasks, which the final eval repeats

    def reserve(self) -> float:
        """Seconds kept for the final eval, checkpoint, sample and exit."""
        per_tok = self.eval_s_per_tok or (self.train_s_per_tok or 0.0) / 2.0
        return 1.2 * (per_tok * self.val_tokens + self.tasks_s) + 0.8

    def tick(self, step: int, warmup_steps: int, tokens_per_step: int) -> None:
        now = time.time()
        if self.last_t is not None and step > self.last_step:
            per_tok = (now - self.last_t - self.eval_since) / ((step - self.last_step) * tokens_per_step)
            self.ticks += 1
            if self.ticks > 2:
                prev = self.train_s_per_tok
                self.train_s_per_tok = per_tok if prev is None else 0.95 * prev + 0.05 * per_tok
        self.last_t, self.last_step, self.eval_since = now, step, 0.0
        if step < warmup_steps:
            return
        if self.t_warm is None:
            self.t_warm = now
        deadline = self.end - self.reserve()
        spent = min(1.0, max(0.0, (now - self.t_warm) / max(deadline - self.t_warm, 1e-9)))
        self.ratio = self.start_ratio + (1.0 - self.start_ratio) * spent

    def projected_end_step(self, step: int, tokens_per_step: int) -> int:
        """The step at which the budget will stop training, at the current speed."""
        if not self.train_s_per_tok:
            return step + 1
        left = self.end - self.reserve() - time.time()
        return step + max(1, int(left / (self.train_s_per_tok * tokens_per_step)))

    def out_of_time(self) -> bool:
        return time.time() >= self.end - self.reserve()

    @contextlib.contextmanager
    def timing_eval(self, tokens: int):
        t = time.time()
        yield
        dt = time.time() - t
        self.eval_since += dt
        self.eval_s_per_tok = dt / max(tokens, 1)


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable 2-D matrices inside the transformer blocks (attention and MLP weights, either
    family): what Muon updates. Embeddings, the head and every 1-D gain or bias stay with AdamW."""
    return [p for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2]


class MuonWithAdamW:
    """torch.optim.Muon and an AdamW behind one optimizer's interface: param_groups (AdamW's, then
    Muon's), step, zero_grad and a state_dict numbered over both in that order, so checkpoints
    store it under parameter names like any optimizer."""

    def __init__(self, adamw: torch.optim.Optimizer, muon: torch.optim.Optimizer):
        self.adamw, self.muon = adamw, muon

    @property
    def param_groups(self) -> list[dict]:  # a property: load_state_dict replaces the groups' dicts
        return self.adamw.param_groups + self.muon.param_groups

    @property
    def state(self):
        return {**self.adamw.state, **self.muon.state}

    def step(self, closure=None):
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True):
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def _n_adamw(self, groups: list[dict]) -> int:
        return sum(len(g["params"]) for g in groups[: len(self.adamw.param_groups)])

    def state_dict(self) -> dict:
        a, m = self.adamw.state_dict(), self.muon.state_dict()
        n = self._n_adamw(a["param_groups"])
        return {"state": {**a["state"], **{i + n: v for i, v in m["state"].items()}},
                "param_groups": a["param_groups"] + [{**g, "params": [i + n for i in g["params"]]}
                                                     for g in m["param_groups"]]}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups) or not all(g.get("muon") for g in groups[len(self.adamw.param_groups):]):
            raise GptkitError("the checkpoint's optimizer state is not Muon + AdamW's", "optimizer",
                              "resume with the optimizer the run was started with")
        k, n = len(self.adamw.param_groups), self._n_adamw(groups)
        self.adamw.load_state_dict({"state": {i: v for i, v in sd["state"].items() if i < n},
                                    "param_groups": groups[:k]})
        self.muon.load_state_dict({"state": {i - n: v for i, v in sd["state"].items() if i >= n},
                                   "param_groups": [{**g, "params": [i - n for i in g["params"]]} for g in groups[k:]]})


def optimizer_kind(cfg, fsdp: bool = False) -> str:
    """The optimizer a run uses: `optimizer=auto` is Muon (with AdamW beside it) for a model trained
    from scratch, where it reaches a lower loss in the same wall time, and AdamW for fine-tuning
    (`init`, LoRA: Muon's orthogonalized updates are not what pretrained weights were tuned with)
    and under FSDP (Muon needs whole matrices)."""
    if cfg.optimizer != "auto":
        return cfg.optimizer
    return "muon" if cfg.init == "scratch" and not cfg.lora_rank and not fsdp else "adamw"


def make_optimizer(model: torch.nn.Module, cfg, device_type: str = "cpu", fsdp: bool = False):
    """The run's optimizer from a TrainConfig (`optimizer`, `lr`, `muon_lr`, betas, eps, weight decay,
    `optim_dtype`). Returns (optimizer, index -> parameter name); each group's `base_lr` is its peak LR."""
    state_dtype = {"float32": torch.float32, "fp32": torch.float32}.get(cfg.optim_dtype, torch.bfloat16)
    kw = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, device_type=device_type, state_dtype=state_dtype,
              **({"fused": False} if fsdp else {}))
    if optimizer_kind(cfg, fsdp) == "adamw":
        opt, names = make_adamw(model, cfg.lr, cfg.weight_decay, **kw)
    else:
        if fsdp:
            raise GptkitError("optimizer=muon does not run under FSDP (Muon orthogonalizes whole matrices)",
                              "optimizer", "use fsdp=false (DDP works) or optimizer=adamw")
        hidden = muon_params(model)
        adamw, _ = make_adamw(model, cfg.lr, cfg.weight_decay, exclude={id(p) for p in hidden}, **kw)
        muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                 ns_steps=cfg.muon_ns_steps)
        muon.param_groups[0].update(muon=True, base_lr=cfg.muon_lr)
        opt = MuonWithAdamW(adamw, muon)
        names = param_names(model, opt.param_groups)
    for g in opt.param_groups:
        g.setdefault("base_lr", cfg.lr)
    return opt, names


def set_lr(optimizer, lr: float, peak_lr: float) -> None:
    """Set every group's LR to its own peak (`base_lr`, default `peak_lr`) times lr / peak_lr."""
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", peak_lr) * lr / peak_lr
