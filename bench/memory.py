"""Memory per rank, two ways, on gloo ranks of this machine.

    python bench/memory.py [--model gpt2-medium]      the runner's GPT-2, materialised
    python bench/memory.py --weights [--hf gpt2]      a transformers model from safetensors
    python bench/memory.py --state [--model gpt2]     training state per rank, tp x dp x FSDP

The first builds the runner's model (meta, then one parameter at a time) at tp 1, 2 and 4
and prints parameter bytes and peak RSS of each rank against serial.

The second saves a transformers model (`--hf gpt2`: GPT-2 small's default config, 124M
parameters; `--hf llama-1b`: a 1.1B Llama config) with save_pretrained into a temporary
folder, then on tp ranks builds it on the meta device and calls
`autotp.parallelize(model, tp, weights=folder)`, sampling the process's anonymous resident
memory (RssAnon: what the rank allocated, not the mapped file) every 2 ms while loading.
It prints, per tp, the peak over the load against the rank's shard, the largest single
tensor and the full model, and the time parallelize took.

The third trains one step of the runner at tp x dp in {1, 2} x {1, 2}, with and without
--fsdp, and counts the bytes each rank holds after it, before gradients are dropped:
parameters, gradients and AdamW's state (exp_avg, exp_avg_sq, step), each tensor's local
part (an FSDP DTensor's own shard), a tied tensor once. The largest rank is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import tempfile
import threading
import time
from collections.abc import Iterator

import torch

from autotp.testing import run_on_gloo


def _rank(rank: int, world: int, model: str) -> tuple[int, float]:
    from autotp.run.train import TrainConfig, Trainer

    cfg = TrainConfig(model=model, tp=world, dp=1, steps=0, batch=2, seq=64, progress=False,
                      data=None)  # fmt: skip
    trainer = Trainer(cfg)
    held = sum(p.numel() * p.element_size() for p in dict.fromkeys(trainer.module.parameters()))
    return held, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _local_bytes(tensors) -> int:
    """Bytes of the tensors' local parts (a DTensor's own shard), each tensor once."""
    from torch.distributed.tensor import DTensor

    seen = {id(t): t for t in tensors if t is not None}.values()
    local = [t.to_local() if isinstance(t, DTensor) else t for t in seen]
    return sum(t.numel() * t.element_size() for t in local)


def _state_rank(rank: int, world: int, model: str, tp: int, fsdp: bool) -> tuple[int, ...]:
    from autotp.run.train import TrainConfig, Trainer

    cfg = TrainConfig(model=model, tp=tp, dp=world // tp, fsdp=fsdp, steps=1, batch=2, seq=64,
                      progress=False, eval_batches=0)  # fmt: skip
    trainer = Trainer(cfg)
    trainer.opt.zero_grad = lambda set_to_none=True: None  # keep this step's gradients
    trainer.train_step()
    with torch.no_grad():
        params = _local_bytes(trainer.params)
        grads = _local_bytes(p.grad for p in trainer.params)
        state = _local_bytes(t for s in trainer.opt.state.values() for t in s.values())
    return params, grads, state


def state_main(model: str) -> None:
    from autotp.models import build

    with torch.device("meta"):
        serial = build(model)
    count = sum(p.numel() for p in serial.parameters())
    mib = lambda b: f"{b / 2**20:9.1f} MiB"  # noqa: E731
    print(f"{model}: {count / 1e6:.0f}M parameters, float32; bytes held by the largest rank "
          "after one AdamW step (local shards, a tied tensor once)")  # fmt: skip
    print(f"{'tp':>3s} {'dp':>3s} {'fsdp':>5s} {'parameters':>13s} {'gradients':>13s} "
          f"{'AdamW state':>13s} {'total':>13s}")  # fmt: skip
    for tp in (1, 2):
        for dp in (1, 2):
            for fsdp in (False, True):
                rows = run_on_gloo(_state_rank, tp * dp, model, tp, fsdp, timeout=1800)
                p, g, s = max(rows, key=sum)
                print(f"{tp:3d} {dp:3d} {'yes' if fsdp else 'no':>5s} {mib(p)} {mib(g)} "
                      f"{mib(s)} {mib(p + g + s)}")  # fmt: skip


def _anon() -> int:
    """This process's anonymous resident memory, bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def anon_peak() -> Iterator[list[int]]:
    """The peak anonymous resident memory while the body runs, above what the process
    held before (sampled every 2 ms): `[bytes]`, filled in when the body ends."""
    base, peak, stop = _anon(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = [0]
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out[0] = max(peak[0], _anon()) - base


def _config(name: str):
    import transformers

    if name == "gpt2":
        return transformers.GPT2Config(), transformers.GPT2LMHeadModel
    if name == "llama-1b":  # TinyLlama-1.1B's shape
        cfg = transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
        )  # fmt: skip
        return cfg, transformers.LlamaForCausalLM
    raise SystemExit(f"--hf: gpt2 or llama-1b, not {name}")


