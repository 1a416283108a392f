"""The distributed runner: train the rewritten graph over a TP x DP mesh with torchrun.

    autotp train [--model gpt2-bytes] [--tp 2] [--dp 1] [--steps N] ...   (launches torchrun)
    torchrun --nproc-per-node 4 -m autotp.run.train --tp 2 --dp 2 ...     (the same, by hand)

With no arguments it trains the small byte-level GPT-2 `gpt2-bytes` at tp=2 on the Python
standard library's own source files, which every machine has. Each rank's module is what
`autotp.plan` and `autotp.parallelize` give a library user (autotp.run.rank_module): a
transformers model keeps its own Python, its layers, embedding and head split as regions;
other models are one rewritten graph, built on the meta device and materialised one
parameter at a time: each rank fills only its shards, cut from the same full
initialisation a serial model would get (models/init.py), so no rank ever holds the
whole model. Data parallelism is PyTorch's own over the mesh's "dp"
dimension: replicate (DDP) of each rank's TP module, or with --fsdp FSDP2's fully_shard of
it (parameters, gradients and AdamW's state sharded over dp). AdamW, warmup then cosine
learning rate, gradient accumulation, clipping by the true global gradient norm, a data
order that depends only on (seed, step), bf16/fp16 autocast on GPU, sharded checkpoints
through torch.distributed.checkpoint, a metrics log (autotp.run.metrics). A NaN or inf
loss stops the run before the step that would use it. The objective is next-token
prediction, or BERT's masked LM for masked-LM models (`--objective`, autotp.run.objective).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..build.weights import Weights, fill_buffers
from ..common.errors import AutoTPError, TrainingStopped, UsageError
from . import data as data_mod
from .checkpoint import tied_names
from .config import (
    ERROR_FILE,
    TrainConfig,
    check_args,
    check_model,
    check_run_folder,
    config_from_args,
)
from .drawn import draw
from .mesh import Mesh, make_mesh
from .metrics import MetricsLog, Reporter
from .objective import mlm_batch, mlm_val_batch
from .rank_module import RankModule, left_replicated, planned
from .resolve import build, canonical, example_inputs, is_hf

__all__ = ["TrainConfig", "Trainer", "main", "lr_at", "resume"]


class _GradientSync(Protocol):
    """A module under FSDP2's fully_shard or composable replicate."""

    def set_requires_gradient_sync(self, requires_gradient_sync: bool) -> None: ...


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    frac = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


