"""
Training-step benchmark: ms per step (forward, backward, clip, AdamW step, TVR where on), tokens/s and peak
memory for the baseline, each stabilizer alone and all of them, at a given shape, on random tokens.

    python -m tools.bench                       # the CPU preset shape (4/4/128, block 64, batch 32)
    python -m tools.bench --shape nanogpt-cpu   # nanoGPT's README CPU recipe shape (4/4/128, block 64, batch 12)
    python -m tools.bench --no-compile          # the same, eager (by default each model is torch.compile'd, as
                                                # the training script runs it where compile works)
    python -m tools.bench --nanogpt ../nanoGPT/model.py   # add nanoGPT's own model, timed in this process

The machine's speed drifts by up to 30% within a minute (other tenants), while ratios measured side by side are
steady. So the configurations are interleaved: each round times every configuration for --steps steps, and
the report gives each one's median time and its median ratio to the baseline *of the same round*. Peak memory
is measured per configuration in a fresh process (3 steps): on CPU the process's peak resident set (PyTorch's
own runtime included), on CUDA the peak of torch.cuda.max_memory_allocated.
"""

import argparse
import contextlib
import importlib.util
import io
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from stable_gpt import GPT, GPTConfig, qk_clip_after_step, tvr_after_step
from tools.cli import OneLineParser
from tools.monitors import SkipStep, ZClip
from tools.runs import TrainError, clip_gradients, compile_or_eager, keep_freed_memory, pick_device, pick_dtype
from train_shakespeare import OLMO2

SHAPES = {  # vocab 65: tiny Shakespeare's characters; 50304: GPT-2's BPE padded to a multiple of 64
    "cpu-preset": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, vocab_size=65),
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65),
    # the gpt2-124m preset's micro-batch on a GPU (python -m tools.bench --shape gpt2-124m --device cuda --compile)
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=32, vocab_size=50304),
}
FLAGS = {
    "baseline": {}, "sdd": dict(sdd=True), "lns": dict(lns=True), "wesar": dict(wesar=True), "lir": dict(lir=True),
    "tvr": dict(tvr=True), "sdd+lns": dict(sdd=True, lns=True),
    "all": dict(sdd=True, lns=True, wesar=True, lir=True, tvr=True),
    "qk-norm": dict(qk_norm=True), "z-loss": dict(z_loss=1e-4), "peri": dict(norm_position="peri"),
    "softcap": dict(logit_softcap=30.0), "attn-gate": dict(attn_gate=True), "qk-clip": dict(qk_clip=30.0),
    "dyt": dict(norm="dyt"), "reorder": dict(norm_position="reorder"),
    "olmo2": {k: v for k, v in OLMO2.items() if k != "olmo_decay"},  # (the decay groups: not the model's)
    "muon": dict(optimizer="muon"),  # not a GPTConfig field: the optimizer the Runner builds
    "attn-sink": dict(attn_sink=True), "mhc": dict(hyper_connections="mhc"), "mup": dict(mup=True),
    # not GPTConfig fields: the update rules the Runner applies as the training loop does (a host sync per step)
    "zclip": dict(update="zclip"), "skip-spikes": dict(update="skip_spikes"),
}
RUNNER_KEYS = ("optimizer", "update")  # FLAGS' keys that are the Runner's, not the model's


def load_nanogpt(path):
    """nanoGPT's own model.py (from a nanoGPT checkout: this project does not ship its code) as a module."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --nanogpt {path}: no such file (give the model.py of a nanoGPT checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (hasattr(module, "GPT") and hasattr(module, "GPTConfig")) or module.GPT.__module__ != module.__name__:
        raise SystemExit(f"error: --nanogpt {path} defines no GPT and GPTConfig of its own; is it nanoGPT's model.py?")
    return module


def build_model(shape, flag, nanogpt=None):
    """Our GPT with the flags FLAGS[flag], or, for flag 'nanogpt', nanoGPT's GPT from the module given."""
    s = {k: v for k, v in shape.items() if k != "batch_size"}
    if flag == "nanogpt":
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
            return nanogpt.GPT(nanogpt.GPTConfig(bias=False, dropout=0.0, **s))
    config = {k: v for k, v in FLAGS[flag].items() if k not in RUNNER_KEYS}
    return GPT(GPTConfig(bias=False, **s, **config))


