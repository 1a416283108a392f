"""The distributed runner: train the rewritten graph over a TP x DP mesh with torchrun.

    autotp train [--model gpt2-bytes] [--tp 2] [--dp 1] [--steps N] ...   (launches torchrun)
    torchrun --nproc-per-node 4 -m autotp.train --tp 2 --dp 2 ...         (the same, by hand)

With no arguments it trains the small byte-level GPT-2 `gpt2-bytes` at tp=2 on the Python
standard library's own source files, which every machine has. The model is built on the
meta device and materialised one parameter at a time: each rank fills only its shards,
cut from the same full initialisation a serial model would get (models/init.py), so no
rank ever holds the whole model. AdamW, warmup then cosine learning rate, gradient
accumulation, clipping by the true global gradient norm, gradient all-reduce over the
data-parallel group only, a data order that depends only on (seed, step), bf16/fp16
autocast on GPU, sharded checkpoints through torch.distributed.checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import data as data_mod
from .collectives import ProcessGroupComm
from .errors import AutoTPError
from .materialise import build_rank_module, cut
from .mesh import Mesh, make_mesh
from .plan import plan
from .rewrite import RANK_BUFFER

__all__ = ["TrainConfig", "Trainer", "main", "lr_at"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Batch sizes are global (all data-parallel ranks together)."""

    model: str = "gpt2-bytes"
    tp: int = 2
    dp: int = 1
    data: str | None = None  # None: the Python standard library's source, as bytes
    steps: int = 800
    batch: int = 16  # sequences per optimizer step, over all DP ranks
    seq: int = 128
    accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 50
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"  # parameters: float32 or float64
    amp: str | None = None  # "bf16" or "fp16" autocast, GPU only
    ckpt_dir: str | None = None
    save_every: int = 0  # 0: only at the end (when ckpt_dir is set)
    resume: bool = True  # continue from ckpt_dir/latest when present
    eval_batches: int = 20
    log_every: int = 10
    progress: bool = True


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def _build_real(cfg: TrainConfig) -> torch.nn.Module:
    """An hf:NAME architecture from its default config, or a file.py:factory model, built
    whole on the CPU from the run's seed (every rank builds the same and keeps its shards)."""
    torch.manual_seed(cfg.seed)
    if cfg.model.startswith("hf:"):
        from .cli import _HF

        name = cfg.model[3:]
        if name not in _HF or name == "bert":
            raise AutoTPError(f"hf:{name}: autotp train takes hf:gpt2 or hf:llama")
        import transformers

        transformers.logging.set_verbosity_error()
        cfg_cls, model_cls = (getattr(transformers, n) for n in _HF[name])
        return model_cls(cfg_cls(use_cache=False))
    path, _, fn = cfg.model.partition(":")
    if not path.endswith(".py") or not fn:
        from autotp.models import CONFIGS

        raise AutoTPError(
            f"unknown model {cfg.model!r}: a named configuration ({', '.join(CONFIGS)}), "
            "hf:gpt2, hf:llama, or path/to/file.py:factory"
        )
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, fn)()


def _build_meta(cfg: TrainConfig, vocab: int) -> torch.nn.Module:
    from autotp.models import CONFIGS, build

    conf = CONFIGS[cfg.model]
    if not hasattr(conf, "block_size"):
        raise AutoTPError(f"{cfg.model} is not a causal language model; train a GPT-2 config")
    if conf.vocab_size < vocab:
        raise AutoTPError(
            f"the data has {vocab} token ids but {cfg.model} has a vocabulary of "
            f"{conf.vocab_size}: pick a model with a larger vocabulary"
        )
    if cfg.seq > conf.block_size:
        raise AutoTPError(f"--seq {cfg.seq} exceeds {cfg.model}'s block size {conf.block_size}")
    torch.manual_seed(cfg.seed)  # decides model.init_seed: the same on every rank
    with torch.device("meta"):
        return build(cfg.model)