class Trainer:
    """One rank's share of a run. Call inside an initialised process group of tp x dp."""

    def __init__(self, cfg: TrainConfig, mesh: Mesh | None = None) -> None:
        from autotp.models import CONFIGS

        if cfg.batch % (cfg.dp * cfg.accum):
            raise UsageError(f"--batch {cfg.batch} must be divisible by dp x accum")
        cfg = dataclasses.replace(cfg, model=canonical(cfg.model))
        self.cfg = cfg
        self.mesh = mesh or make_mesh(cfg.tp, cfg.dp)
        self.device = torch.device(
            f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        )
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[cfg.dtype]
        tokens = data_mod.load(cfg.data)
        self.train_data, self.val_data = tokens.split(0.05)
        # named configurations are initialised parameter by parameter from the meta device;
        # hf: and factory models are built from the seed without their large tensors, which
        # each rank draws its shards of (autotp.run.drawn), or whole where that cannot be;
        # with --init-from every model is a meta program and each rank reads its slices
        source: Any = Weights(cfg.init_from) if cfg.init_from else None
        drawn = None if source is not None else draw(cfg.model, cfg.seed)
        on_meta = cfg.model in CONFIGS or source is not None or drawn is not None
        if drawn is not None:  # large tensors drawn one at a time, each rank keeping its shards
            self.model, source = drawn.model, drawn
        else:
            self.model = build(cfg.model, meta=on_meta, seed=cfg.seed)
        if isinstance(source, Weights):
            fill_buffers(self.model, source)  # what the file does not store (rotary tables)
        self.objective = check_model(self.model, cfg, tokens.vocab_size)
        self.cfg = cfg = dataclasses.replace(cfg, objective=self.objective)
        self.vocab = tokens.vocab_size  # the data's ids; mlm's random replacements
        self.mask_id = tokens.vocab_size if self.objective == "mlm" else None
        if not on_meta:
            self.model = self.model.to(self.dtype)
        # what a checkpoint records to rebuild the serial model: read before anything moves
        self.serial_shapes = {n: list(p.shape) for n, p in self.model.named_parameters()}
        self.tied = tied_names(self.model)
        self.hf = is_hf(self.model)
        rows = max(cfg.batch // (cfg.dp * cfg.accum), 2)
        # planned on the meta device where the model is partly there (planning reads no
        # values; a model with some real tensors would mix devices)
        planning = drawn.on_meta() if drawn is not None else self.model
        example = example_inputs(planning, rows, cfg.seq)
        self.inputs = tuple(example) if isinstance(example, dict) else ()  # mlm's keywords
        # what a library user gets: autotp.plan's form, parallelize's module for it
        self.plan = planned(planning, cfg.tp, example, cfg)
        m = self.mesh
        # each rank's shards: read from the file, or drawn whole one tensor at a time by
        # the model's own initialiser and cut (a meta model), or cut from the real model
        init = self.model.init_parameter if on_meta and source is None else None
        self.rank = RankModule.build(self.model, self.plan, m, cfg.seed, source, init,
                                     self.device)  # fmt: skip
        self.module = self.rank.module
        _refuse_meta(self.module)
        self.module.to(device=self.device, dtype=self.dtype)
        if not on_meta:  # shards were cut from the real model; drop the whole copy
            self.model = self.model.to("meta")
        self.module.train()
        self._data_parallel()  # FSDP replaces the parameters (by DTensors of the same names)
        self.params = list(dict.fromkeys(self.module.parameters()))  # tied once
        self.split_params = {  # id -> the ranks holding each of its slices
            id(p): self.plan.splits[n].replicas
            for n, p in self.module.named_parameters(remove_duplicate=False)
            if n in self.plan.splits
        }  # fmt: skip
        shared = [n for n, s in self.plan.splits.items() if s.part_replicas]
        if cfg.fsdp and shared:  # FSDP's row shards cut across its runs: not counted yet
            raise UsageError(
                f"--fsdp with {shared[0]} split in parts that different numbers of ranks "
                f"hold ({self.plan.splits[shared[0]]}): its gradient norm is not counted "
                "under FSDP yet",
                hint="train it with --dp instead of --fsdp, or with a --tp that divides "
                "its number of key/value heads",
            )
        self.opt = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay
        )
        self.step = 0
        self.losses: list[float] = []
        self.last_grad_norm: float | None = None

    def _data_parallel(self) -> None:
        """PyTorch's own data parallelism over the mesh's "dp" dimension, applied to this
        rank's TP module (its parameters are plain tensors, this rank's TP shards):

        --fsdp    fully_shard (FSDP2): parameters, gradients and Adam's moments sharded
                  over dp (DTensors, Shard(0) of each TP shard), gathered for forward and
                  backward, gradients reduce-scattered (averaged over dp)
        --dp N    replicate (composable DDP): whole TP shards on every dp rank, gradients
                  all-reduced (averaged) in buckets during backward; the module stays the
                  same object with plain tensors, so checkpoints and norms read it as before

        Both average over dp as the serial mean over the global batch wants (each rank's
        loss is its own rows' mean)."""
        c, m = self.cfg, self.mesh
        if c.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(self.module, mesh=m.device["dp"])
        elif c.dp > 1:
            from torch.distributed._composable.replicate import replicate

            # DDP stops at a parameter that gets no gradient; one the graph never reads
            # (kept for the state_dict only) is frozen: AdamW would skip it anyway
            for param in self.rank.unread_parameters():
                param.requires_grad_(False)
            # buffers are equal across a dp group (the rank buffer holds the TP rank): no
            # broadcast before every forward
            replicate(self.module, device_mesh=m.device["dp"], forward_sync_buffers=False)

    def serial_state(self) -> dict[str, torch.Tensor]:
        """The serial model's state_dict from this run's rank modules (a collective: every
        rank calls it)."""
        return self.rank.serial_state()

    # -- one optimizer step -----------------------------------------------------------------
    def _micro(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of a micro-batch: for clm the next tokens, for mlm the masked
        inputs and their labels (autotp.run.objective)."""
        c, m = self.cfg, self.mesh
        where = {"seed": c.seed, "dp_rank": m.dp_rank, "dp_size": c.dp, "micro": micro,
                 "micro_steps": c.accum}  # fmt: skip
        if self.objective == "mlm":
            assert self.mask_id is not None  # set for mlm
            x, y = mlm_batch(self.train_data, step, c.batch, c.seq, mask_id=self.mask_id,
                             vocab=self.vocab, **where)  # fmt: skip
        else:
            x, y = data_mod.batch(self.train_data, step, c.batch, c.seq, **where)
        return x.to(self.device), y.to(self.device)

    def train_step(self, measure: bool = False) -> float:
        """One optimizer step; the loss (the mean over the global batch). A NaN or inf
        loss or gradient norm raises TrainingStopped before the weights change. `measure`:
        also compute the global gradient norm when clipping does not (`last_grad_norm`)."""
        c = self.cfg
        lr = lr_at(c, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(c.accum):
            x, y = self._micro(self.step, micro)
            if c.fsdp or c.dp > 1:  # gradients are averaged over dp in the last backward
                cast(_GradientSync, self.module).set_requires_gradient_sync(micro == c.accum - 1)
            with self._autocast():
                loss = self.loss(x, y)
            (loss / c.accum).backward()  # type: ignore[no-untyped-call]  # torch: unannotated
            total += loss.detach().double().cpu() / c.accum
        if c.dp > 1:  # the mean over the global batch: the same value on every rank
            total = total.to(self.device)
            dist.all_reduce(total, group=self.mesh.dp_group)
            total = total.cpu() / c.dp
        value = total.item()
        self._stop_unless_finite("loss", value)
        self.last_grad_norm = None
        if c.clip or measure:
            norm = self.clip(c.clip)
            self.last_grad_norm = norm.item()
            self._stop_unless_finite("gradient norm", self.last_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(value)
        return value

    def _stop_unless_finite(self, what: str, value: float) -> None:
        """Every rank holds the same value here, so every rank stops together."""
        if math.isfinite(value):
            return
        self.opt.zero_grad(set_to_none=True)
        where = f"--ckpt-dir {self.cfg.ckpt_dir}" if self.cfg.ckpt_dir else "no --ckpt-dir"
        raise TrainingStopped(
            f"the {what} is {value} at step {self.step + 1}: stopped before the optimizer "
            f"step, so no checkpoint holds weights it touched ({where})",
            hint=f"run again with a lower --lr (now {self.cfg.lr:g}), keep --clip on, or "
            "check the data",
        )

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's loss (see _model_loss). FSDP2 warns when a module returns a view (an
        in-place op on it would skip its backward hook): the loss is only read here."""
        if self.cfg.fsdp:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view")
                return self._model_loss(x, y)
        try:
            return self._model_loss(x, y)
        except RuntimeError as e:  # replicate's DDP, at the step after a gradient was missing
            if "Expected to have finished reduction" not in str(e):
                raise
            which = next((line for line in str(e).splitlines() if "did not receive" in line),
                         "")  # fmt: skip
            raise UsageError(
                f"{self.cfg.model} has parameters its forward reads but its loss does not "
                f"depend on, which --dp {self.cfg.dp} (DDP) refuses to average. {which}",
                hint="add --fsdp, which allows them, or make the loss use every "
                "parameter the forward reads (TORCH_DISTRIBUTED_DEBUG=INFO names them)",
            ) from e

    def _model_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The model's own loss: (logits, loss) = module(x, y) for autotp.models' GPT-2s
        and factories alike; Hugging Face causal LMs shift labels themselves. For mlm, the
        masked LM's loss from its labels (-100 off the chosen positions): module(input_ids=x,
        labels=y), with an all-ones attention mask and one segment where it takes them."""
        if self.objective == "mlm":
            given = {"input_ids": x, "labels": y}
            if "attention_mask" in self.inputs:
                given["attention_mask"] = torch.ones_like(x)
            if "token_type_ids" in self.inputs:
                given["token_type_ids"] = torch.zeros_like(x)
            return _loss_of(self.module(**given))
        if self.hf:
            return _loss_of(self.module(input_ids=x, labels=x))
        return cast(torch.Tensor, self.module(x, y)[1])

    def _autocast(self) -> torch.autocast:
        if self.cfg.amp and self.device.type == "cuda":
            dt = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return torch.autocast("cpu", enabled=False)

    def clip(self, max_norm: float | None) -> torch.Tensor:
        """The serial model's gradient norm, and the gradients scaled to at most `max_norm`
        when given (checked finite first). Without FSDP this is what a user's loop does:
        torch's own get_total_norm / clip_grad_norm_ on the rank module's parameters (their
        gradients count as the serial model's, autotp.runtime.grads). Under FSDP each rank holds
        1/dp of every gradient (dp's DTensors): split and replicated squares are summed over
        dp, the split ones over tp, by hand."""
        if not self.cfg.fsdp:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if max_norm and math.isfinite(norm.item()):
                torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)
            return norm
        norm = self._fsdp_grad_norm()
        if max_norm and math.isfinite(norm.item()):
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.params:
                if p.grad is not None:
                    _local(p.grad).mul_(scale.to(p.grad.dtype))
        return norm

    def _fsdp_grad_norm(self) -> torch.Tensor:
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (split, replicated)
        for p in self.params:
            if p.grad is None:
                continue
            sq = _local(p.grad).detach().double().square().sum()
            if id(p) in self.split_params:  # a slice several ranks hold counts once
                sums[0] += sq / self.split_params[id(p)]
            else:
                sums[1] += sq
        if self.cfg.dp > 1:
            dist.all_reduce(sums, group=self.mesh.dp_group)
        split, repl = sums[0], sums[1]
        if self.cfg.tp > 1:
            dist.all_reduce(split, group=self.mesh.tp_group)
        return (split + repl).sqrt()

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def val_loss(self, batches: int | None = None) -> float:
        """Mean loss over the start of the validation split (the same on every rank); for
        mlm the masked-token loss, so exp() of it is the masked-token perplexity."""
        self.module.eval()
        rows = max(self.cfg.batch // self.cfg.accum, 2)  # the same windows at any dp
        losses = []
        windows = data_mod.val_batches(self.val_data, self.cfg.seq, rows,
                                       batches or self.cfg.eval_batches)  # fmt: skip
        for i, (x, y) in enumerate(windows):
            if self.objective == "mlm":  # masked-token loss, the same masks every time
                assert self.mask_id is not None  # set for mlm
                x, y = mlm_val_batch(x, i, seed=self.cfg.seed, mask_id=self.mask_id,
                                     vocab=self.vocab)  # fmt: skip
            loss = self.loss(x.to(self.device), y.to(self.device))
            losses.append(loss.double().item())
        self.module.train()
        return sum(losses) / max(len(losses), 1)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, checkpoints: Any = None, metrics: MetricsLog | None = None) -> dict[str, float]:
        """Train to cfg.steps, saving through `checkpoints` and logging a row every
        log_every steps (and the last) to `metrics` on the lead rank; then validate."""
        c = self.cfg
        lead = self.mesh.rank == 0
        log = metrics if (metrics is not None and lead) else MetricsLog(None)
        start = time.perf_counter()
        first = self.step
        tokens_per_step = c.batch * c.seq
        window = (self.step, start)  # tokens/s over the steps since the last row
        saved = None
        with Reporter(lead and c.progress, c.steps, self.step) as report:
            while self.step < c.steps:
                logged = (self.step + 1) % c.log_every == 0 or self.step + 1 == c.steps
                loss = self.train_step(measure=True)
                now = time.perf_counter()
                tps = (self.step - window[0]) * tokens_per_step / max(now - window[1], 1e-9)
                row = None
                if logged:
                    row = {
                        "kind": "train", "step": self.step, "loss": loss,
                        "lr": lr_at(c, self.step - 1), "grad_norm": self.last_grad_norm,
                        "tokens_per_s": tps, "elapsed_s": round(now - start, 3),
                    }  # fmt: skip
                    log.write(row)
                    window = (self.step, now)
                report.step(self.step, loss, tps, row)
                if checkpoints and c.save_every and self.step % c.save_every == 0:
                    checkpoints.save(self)
                    saved = self.step
            if checkpoints and self.step > first and saved != self.step:
                checkpoints.save(self)
        validate = c.eval_batches > 0
        if validate and not self.rank.evaluates:
            validate = False
            report.say("no validation: this model's traced graph depends on train/eval mode, "
                       "so the parallel module runs in train mode only; `autotp eval "
                       f"{c.ckpt_dir or 'RUN_DIR'}` evaluates a checkpoint of it")  # fmt: skip
        val = self.val_loss() if validate else float("nan")
        elapsed = time.perf_counter() - start
        if validate:
            ppl = math.exp(val)
            log.write({"kind": "val", "step": self.step, "val_loss": val,
                       "val_perplexity": ppl, "elapsed_s": round(elapsed, 3)})  # fmt: skip
        result = {
            "steps": self.step,
            "first_loss": self.losses[0] if self.losses else float("nan"),
            "last_loss": self.losses[-1] if self.losses else float("nan"),
            "val_loss": val,
            "val_perplexity": math.exp(val) if validate else float("nan"),
            "tokens_per_s": (self.step - first) * tokens_per_step / max(elapsed, 1e-9),
            "seconds": elapsed,
        }
        if lead and c.progress:
            what = "masked-token " if self.objective == "mlm" else ""
            report.say(
                f"done: {result['steps']} steps in {elapsed:.1f} s, "
                f"{result['tokens_per_s']:,.0f} tokens/s; loss {result['first_loss']:.3f} -> "
                f"{result['last_loss']:.3f}"
                + (
                    f"; validation {what}perplexity {result['val_perplexity']:.2f}"
                    if validate
                    else ""
                )
            )
        return result


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of an FSDP DTensor, else `t` itself."""
    if not isinstance(t, DTensor):
        return t
    with torch.no_grad():  # the local tensor itself, not an autograd view of it
        return t.to_local()


def _refuse_meta(module: torch.nn.Module) -> None:
    """Every tensor of a rank module is real before it trains (a buffer of a model built on
    the meta device, with no file to read it from, has no values)."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            raise AutoTPError(
                f"{name} of the rank module is still on the meta device: the model's "
                "initialiser draws parameters only",
                hint="build the model on a real device, or give --init-from a file that holds it",
            )


def _loss_of(out: Any) -> torch.Tensor:
    """The loss in a model's output: `.loss` (transformers), ["loss"], or the one scalar
    of a tuple ((logits, loss) of autotp.models, (loss, logits, ...) of return_dict=False)."""
    if hasattr(out, "loss"):
        return cast(torch.Tensor, out.loss)
    if isinstance(out, dict):
        return cast(torch.Tensor, out["loss"])
    scalars = [v for v in out if isinstance(v, torch.Tensor) and v.ndim == 0]
    if len(scalars) != 1:
        raise UsageError(
            f"the model returned {len(out)} values, {len(scalars)} of them scalars: autotp "
            "train cannot tell which is the loss",
            hint="return (logits, loss), or an object with a .loss",
        )
    return scalars[0]


def join_group() -> None:
    """A torchrun worker joins its process group: NCCL on its GPU where there are GPUs,
    else gloo."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        init_process_group("nccl", device_id=device)
    else:
        init_process_group("gloo")


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
    # torch.distributed re-exports TCPStore and PrefixStore without listing them in __all__
    store = dist.TCPStore(  # type: ignore[attr-defined]
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
        timeout=datetime.timedelta(minutes=10),
    )  # fmt: skip
    prefixed = dist.PrefixStore(f"autotp/attempt_{attempt}", store)  # type: ignore[attr-defined]
    dist.init_process_group(
        backend, store=prefixed,
        rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), **kwargs,
    )  # fmt: skip


def resume(
    trainer: Trainer, checkpoints: Any, metrics: MetricsLog, say: Callable[[str], None],
    fresh: bool = False,
) -> Path | None:  # fmt: skip
    """Load the run's best checkpoint into `trainer` (none when `fresh`), say where it
    resumed, and drop the metrics rows of the steps it will train again (all of them on a
    fresh start); the lead rank writes the log."""
    found = None if fresh else checkpoints.resume(trainer)
    if trainer.mesh.rank == 0:
        metrics.rewind(trainer.step)
        if found is not None:
            say(f"resumed from {found} at step {trainer.step} of {trainer.cfg.steps}")
            metrics.write({"kind": "resume", "step": trainer.step, "checkpoint": found.name,
                           "elapsed_s": 0.0})  # fmt: skip
    return found


def _report_error(e: AutoTPError) -> None:
    """Under `autotp train` the first failing rank leaves its error for the launcher to show
    once; under a bare torchrun rank 0 prints it."""
    path = os.environ.get(ERROR_FILE)
    if path:  # written whole under another name, then linked: the first rank's stays
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"kind": type(e).__name__, "title": e.title, "message": e.message,
                       "what": e.what, "where": e.where, "hint": e.hint}, f)  # fmt: skip
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        os.unlink(tmp)
    elif dist.get_rank() == 0:
        from rich.console import Console

        from ..show.render import error_view

        Console(stderr=True).print(error_view(e))


