"""Timing, peak-memory and table helpers shared by the scripts in ``benchmarks/``.

Everything here is independent of what is being measured: a benchmark hands over a zero-argument
callable and gets back the median wall time, or the peak memory that one call needed.

Timing
    :func:`time_callable` runs a callable a few times after a warm-up and returns the median (and
    the individual times) in milliseconds. On CUDA the device is synchronised before the clock is
    read, so the times include the kernels and not only their launch.

Peak memory on the CPU
    ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` can only grow, so
    :func:`peak_memory_mb` resets the kernel's resident-set high-water mark (``VmHWM``) by writing
    ``5`` to ``/proc/self/clear_refs``, reads the current resident set (``VmRSS``), runs the
    callable once and reports ``VmHWM - VmRSS_before``. For the difference to mean "the memory
    this call needed", memory freed by earlier calls must have gone back to the system and not sit
    in the C allocator's free lists: the measuring process must be started with the environment of
    :func:`memory_worker_env` (glibc serves every block above 64 KiB by ``mmap`` and returns it by
    ``munmap`` on free). That environment makes allocation slower, so time in one process and
    measure memory in another (see :class:`JsonLineWorker`). Linux only; elsewhere the peak is
    reported as unavailable.

Peak memory on CUDA
    ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated
    before the call: the tensors the call created, not the caching allocator's reserve.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

__all__ = [
    "Timing",
    "synchronize",
    "time_callable",
    "time_interleaved",
    "rss_mb",
    "reset_peak_rss",
    "peak_memory_mb",
    "memory_worker_env",
    "JsonLineWorker",
    "serve_json_lines",
    "ratio",
    "format_ms",
    "format_mb",
    "format_ratio",
    "format_table",
    "machine_summary",
]

MALLOC_MMAP_THRESHOLD = 65536
"""Bytes above which glibc serves an allocation by ``mmap`` in a memory-measuring process."""


@dataclass(frozen=True)
class Timing:
    """Wall times (and, where measured, CPU times) of repeated calls, in milliseconds.

    The CPU time of a call is ``time.process_time`` (user + system time of every thread of this
    process) around it: on a machine shared with other processes it leaves out the time the
    process waited for a core, so it is less noisy than the wall time there; with several torch
    threads it is their sum, not the elapsed time, and it does not include GPU work.

    Attributes:
        median_ms: median of ``times_ms``.
        min_ms: fastest call.
        times_ms: every timed call, in order (warm-up calls excluded).
        warmup: number of untimed calls made first.
        cpu_times_ms: the CPU time of every timed call, in order (empty where not measured).
    """

    median_ms: float
    min_ms: float
    times_ms: tuple[float, ...]
    warmup: int
    cpu_times_ms: tuple[float, ...] = ()

    @property
    def cpu_median_ms(self) -> float | None:
        """Median of ``cpu_times_ms`` (None where not measured)."""
        return statistics.median(self.cpu_times_ms) if self.cpu_times_ms else None

    @property
    def cpu_min_ms(self) -> float | None:
        """Smallest of ``cpu_times_ms`` (None where not measured)."""
        return min(self.cpu_times_ms) if self.cpu_times_ms else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for JSON output."""
        return asdict(self)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU).

    Args:
        device: the device the timed work runs on.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 3,
    max_seconds: float | None = None,
) -> Timing:
    """Median wall time of ``fn()`` over several calls after a warm-up.

    Each call is timed on its own (``time.perf_counter`` around the call, the device synchronised
    before and after), so a slow outlier shifts the median little. When ``max_seconds`` is given
    the repeats stop early once the timed calls together took that long, but never before
    ``min_repeats`` calls.

    Args:
        fn: the work; its return value is dropped before the next call.
        device: where ``fn`` runs (CUDA is synchronised around each call).
        warmup: untimed calls made first (allocator, thread pools, caches of the callee).
        repeats: timed calls at most.
        min_repeats: timed calls at least, whatever ``max_seconds`` says.
        max_seconds: time budget for the timed calls, or None for exactly ``repeats`` calls.

    Returns:
        The :class:`Timing` of the timed calls.

    Raises:
        ValueError: if ``repeats < 1``, ``warmup < 0`` or ``min_repeats > repeats``.
    """
    if repeats < 1 or warmup < 0 or not 1 <= min_repeats <= repeats:
        raise ValueError(f"expected repeats >= min_repeats >= 1 and warmup >= 0, got {repeats=}, {min_repeats=}, {warmup=}")
    for _ in range(warmup):
        out = fn()
        del out
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    for i in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        del out
        times.append(dt * 1e3)
        spent += dt
        if max_seconds is not None and i + 1 >= min_repeats and spent >= max_seconds:
            break
    return Timing(median_ms=statistics.median(times), min_ms=min(times), times_ms=tuple(times), warmup=warmup)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 3,
    max_seconds: float | None = None,
) -> tuple[dict[str, Timing], dict[str, str]]:
    """Time several callables round-robin, so that load from other processes hits them alike.

    After ``warmup`` untimed rounds, each round calls every callable still active once and times
    that call on its own (synchronising the device around it). A callable leaves the rotation
    after ``repeats`` timed calls, or once it has ``min_repeats`` calls that together took
    ``max_seconds``. Comparing medians taken this way is fairer on a shared machine than timing
    one library after the other: a burst of foreign load spreads over all of them. Each call's
    CPU time (``time.process_time``) is recorded beside its wall time (see :class:`Timing`).

    Args:
        fns: name -> zero-argument callable.
        device: where the callables run (CUDA is synchronised around each call).
        warmup: untimed rounds first.
        repeats: timed calls per callable at most.
        min_repeats: timed calls per callable at least, whatever ``max_seconds`` says.
        max_seconds: time budget per callable, or None for exactly ``repeats`` calls each.

    Returns:
        ``(timings, errors)``: the :class:`Timing` of each callable that never raised, and
        ``"Type: message"`` for each one that did (it leaves the rotation at its first error).

    Raises:
        ValueError: if ``repeats < 1``, ``warmup < 0`` or ``min_repeats > repeats``.
    """
    if repeats < 1 or warmup < 0 or not 1 <= min_repeats <= repeats:
        raise ValueError(f"expected repeats >= min_repeats >= 1 and warmup >= 0, got {repeats=}, {min_repeats=}, {warmup=}")
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    errors: dict[str, str] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            if name in errors:
                continue
            try:
                out = fn()
                del out
            except Exception as exc:  # reported per callable, the others go on
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]

    def active(name: str) -> bool:
        t = times[name]
        if name in errors or len(t) >= repeats:
            return False
        return max_seconds is None or len(t) < min_repeats or sum(t) < max_seconds * 1e3

    while any(active(n) for n in fns):
        for name, fn in fns.items():
            if not active(name):
                continue
            try:
                synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                synchronize(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
                del out
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    timings = {
        k: Timing(median_ms=statistics.median(t), min_ms=min(t), times_ms=tuple(t), warmup=warmup, cpu_times_ms=tuple(cpu[k]))
        for k, t in times.items()
        if k not in errors and t
    }
    return timings, errors


def _proc_status_mb(*keys: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) / 1024.0  # kB -> MiB
    return out


def rss_mb() -> float | None:
    """Current resident set size of this process in MiB (``VmRSS``), or None off Linux."""
    try:
        return _proc_status_mb("VmRSS")["VmRSS"]
    except (OSError, KeyError):
        return None


def reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark ``VmHWM`` to the current resident set.

    Returns:
        True when the kernel accepted the reset (Linux >= 4.0), False otherwise.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float | None:
    """Peak memory that one call of ``fn()`` needed on top of what was in use before, in MiB.

    CPU: resident-set high-water mark minus the resident set before the call (see the module
    notes; run in a process started with :func:`memory_worker_env`). CUDA: peak of
    ``torch.cuda.memory_allocated`` during the call minus its value before.

    Args:
        fn: the work; whatever it returns is dropped inside the measured window.
        device: where ``fn`` allocates.

    Returns:
        The peak in MiB, or None where the platform offers no way to measure it.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        synchronize(device)
        del out
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not reset_peak_rss():
        return None
    try:
        before = _proc_status_mb("VmRSS")["VmRSS"]
        out = fn()
        del out
        return max(0.0, _proc_status_mb("VmHWM")["VmHWM"] - before)
    except (OSError, KeyError):
        return None


def memory_worker_env(threads: int | None = None) -> dict[str, str]:
    """Environment for a child process that measures CPU peak memory with :func:`peak_memory_mb`.

    A copy of ``os.environ`` with glibc's mmap threshold fixed at 64 KiB (so freed tensors are
    unmapped at once and the resident set tracks live memory) and, optionally, the thread count
    of OpenMP and MKL.

    Args:
        threads: value for ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS``, or None to keep them.

    Returns:
        The environment mapping.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


