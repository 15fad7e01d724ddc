"""gptkit's native checkpoints: safetensors + JSON, written atomically, never pickled.

Layout (INTERFACES.md): RUN_DIR/ckpt_<step:08d>/ holding
  model.safetensors      the model's tensors (tied lm_head stored once, as wte)
  optimizer.safetensors  the optimizer's per-parameter tensors, keyed "<param name>.<slot>"
  state.json             gptkit version, step, configs, schedule, loader position, RNG states,
                         char vocab, optimizer hyperparameters

A checkpoint is written into a hidden temporary directory, flushed, then renamed into place, so a
crash leaves either the old set of checkpoints or the new one, never a half-written ckpt_*.
Reading returns plain tensors and JSON (`read_checkpoint`); gptkit.loading builds the model.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gptkit.version import __version__
from gptkit.config import GPTConfig
from gptkit.errors import GptkitError

CKPT_RE = re.compile(r"^ckpt_(\d{8})$")
STATE_FILE, MODEL_FILE, OPTIM_FILE = "state.json", "model.safetensors", "optimizer.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# RNG states as JSON-safe values
def rng_state() -> dict[str, Any]:
    st = {
        "python": _b64(json.dumps(_to_jsonable(random.getstate())).encode()),
        "numpy": _to_jsonable(np.random.get_state()),
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    if "python" in st:
        random.setstate(_from_jsonable(json.loads(base64.b64decode(st["python"]))))
    if "numpy" in st:
        np.random.set_state(_from_jsonable(st["numpy"]))
    if "torch" in st:
        torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(st["torch"])), dtype=torch.uint8))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in st["cuda"]])


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _to_jsonable(x):
    if isinstance(x, np.ndarray):
        return {"__ndarray__": _b64(x.tobytes()), "dtype": str(x.dtype), "shape": list(x.shape)}
    if isinstance(x, (tuple, list)):
        return {"__tuple__": [_to_jsonable(v) for v in x]} if isinstance(x, tuple) else [_to_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    return x


def _from_jsonable(x):
    if isinstance(x, dict) and "__ndarray__" in x:
        return np.frombuffer(base64.b64decode(x["__ndarray__"]), dtype=x["dtype"]).reshape(x["shape"]).copy()
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_from_jsonable(v) for v in x["__tuple__"])
    if isinstance(x, list):
        return [_from_jsonable(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# optimizer state <-> flat tensors + JSON
def optimizer_to_flat(optimizer: torch.optim.Optimizer | dict, names: dict[int, str]) -> tuple[dict, dict]:
    """Flatten optimizer.state_dict() (or such a dict) into {"<param name>.<slot>": tensor} and a
    JSON part. `names` maps the optimizer's parameter index to the parameter's name."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for slot, val in slots.items():
            key = f"{names[idx]}.{slot}"
            if torch.is_tensor(val):
                tensors[key] = val.detach().to("cpu").contiguous()
            else:
                scalars[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict, meta: dict, names: dict[int, str]) -> dict:
    """Inverse of optimizer_to_flat: a dict for optimizer.load_state_dict()."""
    by_name = {n: i for i, n in names.items()}
    state: dict[int, dict] = {}
    for key, val in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        pname, slot = key.rsplit(".", 1)
        if pname not in by_name:
            raise GptkitError(f"optimizer state names unknown parameter {pname!r}", OPTIM_FILE,
                              "the checkpoint does not belong to this model")
        state.setdefault(by_name[pname], {})[slot] = val
    # JSON turned tuples (betas) into lists
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: a tied lm_head is stored once, as wte (an untied one, a
    Llama option, is stored)."""
    sd = model.state_dict()
    tied = getattr(getattr(model, "config", None), "tie_embeddings", True)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")}


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    state: dict[str, Any], optimizer: torch.optim.Optimizer | dict | None = None,
                    param_names: dict[int, str] | None = None, keep_last: int = 0) -> Path:
    """Write RUN_DIR/ckpt_<step>/ atomically and prune older checkpoints beyond `keep_last`.
    `model` may be a module or its tensors already gathered (FSDP); `optimizer` an optimizer or its
    state_dict(). Weights holding NaN or inf are refused, so a diverged state never replaces a
    good checkpoint. A failed write (full disk) leaves the existing checkpoints as they were.
    Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    tensors = model if isinstance(model, dict) else model_tensors(model)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GptkitError(f"the weights hold NaN or inf (first: {bad[0]}); checkpoint at step {step} not written",
                          run_dir, "the run diverged: lower lr or use float32; the last good checkpoint is intact")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        final = run_dir / f"ckpt_{step:08d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp_ckpt_{step:08d}_", dir=run_dir))
    except OSError as e:
        raise GptkitError(f"cannot write a checkpoint: {e.strerror or e}", run_dir,
                          "free disk space or choose another --out; existing checkpoints are intact") from None
    try:
        _write_tensors(tensors, tmp / MODEL_FILE)
        full_state = {"format": "gptkit-checkpoint", "format_version": FORMAT_VERSION,
                      "gptkit_version": __version__, "step": step, **state}
        if optimizer is not None:
            opt_tensors, meta = optimizer_to_flat(optimizer, param_names or {})
            _write_tensors(opt_tensors, tmp / OPTIM_FILE)
            full_state["optimizer"] = meta
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(full_state, f, indent=1)
        mask = _umask()  # mkdtemp makes the directory 0700: the checkpoint follows the umask instead
        os.chmod(tmp, 0o777 & ~mask)
        for p in tmp.iterdir():  # flush file contents before the rename makes them visible
            os.chmod(p, 0o666 & ~mask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if final.exists():  # re-saving a step: move the old one aside only now the new one is complete
            old = run_dir / f".old_{final.name}_{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptkitError(f"cannot write checkpoint ckpt_{step:08d}: {e.strerror or e}", run_dir,
                          "free disk space or choose another --out; existing checkpoints are intact") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # prune only now that the new checkpoint is complete and in place
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                # hide it first (one atomic rename), then delete: a kill mid-delete leaves a hidden
                # directory that clean_partial removes, never a visible, half-deleted ckpt_*
                doomed = run_dir / f".del_{old.name}_{os.getpid()}"
                os.replace(old, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
    return final


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _write_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, str(file), metadata={"format": "pt"})


