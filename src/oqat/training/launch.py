"""One single-threaded process per CPU core, started by oqat itself (no torchrun on a laptop).

Why processes and not threads: a training step runs thousands of small parallel regions, and
with N threads on N cores each region waits at its barrier for every thread; when another
program takes one core, every region waits for the descheduled thread and the run slows down
several-fold (measured on the quickstart: 1 process x 2 threads fell to 29% of its idle rate
with one core busy, 2 processes x 1 thread kept 75%, and idle they are as fast; see
docs/performance.md). Data-parallel processes meet once per step, in one all-reduce.

:func:`launch` re-runs the same ``oqat`` command in ``procs`` processes with the environment
torchrun would give them (gloo on loopback), one intra-op thread each. The configured batch is
the global one: :func:`process_batch` splits it over the processes, so a run has the same
recipe whatever the process count. ``OQAT_PROCS`` overrides the choice (``1``: one process).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SPLIT_ENV = "OQAT_SPLIT_BATCH"      # set by launch(): the configured batch is split over this many processes
PROCS_ENV = "OQAT_PROCS"            # the user's override of the process count
ERRORS_ENV = "OQAT_RANK_ERRORS"     # set by launch(): the folder where each rank leaves its final error line


def report_error(line: str) -> None:
    """Print a command's final error line, once per run rather than once per process: under
    :func:`launch` every rank leaves its line in the launcher's folder and only rank 0 prints;
    the launcher prints another rank's line afterwards when it differs from rank 0's."""
    rank, folder = int(os.environ.get("RANK", "0")), os.environ.get(ERRORS_ENV)
    if folder:
        try:
            (Path(folder) / f"rank{rank}.txt").write_text(line + "\n")
        except OSError:
            folder = None                       # the launcher's folder is gone: say it here
    if rank == 0 or not folder:
        print(line, file=sys.stderr)


def _other_ranks_errors(folder: Path, procs: int) -> list[str]:
    """The error lines of ranks 1.. that say something rank 0's does not (each rank of a
    data-parallel run usually fails on the same bad input, with the same line)."""
    def line(rank: int) -> str:
        try:
            return (folder / f"rank{rank}.txt").read_text().strip()
        except OSError:
            return ""
    seen, out = {line(0)}, []
    for rank in range(1, procs):
        text = line(rank)
        if text and text not in seen:
            seen.add(text)
            out.append(f"{text} (process {rank + 1} of {procs})")
    return out


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose_procs(flag: int | str | None, configured: int | str | None = "auto", device: str = "auto") -> int:
    """How many processes a run uses: the ``--procs`` flag, else ``OQAT_PROCS``, else the config's
    value; "auto" means one per usable core on a CPU. GPU runs, and processes already started by
    torchrun or by :func:`launch`, are one process (torchrun places GPU ranks)."""
    requested = flag or os.environ.get(PROCS_ENV) or configured or "auto"
    if "WORLD_SIZE" in os.environ or "RANK" in os.environ:
        return 1
    if str(requested) == "auto":
        import torch

        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        return usable_cores() if on_cpu else 1
    try:
        n = int(requested)
    except ValueError:
        raise ValueError(f"procs: expected a positive integer or 'auto', got {requested!r}") from None
    if n < 1:
        raise ValueError(f"procs: expected a positive integer or 'auto', got {requested!r}")
    return n


def process_batch(batch_size: int, world_size: int, where: str = "train.batch_size") -> int:
    """The per-process batch: under :func:`launch` the configured (global) batch split evenly over
    the processes; under torchrun the configured batch itself (torchrun's convention)."""
    split = int(os.environ.get(SPLIT_ENV, "1"))
    if split <= 1 or world_size != split:
        return batch_size
    if batch_size % split:
        raise ValueError(f"{where}: {batch_size} does not split evenly over {split} processes; use a multiple of "
                         f"{split} or --procs 1")
    return batch_size // split


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], procs: int) -> int:
    """Run ``python -m oqat ARGV`` in `procs` processes (ranks 0..procs-1) and wait for them all.

    Returns the first non-zero exit status (the other processes are then stopped), else 0.
    Ctrl-C reaches every process; rank 0 alone prints progress, the others warnings, and a final
    error line only where it differs from rank 0's (:func:`report_error`).
    """
    with tempfile.TemporaryDirectory(prefix="oqat-ranks-") as errors:
        status = _run_ranks(argv, procs, {ERRORS_ENV: errors})
        for line in _other_ranks_errors(Path(errors), procs):
            print(line, file=sys.stderr)
    return status


# Signals that stop a run from outside (kill, timeout, a job scheduler, a closed terminal): the
# launcher passes them on, so no rank keeps running, and holding the run folder, after it.
FORWARDED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _die_with_parent() -> None:
    """In a rank, before it execs: on Linux, a SIGTERM when the launcher dies (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: signals are still forwarded while the launcher lives
        pass


def _run_ranks(argv: list[str], procs: int, extra_env: dict[str, str]) -> int:
    env = {**os.environ, **extra_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(procs),
           "LOCAL_WORLD_SIZE": str(procs), SPLIT_ENV: str(procs), "OMP_NUM_THREADS": "1"}
    children: list[subprocess.Popen] = []
    stopped_by: list[int] = []

    def forward(signum, _frame) -> None:
        stopped_by.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python takes signals
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED} if in_main_thread else {}
    try:
        for rank in range(procs):
            child_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            out = None if rank == 0 else subprocess.DEVNULL
            children.append(subprocess.Popen([sys.executable, "-m", "oqat", *argv], env=child_env, stdout=out,
                                             preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        status = _wait_all(children)
    except KeyboardInterrupt:  # a terminal's Ctrl-C reaches the children too; a kill of this process does not
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped_by:
        verb = next((a for a in argv if not a.startswith("-")), "")
        again = ("the same command with --resume continues from the last checkpoint" if verb == "train"
                 else "the same command continues where it stopped")
        print(f"oqat {verb}: stopped by {signal.Signals(stopped_by[0]).name}; {again}", file=sys.stderr)
        return 128 + stopped_by[0]
    return status


def _wait_all(children: list[subprocess.Popen]) -> int:
    """Wait for every rank; the first non-zero exit status stops the others and is returned."""
    status = 0
    pending = list(children)
    while pending:
        for child in list(pending):
            code = child.poll()
            if code is None:
                continue
            pending.remove(child)
            if code != 0 and status == 0:
                status = code
                for other in pending:  # one rank failed: the others would wait for it forever
                    other.terminate()
        if pending:
            try:
                pending[0].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
    return status


__all__ = ["ERRORS_ENV", "PROCS_ENV", "SPLIT_ENV", "choose_procs", "launch", "process_batch", "report_error",
           "usable_cores"]