class JsonLineWorker:
    """A child Python process that answers JSON requests, one line each way.

    The child is started lazily at the first :meth:`request` with the given environment (e.g.
    :func:`memory_worker_env`) and must run :func:`serve_json_lines`. Lines the child prints that
    are not JSON objects (warnings, progress) are skipped. If the child dies (killed for memory,
    say), the request returns ``{"error": ...}`` and the next request starts a fresh child.

    Args:
        argv: arguments after the interpreter (script path first).
        env: environment of the child.

    Example:
        >>> worker = JsonLineWorker(["benchmarks/primitives.py", "--memory-worker"], memory_worker_env(2))
        >>> worker.request({"case": ...})  # doctest: +SKIP
    """

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None):
        self.argv, self.env = list(argv), env
        self._proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, *self.argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env, text=True
            )
        return self._proc

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one JSON object, return the child's JSON answer (or ``{"error": ...}``).

        Args:
            obj: the request.

        Returns:
            The answer object.
        """
        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(obj) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        answer = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(answer, dict):
                        return answer
        except (BrokenPipeError, OSError) as exc:
            return {"error": f"worker pipe failed: {exc}"}
        code = proc.wait()
        return {"error": f"worker exited with code {code}"}

    def close(self) -> None:
        """Close the child's input and wait for it to end (killed after 10 s)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "JsonLineWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_json_lines(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Child side of :class:`JsonLineWorker`: answer each JSON line on stdin with one on stdout.

    An exception in ``handler`` is answered as ``{"error": "Type: message"}``; the loop ends when
    stdin closes.

    Args:
        handler: maps a request object to an answer object.
    """
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            answer = handler(json.loads(line))
        except Exception as exc:  # the parent decides what a failed measurement means
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def format_ms(ms: float | None) -> str:
    """Milliseconds with three significant digits (``"-"`` for None)."""
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def format_mb(mb: float | None) -> str:
    """MiB with one decimal below 100 (``"-"`` for None)."""
    if mb is None:
        return "-"
    return f"{mb:.1f}" if mb < 100 else f"{mb:.0f}"


def format_ratio(r: float | None) -> str:
    """A ratio as ``"0.83x"`` (``"-"`` for None)."""
    return "-" if r is None else f"{r:.2f}x"


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    align: Sequence[Literal["<", ">"]] | None = None,
) -> str:
    """Plain-text table with a header rule, columns padded to their widest cell.

    Args:
        headers: column titles.
        rows: cells as strings, one sequence per row, as many cells as headers.
        align: ``"<"`` (left) or ``">"`` (right) per column; left for all when None.

    Returns:
        The table as one string without a trailing newline.

    Raises:
        ValueError: if a row or ``align`` does not have one entry per column.
    """
    rows = [list(r) for r in rows]
    n = len(headers)
    align = list(align) if align is not None else ["<"] * n
    if len(align) != n or any(len(r) != n for r in rows):
        raise ValueError(f"expected {n} cells per row and {n} alignments, got rows of {sorted({len(r) for r in rows})} and {len(align)}")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def machine_summary(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: torch version, threads, CPU count, load, GPU name.

    Args:
        device: the device benchmarked.

    Returns:
        A JSON-ready mapping.
    """
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
