"""
Training-step benchmark: ms per step (forward, backward, clip, AdamW step, TVR where on) and tokens/s for the
baseline, each stabilizer alone and all of them, at a given shape, on random tokens.

    python bench.py                       # the CPU preset shape (4/4/128, block 64, batch 32)
    python bench.py --shape nanogpt-cpu   # nanoGPT's README CPU recipe shape (4/4/128, block 64, batch 12)

The machine's speed drifts by up to 30% within a minute (other tenants), while ratios measured side by side are
steady. So the configurations are interleaved: each round times every configuration for --steps steps, and
the report gives each one's median time and its median ratio to the baseline *of the same round*. Peak memory
is measured per configuration in a fresh process (3 steps): on CPU the process's peak resident set (PyTorch's
own runtime included), on CUDA the peak of torch.cuda.max_memory_allocated.
"""

import argparse
import statistics
import subprocess
import sys
import time

import torch

from stable_gpt import GPT, GPTConfig, target_variance_rescale

SHAPES = {
    "cpu-preset": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32),
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
}
FLAGS = {
    "baseline": {}, "sdd": dict(sdd=True), "lns": dict(lns=True), "wesar": dict(wesar=True), "lir": dict(lir=True),
    "tvr": dict(tvr=True), "sdd+lns": dict(sdd=True, lns=True),
    "all": dict(sdd=True, lns=True, wesar=True, lir=True, tvr=True),
}


class Runner:
    """One model and optimizer, stepped on a fixed random batch."""

    def __init__(self, shape, flags, vocab_size, device):
        torch.manual_seed(0)
        s = dict(shape)
        self.batch_size = s.pop("batch_size")
        self.model = GPT(GPTConfig(vocab_size=vocab_size, bias=False, **s, **flags)).to(device)
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), device.type)
        self.x = torch.randint(0, vocab_size, (self.batch_size, s["block_size"]), device=device)
        self.tokens = self.x.numel()
        self.step_num = 0

    def step(self):
        _, loss = self.model(self.x, self.x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_num += 1
        c = self.model.config
        if c.tvr and self.step_num % c.tvr_interval == 0:
            target_variance_rescale(self.model, c.tvr_target, c.tvr_threshold)

    def time(self, steps):
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t) / steps


def peak_memory_mib(shape, flag, device):
    """Peak memory of 3 training steps of one configuration, measured in a fresh process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        Runner(SHAPES[shape], FLAGS[flag], 65, device).time(3)
        return torch.cuda.max_memory_allocated(device) / 2**20
    code = (f"import bench, torch; bench.Runner(bench.SHAPES[{shape!r}], bench.FLAGS[{flag!r}], 65, "
            f"torch.device('cpu')).time(3); print(bench.peak_rss_kib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def peak_rss_kib():
    """This process's peak resident set in KiB. On Linux VmHWM, which starts afresh at exec; ru_maxrss would
    carry over the high-water mark of the parent this process was forked from."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu-preset")
    p.add_argument("--flags", nargs="+", choices=list(FLAGS), default=list(FLAGS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=5, help="steps per configuration per round")
    p.add_argument("--vocab-size", type=int, default=65)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    args = p.parse_args()
    device = torch.device(args.device)
    runners = {name: Runner(SHAPES[args.shape], FLAGS[name], args.vocab_size, device) for name in args.flags}
    for r in runners.values():  # warm-up
        r.time(3)
    times = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, r in runners.items():
            times[name].append(r.time(args.steps))
    shape = SHAPES[args.shape]
    print(f"shape {args.shape}: {shape}, {torch.get_num_threads()} threads, {device}, {args.rounds} rounds "
          f"x {args.steps} steps, medians")
    base = times["baseline" if "baseline" in times else args.flags[0]]
    print(f"{'config':<10} {'ms/step':>8} {'tokens/s':>9} {'x baseline':>10} {'peak MiB':>9}")
    for name, ts in times.items():
        sec = statistics.median(ts)
        ratio = statistics.median(t / b for t, b in zip(ts, base))
        mem = "-" if args.no_memory else f"{peak_memory_mib(args.shape, name, device):,.0f}"
        print(f"{name:<10} {sec * 1000:8.1f} {runners[name].tokens / sec:9,.0f} {ratio:10.2f} {mem:>9}")


if __name__ == "__main__":
    main()
