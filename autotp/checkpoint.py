"""Sharded checkpoints through torch.distributed.checkpoint (DCP).

Layout of `ckpt_dir`:
    step_00000100/      a DCP checkpoint: every TP rank's shards under keys that name the
                        shard ("<param>@tp<r>of<T>"), replicated tensors under their own
                        name, Adam's moments alike; data-parallel copies are written once
    step_00000100/autotp.json   what is needed to read it: model, tp, each split, step
    latest              the name of the last complete checkpoint

A save writes `step_N.tmp` and only then renames it and rewrites `latest` (both atomic
on one filesystem): a save killed midway never replaces the last good checkpoint.
Resuming restores parameters, optimizer moments and step (the data order and learning rate
are functions of the step), and the dropout streams when the layout is unchanged. A
checkpoint loads at another tp or dp: each parameter is rebuilt from the old shards and cut
for the new layout. `export` writes the serial state_dict for the unmodified model.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .errors import AutoTPError
from .materialise import cut, gather
from .shapes import Shard

__all__ = ["Checkpoints", "export", "read_serial_state"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _key(name: str, spec: Shard | None, r: int, tp: int) -> str:
    return name if spec is None else f"{name}@tp{r}of{tp}"


def _spec_json(spec: Shard) -> list[int | None]:
    return [spec.dim, spec.blocks, spec.padded]


def _spec_of(raw: list[int | None] | None) -> Shard | None:
    return None if raw is None else Shard(raw[0], raw[1], raw[2])


class Checkpoints:
    """Save and resume one run's checkpoints in `directory` (all ranks call both)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)

    # -- save ---------------------------------------------------------------------------
    def _state(self, trainer: Any) -> dict[str, Any]:
        m, splits = trainer.mesh, trainer.plan.splits
        state: dict[str, Any] = {}
        opt_state = trainer.opt.state
        for name, p in _unique_params(trainer.module):
            key = _key(name, splits.get(name), m.tp_rank, m.tp)
            state[f"model/{key}"] = p.detach()
            st = opt_state.get(p, {})
            for moment in _MOMENTS:
                if moment in st:
                    state[f"optim/{key}/{moment}"] = st[moment]
            if "step" in st:
                state[f"optim/{key}/step"] = st["step"]
        rng = trainer.module.autotp.random.get_state()
        for (stream, device), s in rng.items():
            state[f"rng/rank{m.rank}/{stream}/{device}"] = s
        return state

    def save(self, trainer: Any) -> Path:
        step = trainer.step
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f"step_{step:08d}.tmp"
        lead = dist.get_rank() == 0
        if lead:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        dcp.save(self._state(trainer), checkpoint_id=str(tmp))
        dist.barrier()
        if lead:
            meta = {
                "model": trainer.cfg.model,
                "seed": trainer.cfg.seed,
                "dtype": trainer.cfg.dtype,
                "seq": trainer.cfg.seq,
                "tp": trainer.mesh.tp,
                "dp": trainer.mesh.dp,
                "step": step,
                "splits": {n: _spec_json(s) for n, s in trainer.plan.splits.items()},
                "shapes": {n: list(p.shape) for n, p in trainer.model.named_parameters()},
                "tied": _tied_names(trainer.model),
            }
            (tmp / "autotp.json").write_text(json.dumps(meta, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.dir / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.dir / "latest")
        dist.barrier()
        return final

    # -- resume -------------------------------------------------------------------------
    def latest(self) -> Path | None:
        pointer = self.dir / "latest"
        if not pointer.exists():
            return None
        path = self.dir / pointer.read_text().strip()
        return path if (path / "autotp.json").exists() else None

    def resume(self, trainer: Any) -> bool:
        """Load the latest checkpoint into `trainer`, resharding if its layout differs;
        False when there is none."""
        path = self.latest()
        if path is None:
            return False
        meta = json.loads((path / "autotp.json").read_text())
        if meta["model"] != trainer.cfg.model:
            raise AutoTPError(
                f"{path} holds a {meta['model']} run; this run trains {trainer.cfg.model}"
            )
        m, splits = trainer.mesh, trainer.plan.splits
        same_layout = meta["tp"] == m.tp
        old_tp = meta["tp"]
        old_splits = {n: _spec_of(s) for n, s in meta["splits"].items()}
        want: dict[str, Any] = {}
        plan_keys: list[tuple[str, str, list[str]]] = []  # (name, kind, keys)
        params = dict(_unique_params(trainer.module))
        reader = dcp.FileSystemReader(str(path))
        stored = reader.read_metadata().state_dict_metadata
        for name, p in params.items():
            old = old_splits.get(name)
            keys = [_key(name, old, r, old_tp) for r in range(old_tp if old else 1)]
            for kind in ("model", *(f"optim/{k}" for k in _MOMENTS)):
                full_keys = [
                    f"model/{k}" if kind == "model" else f"optim/{k}/{kind[6:]}" for k in keys
                ]
                if not all(k in stored for k in full_keys):
                    continue
                for k in full_keys:
                    want[k] = torch.empty(stored[k].size, dtype=p.dtype)
                plan_keys.append((name, kind, full_keys))
            step_key = f"optim/{keys[0]}/step"
            if step_key in stored:
                want[step_key] = torch.empty(stored[step_key].size, dtype=torch.float32)
        if same_layout:
            for key in stored:
                if key.startswith(f"rng/rank{m.rank}/"):
                    want[key] = torch.empty(stored[key].size, dtype=torch.uint8)
        dcp.load(want, checkpoint_id=str(path))
        serial_shapes = meta["shapes"]
        for name, kind, keys in plan_keys:
            old = old_splits.get(name)
            if old is None:
                full = want[keys[0]]
            else:
                size = serial_shapes.get(name, serial_shapes.get(_alias(name, meta)))
                full = gather([want[k] for k in keys], old, size[old.dim] if size else None)
            local = cut(full, splits.get(name), m.tp_rank, m.tp).clone()
            p = params[name]
            if kind == "model":
                with torch.no_grad():
                    p.copy_(local)
            else:
                st = trainer.opt.state.setdefault(p, {})
                st[kind[6:]] = local.to(p.device)
                step_key = f"optim/{_key(name, old, 0, old_tp)}/step"
                if step_key in want:
                    st["step"] = want[step_key].clone()
        if same_layout:
            rng = {}
            for key, value in want.items():
                if key.startswith(f"rng/rank{m.rank}/"):
                    _, _, stream, device = key.split("/", 3)
                    rng[(stream, torch.device(device))] = value
            trainer.module.autotp.random.set_state(rng)
        trainer.step = meta["step"]
        return True


def _unique_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _alias(name: str, meta: dict) -> str:
    return meta.get("tied", {}).get(name, name)


def read_serial_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The serial model's state_dict from a checkpoint directory (a step_N folder or a
    run's folder with `latest`), in one process, no process group needed."""
    path = Path(path)
    if (path / "latest").exists():
        path = path / (path / "latest").read_text().strip()
    meta_file = path / "autotp.json"
    if not meta_file.exists():
        raise AutoTPError(f"{path} is not an autotp checkpoint (no autotp.json)")
    meta = json.loads(meta_file.read_text())
    tp = meta["tp"]
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    splits = {n: _spec_of(s) for n, s in meta["splits"].items()}
    want: dict[str, torch.Tensor] = {}
    names = [n for n in meta["shapes"]]
    for name in names:
        spec = splits.get(name)
        for r in range(tp if spec else 1):
            key = f"model/{_key(name, spec, r, tp)}"
            if key in stored:
                want[key] = torch.empty(stored[key].size)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(want, checkpoint_id=str(path), no_dist=True)
    out: dict[str, torch.Tensor] = {}
    for name, shape in meta["shapes"].items():
        spec = splits.get(name)
        keys = [f"model/{_key(name, spec, r, tp)}" for r in range(tp if spec else 1)]
        if spec is None:
            out[name] = want[keys[0]]
        else:
            out[name] = gather([want[k] for k in keys], spec, shape[spec.dim])
    for alias, first in meta.get("tied", {}).items():
        out[alias] = out[first]
    return out


def export(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the serial state_dict (loads into the unmodified model): safetensors when
    `out` ends in .safetensors, torch.save otherwise."""
    state = read_serial_state(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        try:
            from safetensors.torch import save_file
        except ImportError as e:
            raise AutoTPError("writing .safetensors needs the safetensors package") from e
        save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out))
    else:
        torch.save(state, out)
    return out
