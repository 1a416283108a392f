"""Sharded checkpoints through torch.distributed.checkpoint (DCP).

Layout of `ckpt_dir`:
    step_00000100/      a DCP checkpoint: every TP rank's shards under keys that name the
                        shard ("<param>@tp<r>of<T>"), replicated tensors under their own
                        name, Adam's moments alike; data-parallel copies are written once
    step_00000100/autotp.json   what is needed to read it: the model (as autotp.run.resolve
                        rebuilds it), its objective (clm or mlm) and [MASK] id, its serial
                        shapes and ties, tp, each split, step
    latest              the name of the last complete checkpoint
    metrics.jsonl       the run's log (autotp.run.metrics)

A save writes `step_N.tmp` and only then renames it and rewrites `latest` (both atomic
on one filesystem): a save killed midway never replaces the last good checkpoint. No
complete checkpoint is ever deleted but by `keep_last`; a folder in the way of a new save
is moved aside. A `latest` that names a missing or damaged folder gives way to the newest
complete checkpoint, and one that fails to load to the one before it, each said aloud.
Nothing read from a checkpoint can run code (autotp.run.safe_dcp).
Resuming restores parameters, optimizer moments and step (the data order and learning rate
are functions of the step), and the dropout streams when the layout is unchanged. A
checkpoint loads at another tp or dp: each parameter is rebuilt from the old shards and cut
for the new layout. `export` writes the serial state_dict for the unmodified model.

Under --fsdp a TP shard and its moments are DTensors sharded over the dp ranks: each dp
rank writes its part of the same key, so the folder holds the same tensors with or without
FSDP, and either loads into the other (a loaded TP shard is placed as the DTensor holds it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save
from torch.distributed.tensor import DTensor, distribute_tensor

from ..build.materialise import gather
from ..common.errors import CheckpointError, UsageError
from ..sharding import Shard
from ..sharding.placement import cut
from .safe_dcp import SafeReader, problem

__all__ = [
    "Checkpoints",
    "check_compatible",
    "export",
    "find_checkpoint",
    "read_serial_state",
    "serial_model",
    "step_folders",
    "tied_names",
]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def _key(name: str, spec: Shard | None, r: int, tp: int) -> str:
    return name if spec is None else f"{name}@tp{r}of{tp}"


def _spec_json(spec: Shard) -> list[Any]:
    """[dim, parts, padded, replicas, sections, part_replicas]: how a tensor was cut."""
    return [spec.dim, spec.parts, spec.padded, spec.replicas, list(spec.sections),
            list(spec.part_replicas)]  # fmt: skip


def _spec_of(raw: list[Any] | None) -> Shard | None:
    if raw is None:
        return None
    # written by _spec_json: dim, parts and replicas are ints, padded an int or None,
    # sections and part_replicas lists of ints; a checkpoint written before shared slices
    # has no replicas (1), one written before unequal parts were recorded no sections
    # (read as equal parts)
    replicas = raw[3] if len(raw) > 3 else 1
    sections = tuple(int(x) for x in raw[4]) if len(raw) > 4 else ()
    held = tuple(int(x) for x in raw[5]) if len(raw) > 5 else ()
    return Shard(int(raw[0]), int(raw[1]), raw[2], replicas=int(replicas), sections=sections,
                 part_replicas=held)  # fmt: skip


_STEP = re.compile(r"step_(\d{8})")


def step_folders(directory: Path) -> list[Path]:
    """The step_N folders of a run, oldest first (a `.tmp` save in progress is not one)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: p.name)


