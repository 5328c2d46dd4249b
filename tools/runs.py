"""
The run plumbing of train_shakespeare.py, kept out of the recipe: the Run object (a run's state and everything
it writes: run folder, logs, checkpoints, summary.json), the processes under torchrun, batches, checkpoint
files, device and dtype, the JSONL logs, the folder lock, the stop request (Ctrl-C), and the memory setting
that the benchmark shares. Imports torch, numpy and stable_gpt only (plots only with --plot).
"""

import ctypes
import datetime
import fcntl
import functools
import json
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from stable_gpt import GPT, GPTConfig, combination_notes
from tools.monitors import SkipStep, SpikeWatch, StepTimer, ZClip


class TrainError(Exception):
    """A problem with the user's input, reported as one line (exit code 2)."""


# bf16 dense tensor-core peak FLOP/s by GPU name, for MFU (NVIDIA data sheets); an unknown GPU gets no MFU
# dense bf16 tensor-core peaks from the vendor's data sheets (without sparsity), for MFU; the first name that
# the device's name contains wins, so the specific forms come first (NVL and PCIe boards run at lower clocks)
GPU_PEAK_FLOPS = {"GB200": 2.5e15, "B200": 2.25e15, "H200 NVL": 835e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                  "H800 PCIe": 756e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12,
                  "A800": 312e12, "A10G": 125e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12,
                  "RTX 3090": 71e12, "V100": 125e12}


class Batches:
    """Random (x, y) windows from a uint16 token file, drawn with the run's own generator, so that the data
    order is reproducible and its state can be saved for an exact resume. Every batch's ids are checked against
    vocab_size on the host, where it costs nothing (on a GPU a bad id would be a device-side assert)."""

    def __init__(self, path, block_size, batch_size, device, seed, vocab_size):
        self.path, self.block_size, self.batch_size, self.device = path, block_size, batch_size, device
        self.n, self.vocab_size = len(np.memmap(path, dtype=np.uint16, mode="r")), vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        # re-open the memmap on every batch: a long-lived memmap grows RSS (nanoGPT #287)
        data = np.memmap(self.path, dtype=np.uint16, mode="r")
        ix = torch.randint(self.n - self.block_size, (self.batch_size,), generator=self.gen).tolist()
        windows = np.stack([data[i:i + self.block_size + 1] for i in ix])  # (batch, block + 1)
        if (top := int(windows.max())) >= self.vocab_size:
            raise TrainError(f"{self.path} holds token id {top}, outside the vocabulary of {self.vocab_size}")
        windows = torch.from_numpy(windows.astype(np.int64))
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # y: x shifted by one
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


def load_checkpoint(path, for_resume=False):
    path = Path(path)
    try:
        found = path.is_file()
    except OSError as e:  # a name too long
        raise TrainError(f"cannot read {path} ({e.strerror or e})") from None
    if not found:
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
    if problem := checkpoint_problem(ckpt, for_resume):
        raise TrainError(f"{path} is damaged or not a stable-gpt checkpoint ({problem}); train afresh with "
                         "--overwrite, or use another --out-dir")
    return ckpt


def checkpoint_problem(ckpt, for_resume):
    """What is wrong with a loaded checkpoint's contents (None: nothing): each part of the type the training
    script writes, finite weights; for a resume, the optimizer, step and random states too."""
    kinds = dict(model=dict, model_args=dict, config=dict, meta=dict)
    if for_resume:
        kinds.update(optimizer=dict, iter_num=int, best_val_loss=(int, float), rng=list)
    if wrong := [k for k, kind in kinds.items() if not isinstance(ckpt.get(k), kind)]:
        return ", ".join(f"{k} is {type(ckpt[k]).__name__}" if k in ckpt else f"no {k}" for k in wrong)
    if not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        return "the model holds something other than tensors"
    if not (isinstance(ckpt["meta"].get("vocab_size"), int) and isinstance(ckpt["meta"].get("tokenizer"), str)):
        return "meta has no vocab_size or tokenizer"
    if bad := next((k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()),
                   None):
        return f"{bad} holds non-finite values"
    if for_resume and ckpt["iter_num"] < 0:
        return f"iter_num is {ckpt['iter_num']}"
    return None


def checkpoint_model_state(ckpt):
    """The checkpoint's model state dict, with the prefix torch.compile adds to its keys removed."""
    return {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}


def load_gpt2(init_from, dropout, block_size):
    """GPT.from_pretrained(init_from) (--init-from), cropped to block_size; every failure is one line."""
    try:
        model = GPT.from_pretrained(init_from, dict(dropout=dropout))
        model.crop_block_size(block_size)
        return model
    except (ImportError, ValueError) as e:  # transformers missing (it is optional), or a bad size
        raise TrainError(f"--init-from {init_from}: {e}") from None
    except Exception as e:  # offline and not cached: transformers/huggingface_hub raise OSError and others
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise TrainError(f"--init-from {init_from}: could not load GPT-2's weights ({type(e).__name__}: "
                         f"{first_line}); they are downloaded from Hugging Face on first use, so this needs a "
                         "network once, or a copy in the Hugging Face cache") from None