def clean_partial(run_dir: str | Path) -> None:
    """Remove what a crash mid-save left behind: hidden temporary directories and pruned checkpoints
    whose deletion was cut short, and put back a checkpoint that was moved aside while being re-saved."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name.startswith(".old_ckpt_") and p.is_dir():
            name = p.name[len(".old_"):].rsplit("_", 1)[0]
            if CKPT_RE.match(name) and not (run_dir / name).exists():
                os.replace(p, run_dir / name)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith((".tmp_ckpt_", ".del_ckpt_")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def is_checkpoint_dir(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file()


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint `path` names: itself, or a run directory's latest checkpoint. None if neither."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    ckpts = list_checkpoints(path)
    return ckpts[-1] if ckpts else None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        with open(ckpt / STATE_FILE) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GptkitError(f"unreadable checkpoint state: {e}", ckpt / STATE_FILE,
                          "the checkpoint is damaged; use an older ckpt_* directory") from None
    if not isinstance(state, dict) or state.get("format") != "gptkit-checkpoint":
        raise GptkitError("not a gptkit checkpoint state", ckpt / STATE_FILE,
                          "give a directory written by `gptkit train` or `gptkit convert --to gptkit`")
    version = state.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise GptkitError(f"checkpoint format version {version!r} is not a number", ckpt / STATE_FILE,
                          "the checkpoint is damaged; use an older ckpt_* directory")
    if version > FORMAT_VERSION:
        raise GptkitError(f"checkpoint format version {state['format_version']} is newer than this gptkit "
                          f"reads ({FORMAT_VERSION})", ckpt / STATE_FILE, "upgrade gptkit")
    return state


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise GptkitError("missing checkpoint file", file,
                          "the checkpoint is incomplete; use an older ckpt_* directory")
    try:
        return load_file(str(file))
    except Exception as e:
        raise GptkitError(f"unreadable tensors: {e}", file,
                          "the checkpoint is damaged; use an older ckpt_* directory") from None


def read_checkpoint(ckpt: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint directory's model config, its complete state dict (a tied lm_head set to wte)
    and its state.json; weights holding NaN or inf are refused."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    if not isinstance(state.get("model_config"), dict):
        raise GptkitError("checkpoint state has no model_config object", ckpt / STATE_FILE,
                          "the checkpoint is damaged; use an older ckpt_* directory")
    try:
        config = GPTConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:  # keys or values of the wrong type
        raise GptkitError(f"bad model_config: {e}", ckpt / STATE_FILE,
                          "the checkpoint is damaged; use an older ckpt_* directory") from None
    sd = read_tensors(ckpt / MODEL_FILE)
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd.get("transformer.wte.weight")
    if sd.get("transformer.wte.weight") is None:
        raise GptkitError("no token embedding in the checkpoint", ckpt / MODEL_FILE,
                          "the checkpoint is damaged; use an older ckpt_* directory")
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise GptkitError(f"tensor {k} holds NaN or inf", ckpt / MODEL_FILE,
                              "the run diverged before this checkpoint; use an older ckpt_* directory")
    return config, sd, state
