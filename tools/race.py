"""
Time to quality against nanoGPT: nanoGPT's own train.py with its README's CPU recipe, then this project's
train_shakespeare.py, one after the other on the same machine. Every line each prints is time-stamped from the
start of its process; an evaluation's time (and the checkpoint written after it) is measured from the stamps and
taken out, except the first evaluation's, so a time is "from process start, imports, data, compile and training
included, evaluations after the first excluded" (docs/speed.md).

    python -m tools.race --nanogpt ../nanoGPT                 # nanoGPT's recipe, then python train_shakespeare.py
    python -m tools.race --nanogpt ../nanoGPT -- --no-compile # flags after -- go to train_shakespeare.py
    python -m tools.race --target 1.8857 -- --lr 6e-3         # ours alone, against a val loss given

nanoGPT's checkout is not shipped here (git clone https://github.com/karpathy/nanoGPT); its data/shakespeare_char
is prepared from the tiny Shakespeare this project finds, if it is not there. Writes race.json and both logs into
--out-dir (default out/race). Run it on a quiet machine: it is a timing.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tools.oneline import OneLineParser

ROOT = Path(__file__).resolve().parent.parent

# nanoGPT's README, "I only have a macbook" (CPU): the command as written there, with the checkpoints sent elsewhere
NANOGPT_RECIPE = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                  "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                  "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
# what each program prints: an evaluation (iter, val loss) and a step (iter)
NANOGPT_LINES = (re.compile(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)"), re.compile(r"^iter (\d+): loss"))
OUR_LINES = (re.compile(r"^eval\s+(\d+): train [\d.]+, val ([\d.]+)"), re.compile(r"^iter\s+(\d+)/\d+ \|"))


def timed_lines(cmd, cwd, log_path):
    """Run cmd; return [(seconds since its start, line)] of what it printed (stdout and stderr), and write them
    to log_path as they come. A non-zero exit is an error: the race of a failed run means nothing."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=_unbuffered())
    lines = []
    with open(log_path, "w") as log:
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))
            log.write(f"{lines[-1][0]:9.3f} {lines[-1][1]}\n")
            log.flush()  # a long run can be followed with tail -f
    if proc.wait() != 0:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} exited {proc.returncode}; its output: {log_path}")
    return lines


def _unbuffered():
    import os

    return dict(os.environ, PYTHONUNBUFFERED="1")


def evaluations(lines, patterns):
    """Each evaluation of a run as (iter, val loss, stamp, own seconds, cost in seconds). Its own seconds: from the
    line printed before it to its line; its cost: to the first step line after it (a checkpoint written), less
    the steps made in between (at the median time per step). Returns (evaluations, seconds per step)."""
    eval_re, step_re = patterns
    marks = []  # (stamp, kind, iter, val)
    for t, line in lines:
        if m := eval_re.match(line):
            marks.append((t, "eval", int(m[1]), float(m[2])))
        elif m := step_re.match(line):
            marks.append((t, "step", int(m[1]), None))
    # seconds per step from consecutive step lines with no evaluation between them (the first pair after the
    # start is left out too: it holds the compile)
    per_step = statistics.median((t2 - t1) / (i2 - i1) for (t1, k1, i1, _), (t2, k2, i2, _) in zip(marks[1:], marks[2:])
                                 if k1 == k2 == "step" and i2 > i1)
    out = []
    for k, (t, kind, it, val) in enumerate(marks):
        if kind != "eval":
            continue
        if k == 0:  # the first evaluation, before any step: its time stays in (nothing to measure it from)
            out.append((it, val, t, 0.0, 0.0))
            continue
        before = marks[k - 1]
        after = next((m for m in marks[k + 1:] if m[1] == "step"), None)
        own = t - before[0]  # the evaluation itself, up to its line
        # with what follows it (a checkpoint written) until the next step line, less the steps made in between
        cost = own if after is None else (after[0] - before[0]) - (after[2] - before[2]) * per_step
        out.append((it, val, t, max(own, 0.0), max(cost, own, 0.0)))
    return out, per_step


def time_to(target, evals):
    """(seconds, iter): from process start to the first evaluation at or below target, the evaluations after the
    first taken out (the reaching one's own included); (None, None) if never reached. The first evaluation's
    cost is 0 in evals (evaluations() keeps it in)."""
    spent = 0.0
    for k, (it, val, t, own, cost) in enumerate(evals):
        if val <= target:
            return t - spent - own, it
        spent += cost
    return None, None


def prepare_nanogpt_data(checkout):
    """nanoGPT's data/shakespeare_char from this project's tiny Shakespeare, unless it is there already."""
    data = checkout / "data" / "shakespeare_char"
    if (data / "train.bin").is_file() and (data / "meta.pkl").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from prepare_data import find_shakespeare

    if not (data / "input.txt").is_file():
        shutil.copyfile(find_shakespeare(), data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ours_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout (its train.py is run)")
    who.add_argument("--target", type=float, metavar="VAL", help="no nanoGPT run: time ours to this val loss")
    p.add_argument("--out-dir", default="out/race", help="where race.json and the logs go")
    args = p.parse_args(argv)
    checkout = args.nanogpt and Path(args.nanogpt)
    if checkout and not all((checkout / f).is_file() for f in ("train.py", "config/train_shakespeare_char.py")):
        p.error(f"--nanogpt {checkout}: no train.py and config/train_shakespeare_char.py there; give a nanoGPT "
                "checkout")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result, target, t_nano = {}, args.target, None
    with tempfile.TemporaryDirectory() as tmp:
        if checkout:
            prepare_nanogpt_data(checkout)
            cmd = [sys.executable, "train.py", *NANOGPT_RECIPE, f"--out_dir={tmp}/nanogpt"]
            print("nanoGPT:", " ".join(cmd[1:]), flush=True)
            nano, per_step = evaluations(timed_lines(cmd, checkout, out / "nanogpt.log"), NANOGPT_LINES)
            target = min(val for _, val, *_ in nano)
            t_nano, it = time_to(target, nano)
            result["nanogpt"] = dict(seconds=round(t_nano, 1), iter=it, best_val=target,
                                     ms_per_step=round(per_step * 1000, 1), command=cmd[1:])
            print(f"nanoGPT: best val {target:.4f} at iter {it}, {t_nano:.1f} s ({per_step * 1000:.1f} ms/step)")
        cmd = [sys.executable, "train_shakespeare.py", "--out-dir", f"{tmp}/ours", "--overwrite", *ours_flags]
        print("ours:   ", " ".join(cmd[1:]), flush=True)
        ours, per_step = evaluations(timed_lines(cmd, ROOT, out / "ours.log"), OUR_LINES)
    t_ours, it = time_to(target, ours)
    result["ours"] = dict(seconds=t_ours and round(t_ours, 1), iter=it, best_val=min(val for _, val, *_ in ours),
                          ms_per_step=round(per_step * 1000, 1), command=cmd[1:])
    result.update(target_val=target, ratio=t_ours and t_nano and round(t_ours / t_nano, 3))
    (out / "race.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"ours:    val <= {target:.4f} at iter {it}, " + ("never" if t_ours is None else f"{t_ours:.1f} s" + (
        f" = {t_ours / t_nano:.2f}x nanoGPT's time" if t_nano else "")) + f"; best val {result['ours']['best_val']:.4f}"
        f" ({per_step * 1000:.1f} ms/step)")
    print(f"wrote {out / 'race.json'} and the logs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