class Checkpoints:
    """Save and resume one run's checkpoints in `directory` (all ranks call both).

    A complete checkpoint is never deleted, except the oldest ones beyond `keep_last`
    (0 keeps all) after a newer one has been written. `say` receives one line for each
    thing a user should know (which checkpoint a resume used, and why)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, keep_last: int = 0,
        say: Callable[[str], None] | None = None,
    ) -> None:  # fmt: skip
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.say = say or (lambda line: None)

    # -- save ---------------------------------------------------------------------------
    def _state(self, trainer: Any) -> dict[str, Any]:
        m, splits = trainer.mesh, trainer.plan.splits
        state: dict[str, Any] = {}
        opt_state = trainer.opt.state
        for name, p in _unique_params(trainer):
            key = _key(name, splits.get(name), m.tp_rank, m.tp)
            state[f"model/{key}"] = p.detach()
            st = opt_state.get(p, {})
            for moment in _MOMENTS:
                if moment in st:
                    state[f"optim/{key}/{moment}"] = st[moment]
            if "step" in st:
                state[f"optim/{key}/step"] = st["step"]
        rng = trainer.rank.random.get_state()
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
            shutil.rmtree(tmp, ignore_errors=True)  # a save that never finished
        dist.barrier()
        dcp_save(self._state(trainer), checkpoint_id=str(tmp))
        dist.barrier()
        if lead:
            cfg = trainer.cfg
            meta = {
                "format": 2,
                "model": cfg.model,
                "objective": trainer.objective,
                "mask_id": trainer.mask_id,
                "data": cfg.data,
                "seed": cfg.seed,
                "dtype": cfg.dtype,
                "seq": cfg.seq,
                "tp": trainer.mesh.tp,
                "dp": trainer.mesh.dp,
                "fsdp": cfg.fsdp,
                "step": step,
                "splits": {n: _spec_json(s) for n, s in trainer.plan.splits.items()},
                "shapes": trainer.serial_shapes,
                "tied": trainer.tied,
            }
            (tmp / "autotp.json").write_text(json.dumps(meta, indent=1))
            if final.exists():  # never delete what may be someone's only copy
                aside = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(final, aside)
                self.say(f"moved the existing {final.name} aside to {aside.name}")
            os.replace(tmp, final)
            pointer = self.dir / "latest.tmp"
            pointer.write_text(final.name)
            os.replace(pointer, self.dir / "latest")
            self._retire(final)
        dist.barrier()
        return final

    def _retire(self, newest: Path) -> None:
        """Delete complete checkpoints beyond the newest `keep_last` (never `newest`)."""
        if self.keep_last <= 0:
            return
        # only folders older than the one just written: after a fall-back, a newer
        # checkpoint that failed to load once is kept for a person to look at
        older = [p for p in step_folders(self.dir) if p.name < newest.name]
        done = [p for p in older if problem(p) is None]
        for old in done[: max(0, len(done) - (self.keep_last - 1))]:
            shutil.rmtree(old)

    # -- resume -------------------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Complete checkpoints to resume from, best first: the one `latest` names, then
        the others newest first. Says why `latest` is passed over when it is. Raises
        CheckpointError when the folder holds a run but no complete checkpoint of it."""
        pointer = self.dir / "latest"
        named: Path | None = None
        if pointer.exists():
            try:
                text = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError) as e:
                text = f"<unreadable: {e}>"
            if _STEP.fullmatch(text):
                named = self.dir / text
                why = problem(named)
            else:
                why = f"{pointer} does not name a step folder ({text[:60]!r})"
            if named is not None and why is None:
                rest = [p for p in reversed(step_folders(self.dir)) if p != named]
                return [named, *(p for p in rest if problem(p) is None)]
        else:
            why = None
        folders = step_folders(self.dir)
        done = [p for p in reversed(folders) if problem(p) is None]
        if why is not None or (folders and not done):
            if not done:
                found = "; ".join(f"{p.name}: {problem(p)}" for p in folders[-3:]) or "none"
                raise CheckpointError(
                    f"{self.dir} holds a run but no complete checkpoint to resume from\n"
                    f"  latest: {why or 'missing'}\n"
                    f"  steps:  {found}",
                    hint="restore the checkpoint folders, or train into a new --ckpt-dir",
                )
            if why is not None:
                self.say(f"{why}; resuming from {done[0].name}, the newest complete checkpoint")
        return done

    def latest(self) -> Path | None:
        """The checkpoint a resume would start from, or None for a fresh run."""
        found = self.candidates()
        return found[0] if found else None

    def resume(self, trainer: Any) -> Path | None:
        """Load the best complete checkpoint into `trainer`, resharding if its layout
        differs; a checkpoint that fails to load gives way to the one before it, saying
        so. None when there is none (a fresh run). Rank 0 reads the folder and every rank
        follows its choice, so a filesystem seen differently cannot split the decision."""
        found = self._agreed_candidates()
        for i, path in enumerate(found):
            try:
                self._load(trainer, path)
            except CheckpointException as e:
                if i + 1 == len(found):
                    raise CheckpointError(
                        f"no checkpoint in {self.dir} could be loaded; the last tried, "
                        f"{path.name}: {_first_failure(e)}",
                        hint="restore the checkpoint files, or train into a new --ckpt-dir",
                    ) from e
                self.say(f"{path.name} could not be loaded ({_first_failure(e)}); "
                         f"trying {found[i + 1].name}")  # fmt: skip
                continue
            return path
        return None

    def _agreed_candidates(self) -> list[Path]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.candidates()
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = ("ok", [p.name for p in self.candidates()])
            except CheckpointError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise CheckpointError(value)
        return [self.dir / name for name in value]

    def _load(self, trainer: Any, path: Path) -> None:
        meta = json.loads((path / "autotp.json").read_text())
        check_compatible(meta, path, trainer.cfg.model, trainer.serial_shapes, trainer.tied,
                         objective=trainer.objective)  # fmt: skip
        m, splits = trainer.mesh, trainer.plan.splits
        same_layout = meta["tp"] == m.tp
        old_tp = meta["tp"]
        old_splits = {n: _spec_of(s) for n, s in meta["splits"].items()}
        want: dict[str, Any] = {}
        plan_keys: list[tuple[str, str, list[str]]] = []  # (name, kind, keys)
        params = dict(_unique_params(trainer))
        stored = _tensor_metadata(path)
        for name, p in params.items():
            old = old_splits.get(name)
            keys = [_key(name, old, r, old_tp) for r in range(old_tp if old else 1)]
            for kind in ("model", *(f"optim/{k}" for k in _MOMENTS)):
                full_keys = [
                    f"model/{k}" if kind == "model" else f"optim/{k}/{kind[6:]}" for k in keys
                ]
                if not all(k in stored for k in full_keys):
                    if kind == "model":
                        raise CheckpointError(
                            f"{path} holds no weights for {name} ({full_keys[0]} is missing)"
                        )
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
        dcp_load(want, storage_reader=SafeReader(str(path)))
        serial_shapes = meta["shapes"]
        for name, kind, keys in plan_keys:
            old = old_splits.get(name)
            if old is None:
                full = want[keys[0]]
            else:
                size = serial_shapes.get(name, serial_shapes.get(_alias(name, meta)))
                full = gather([want[k] for k in keys], old, size[old.dim] if size else None)
            p = params[name]
            local = _placed_like(p, cut(full, splits.get(name), m.tp_rank, m.tp).clone())
            if kind == "model":
                with torch.no_grad():
                    p.copy_(local)
            else:
                st = trainer.opt.state.setdefault(p, {})
                st[kind[6:]] = local
                step_key = f"optim/{_key(name, old, 0, old_tp)}/step"
                if step_key in want:
                    st["step"] = want[step_key].clone()
        if same_layout:
            rng: dict[tuple[str, torch.device], torch.Tensor] = {}
            for key, value in want.items():
                if key.startswith(f"rng/rank{m.rank}/"):
                    _, _, stream, device = key.split("/", 3)
                    rng[(stream, torch.device(device))] = value
            trainer.rank.random.set_state(rng)
        trainer.step = meta["step"]


