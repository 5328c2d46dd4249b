"""
The GPU stability map: a Wortsman-style learning-rate x size map (arXiv 2309.14322, Fig. 1) on one GPU in about
8 minutes, several small runs at once (tools.sweep --jobs), GPT-2 BPE of a text you give:

    python -m tools.gpu_map --data owt_sample.txt              # on a CUDA machine
    python -m tools.gpu_map --data input.txt --dry-run         # the same code paths at toy sizes on CPU (CI)

Writes runs.csv, tables.md, stability_map.png, lr_sensitivity.png and lr_transfer.png into --out-dir (default
out/gpu_map), as the CPU map does; stopped (Ctrl-C) it resumes where it was. The protocol is PROTOCOL below: 5
configurations x 3 sizes x 6 learning rates x 3 seeds = 270 runs of 600 steps x 8,192 tokens. The 8 minutes are
an estimate from FLOPs (the largest size's run is ~1.3e15 FLOPs, ~3 s at a third of an H100's bf16 peak), not yet
measured: the first GPU session records the real time in docs/scaling_up.md, and --jobs and --steps trade time for
coverage.
"""

import sys

import torch

from tools import sweep
from tools.cli import OneLineParser

# The protocol. Sizes LxW with head size 64: 0.39M, 3.1M and 18.9M non-embedding parameters (48x), 6.8M to 44.6M
# with the tied 50,304 x W embedding (nanoGPT's count). Decay independent of the learning rate (Wortsman), strong
# enough to act in 600 steps.
PROTOCOL = dict(
    configs=["baseline", "--qk-norm", "--z-loss 1e-4", "--sdd", "--norm-position post"],
    sizes=["2x128x2", "4x256x4", "6x512x8"],
    lrs=["3e-4", "1e-3", "3e-3", "1e-2", "3e-2", "1e-1"],
    seeds=3,
    flags=["--tokenizer", "gpt2", "--block-size", "256", "--batch-size", "32", "--warmup-iters", "60",
           "--eval-interval", "100", "--eval-iters", "20", "--log-interval", "50", "--diag-interval", "50",
           "--independent-wd", "--weight-decay", "1e-3", "--dropout", "0", "--beta2", "0.95"],
)
DRY_RUN = dict(sizes=["1x16x1", "1x32x1", "2x32x1"], lrs=["1e-3", "1e-1"], seeds=1, steps=4, jobs=2,
               flags=["--block-size", "16", "--batch-size", "2", "--eval-iters", "1", "--eval-interval", "2",
                      "--diag-interval", "2", "--device", "cpu", "--no-compile"])


def sweep_argv(data, out_dir, steps, jobs, dry_run):
    """tools.sweep's command line for the map (dry run: toy sizes on CPU, eager)."""
    p = dict(PROTOCOL, **(DRY_RUN if dry_run else {}))
    flags = PROTOCOL["flags"] + (DRY_RUN["flags"] if dry_run else [])  # later flags win
    return ["--preset", "cpu", "--data", data, "--out-dir", out_dir, "--max-iters", str(DRY_RUN["steps"] if dry_run
                                                                                        else steps), *flags,
            "--compare", *p["configs"], "--sizes", *p["sizes"], "--lrs", *p["lrs"], "--seeds", str(p["seeds"]),
            "--jobs", str(DRY_RUN["jobs"] if dry_run else jobs)]


def main(argv=None):
    parser = OneLineParser(description=__doc__)
    parser.add_argument("--data", required=True, help="a text file (GPT-2 BPE; tokenized once, cached)")
    parser.add_argument("--out-dir", default="out/gpu_map", help="where the runs and the map go")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (default 600)")
    parser.add_argument("--jobs", type=int, default=8, help="runs at once on the GPU (default 8)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on CPU, eager: the code paths in ~1 min")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.jobs < 1:
        parser.error("--steps and --jobs must be positive")
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; the GPU map needs one (--dry-run runs its code paths on CPU)", file=sys.stderr)
        return 2
    return sweep.main(sweep_argv(args.data, args.out_dir, args.steps, args.jobs, args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