def model_from_checkpoint(ckpt, path="the checkpoint"):
    """The GPT a checkpoint holds; a model_args key this version does not know, a missing or misshapen tensor is
    one line."""
    try:
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(checkpoint_model_state(ckpt))
    except (TypeError, ValueError, RuntimeError) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise TrainError(f"{path} does not hold a model this stable_gpt.py can build ({type(e).__name__}: "
                         f"{first_line})") from None
    return model


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
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # meta, xla, ...: nothing this script trains on
        raise TrainError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda, but CUDA is not available here; use --device cpu (or auto)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainError("--device mps, but MPS is not available here; use --device cpu (or auto)")
    return device


def pick_dtype(name, device):
    if name in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        # bf16 only where the GPU has it (sm80+): emulated bf16 (V100, T4) is slow and inductor skips it, so those
        # get fp16 with a GradScaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if name != "float32" and device.type != "cuda":
        raise TrainError(f"--dtype {name} needs CUDA; on {device.type} use float32")
    return getattr(torch, name)


def gpu_peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # a key matches as whole words only: "NVIDIA L40" is not an L4, "GB200" not a B200
    return next((peak for key, peak in GPU_PEAK_FLOPS.items()
                 if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", name)), None)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


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
        try:
            self.append(json.dumps(finite_or_null(record), allow_nan=False) + "\n")
        except OSError as e:  # a full disk, a file-size limit: the run stops here, its last checkpoint whole
            raise TrainError(f"could not write {self.path} ({e.strerror or e}); the last checkpoint is kept: free "
                             "disk space, then --resume") from None

    def append(self, line):
        with self.path.open("a") as f:
            f.write(line)


def finite_or_null(value):
    """value with every NaN or infinity replaced by None: JSON has no NaN, so a diverged step logs null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


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


# What a run writes into its folder, and all that a fresh start with --overwrite removes: anything else there is
# not a run's, and a run never touches it
RUN_FILES = ("ckpt.pt", "best.pt", "summary.json", "log.jsonl", "diag.jsonl", ".lock")
PLOT_FILES = ("loss.png", "depth.png", "updates.png", "activations.png", "weight_std.png", "logits.png")
OWN_FILES = {*RUN_FILES, *PLOT_FILES, *(f"{name}.tmp" for name in RUN_FILES + PLOT_FILES)}  # .tmp: atomic writes


def check_fresh_start(folder, overwrite, holding_lock=False):
    """A fresh run writes only into a new or empty folder, or, with --overwrite, into one that holds a stable-gpt
    run (a .lock and a run's files) and nothing else. Anything else is refused in one line, before anything is
    written. Called before the run starts, and again by the run once it holds the folder's lock (holding_lock),
    since another run may have written there in between (while this one prepared its data)."""
    folder = Path(folder)
    try:
        entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    except OSError as e:  # a name too long, no permission to list it
        raise TrainError(f"cannot use --out-dir {folder} ({e.strerror or e}); choose another folder") from None
    if ".lock" in entries:
        if not holding_lock:
            RunLock(folder).release()  # one line if another run holds the folder
        if entries == [".lock"]:  # a run that stopped before it wrote anything (or this one, holding it)
            return
    foreign = [name for name in entries if name not in OWN_FILES]
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise TrainError(f"{folder} holds files that no stable-gpt run writes ({listed}); a fresh run writes only "
                         "into a new or empty folder or a run's own: choose another --out-dir")
    if entries and ".lock" not in entries:
        raise TrainError(f"{folder} holds {', '.join(entries)} but no stable-gpt run (a run's folder has a .lock); "
                         "choose another --out-dir")
    if entries and not overwrite:
        raise TrainError(f"{folder} already holds a run; --resume to continue it, --overwrite to start afresh there "
                         f"(its {', '.join(n for n in entries if n != '.lock')} removed), --out-dir elsewhere, or "
                         f"plot it: python -m tools.plots {folder}")


def clear_outputs(folder):
    """Before a fresh run (--overwrite) in a folder that held one: remove the old run's files (and only those), so
    that no stale plot or summary is taken for the new run's."""
    for name in OWN_FILES - {".lock"}:  # the lock is held by this run already
        (Path(folder) / name).unlink(missing_ok=True)


def write_json_atomically(path, record):
    """path holds the whole record or its previous content, never a part: a temporary file, then a rename."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(finite_or_null(record), indent=2))
    os.replace(tmp, path)


class OutputThatSurvivesAClosedPipe:
    """stdout for a run whose output may be piped into a reader that quits early (| head): once the pipe is
    closed, the rest of the output is dropped and the run goes on, instead of dying of BrokenPipeError."""

    def __init__(self, stream):
        self.stream, self.closed_pipe = stream, False

    def write(self, text):
        if not self.closed_pipe:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self.closed_pipe = True
                # nothing more can reach the reader; point the descriptor at /dev/null for Python's exit flush
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        return len(text)

    def flush(self):
        if not self.closed_pipe:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.closed_pipe = True
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request the loop honours at the next step boundary, where it
    writes a checkpoint and returns. Before a run has opened its folder (before_start, set by the training script
    while it prepares data and model) a signal stops at once with KeyboardInterrupt: there is nothing to save. A
    second signal while the loop runs (at_once, set by the training script around it) stops at once, with
    KeyboardInterrupt; the last checkpoint stays whole (atomic writes). Outside the loop, while the checkpoint and
    summary.json are written, further signals are ignored: they would only lose them."""

    def __init__(self):
        self.signum, self.at_once = None, False
        self.before_start = False  # set while a run prepares its data and model: a signal then ends it at once

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.before_start:  # nothing to save yet: stop now (KeyboardInterrupt), with nothing written
            self.before_start = False
            raise KeyboardInterrupt
        if self.signum is not None:
            if self.at_once:
                self.at_once = False  # a third signal, while the stop at once is reported, changes nothing
                raise KeyboardInterrupt
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(signal again to stop at once)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():  # once stopping, the process only ends: a signal could only cut it
            signal.signal(s, signal.SIG_IGN if self.signum is not None else handler)


# ----------------------------------------------------------------------------------------------------
# Processes: one, or one per GPU under torchrun


@dataclass
class Process:
    """This process's place in the run: rank and world size under torchrun (else 0 and 1) and its device."""
    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self):
        return self.rank == 0  # rank 0 alone prints, logs, evaluates into files and writes checkpoints


def setup_process(device_name, stopped=lambda: False):
    """The device, and under torchrun (which sets RANK) the process group: NCCL on GPUs, gloo on CPUs. stopped():
    whether a signal came while waiting for the other processes (then TrainError: nothing to save yet)."""
    if os.environ.get("RANK", "-1").strip() == "-1":
        device = pick_device(device_name)
        if device.type == "cuda":  # the GPU asked for (cuda:1) becomes the current one: its RNG is the one saved
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
            torch.cuda.set_device(device)
        return Process(0, 1, device, ddp=False)
    needed = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
    if missing := [k for k in needed if k not in os.environ]:
        raise TrainError(f"RANK is set but not {', '.join(missing)}: start the processes with torchrun, or unset "
                         "RANK for one process")
    try:
        rank, local_rank, world, port = (int(os.environ[k]) for k in
                                         ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))
    except ValueError:
        raise TrainError("RANK, LOCAL_RANK, WORLD_SIZE and MASTER_PORT must be whole numbers (torchrun sets them)") \
            from None
    if not 0 <= rank < world:
        raise TrainError(f"RANK {rank} is not below WORLD_SIZE {world}")
    if not 0 < port < 65536:
        raise TrainError(f"MASTER_PORT {port} is not a port (1-65535)")
    device = pick_device("cuda" if device_name in (None, "auto") and torch.cuda.is_available() else
                         "cpu" if device_name in (None, "auto") else device_name)
    if device.type == "cuda":  # one GPU per process: the one of its LOCAL_RANK on its node
        if device.index is not None:
            raise TrainError(f"under torchrun each process takes the GPU of its LOCAL_RANK; use --device cuda, not "
                             f"--device {device_name}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    store = join_peers(rank, world, os.environ["MASTER_ADDR"], port, stopped)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world)
    return Process(rank, world, device, ddp=True)


PEER_WAIT_S = 120  # how long a process waits for the others to appear; launchers start them within seconds


def join_peers(rank, world, host, port, stopped):
    """The rendezvous store that init_process_group would make from MASTER_ADDR/PORT (env://), but with a bounded
    wait: RANK/WORLD_SIZE left in a shell from an earlier torchrun would otherwise wait 30 minutes for peers that
    never come. torchrun's agent hosts the store itself (TORCHELASTIC_USE_AGENT_STORE); otherwise rank 0 does."""
    stale = (f"no peers after {PEER_WAIT_S} s (RANK={rank}, WORLD_SIZE={world}, MASTER_ADDR={host}:{port}): start "
             "every rank with torchrun, or unset RANK, LOCAL_RANK and WORLD_SIZE (left from an earlier one) for one "
             "process")
    hosts_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not hosts_store:  # wait here, in Python, where a signal still ends the process and C++ logs no retries
        deadline = time.monotonic() + PEER_WAIT_S
        while True:
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if stopped():
                    raise TrainError("stopped by a signal while waiting for the other processes; nothing was "
                                     "written") from None
                if time.monotonic() > deadline:
                    raise TrainError(stale) from None
                time.sleep(0.5)
        probe_store(host, port, world, stopped, deadline, stale)  # something answers: a store, or another server
    try:
        return dist.TCPStore(host, port, world, is_master=hosts_store, wait_for_workers=True,
                             timeout=datetime.timedelta(seconds=PEER_WAIT_S))
    except dist.DistError as e:
        raise TrainError(stale if "timed out" in str(e).lower() else f"cannot join the process group: {e}") from None


def probe_store(host, port, world, stopped, deadline, stale):
    """Whether the TCPStore of the other processes answers at host:port, asked by a client in a child process: a
    port where something else listens (another server, a live job's port) holds a client's handshake in C++, past
    its timeout and deaf to signals, so the wait here stays in Python, bounded, and a signal ends it at once."""
    code = ("import datetime, torch.distributed as dist; "
            f"dist.TCPStore({host!r}, {port}, {world}, False, wait_for_workers=False, "
            f"timeout=datetime.timedelta(seconds={PEER_WAIT_S}))")
    probe = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while probe.poll() is None:
            if stopped():
                raise TrainError("stopped by a signal while waiting for the other processes; nothing was written")
            if time.monotonic() > deadline:
                raise TrainError(f"{stale}; if they were started, something other than their store answers on "
                                 f"port {port}")
            time.sleep(0.2)
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    if probe.returncode != 0:
        raise TrainError(f"{stale}; something other than their store answers on port {port}")


def micro_steps_per_rank(grad_accum, world):
    """--grad-accum is the micro-batches of one optimizer step over all processes: each of N processes does
    grad_accum / N of them, and at least one, so any preset runs on any N (with more processes than
    micro-batches, a step holds N micro-batches and the tokens per step grow; the start-up line says so)."""
    return max(1, grad_accum // world)


def compile_or_eager(asked, device, say=print):
    """Whether the step runs torch.compile'd: as asked (--compile, --no-compile), and by default wherever compile
    works. On CPU inductor builds C++ kernels, so a missing or broken C++ compiler, or a platform where compile
    fails (Windows without a compiler, MPS set-ups), falls back to eager with one note line; --compile there is
    an error instead."""
    if asked is False:
        return False
    if (reason := why_compile_fails(device.type)) is None:
        return True
    if asked:
        raise TrainError(f"--compile: torch.compile does not work on this machine ({reason}); use --no-compile")
    say(f"note: torch.compile does not work on this machine ({reason}); training eager, slower (--no-compile "
        "skips this check)")
    return False


@functools.cache
def why_compile_fails(device_type):
    """None if torch.compile builds and runs a small matmul on this device type, else why not, in a few words.
    Once per process, ~0.25 s beyond the inductor start-up that the model's own compile pays anyway."""
    if device_type == "cpu" and not any(shutil.which(cc) for cc in ("c++", "g++", "clang++", "cl")):
        return "no C++ compiler on PATH"
    try:
        a = torch.ones(4, 4, device=device_type)
        torch.compile(lambda u, v: torch.relu(u @ v).sum())(a, a).item()
    except Exception as e:  # any failure of the toolchain: the reason shows in its first line
        first_line = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__
    return None


def cpu_has_bf16_matmul():
    """Whether this CPU has bf16 dot-product instructions (x86's AVX512_BF16 or AMX-BF16, Arm's BF16), from
    /proc/cpuinfo; None where that cannot be read (not Linux). Without them PyTorch runs bf16 matmuls far slower
    than fp32: torch.optim.Muon's Newton-Schulz, fixed in bf16, made a Muon step 7.7x AdamW's on such a CPU, 1.2x
    on one with AVX512_BF16 (docs/speed.md)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return any(f in flags for f in ("avx512_bf16", "amx_bf16", "bf16"))


def device_memory_bytes(device):
    """All the memory of the device: the GPU's, or this machine's RAM (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_the_run_fits(cfg, vocab_size, device):
    """Refuse, in one line and before anything is allocated, a run whose memory cannot fit the device: a lower
    bound (no run needs less) of the parameters with their gradients and AdamW's two moments (16 bytes each in
    fp32; 12 L d^2 in the blocks, (V + T) d in the embeddings), the logits of a micro-batch and one bf16 copy of
    the residual stream per layer, and the evaluation's loss vector. A bound, not an estimate: it catches sizes
    that cannot work (a typo, 1e11 layers), never a run that might."""
    total = device_memory_bytes(device)
    d, layers, tokens = cfg.n_embd, cfg.n_layer, cfg.batch_size * cfg.block_size
    params = 12 * layers * d * d + (vocab_size + cfg.block_size) * d
    need = 16 * params + tokens * vocab_size * 2 + tokens * layers * d * 2 + 4 * cfg.eval_iters
    if total is not None and need > total:
        raise TrainError(f"this run needs at least {need / 2**30:,.0f} GiB ({params / 1e6:,.0f}M parameters with "
                         f"their gradients and AdamW's moments, and a batch of {tokens:,} tokens) and the "
                         f"{device.type} has {total / 2**30:,.0f} GiB: lower --n-layer, --n-embd, --batch-size, "
                         "--block-size or --eval-iters")


def wrap_model(model, compiled, proc):
    """The model the step runs: torch.compile'd (CUDA default), in DistributedDataParallel under torchrun."""
    model = torch.compile(model) if compiled else model
    if proc.ddp:
        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets, not in a second copy
        # broadcast_buffers off: the model's only buffers are QK-Clip's per-rank logit maxima, which the ranks
        # combine themselves (qk_clip_after_step); a broadcast from rank 0 at every forward would overwrite them
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None,
                    gradient_as_bucket_view=True, broadcast_buffers=False)
    return model


def any_rank(flag, proc):
    """Whether flag holds on any rank: every rank must stop at the same step, or the collectives would hang."""
    if not proc.ddp:
        return flag
    t = torch.tensor(float(flag), device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def nonfinite_what(loss, grad_norm, scaler):
    """What of a step is non-finite on this rank, "loss" or "gradient norm", or None. With fp16 an inf gradient
    is the GradScaler's business: it skips the step and lowers its scale."""
    return "loss" if not math.isfinite(loss) else \
        "gradient norm" if not (math.isfinite(grad_norm) or scaler.is_enabled()) else None


def nonfinite_part(loss, grad_norm, scaler, proc):
    """nonfinite_what, the same answer on every rank under DDP (each rank's loss is its own), so that all skip
    or stop together."""
    what = nonfinite_what(loss, grad_norm, scaler)
    if proc.ddp and any_rank(what is not None, proc):
        what = what or "loss (on another rank)"
    return what


def first_on_any_rank(index, proc):
    """The smallest of every rank's index (None: none on this rank): where a non-finite step was, on any."""
    if not proc.ddp:
        return index
    t = torch.tensor(float("inf") if index is None else float(index), device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return None if math.isinf(t.item()) else int(t.item())


def replica_max_diff(model, proc):
    """Self-check after a DDP run: the largest difference of any weight across ranks (DDP, and TVR's
    deterministic in-place edit, must keep the replicas identical). None without DDP."""
    if not proc.ddp:
        return None
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def rng_states(data_state, proc):
    """Every rank's random streams (data order, dropout), so that each rank resumes its own."""
    mine = dict(data=data_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if proc.device.type == "cuda" else None)
    if not proc.ddp:
        return [mine]
    states = [None] * proc.world
    dist.all_gather_object(states, mine)
    return states


# ----------------------------------------------------------------------------------------------------
# A run: its state, and everything it writes


MAX_SKIPS_IN_A_ROW = 10  # --skip-nonfinite: more non-finite steps in a row than this is a divergence


def clip_gradients(params, max_norm, zclip=None):
    """Clip the global gradient norm of params at max_norm, and with a ZClip (tools/monitors.py) also at its
    threshold for this step (a host sync: the threshold depends on the norm); returns the norm before clipping."""
    params = list(params)
    if zclip is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    adaptive = zclip.clip_value(float(norm))
    torch.nn.utils.clip_grads_with_norm_(params, min(max_norm, math.inf if adaptive is None else adaptive), norm)
    return norm


class Run:
    """One training run's state and everything it writes. Every rank keeps the state (the step counter, the
    best val loss, the spike rules); rank 0 alone prints and writes the run folder: the lock, log.jsonl,
    diag.jsonl, ckpt.pt and best.pt, summary.json. A checkpoint holds the whole state and every rank's random
    streams, so that --resume continues bit for bit."""

    def __init__(self, cfg, proc, model, optimizer, batches, meta, resume_ckpt=None, overwrite=False):
        self.cfg, self.proc, self.model, self.optimizer = cfg, proc, model, optimizer
        self.meta, self.batches, self.out_dir = meta, batches, Path(cfg.out_dir)
        # fp16 needs a loss scaler (bf16 and fp32 do not); it is part of the state a checkpoint holds
        fp16 = pick_dtype(cfg.dtype, proc.device) == torch.float16
        self.scaler = torch.amp.GradScaler(proc.device.type, enabled=fp16)
        self.grad_accum = micro_steps_per_rank(cfg.grad_accum, proc.world)  # micro-batches per step, this rank
        self.tokens_per_iter = self.grad_accum * proc.world * cfg.batch_size * cfg.block_size
        self.iter_num, self.best_val, spike_state = self._restore(resume_ckpt)
        for key in ("model", "optimizer") if resume_ckpt else ():  # restored: the host copy is not kept all run
            resume_ckpt.pop(key)  # (18.7 GB per process at gpt2-1.5b)
        self.spikes = SpikeWatch(cfg.spike_factor, cfg.spike_window, spike_state)
        self.skip_step = SkipStep(state=(resume_ckpt or {}).get("skip_step")) if cfg.skip_spikes else None
        self.zclip = ZClip(state=(resume_ckpt or {}).get("zclip")) if cfg.zclip else None
        self.resumed_at = self.last_saved = self.iter_num if resume_ckpt else None
        self.last_eval = self.diverged_at = self.interrupted_at = None
        self.skipped = self.skips_in_a_row = self.tokens_trained = 0
        self.pending = []  # steps whose values are still on the device (count_step, settle_steps)
        self.lock = self.log = self.diag_log = None
        if proc.master:
            self.lock, self.log, self.diag_log = open_run_folder(self.out_dir, self.resumed_at, overwrite)
        self.peak_flops = gpu_peak_flops(proc.device)
        self.t_start, self.timer = time.time(), StepTimer(self.iter_num)

    def _restore(self, ckpt):
        """Put a checkpoint back into the model, optimizer, loss scaler and this rank's random streams (dropout
        and data order). Returns (iter_num, best val loss, the spike rules' state)."""
        if ckpt is None:
            return 0, float("inf"), {}
        saved, meta = ckpt["meta"], self.meta
        # the text's checksum where both have one (prepare_data writes it; nanoGPT's own .bin folders have none)
        keys = ("tokenizer", "vocab_size", "chars") + (("text_sha1",) if saved.get("text_sha1") and
                                                         meta.get("text_sha1") else ())
        if differ := [k for k in keys if saved.get(k) != meta.get(k)]:
            what = {"tokenizer": "tokenizer", "vocab_size": "vocabulary size", "chars": "vocabulary",
                    "text_sha1": "text"}
            raise TrainError(f"the checkpoint was trained on another {' and '.join(what[k] for k in differ)} than "
                             f"--data's ({saved.get('source', 'its data')} vs {meta.get('source', 'this data')}); "
                             "resume with the run's own --data and --tokenizer")
        try:  # a checkpoint whose tensors or states do not fit (damaged, or edited by hand): one line
            self.model.load_state_dict(checkpoint_model_state(ckpt))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if "scaler" in ckpt:
                self.scaler.load_state_dict(ckpt["scaler"])
            rng = ckpt["rng"][self.proc.rank % len(ckpt["rng"])]  # a run resumed on more ranks reuses streams
            torch.set_rng_state(rng["torch"])
            if self.proc.device.type == "cuda" and rng["cuda"] is not None:
                torch.cuda.set_rng_state(rng["cuda"])
            self.batches.gen.set_state(rng["data"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, ZeroDivisionError) as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise TrainError(f"the checkpoint in {self.out_dir} does not fit this run ({type(e).__name__}: "
                             f"{first_line}); train afresh with --overwrite, or use another --out-dir") from None
        return ckpt["iter_num"], ckpt["best_val_loss"], {k: ckpt[k] for k in SpikeWatch.STATE_KEYS if k in ckpt}

    def checkpoint_state(self, data_state):
        """What ckpt.pt holds; every rank calls it (rng_states gathers each rank's streams)."""
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scaler=self.scaler.state_dict(), model_args=asdict(self.model.config), config=asdict(self.cfg),
                    meta=self.meta, iter_num=self.iter_num, best_val_loss=self.best_val, **self.spikes.state(),
                    skip_step=self.skip_step.state() if self.skip_step else None,
                    zclip=self.zclip.state() if self.zclip else None, rng=rng_states(data_state, self.proc))

    def print_start(self, dtype, compiled, data_dir, resume_ckpt):
        if not self.proc.master:
            return
        config, cfg, proc = self.model.config, self.cfg, self.proc
        print(f"model: {config.techniques()} | {self.model.get_num_params() / 1e6:.2f}M params | "
              f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {config.block_size}, "
              f"vocab {config.vocab_size}")
        for note in combination_notes(config):
            print(f"note: {note}")
        print(f"training: {cfg.max_iters} iters x {self.tokens_per_iter:,} tokens on {proc.device} "
              f"({str(dtype)[6:]}{', compiled' if compiled else ''}{f', {proc.world} processes' if proc.ddp else ''})"
              f", data {data_dir}, out {self.out_dir}"
              + (f", resuming at iter {resume_ckpt['iter_num']}" if resume_ckpt else ""))
        if cfg.warmup_iters >= cfg.max_iters:
            print(f"note: --warmup-iters {cfg.warmup_iters} >= --max-iters {cfg.max_iters}: the learning rate never "
                  f"reaches --lr {cfg.lr:g} (its peak: {cfg.lr * cfg.max_iters / (cfg.warmup_iters + 1):.3g})")
        if self.grad_accum * proc.world != cfg.grad_accum:
            print(f"note: --grad-accum {cfg.grad_accum} on {proc.world} processes: {self.grad_accum} micro-batch(es) "
                  f"per process, {self.grad_accum * proc.world} per step, {self.tokens_per_iter:,} tokens per step")
        resumed_world = len(resume_ckpt["rng"]) if resume_ckpt else None  # one RNG state per rank
        if resumed_world not in (None, proc.world):
            print(f"warning: resuming a run of {resumed_world} process(es) on {proc.world}: the data order and the "
                  "tokens per step differ from the first part, so the losses will not continue as they would have")

    def record_eval_and_write_checkpoint(self, losses, data_state):
        """An evaluation: the eval line, its log record, ckpt.pt, and best.pt when the val loss improved."""
        improved, self.best_val = losses["val"] < self.best_val, min(self.best_val, losses["val"])
        self.last_eval, state = losses, self.checkpoint_state(data_state)
        if self.proc.master:
            elapsed = time.time() - self.t_start  # since training (or this resumed part) started: time to a loss
            print(f"eval  {self.iter_num:>6}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                  + (" (best)" if improved else "") + f" | {elapsed:.0f} s")
            self.log.write(iter=self.iter_num, type="eval", train_loss=losses["train"], val_loss=losses["val"],
                           time_s=round(elapsed, 1))
            save_checkpoint(self.out_dir / "ckpt.pt", state)
            if improved:
                link_checkpoint(self.out_dir / "ckpt.pt", self.out_dir / "best.pt")
        self.last_saved = self.iter_num
        self.timer.restart()

    def write_checkpoint_and_stop(self, data_state):
        """A stop request (Ctrl-C, SIGTERM): ckpt.pt, and the command that resumes."""
        state, self.interrupted_at = self.checkpoint_state(data_state), self.iter_num
        if self.proc.master:
            save_checkpoint(self.out_dir / "ckpt.pt", state)
            local = int(os.environ.get("LOCAL_WORLD_SIZE", self.proc.world))  # processes per node, under torchrun
            launcher = "python" if not self.proc.ddp else f"torchrun --standalone --nproc_per_node={local}" if \
                local == self.proc.world else (f"torchrun --nnodes={self.proc.world // local} --nproc_per_node={local} "
                                               "--rdzv_backend=c10d --rdzv_endpoint=HOST:PORT (on every node)")
            print(f"stopped at iter {self.iter_num}; wrote {self.out_dir / 'ckpt.pt'}. Resume with:\n"
                  f"  {launcher} train_shakespeare.py --resume --out-dir {shlex.quote(str(self.out_dir))}")

    def stopped_at_once(self):
        """A second Ctrl-C stopped the loop mid-step: nothing more is written but summary.json; the last checkpoint
        (written atomically) is whole."""
        self.interrupted_at = self.iter_num
        folder = shlex.quote(str(self.out_dir))
        if self.last_saved is None:  # nothing to resume: say how to start again, not how to resume
            print(f"stopped at once at iter {self.iter_num} (a second signal), before the first checkpoint: nothing "
                  f"to resume. Start again with:\n  python train_shakespeare.py --overwrite --out-dir {folder} ...",
                  flush=True)
            return
        print(f"stopped at once at iter {self.iter_num} (a second signal); the last checkpoint: "
              f"{self.out_dir / 'ckpt.pt'} (iter {self.last_saved}). Resume with:\n"
              f"  python train_shakespeare.py --resume --out-dir {folder}", flush=True)

    def skip_or_stop_on_nonfinite(self, what, loss, grad_norm):
        """A step with a non-finite loss or gradient. With --skip-nonfinite it made no update: count it and return
        True (go on), up to MAX_SKIPS_IN_A_ROW in a row; else the run has diverged: say so, return False."""
        self.skips_in_a_row += 1
        skip = self.cfg.skip_nonfinite and self.skips_in_a_row <= MAX_SKIPS_IN_A_ROW
        self.skipped += skip
        step = self.iter_num + 1
        if self.proc.master and skip:
            print(f"iter {step}: non-finite {what} ({loss}, {grad_norm}); update skipped ({self.skipped} so far)")
            self.log.write(iter=step, type="skipped", loss=loss, grad_norm=grad_norm)
        elif self.proc.master:
            where = "none yet" if self.last_saved is None else f"{self.out_dir / 'ckpt.pt'} (iter {self.last_saved})"
            print(f"iter {step}: non-finite {what} (loss {loss}, gradient norm {grad_norm})"
                  + (f", {MAX_SKIPS_IN_A_ROW} updates in a row skipped before it" if self.skipped else "")
                  + f"; stopping without saving. The last good checkpoint: {where}")
        if skip:
            self.iter_num += 1
        else:
            self.diverged_at = step
        return skip

    def clip_gradients(self):
        """Clip the global gradient norm at --grad-clip (0: off), and with --zclip also at ZClip's threshold
        (clip_gradients below); returns the norm before clipping. The gradients are already all-reduced, so every
        rank sees the same norm and clips alike."""
        return clip_gradients(self.model.parameters(), self.cfg.grad_clip or math.inf, self.zclip)

    def skip_this_spike(self, loss, grad_norm):
        """--skip-spikes: whether this step's update is skipped by OLMo-core's skip-step rule (SkipStep), judged on
        the loss averaged over ranks and the (already global) gradient norm, so every rank decides alike; a skipped
        step is counted, logged and done. A host sync per step."""
        if self.skip_step is None:
            return False
        loss = loss.detach().float().clone()
        if self.proc.ddp:  # (a sum: gloo has no average)
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        loss, grad_norm = loss.item() / self.proc.world, float(grad_norm)
        if not self.skip_step.skip(loss, grad_norm):
            return False
        self.skipped += 1
        self.iter_num += 1
        if self.proc.master:
            print(f"iter {self.iter_num}: loss {loss:.4f} or gradient norm {grad_norm:.4g} over {self.skip_step.sigma:g} "
                  f"std off the last {self.skip_step.window} steps; update skipped ({self.skipped} so far)")
            self.log.write(iter=self.iter_num, type="skipped", loss=loss, grad_norm=grad_norm, reason="spike")
        return True

    def count_step(self, loss, z_loss, grad_norm, lr):
        """An optimizer step made. Its values (device tensors: loss with the z-loss, the z-loss term, the gradient
        norm; z_loss None when off) wait on the device until settle_steps, so that a step costs no host sync."""
        self.skips_in_a_row = 0
        self.iter_num += 1
        self.tokens_trained += self.tokens_per_iter
        self.timer.step_done(self.iter_num)
        z_loss = torch.zeros_like(loss) if z_loss is None else z_loss
        self.pending.append((self.iter_num, lr, torch.stack([loss, z_loss, grad_norm.to(loss.device)])))

    def settle_steps(self):
        """The host learns the values of the steps since the last call, in one device sync (every --log-interval
        steps and before each evaluation and checkpoint): a non-finite step stops the run there, without saving
        (True: stopped); else the spike rules and the progress lines see each step in order."""
        steps, self.pending = self.pending, []
        if not steps:
            return False
        values = torch.stack([v for _, _, v in steps]).float().tolist()  # the sync: (steps, [loss, z, grad norm])
        bad = next((k for k, (loss, _, norm) in enumerate(values) if nonfinite_what(loss, norm, self.scaler)), None)
        bad = first_on_any_rank(bad, self.proc)  # every rank stops at the same step
        for k, ((it, lr, _), (loss, z, norm)) in enumerate(zip(steps, values)):
            if k == bad:  # this step and those after it are not counted: the run stops at the step before
                self.iter_num = it - 1
                self.tokens_trained -= (len(steps) - k) * self.tokens_per_iter
                what = nonfinite_what(loss, norm, self.scaler) or "loss (on another rank)"
                return not self.skip_or_stop_on_nonfinite(what, loss, norm)
            self.watch_spikes(it, loss - z, norm)  # the spike rules watch the cross-entropy (loss has the z-loss)
            if it % self.cfg.log_interval == 0 or it == self.cfg.max_iters:
                self.log_progress(it, loss - z, z if self.model.config.z_loss else None, lr, norm)
        return False

    def watch_spikes(self, it, loss, grad_norm):
        if (median := self.spikes.update(it, loss, grad_norm)) is not None and self.proc.master:
            print(f"spike at iter {it}: loss {loss:.4f} > {self.cfg.spike_factor} x median {median:.4f}")
            self.log.write(iter=it, type="spike", loss=loss, median=median)

    def log_progress(self, it, loss, z_loss, lr, grad_norm):
        """Step it's progress line and its log.jsonl record; the ETA from the smoothed step time, so it does not
        swing. loss is the cross-entropy; z_loss the step's z-loss term (None when off)."""
        cfg = self.cfg
        dt, smooth_dt = self.timer.lap(it)
        if not self.proc.master:
            return
        # MFU against the detected GPU's bf16 peak, per GPU: each rank runs grad_accum micro-batches
        mfu = self.peak_flops and self.model.estimate_mfu(self.grad_accum * cfg.batch_size, dt, self.peak_flops)
        z_part = f" + z-loss {z_loss:.2e}" if z_loss is not None else ""
        print(f"iter {it:>6}/{cfg.max_iters} | loss {loss:.4f}{z_part} | lr {lr:.2e} | {dt * 1000:.1f} "
              f"ms/iter | {self.tokens_per_iter / dt:,.0f} tok/s" + (f" | MFU {mfu * 100:.1f}%" if mfu else "")
              + f" | ETA {fmt_time(smooth_dt * (cfg.max_iters - it))}")
        self.log.write(iter=it, loss=loss, lr=lr, grad_norm=grad_norm, ms=dt * 1000,
                       **({"z_loss": z_loss} if z_loss is not None else {}), **({"mfu": mfu} if mfu else {}))

    def write_summary_and_close(self, diag_s):
        """The end of a run: the DDP replica self-check, summary.json and the plots (rank 0), the lock released
        and the process group closed. Returns the summary (None on the other ranks)."""
        wall = time.time() - self.t_start
        replica_diff = replica_max_diff(self.model, self.proc)
        summary = None
        if self.proc.master:
            summary = self.summary(wall, replica_diff, diag_s)
            write_json_atomically(self.out_dir / "summary.json", summary)
            ended = f"diverged at iter {self.diverged_at}" if self.diverged_at is not None else \
                f"interrupted at iter {self.interrupted_at}" if self.interrupted_at is not None else "done"
            print(f"{ended}: best val {self.best_val:.4f}, {self.iter_num} iters in {wall:.1f} s "
                  f"({summary['tokens_per_s']:,} tok/s), {summary['spikes']} loss spikes; "
                  f"wrote {self.out_dir}/summary.json")
            if self.cfg.plot:
                from tools import plots

                print("plots: " + ", ".join(str(p) for p in plots.plot_run(self.out_dir)))
            self.lock.release()
        if self.proc.ddp:  # leave together: a rank that tears down while another still talks to it can abort in gloo
            dist.barrier()
            dist.destroy_process_group()
        return summary

    def summary(self, wall, replica_diff, diag_s):
        return dict(config=asdict(self.cfg), model_args=asdict(self.model.config),
                    techniques=self.model.config.techniques(), best_val_loss=self.best_val,
                    final_val_loss=self.last_eval["val"] if self.last_eval else None, iters=self.iter_num,
                    wall_s=round(wall, 2), tokens_per_s=round(self.tokens_trained / max(wall, 1e-9)),
                    diverged=self.diverged_at is not None, diverged_at=self.diverged_at,
                    interrupted_at=self.interrupted_at, skipped_updates=self.skipped, **self.spikes.summary(),
                    diag_s=round(diag_s, 2), world_size=self.proc.world, replica_max_diff=replica_diff,
                    tokens_per_step=self.tokens_per_iter, text_sha1=self.meta.get("text_sha1"))


def open_run_folder(out_dir, resumed_at, overwrite=False):
    """Rank 0's run folder: created, locked against a second run, looked at again under the lock and cleared of an
    old run's files on a fresh start (--overwrite); returns (lock, log.jsonl, diag.jsonl), the logs cut back to
    resumed_at on a resume."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir)
    except OSError as e:  # a file in the way, a file above it, no permission, a read-only disk
        raise TrainError(f"cannot write into --out-dir {out_dir} ({e.strerror or e}); choose another folder") from None
    if resumed_at is None:
        try:  # a run that finished there since this one started is not cleared without --overwrite
            check_fresh_start(out_dir, overwrite, holding_lock=True)
        except TrainError:
            lock.release()
            raise
        clear_outputs(out_dir)
    return lock, JsonlLog(out_dir / "log.jsonl", resumed_at), JsonlLog(out_dir / "diag.jsonl", resumed_at)
