"""`autotp train`: check everything a process group is not needed for, then start
tp x dp workers (`autotp.run.train`) through torchrun's elastic launcher.

A user's mistake is reported once, as one panel, with exit code 2: from the checks here
(about a second after the command, before any worker starts) or from a worker, which
leaves its error in a file this process reads (torchrun's own failure traceback is not
shown). Ctrl-C exits 130; checkpoints are written atomically, so the last good one stays.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

from ..common.errors import AutoTPError, CheckpointError, TrainingStopped, UsageError
from .config import ERROR_FILE, TORCHRUN_FLAGS, check, config_from_args, parser

__all__ = ["launch", "run_workers", "split_argv"]

# a worker's error file names its class (None where it names none)
_KINDS: dict[str | None, type[AutoTPError]] = {
    c.__name__: c for c in (AutoTPError, UsageError, CheckpointError, TrainingStopped)
}


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun's options, autotp train's options) of an `autotp train` command line."""
    launcher, rest, i = [], [], 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in TORCHRUN_FLAGS or flag.replace("_", "-") in TORCHRUN_FLAGS:
            take = 1 if "=" in argv[i] else 2
            launcher += argv[i : i + take]
            i += take
        elif argv[i] == "--standalone":
            launcher.append(argv[i])
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return launcher, rest


def _quiet_torchrun() -> None:
    """torchrun logs each failed worker at ERROR with its own summary; the worker's
    message is what the user needs, shown once by us. Restarts stay visible (WARNING)."""
    for name in ("torch.distributed.elastic.multiprocessing.api",
                 "torch.distributed.elastic.multiprocessing.errors",
                 "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.agent.server.local_elastic_agent",
                 "torch.distributed.launcher.api"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _worker_error(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            err = json.load(f)
    except (OSError, ValueError):
        return None
    return err if isinstance(err, dict) else None


def launch(argv: list[str], say: Callable[[str], None] = print) -> int:
    """Run `autotp train ARGV`; returns the exit code (AutoTPError for user mistakes)."""
    launcher, rest = split_argv(argv)
    if "-h" in rest or "--help" in rest:
        parser().print_help()
        return 0
    cfg = check(config_from_args(rest), say=lambda line: None)  # workers say it
    return run_workers("autotp.run.train", launcher, rest, cfg.tp * cfg.dp, say=say)


def run_workers(
    module: str, launcher: list[str], argv: list[str], nproc: int,
    say: Callable[[str], None] = print,
) -> int:  # fmt: skip
    """`torchrun [LAUNCHER] -m MODULE ARGV` with `nproc` processes per node unless the
    launcher options say otherwise; the first failing worker's AutoTPError (left in
    AUTOTP_ERROR_FILE) is raised here, once. Returns the exit code (130 on Ctrl-C)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher = list(launcher)
    names = {a.split("=", 1)[0].replace("_", "-") for a in launcher}
    if "--nproc-per-node" not in names:
        launcher += ["--nproc-per-node", str(nproc)]
    if "--rdzv-endpoint" not in names and "--nnodes" not in names:
        launcher.append("--standalone")
    with tempfile.TemporaryDirectory(prefix="autotp-") as tmp:
        error_file = os.path.join(tmp, "error.json")
        os.environ[ERROR_FILE] = error_file
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, minus its banner
        _quiet_torchrun()
        try:
            # torch leaves torchrun's parse_args and run unannotated
            torchrun_argv = [*launcher, "-m", module, *argv]
            args = torchrun.parse_args(torchrun_argv)  # type: ignore[no-untyped-call]
            torchrun.run(args)  # type: ignore[no-untyped-call]
        except ChildFailedError as e:
            err = _worker_error(error_file)
            if err is not None:
                kind = _KINDS.get(err.get("kind"), AutoTPError)
                raise kind(err.get("message", ""), what=err.get("what"), where=err.get("where"),
                           hint=err.get("hint")) from None  # fmt: skip
            codes = sorted({f.exitcode for f in e.failures.values()})
            if codes == [130] or codes == [-2]:
                return 130
            rank, first = next(iter(e.failures.items()))  # by global rank
            raise AutoTPError(
                f"a worker process failed (exit codes {codes}) without an autotp message\n"
                f"  rank:   {rank}, {first.error_file or 'no error file'}",
                hint="its traceback is above; `autotp train --max-restarts N` restarts "
                "a training run from its last checkpoint after a crash",
            ) from None
        except (KeyboardInterrupt, SignalException):
            say("interrupted: the last complete checkpoint is kept")
            return 130
        finally:
            os.environ.pop(ERROR_FILE, None)
    return 0