def materialise(
    rank_module: torch.nn.Module, model: torch.nn.Module, splits: dict, rank: int, tp: int,
    device: torch.device, dtype: torch.dtype,
) -> None:  # fmt: skip
    """Give a meta rank module real tensors: each parameter is initialised whole, one at a
    time, exactly as the serial model initialises it (model.init_parameter), and this
    rank's shard is cut from it; nothing else of the model is ever allocated."""
    tied: dict[int, list[str]] = {}
    for name, p in rank_module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    rank_module.to_empty(device=device)  # from meta this makes new tensors per module...
    for names in tied.values():  # ...so tie them again
        first = rank_module.get_parameter(names[0])
        for other in names[1:]:
            owner, _, leaf = other.rpartition(".")
            setattr(rank_module.get_submodule(owner), leaf, first)
    seen: set[int] = set()
    serial = dict(model.named_parameters(remove_duplicate=False))
    for name, p in rank_module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue  # a tied name of a tensor already filled
        seen.add(id(p))
        full = torch.empty(serial[name].shape, dtype=torch.float32)
        model.init_parameter(name, full)
        with torch.no_grad():
            p.data = cut(full, splits.get(name), rank, tp).to(device=device, dtype=dtype).clone()
    for name, b in rank_module.named_buffers():
        if name == RANK_BUFFER:
            b.fill_(rank)
        else:
            raise AutoTPError(f"buffer {name} cannot be materialised from the meta device")


class Trainer:
    """One rank's share of a run. Call inside an initialised process group of tp x dp."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh | None = None) -> None:
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg.tp, cfg.dp)
        self.device = torch.device(
            f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        )
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        tokens = data_mod.load(cfg.data)
        self.train_data, self.val_data = tokens.split(0.05)
        if cfg.batch % (cfg.dp * cfg.accum):
            raise AutoTPError(f"--batch {cfg.batch} must be divisible by dp x accum")
        from autotp.models import CONFIGS

        on_meta = cfg.model in CONFIGS
        if on_meta:
            self.model = _build_meta(cfg, tokens.vocab_size)
        else:
            self.model = _build_real(cfg).to(self.dtype)
        forward = inspect.signature(self.model.forward).parameters
        self.hf = "input_ids" in forward and "labels" in forward
        rows = max(cfg.batch // (cfg.dp * cfg.accum), 2)
        if self.hf:
            ids = torch.zeros(rows, cfg.seq, dtype=torch.long)
            example: Any = {"input_ids": ids, "labels": ids}
        else:
            example = self.model.example_inputs(batch=rows, seq=cfg.seq)
        self.plan = plan(self.model, cfg.tp, example)
        m = self.mesh
        comm = ProcessGroupComm(m.tp_group)
        self.module = build_rank_module(
            self.model, self.plan.traced.gm, self.plan.graph, self.plan.splits, m.tp_rank,
            cfg.tp, comm, self.plan, self.plan.model_name, seed=cfg.seed,
        )  # fmt: skip
        if on_meta:
            materialise(self.module, self.model, self.plan.splits, m.tp_rank, cfg.tp,
                        self.device, self.dtype)  # fmt: skip
        else:  # shards were cut from the real model; drop the whole copy
            self.module.to(self.device)
            self.model = self.model.to("meta")
        self.module.train()
        self.params = list(dict.fromkeys(self.module.parameters()))  # tied once
        self.split_params = {
            id(p) for n, p in self.module.named_parameters(remove_duplicate=False)
            if n in self.plan.splits
        }  # fmt: skip
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.losses: list[float] = []

    # -- one optimizer step -----------------------------------------------------------------
    def _micro(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        c, m = self.cfg, self.mesh
        x, y = data_mod.batch(
            self.train_data, step, c.batch, c.seq, seed=c.seed, dp_rank=m.dp_rank,
            dp_size=c.dp, micro=micro, micro_steps=c.accum,
        )  # fmt: skip
        return x.to(self.device), y.to(self.device)

    def train_step(self) -> float:
        c = self.cfg
        lr = lr_at(c, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(c.accum):
            x, y = self._micro(self.step, micro)
            with self._autocast():
                loss = self.loss(x, y)
            (loss / c.accum).backward()
            total += loss.detach().double().cpu() / c.accum
        self._all_reduce_grads()
        self._clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if c.dp > 1:  # the logged loss: the mean over the global batch
            total = total.to(self.device)
            dist.all_reduce(total, group=self.mesh.dp_group)
            total = total.cpu() / c.dp
        self.step += 1
        self.losses.append(total.item())
        return total.item()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's own loss: (logits, loss) = module(x, y) for autotp.models' GPT-2s
        and factories alike; Hugging Face causal LMs shift labels themselves."""
        if self.hf:
            out = self.module(input_ids=x, labels=x)
            return out.loss if hasattr(out, "loss") else out[0]
        return self.module(x, y)[1]

    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            dt = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return torch.autocast("cpu", enabled=False)

    def _all_reduce_grads(self) -> None:
        """Average gradients over the data-parallel group only (one flat buffer)."""
        if self.cfg.dp == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.mesh.dp_group)
        flat /= self.cfg.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def grad_norm(self) -> torch.Tensor:
        """The serial model's gradient norm: split parameters summed over the TP group
        (each shard once), replicated ones counted once; identical on every DP rank."""
        split = torch.zeros((), dtype=torch.float64, device=self.device)
        repl = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.params:
            if p.grad is None:
                continue
            sq = p.grad.detach().double().square().sum()
            if id(p) in self.split_params:
                split += sq
            else:
                repl += sq
        if self.cfg.tp > 1:
            dist.all_reduce(split, group=self.mesh.tp_group)
        return (split + repl).sqrt()

    def _clip(self) -> None:
        if not self.cfg.clip:
            return
        norm = self.grad_norm()
        scale = (self.cfg.clip / (norm + 1e-6)).clamp(max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def val_loss(self, batches: int | None = None) -> float:
        """Mean loss over the start of the validation split (the same on every rank)."""
        self.module.eval()
        rows = max(self.cfg.batch // self.cfg.accum, 2)  # the same windows at any dp
        losses = []
        for x, y in data_mod.val_batches(self.val_data, self.cfg.seq, rows,
                                         batches or self.cfg.eval_batches):  # fmt: skip
            loss = self.loss(x.to(self.device), y.to(self.device))
            losses.append(loss.double().item())
        self.module.train()
        return sum(losses) / max(len(losses), 1)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, checkpoints: Any = None) -> dict[str, float]:
        c = self.cfg
        lead = self.mesh.rank == 0
        start = time.perf_counter()
        first = self.step
        tokens_per_step = c.batch * c.seq
        progress = _progress(lead and c.progress)
        with progress:
            task = progress.add_task("training", total=c.steps, completed=self.step,
                                     loss=float("nan"), tps=0.0)  # fmt: skip
            while self.step < c.steps:
                loss = self.train_step()
                elapsed = time.perf_counter() - start
                tps = (self.step - first) * tokens_per_step / max(elapsed, 1e-9)
                progress.update(task, advance=1, loss=loss, tps=tps)
                if checkpoints and c.save_every and self.step % c.save_every == 0:
                    checkpoints.save(self)
        if checkpoints:
            checkpoints.save(self)
        val = self.val_loss()
        elapsed = time.perf_counter() - start
        result = {
            "steps": self.step,
            "first_loss": self.losses[0] if self.losses else float("nan"),
            "last_loss": self.losses[-1] if self.losses else float("nan"),
            "val_loss": val,
            "val_perplexity": math.exp(val),
            "tokens_per_s": (self.step - first) * tokens_per_step / max(elapsed, 1e-9),
            "seconds": elapsed,
        }
        if lead:
            from rich.console import Console

            Console().print(
                f"[bold]done[/]: {result['steps']} steps in {elapsed:.1f} s, "
                f"{result['tokens_per_s']:,.0f} tokens/s; loss {result['first_loss']:.3f} -> "
                f"{result['last_loss']:.3f}; validation perplexity {result['val_perplexity']:.2f}"
            )
        return result


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )  # fmt: skip

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeRemainingColumn(), disable=not enabled,
    )  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autotp train", description=__doc__.splitlines()[0])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            ap.add_argument(flag, type=kind, default=f.default)
    return ap