def _load_rank(rank: int, world: int, name: str, folder: str) -> tuple:
    import autotp

    cfg, cls = _config(name)
    with torch.device("meta"):
        model = cls(cfg).eval()
    with anon_peak() as peak:
        t0 = time.perf_counter()
        module = autotp.parallelize(model, world, weights=folder)
        took = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for t in
               {id(t): t for t in [*module.parameters(), *module.buffers()]}.values())  # fmt: skip
    return peak[0], held, took


def weights_main(name: str) -> None:
    cfg, cls = _config(name)
    torch.manual_seed(0)
    model = cls(cfg)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}.values()  # tied once
    full = sum(t.numel() * t.element_size() for t in unique)
    largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        print(f"{name}: {params / 1e6:.0f}M parameters, full model {full / 2**20:.0f} MiB "
              f"(float32), largest tensor {largest / 2**20:.0f} MiB, saved with "
              "save_pretrained")  # fmt: skip
        print(f"{'tp':>3s} {'peak anon while loading':>24s} {'rank holds':>11s} "
              f"{'peak - holds':>13s} {'peak / full':>12s} {'parallelize':>12s}")  # fmt: skip
        for tp in (1, 2, 4):
            rows = run_on_gloo(_load_rank, tp, name, folder, timeout=1800)
            peak = max(r[0] for r in rows)
            held = max(r[1] for r in rows)
            took = max(r[2] for r in rows)
            print(f"{tp:3d} {peak / 2**20:20.0f} MiB {held / 2**20:7.0f} MiB "
                  f"{(peak - held) / 2**20:9.0f} MiB {peak / full:12.3f} "
                  f"{took:10.1f} s")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-medium")
    ap.add_argument("--weights", action="store_true", help="load from safetensors instead")
    ap.add_argument("--hf", default="gpt2", help="with --weights: gpt2 or llama-1b")
    ap.add_argument("--state", action="store_true",
                    help="training state per rank at tp x dp with and without --fsdp")  # fmt: skip
    args = ap.parse_args()
    if args.state:
        state_main(args.model)
        return
    if args.weights:
        weights_main(args.hf)
        return
    from autotp.models import build

    with torch.device("meta"):
        serial = sum(p.numel() * 4 for p in build(args.model).parameters())
    print(f"{args.model}: serial parameters {serial / 2**30:.2f} GiB (float32)")
    print(f"{'tp':>3s} {'params per rank':>16s} {'of serial':>10s} {'peak RSS per rank':>18s}")
    for tp in (1, 2, 4):
        rows = run_on_gloo(_rank, tp, args.model, timeout=600)
        held = max(r[0] for r in rows)
        rss = max(r[1] for r in rows)
        print(f"{tp:3d} {held / 2**30:13.2f} GiB {held / serial:10.3f} {rss:15.2f} GiB")


if __name__ == "__main__":
    main()