def _placed_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This rank's whole TP shard `local` as `p` holds it: on p's device, and for an FSDP
    DTensor its Shard(0) part of this dp rank (cut here; no communication)."""
    local = local.to(p.device)
    if isinstance(p, DTensor):
        return distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None)
    return local


def _tensor_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """The DCP metadata of each key in the checkpoint at `path`: tensors only (autotp never
    writes bytes items, and SafeReader refuses to read them)."""
    stored = SafeReader(str(path)).read_metadata().state_dict_metadata
    return cast("dict[str, TensorStorageMetadata]", stored)


def _first_failure(e: CheckpointException) -> str:
    for failure in getattr(e, "failures", {}).values():
        inner = getattr(failure, "exception", failure)
        return f"{type(inner).__name__}: {inner}"[:300]
    return str(e)[:300]


def check_compatible(
    meta: dict[str, Any], path: Path, model: str, shapes: dict[str, list[int]],
    tied: dict[str, str], *, objective: str | None = None,
) -> None:  # fmt: skip
    """Raise CheckpointError unless the checkpoint at `path` (its autotp.json `meta`) holds
    the model `model` with these serial parameter shapes (trained for `objective`, if
    given; checkpoints from before --objective are clm)."""
    if meta.get("model") != model:
        raise CheckpointError(
            f"{path} holds a {meta.get('model')} run; this run trains {model}",
            hint="train into a new --ckpt-dir, or pass the run's own --model",
        )
    saved = meta.get("objective", "clm")
    if objective is not None and saved != objective:
        raise CheckpointError(
            f"{path} holds a run trained with --objective {saved}; this run asks for "
            f"--objective {objective}",
            hint=f"resume with --objective {saved}, or train into a new --ckpt-dir",
        )
    stored = meta.get("shapes", {})
    for name, shape in shapes.items():
        old = stored.get(name, stored.get(meta.get("tied", {}).get(name, name)))
        if old is None and name not in tied:
            raise CheckpointError(f"{path} has no parameter {name}: was the model changed?")
        if old is not None and list(old) != list(shape):
            raise CheckpointError(
                f"{path}: parameter {name} was saved with shape {list(old)}, but the model "
                f"now has {list(shape)}",
                hint="resume with the model the run was started with, or use a new --ckpt-dir",
            )


def _unique_params(trainer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """Each parameter of the rank module once, under the serial model's first name for it
    (the rank module may meet a tied tensor under another of its names first)."""
    seen: set[int] = set()
    out: list[tuple[str, torch.nn.Parameter]] = []
    for name, p in trainer.module.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((trainer.tied.get(name, name), p))
    return out


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _alias(name: str, meta: dict[str, Any]) -> str:
    alias: str = meta.get("tied", {}).get(name, name)
    return alias


def find_checkpoint(
    path: str | os.PathLike[str], say: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, Any]]:
    """(folder, autotp.json) of the checkpoint `path` names: a step_N folder, or a run's
    folder (its latest complete checkpoint). CheckpointError says why when there is none."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}: the folder does not exist")
    if not (path / "autotp.json").exists() and ((path / "latest").exists() or step_folders(path)):
        found = Checkpoints(path, say=say).latest()
        if found is None:
            raise CheckpointError(f"{path} holds no complete checkpoint")
        path = found
    why = problem(path)
    if why is not None:
        raise CheckpointError(
            f"{path} is not a complete autotp checkpoint: {why}",
            hint="give a run's --ckpt-dir or one of its step_N folders",
        )
    return path, json.loads((path / "autotp.json").read_text())