class Runner:
    """One model and optimizer, stepped on a fixed random batch, in the training script's precision: bf16
    autocast and TF32 on CUDA (fp16 where bf16 is missing), fp32 elsewhere; fused AdamW on CUDA."""

    def __init__(self, model, batch_size, device, compile_model=False, optimizer="adamw", update=None):
        torch.manual_seed(0)
        # --zclip and --skip-spikes as Run.clip_gradients and Run.skip_this_spike apply them (tools/monitors.py)
        self.zclip = ZClip() if update == "zclip" else None
        self.skip_step = SkipStep() if update == "skip_spikes" else None
        self.model = model.to(device)
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT's configure_optimizers prints
            self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type,
                                                       **({"optimizer": optimizer} if optimizer != "adamw" else {}))
        dtype = pick_dtype("auto", device)
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = device.type == "cuda"
        self.x = torch.randint(0, model.config.vocab_size, (batch_size, model.config.block_size), device=device)
        self.tokens = self.x.numel()
        self.step_num = 0
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.device = device

    def step(self):
        with self.autocast:
            _, loss = self.forward(self.x, self.x)
        loss.backward()
        norm = clip_gradients(self.model.parameters(), 1.0, self.zclip)  # the training loop's clip, --zclip included
        if self.skip_step is not None and self.skip_step.skip(float(loss.detach()), float(norm)):
            self.opt.zero_grad(set_to_none=True)
            return
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_num += 1
        if isinstance(self.model, GPT):  # (not nanoGPT's own model)
            tvr_after_step(self.model, self.step_num)
            qk_clip_after_step(self.model)

    def time(self, steps):
        self.synchronize()  # the previous configuration's queued GPU work is not this one's
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.synchronize()
        return (time.perf_counter() - t) / steps

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def peak_memory_mib(args, flag):
    """Peak memory of 3 training steps of one configuration, measured in a fresh process."""
    cmd = [sys.executable, "-m", "tools.bench", "--measure-peak", flag, "--shape", args.shape, "--device", args.device]
    cmd += ["--nanogpt", args.nanogpt] if args.nanogpt else []
    cmd += ["--glibc-defaults"] if args.glibc_defaults else []
    cmd += [] if args.compile else ["--no-compile"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.split()[-1])


def peak_rss_kib():
    """This process's peak resident set in KiB. On Linux VmHWM, which starts afresh at exec; ru_maxrss would
    carry over the high-water mark of the parent this process was forked from."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu-preset")
    p.add_argument("--flags", nargs="+", choices=list(FLAGS), default=list(FLAGS))
    p.add_argument("--rounds", type=positive_int, default=15)
    p.add_argument("--steps", type=positive_int, default=5, help="steps per configuration per round")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every model (compile time not counted; default: wherever compile works)")
    p.add_argument("--nanogpt", metavar="MODEL_PY",
                   help="also time nanoGPT's own GPT, from the model.py of a nanoGPT checkout, interleaved")
    p.add_argument("--glibc-defaults", action="store_true",
                   help="leave glibc's malloc settings alone (see keep_freed_memory in tools/runs.py)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--measure-peak", metavar="FLAG", help=argparse.SUPPRESS)  # the peak-memory subprocess
    run(p.parse_args(argv))


def run(args):
    try:
        device = pick_device(args.device)  # "auto", "cpu", "cuda", "cuda:N", "mps", checked: one line if not here
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    args.compile = compile_or_eager(args.compile, device)
    # every configuration is another graph of GPT.forward's one cache: room for all, or dynamo runs the rest eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(FLAGS) + 2)
    if not args.glibc_defaults:
        keep_freed_memory()
    nanogpt = load_nanogpt(args.nanogpt) if args.nanogpt else None
    shape = SHAPES[args.shape]
    names = (["nanogpt"] if nanogpt else []) + args.flags

    def runner(name):
        return Runner(build_model(shape, name, nanogpt), shape["batch_size"], device, args.compile,
                      FLAGS.get(name, {}).get("optimizer", "adamw"), FLAGS.get(name, {}).get("update"))

    if args.measure_peak:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runner(args.measure_peak).time(3)
        print(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_kib() / 1024)
        return

    runners, compile_s = {}, {}
    for name in names:
        t = time.perf_counter()
        runners[name] = runner(name)
        runners[name].time(3)  # warm-up (and compilation)
        compile_s[name] = time.perf_counter() - t
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, r in runners.items():
            times[name].append(r.time(args.steps))
    print(f"shape {args.shape}: {shape}, {torch.get_num_threads()} threads, {device}"
          f"{', compiled' if args.compile else ''}{', glibc malloc defaults' if args.glibc_defaults else ''}"
          ", "
          f"{args.rounds} rounds x {args.steps} steps, medians")
    base = times["baseline" if "baseline" in times else names[0]]
    print(f"{'config':<10} {'ms/step':>8} {'tokens/s':>9} {'x baseline':>10} {'peak MiB':>9}"
          + (f" {'compile s':>9}" if args.compile else ""))
    for name, ts in times.items():
        sec = statistics.median(ts)
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        mem = "-" if args.no_memory else f"{peak_memory_mib(args, name):,.0f}"
        print(f"{name:<10} {sec * 1000:8.1f} {runners[name].tokens / sec:9,.0f} {ratio:10.2f} {mem:>9}"
              + (f" {compile_s[name]:9.1f}" if args.compile else ""))


if __name__ == "__main__":
    main()