def run_worker(parse: Callable[[], Any], body: Callable[[Any], None]) -> int:
    """A torchrun worker's life: its options parsed by `parse` (a mistake printed once, by
    rank 0), the process group joined, `body(options)` run on every rank, the group torn
    down. The exit code: 0; 2 after a user's mistake or an AutoTPError (reported); 130 on
    Ctrl-C (checkpoints are written atomically: nothing to undo)."""
    try:
        options = parse()
    except AutoTPError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(str(e), file=sys.stderr)
        return 2
    join_group()
    try:
        body(options)
        dist.barrier()
    except AutoTPError as e:
        _report_error(e)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of one process started by torchrun (`torchrun -m autotp.run.train`)."""

    def parse() -> TrainConfig:
        cfg = config_from_args(argv)
        check_args(cfg)
        return cfg

    return run_worker(parse, _train)


def _train(cfg: TrainConfig) -> None:
    """One rank's run: build, resume where a run is, train, validate."""
    from .checkpoint import Checkpoints

    lead = dist.get_rank() == 0
    say = print if lead and cfg.progress else (lambda line: None)
    trainer = Trainer(cfg)
    replicated = left_replicated(trainer.plan)
    if replicated:
        left, why = len(replicated), replicated[0][1]
        say(f"{left} matched blocks stay replicated (--strict refuses them); the first: {why}")
    ckpt = metrics = None
    if cfg.ckpt_dir:
        ckpt = Checkpoints(cfg.ckpt_dir, keep_last=cfg.keep_last, say=say)
        metrics = MetricsLog(Path(cfg.ckpt_dir) / "metrics.jsonl")
        # a group torchrun restarted resumes its own checkpoints, even under --no-resume
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
        if not (cfg.resume or restarted):
            check_run_folder(cfg, say)  # refuses a folder that holds a run
        resume(trainer, ckpt, metrics, say, fresh=not (cfg.resume or restarted))
    trainer.fit(ckpt, metrics)


if __name__ == "__main__":
    sys.exit(main())