def read_serial_state(
    path: str | os.PathLike[str], say: Callable[[str], None] | None = None
) -> dict[str, torch.Tensor]:
    """The serial model's state_dict from a checkpoint directory (a step_N folder or a
    run's folder), in one process, no process group needed. Nothing in the folder is
    unpickled beyond DCP's metadata classes (see safe_dcp)."""
    path, meta = find_checkpoint(path, say)
    tp = meta["tp"]
    tied = meta.get("tied", {})
    stored = _tensor_metadata(path)
    splits = {n: _spec_of(s) for n, s in meta["splits"].items()}
    names = [n for n in meta["shapes"] if n not in tied]
    want: dict[str, torch.Tensor] = {}
    for name in names:
        spec = splits.get(name)
        for r in range(tp if spec else 1):
            key = f"model/{_key(name, spec, r, tp)}"
            if key not in stored:
                raise CheckpointError(f"{path} holds no {key}: the checkpoint is incomplete")
            want[key] = torch.empty(stored[key].size, dtype=stored[key].properties.dtype)
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp_load(want, storage_reader=SafeReader(str(path)), no_dist=True)
        except CheckpointException as e:
            raise CheckpointError(f"{path} cannot be read: {_first_failure(e)}") from e
    out: dict[str, torch.Tensor] = {}
    for name in names:
        spec = splits.get(name)
        keys = [f"model/{_key(name, spec, r, tp)}" for r in range(tp if spec else 1)]
        if spec is None:
            out[name] = want[keys[0]]
        else:
            out[name] = gather([want[k] for k in keys], spec, meta["shapes"][name][spec.dim])
    for alias, first in tied.items():
        out[alias] = out[first]
    return out


def serial_model(
    ckpt: str | os.PathLike[str], say: Callable[[str], None] | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The unmodified model a checkpoint was trained from, with its weights, and the
    checkpoint's description (autotp.json). A file.py:factory model runs its file."""
    from .drawn import draw
    from .resolve import build, trusted_factory

    say = say or (lambda line: None)
    path, meta = find_checkpoint(ckpt, say=say)
    trusted_factory(meta["model"], path, say)
    spec, seed = meta["model"], meta.get("seed")
    # an hf: or factory model without its large tensors, which the checkpoint's then
    # replace (assigned): its weights are held once, not twice
    drawn = None if seed is None else draw(spec, seed)
    model = drawn.model if drawn is not None else build(spec, seed=seed)
    dtypes: dict[str | None, torch.dtype] = {"float64": torch.float64}
    dtype = dtypes.get(meta.get("dtype"), torch.float32)
    model = model.to(dtype)
    state = read_serial_state(path)
    try:
        model.load_state_dict(state, assign=drawn is not None)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} does not fit {meta['model']} as it is built now: {str(e)[:400]}",
            hint="was the model's code or config changed since the run?",
        ) from e
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(
            f"{path} does not hold {left[0]} ({len(left)} tensors in all), which {spec} keeps",
            hint="was the model's code or config changed since the run?",
        )
    return model.eval(), meta


def export(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    say: Callable[[str], None] | None = None,
) -> Path:
    """Write the serial state_dict (loads into the unmodified model): safetensors when
    `out` ends in .safetensors, torch.save otherwise."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(
            f"{out} is a folder", hint=f"give a file name, e.g. {out}/model.safetensors"
        )
    state = read_serial_state(ckpt, say)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in state.items()}, str(out))
        else:
            torch.save(state, out)
    except ImportError as e:
        raise UsageError("writing .safetensors needs the safetensors package",
                         hint="pip install safetensors, or write OUT.pt") from e  # fmt: skip
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}",
                         hint="choose a path you can write to") from e  # fmt: skip
    return out
