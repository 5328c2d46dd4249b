"""
The plumbing of train_shakespeare.py, kept out of the recipe: batches, checkpoint files, device and dtype,
the JSONL logs, the diagnostics recorder, the loss-spike detector, the stop request (Ctrl-C), and the memory
setting that bench.py shares. Imports torch, numpy and stable_gpt only.
"""

import ctypes
import fcntl
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

import stable_gpt


class TrainError(Exception):
    """A problem with the user's input, reported as one line (exit code 2)."""


# bf16 dense tensor-core peak FLOP/s by GPU name, for MFU (NVIDIA data sheets); an unknown GPU gets no MFU
GPU_PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
                  "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12}


class Batches:
    """Random (x, y) windows from a uint16 token file, drawn with the run's own generator, so that the data
    order is reproducible and its state can be saved for an exact resume."""

    def __init__(self, path, block_size, batch_size, device, seed):
        self.path, self.block_size, self.batch_size, self.device = path, block_size, batch_size, device
        self.n = len(np.memmap(path, dtype=np.uint16, mode="r"))
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        # re-open the memmap on every batch: a long-lived memmap grows RSS (nanoGPT #287)
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        ix = torch.randint(self.n - self.block_size, (self.batch_size,), generator=self.gen).tolist()
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, state):
    """Atomic: written to a temporary file in the same folder, then renamed over the old one, so a crash
    while writing leaves the previous checkpoint intact."""
    tmp = Path(f"{path}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk shows as either, depending on where torch.save fails
        raise TrainError(f"could not write {path} ({e}); the previous checkpoint there is kept. Free disk space, "
                         "then --resume") from None
    finally:
        tmp.unlink(missing_ok=True)


def link_checkpoint(src, dst):
    """dst becomes the same file as src (a hard link, atomically; a copy where the file system has none): best.pt
    costs no second write or disk space while it is the latest state, and keeps it when ckpt.pt moves on
    (save_checkpoint replaces ckpt.pt with a new file rather than writing into it)."""
    tmp = Path(f"{dst}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"no checkpoint at {path}; train first (python train_shakespeare.py --out-dir "
                         f"{path.parent}), or point --out-dir at a finished run")
    try:
        # weights_only: unpickle tensors, numbers, strings, lists and dicts only (all a checkpoint holds), so
        # that a crafted file cannot run code while it is read
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainError(f"refused to load {path}: it holds objects other than tensors, numbers, strings, lists "
                         "and dicts, which a stable-gpt checkpoint never does (loading it could run code)") from None
    except Exception as e:  # truncated or corrupted file: torch raises a variety of errors
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise TrainError(f"cannot read checkpoint {path} ({type(e).__name__}: {first_line}); it is truncated or "
                         "not a stable-gpt checkpoint") from None
    missing = {"model", "model_args", "config", "meta"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise TrainError(f"{path} is not a stable-gpt checkpoint (missing {', '.join(sorted(missing))})")
    return ckpt


def checkpoint_model_state(ckpt):
    """The checkpoint's model state dict, with the prefix torch.compile adds to its keys removed."""
    return {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}


# ----------------------------------------------------------------------------------------------------
# Device, memory, time


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the OS. A training
    step frees and re-allocates the same activation buffers (0.1-4 MB each in the CPU preset); by default
    glibc maps such sizes fresh and trims them away on free, so each step page-faults 2,500-8,000 zeroed
    pages back in: ~15 ms of kernel time over the 2 threads, ~6% of a CPU-preset step (measured with
    getrusage). A fixed mmap threshold of 32 MiB (glibc's largest) and no trimming keep them on the heap;
    the peak memory stays the same. Returns whether it took effect (Linux with glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))


def pick_device(name):
    if name in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but CUDA is not available here; use --device cpu (or auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainError("--device mps, but MPS is not available here; use --device cpu (or auto)")
    return device


def pick_dtype(name, device):
    if name in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name != "float32" and device.type != "cuda":
        raise TrainError(f"--dtype {name} needs CUDA; on {device.type} use float32")
    return getattr(torch, name)


def gpu_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


class SpikeDetector:
    """A loss spike is a step whose loss exceeds `factor` x the median loss of the previous `window` steps
    (no verdict before `window` steps have been seen). A median, unlike a mean, is not dragged up by the
    spike itself or by the falling loss of early training."""

    def __init__(self, factor, window, recent=()):
        self.factor = factor
        self.recent = deque(recent, maxlen=window)

    def update(self, loss):
        """Feed one step's loss; returns the median it was compared with if it is a spike, else None."""
        median = statistics.median(self.recent) if len(self.recent) == self.recent.maxlen else None
        self.recent.append(loss)
        return median if median is not None and loss > self.factor * median else None


class StepTimer:
    """Seconds per optimizer step between two progress lines, evaluations left out, and an exponentially
    smoothed value of it for a steady ETA (the raw value swings with evaluations and other tenants)."""

    def __init__(self, iter_num):
        self.start, self.start_iter, self.smooth = time.time(), iter_num, None

    def restart(self):
        """After an evaluation: its time is not step time."""
        self.start = time.time()

    def lap(self, iter_num):
        """(seconds per step since the last lap, the smoothed value), iter_num the steps done; starts the next lap."""
        dt = (time.time() - self.start) / (iter_num - self.start_iter)
        self.start, self.start_iter = time.time(), iter_num
        self.smooth = dt if self.smooth is None else 0.8 * self.smooth + 0.2 * dt
        return dt, self.smooth


class OLMoSpikeScore:
    """Loss spikes as OLMo counts them (the "spike score" of OLMo 2, arXiv 2501.00656; the numbers of
    OLMo-core's stability monitor): a step whose loss is more than `sigmas` standard deviations above the mean
    of the previous `window` steps. `score` is the percentage of scored steps (those with a full window
    before them) that spiked, comparable across runs of different lengths; the state survives a resume."""

    def __init__(self, sigmas=6.0, window=128, recent=(), spike_iters=(), scored=0):
        self.sigmas, self.recent = sigmas, deque(recent, maxlen=window)
        self.spike_iters, self.scored = list(spike_iters), scored

    def update(self, iter_num, loss):
        """Feed step iter_num's loss; returns whether it is a spike."""
        spike = False
        if len(self.recent) == self.recent.maxlen:
            self.scored += 1
            spike = loss > statistics.fmean(self.recent) + self.sigmas * statistics.pstdev(self.recent)
            if spike:
                self.spike_iters.append(iter_num)
        self.recent.append(loss)
        return spike

    @property
    def score(self):
        return 100.0 * len(self.spike_iters) / self.scored if self.scored else None

    def state(self):
        return dict(sigmas=self.sigmas, window=self.recent.maxlen, recent=list(self.recent),
                    spike_iters=list(self.spike_iters), scored=self.scored)


class SpikeWatch:
    """Both spike rules over a run's step losses: ours (SpikeDetector, with the iterations it flagged) and OLMo's
    (OLMoSpikeScore). state() goes into every checkpoint, so that a resumed run continues both."""
    STATE_KEYS = ("spikes", "recent_losses", "olmo_spikes")  # state()'s keys, as a checkpoint stores them

    def __init__(self, factor, window, state=None):
        state = state or {}
        self.median_rule = SpikeDetector(factor, window, state.get("recent_losses", ()))
        self.iters = list(state.get("spikes", ()))
        self.olmo = OLMoSpikeScore(**state.get("olmo_spikes", {}))

    def update(self, iter_num, loss):
        """Feed step iter_num's loss; returns the median it was compared with if ours calls it a spike, else None."""
        self.olmo.update(iter_num, loss)
        median = self.median_rule.update(loss)
        if median is not None:
            self.iters.append(iter_num)
        return median

    def state(self):
        return dict(spikes=list(self.iters), recent_losses=list(self.median_rule.recent), olmo_spikes=self.olmo.state())

    def summary(self):
        return dict(spikes=len(self.iters), spike_iters=self.iters[:100], olmo_spikes=len(self.olmo.spike_iters),
                    olmo_spike_score=self.olmo.score, olmo_spike_iters=self.olmo.spike_iters[:100])


def parse_or_none(line):
    """A log line's record, or None for a line that is not whole JSON (a crash mid-write can leave a partial
    last line)."""
    try:
        return json.loads(line)
    except ValueError:
        return None


class JsonlLog:
    """log.jsonl: one JSON object per line; a step line's iter counts the steps done, an eval line's the steps
    before it. On resume, what the resumed run will write again (later steps, the eval at resume_iter) is dropped."""

    def __init__(self, path, resume_iter=None):
        self.path = Path(path)
        lines = []
        if resume_iter is not None and self.path.is_file():
            keep = lambda r: r["iter"] < resume_iter or (r["iter"] == resume_iter and r.get("type") != "eval")
            lines = [ln for ln in self.path.read_text().splitlines()
                     if (record := parse_or_none(ln)) is not None and keep(record)]
        self.path.write_text("".join(ln + "\n" for ln in lines))

    def write(self, **record):
        with self.path.open("a") as f:
            f.write(json.dumps(finite_or_null(record), allow_nan=False) + "\n")


def finite_or_null(value):
    """value with every NaN or infinity replaced by None: JSON has no NaN, so a diverged step logs null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


class DiagnosticsRecorder:
    """Per-layer diagnostics every `interval` optimizer steps (stable_gpt's functions), one diag.jsonl line
    per record, on one fixed batch. The training loop calls these at fixed points of every step; each does
    nothing on a step without a record:
        before_step(iter_num)   a copy of the block matrices, for the update ratios
        after_backward()        gradient norms, before clipping (as OLMo's logs and SDD's Fig. 7)
        after_update()          update ratios |dW|/|W| of the optimizer step (before TVR edits the weights)
        end_step()              activation statistics, layer importance, weight stds; writes the line
    `seconds` is the time spent here (summary.json's diag_s)."""

    def __init__(self, model, batch, log, interval):
        self.model, (self.x, self.y), self.log, self.interval = model, batch, log, interval
        self.record, self.seconds = None, 0.0

    def _timed(self, fn):
        if self.record is not None:
            started = time.time()
            fn(self.record)
            self.seconds += time.time() - started

    def before_step(self, iter_num):
        self.record = None
        if self.interval > 0 and (iter_num + 1) % self.interval == 0:
            self.record = {"iter": iter_num + 1}
            self._timed(lambda r: r.update(before=stable_gpt.matrix_snapshot(self.model)))

    def after_backward(self):
        self._timed(lambda r: r.update(grad_norm=stable_gpt.grad_norms(self.model)))

    def after_update(self):
        self._timed(lambda r: r.update(update_ratio=stable_gpt.update_ratios(r.pop("before"), self.model)))

    def end_step(self):
        self._timed(lambda r: r.update(stable_gpt.activation_stats(self.model, self.x, self.y),
                                       layer_importance=stable_gpt.layer_importance(self.model, self.x, self.y),
                                       weight_std=stable_gpt.weight_stds(self.model)))
        if self.record is not None:
            self.log.write(**self.record)
            self.record = None


class RunLock:
    """An exclusive lock on a run folder (flock on <folder>/.lock, released when the process ends in any way),
    so that two runs never write into one folder at once. The holder's process id is in the file."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise TrainError(f"{folder} is in use by another run (process {holder}); wait for it to finish, or "
                             "use another --out-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        self.file.close()  # closing the file releases the lock


def clear_outputs(folder):
    """Before a fresh run (--overwrite) in a folder that held one: remove the old run's files, so that no
    stale plot or summary is taken for the new run's."""
    for name in ("ckpt.pt", "best.pt", "summary.json", "log.jsonl", "diag.jsonl"):
        (Path(folder) / name).unlink(missing_ok=True)
    for png in Path(folder).glob("*.png"):
        png.unlink()


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request the loop honours at the next step boundary, where it
    writes a checkpoint and returns. A second signal stops at once (the last checkpoint stays intact)."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(signal again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