def config_from_args(argv: list[str] | None = None) -> TrainConfig:
    ns = _parser().parse_args(argv)
    return TrainConfig(**{k: v for k, v in vars(ns).items()})


def init_process_group(backend: str, **kwargs: Any) -> None:
    """torch.distributed.init_process_group, with this attempt's keys kept apart.

    Under torchrun's agent store the workers of a restarted group meet in the same store
    as the attempt before, and gloo can read a dead peer's address from it (seen here as
    "Gloo connectFullMesh failed ... Connection refused" on every restart). A prefix per
    restart attempt (TORCHELASTIC_RESTART_COUNT) keeps each attempt's keys its own."""
    env = os.environ
    attempt = env.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, **kwargs)
        return
    store = dist.TCPStore(
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(minutes=10),
    )  # fmt: skip
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"autotp/attempt_{attempt}", store),
        rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), **kwargs,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of one process started by torchrun (`torchrun -m autotp.train`)."""
    from .checkpoint import Checkpoints

    cfg = config_from_args(argv)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        init_process_group("nccl", device_id=device)
    else:
        init_process_group("gloo")
    try:
        trainer = Trainer(cfg)
        ckpt = Checkpoints(cfg.ckpt_dir) if cfg.ckpt_dir else None
        if ckpt and cfg.resume:
            ckpt.resume(trainer)
        trainer.fit(ckpt)
        dist.barrier()
    except AutoTPError as e:
        if dist.get_rank() == 0:
            from rich.console import Console

            from .render import error_view

            Console(stderr=True).print(error_view(e))
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
