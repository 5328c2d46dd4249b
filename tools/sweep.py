"""
The compare runner and the learning-rate sweep: several configurations of train_shakespeare.py on the same data,
seeds and budget, one after another in this process; finished runs are skipped, interrupted ones resumed.

    python -m tools.sweep --max-iters 600 --compare baseline "--norm-position post" "--lns" --seeds 3
    python -m tools.sweep --max-iters 300 --compare baseline "--sdd" --lrs 1e-3 1e-2 1e-1 --seeds 2
    python -m tools.sweep --lrs 1e-3 1e-2 1e-1 --sdd          # one configuration (the command line's) swept
    python -m tools.sweep --compare baseline "--sdd" --lrs 1e-3 1e-2 --sizes 4x64 4x128 8x128 --seeds 3 --jobs 2

--compare takes 'baseline' or quoted strings of flags; every other flag is common to all runs. Writes compare.md
and compare.png into --out-dir (default out/compare/<the configurations>), or with --lrs (Wortsman et al., arXiv
2309.14322) runs.csv (one row per run, with its failure mode), tables.md (the map's tables and verdicts,
tools/stability.py), stability_map.png, lr_sensitivity.png (and with --sizes lr_transfer.png) into out/lr_sweep;
--min-lr follows each peak at the preset's ratio unless given. --sizes LxW[xH] sweeps model sizes: L layers, W wide,
H heads (default: W over the head size of the other flags' model). --jobs N runs N at a time in worker processes,
the CPU threads split between them (on one GPU: several small runs fill it). The preset is cpu on every device
unless --preset is given.
"""

import json
import math
import re
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import prepare_data
from prepare_data import DataError
from tools import stability
from tools.runs import StopRequest, TrainError, check_fresh_start, load_checkpoint, parse_or_none
from train_shakespeare import Settings, build_parser, resolve, resume_settings, settings_given, train

# ----------------------------------------------------------------------------------------------------
# Compare runner


RUNNER_OPTIONS = ("--compare", "--seeds", "--lrs", "--sizes", "--jobs")


def split_compare(argv):
    """Not argparse: a configuration such as "--lns" is a flag string that argparse would take for an option.
(common flags, configurations, seeds, learning rates or None, sizes or None, jobs) from a command line
    with --compare or --lrs. --compare takes the words after it up to the next runner option or the end, each
    'baseline' or a string of flags ("--lns"); --seeds one whole number; --lrs the numbers after it; --sizes the
    words LxW or LxWxH after it; --jobs how many runs at once. Every other word is a common flag."""
    common, configs, seeds, lrs, sizes, jobs = [], None, 1, None, None, 1
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--compare":
            configs = []
            while words and words[0] not in RUNNER_OPTIONS:
                configs.append(words.pop(0))
            if not configs:
                raise TrainError("--compare needs at least one configuration, e.g. --compare baseline \"--lns\"")
        elif word in ("--seeds", "--jobs"):
            if not words or not words[0].isdigit() or int(words[0]) < 1:
                raise TrainError(f"{word} needs a positive whole number")
            seeds, jobs = (int(words.pop(0)), jobs) if word == "--seeds" else (seeds, int(words.pop(0)))
        elif word == "--lrs":
            lrs = []
            while words and (lr := parse_or_none_float(words[0])) is not None:
                lrs.append(lr)
                words.pop(0)
            if not lrs or not all(0 < lr < math.inf for lr in lrs):
                raise TrainError("--lrs needs one or more learning rates > 0, e.g. --lrs 1e-3 3e-3 1e-2")
        elif word == "--sizes":
            sizes = []
            while words and SIZE.fullmatch(words[0]):
                sizes.append(words.pop(0))
            if not sizes or (words and words[0] not in RUNNER_OPTIONS and not words[0].startswith("-")):
                raise TrainError("--sizes needs one or more model sizes LAYERSxWIDTH[xHEADS] (whole numbers > 0), "
                                 "e.g. --sizes 4x64 4x128 8x128")
        else:
            common.append(word)
    return common, configs or ["baseline"], seeds, lrs, sizes, jobs


SIZE = re.compile(r"([1-9][0-9]*)x([1-9][0-9]*)(?:x([1-9][0-9]*))?")  # --sizes: layers x width [x heads]
SHAPE_FLAGS = ("--n-layer", "--n-embd", "--n-head")


def size_flags(size, head_size):
    """The flags of one --sizes entry: LxW -> L layers of width W with W / head_size heads; LxWxH: H heads."""
    n_layer, n_embd, n_head = SIZE.fullmatch(size).groups()
    n_layer, n_embd = int(n_layer), int(n_embd)
    if n_head is None and n_embd % head_size:
        raise TrainError(f"--sizes {size}: width {n_embd} is not a multiple of the head size {head_size}; give the "
                         f"heads too ({size}xHEADS)")
    n_head = int(n_head) if n_head else n_embd // head_size
    return ["--n-layer", str(n_layer), "--n-embd", str(n_embd), "--n-head", str(n_head)]


def parse_or_none_float(word):
    try:
        return float(word)
    except ValueError:
        return None


def config_slug(config):
    """The run folder's name of a configuration: its flags with every run of other characters as one '-' (the
    sign of an exponent kept: --z-loss 1e-4 and 1e+4 are two folders). compare() refuses two configurations of
    one name."""
    return "baseline" if config.strip() in ("", "baseline") else re.sub(r"[^A-Za-z0-9.+]+", "-", config).strip("-")


def config_flags(config):
    if config_slug(config) == "baseline":
        return []
    try:
        return shlex.split(config)
    except ValueError as e:  # an unbalanced quote
        raise TrainError(f"--compare configuration {config!r}: {e}") from None


def compare(argv):
    """Run every configuration x learning rate x seed (in this process one after another, or --jobs at a time),
    skip the finished ones, then write the table and the plots: compare.md and compare.png, or with --lrs the
    learning-rate sweep's runs.csv, tables.md and figures."""
    common, configs, n_seeds, lrs, sizes, jobs = split_compare(argv)
    parser = build_parser()
    if not any(w == "--preset" or w.startswith("--preset=") for w in common):
        common = ["--preset", "cpu"] + common  # one protocol on every device (the training script picks by device)
    base = settings_given(parser.parse_args(common))
    seed0 = base.get("seed", Settings.seed)
    root = Path(base.get("out_dir") or default_root(configs, lrs))
    grid = lrs or [None]  # None: the learning rate of the flags (a comparison without a sweep)

    def lr_flag(lr):
        return ["--lr", f"{lr:g}"] if lr else []

    if sizes:
        if not lrs:
            raise TrainError("--sizes is for the learning-rate sweep: give --lrs too")
        if given := [w for w in common + [w for c in configs for w in config_flags(c)] if w.split("=")[0] in
                     SHAPE_FLAGS]:
            raise TrainError(f"--sizes sets each run's shape; drop {' '.join(given)}")
        shape = resolve(base)
        size_args = {size: size_flags(size, shape.n_embd // shape.n_head) for size in sizes}
    else:
        size_args = {None: []}
    data_of_config = {}  # (data, tokenizer, block size) -> the first configuration that reads it
    for config in configs:  # every configuration (at every size and learning rate) checked before any trains
        if lrs and any(w == "--lr" or w.startswith("--lr=") for w in common + config_flags(config)):
            raise TrainError(f"--lrs sets the peak learning rate of every run; drop --lr from {config!r} or the "
                             "common flags")
        for size, lr in ((size, lr) for size in size_args for lr in grid):
            cfg = check_compare_config(parser, common + size_args[size] + lr_flag(lr), config)
            data_of_config.setdefault((cfg.data, cfg.tokenizer, cfg.block_size), config)
    for (data, tokenizer, block_size), config in data_of_config.items():  # each data source checked once
        try:  # (a configuration may give its own --data): a bad one fails now, not after the others train
            prepare_data.load_prepared(data, tokenizer, block_size)
        except DataError as e:
            raise TrainError(f"--compare configuration {config!r}: {e}") from None
    slugs = [config_slug(config) for config in configs]
    if len(set(slugs)) < len(slugs):
        twins = sorted({c for c, slug in zip(configs, slugs) if slugs.count(slug) > 1})
        raise TrainError(f"--compare configurations {', '.join(map(repr, twins))} would share one run folder; "
                         "give each once, spelled so that their flags differ")
    plan = [(size, config, lr, seed, root / (size or "") / config_slug(config) / (f"lr{lr:g}" if lr else "") /
             f"seed{seed}") for size in size_args for config in configs for lr in grid
            for seed in range(seed0, seed0 + n_seeds)]
    tasks = [(common + size_args[size] + lr_flag(lr), config, seed, run_dir, f"[{k}/{len(plan)}]")
             for k, (size, config, lr, seed, run_dir) in enumerate(plan, start=1)]
    if (run_in_parallel(tasks, jobs, root) if jobs > 1 else run_in_turn(parser, tasks)) is not None:
        print("compare: interrupted; run the same command again to continue")
        return 130
    if lrs:
        cfg = resolve(base)
        print("\n" + write_sweep_results(plan, cfg.data, cfg.tokenizer, root))
        return 0
    runs = {config: [run_dir for _, c, _, _, run_dir in plan if c == config] for config in configs}
    table = compare_table(runs)
    (root / "compare.md").write_text(table)
    print("\n" + table)
    print_plots(lambda plots: plots.plot_compare(runs, root))
    return 0


def run_in_turn(parser, tasks):
    """Every run of the plan in this process, one after another; the signal that stopped them, or None."""
    with StopRequest() as stop:  # one for the whole comparison: a Ctrl-C between two runs is not lost
        for args, config, seed, run_dir, progress in tasks:
            run_one(parser, args, config, seed, run_dir, stop, progress)
            if stop.signum is not None:
                return stop.signum
    return None


def run_in_parallel(tasks, jobs, root):
    """--jobs N: the runs N at a time, in N worker processes (spawned: no state shared with this one), each with
    the CPU threads split between them (torch's default would give each all of them). A worker's output goes to
    ROOT/worker<k>.log; this process prints a line as each run starts and ends. Ctrl-C (or SIGTERM) here: every
    worker is asked once to stop its run at the next step with a checkpoint, as a single run would; no new run
    starts. Returns the signal that stopped them, or None; a worker's error (e.g. a run folder of other
    settings) is raised here after the running ones finish."""
    import multiprocessing
    import os
    import queue
    import signal

    ctx = multiprocessing.get_context("spawn")
    todo, done = ctx.Queue(), ctx.Queue()
    for task in tasks:
        todo.put(task)
    n_workers = min(jobs, len(tasks))
    for _ in range(n_workers):  # one end mark per worker: a queue read empty may only be one whose runs are still
        todo.put(None)  # on their way through its pipe (get_nowait's Empty once ended a worker at a resume's start)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    root.mkdir(parents=True, exist_ok=True)
    workers = [ctx.Process(target=parallel_worker, args=(todo, done, threads, root / f"worker{k}.log"), daemon=True)
               for k in range(n_workers)]
    errors, finished, asked_to_stop = [], 0, False

    def ask_workers_to_stop():  # once: a second signal to a worker would stop its run at once, unsaved
        nonlocal asked_to_stop
        if not asked_to_stop:
            asked_to_stop = True
            for w in workers:
                if w.is_alive():
                    os.kill(w.pid, signal.SIGINT)

    with StopRequest() as stop:
        for w in workers:
            w.start()
        while (finished < len(tasks) and any(w.is_alive() for w in workers)) or not done.empty():
            if stop.signum is not None:
                ask_workers_to_stop()
            try:
                kind, progress, text = done.get(timeout=0.5)
            except queue.Empty:
                continue
            finished += kind != "start"
            if kind == "error":  # no new runs: the workers finish the ones they have
                errors.append(text)
                ask_workers_to_stop()
            print(f"{progress} {text}", flush=True)
        for w in workers:
            w.join()
    todo.cancel_join_thread()  # runs left in the queue when stopped: exit without flushing them to no reader
    if errors:
        raise TrainError(errors[0])
    if stop.signum is None and finished < len(tasks):
        raise TrainError(f"a worker ended before its runs were done (see {root}/worker*.log); run the same command "
                         "again to continue")
    return stop.signum


def parallel_worker(todo, done, threads, log_path):
    """One worker of run_in_parallel: runs from the queue until its end mark or a signal came (from the parent only:
    its own session keeps a terminal's Ctrl-C, which the parent forwards once, from reaching it twice)."""
    import contextlib
    import os

    os.setsid()
    torch.set_num_threads(threads)
    parser = build_parser()
    with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            StopRequest() as stop:
        while stop.signum is None:
            if (task := todo.get()) is None:  # the end mark: no runs left
                return
            args, config, seed, run_dir, progress = task
            announce = lambda line: (print(line), done.put(("start", progress, f"{config} seed {seed} -> {run_dir}")))
            try:
                trained = run_one(parser, args, config, seed, run_dir, stop, progress, announce)
            except (TrainError, DataError) as e:
                done.put(("error", progress, f"error: {e}"))
                return
            except KeyboardInterrupt:  # a signal while the run prepared its data: it wrote nothing
                done.put(("stopped", progress, f"{config} seed {seed}: interrupted before it started"))
                return
            summary = run_dir / "summary.json"
            best = json.loads(summary.read_text()).get("best_val_loss") if summary.is_file() else None
            state = "done already" if not trained else "interrupted" if stop.signum is not None else \
                f"done, best val {best:.4f}" if best else "done"
            done.put(("end", progress, f"{config} seed {seed}: {state}"))


def print_plots(draw):
    """The plots, drawn after the tables are written: a problem with matplotlib costs the figure, not the table."""
    try:
        from tools import plots

        print("plots: " + ", ".join(str(p) for p in draw(plots)))
    except Exception as e:  # an import or a drawing error: the runs and the tables are already safe
        print(f"warning: no plots ({type(e).__name__}: {e}); the tables are written")


def default_root(configs, lrs):
    """The folder of a sweep without --out-dir: out/lr_sweep (sweeps of one protocol add up there), or one folder
    per comparison, named after its configurations, so that a second comparison does not overwrite the first's
    compare.md (out/compare/baseline_lns)."""
    if lrs:
        return Path("out") / "lr_sweep"
    return Path("out") / "compare" / "_".join(config_slug(c) for c in configs)[:120]


def check_compare_config(parser, common, config):
    """A configuration of --compare that would fail is refused before any run starts, with its reason; else its
    resolved settings."""
    try:
        args, unknown = parser.parse_known_args(common + config_flags(config))
    except SystemExit:  # argparse has printed why (e.g. an invalid choice)
        raise TrainError(f"--compare configuration {config!r} is not valid (see above)") from None
    if unknown:
        raise TrainError(f"--compare configuration {config!r}: unknown flag(s) {' '.join(unknown)}")
    try:
        return resolve(settings_given(args))  # GPTConfig's rules included; the vocabulary comes later, from the data
    except TrainError as e:
        raise TrainError(f"--compare configuration {config!r}: {e}") from None


# settings that change how a run is made or shown, not its result: a finished run is reused whatever they were
NOT_RESULTS = {"out_dir", "plot", "compile", "device"}


def settings_differences(saved, cfg):
    """What differs between a run's saved settings (summary.json's or a checkpoint's config) and cfg."""
    asked = asdict(cfg)
    saved = dict(asdict(Settings()), **{k: v for k, v in saved.items() if k in asked})
    return [f"{k} {saved[k]!r} -> {asked[k]!r}" for k in asked if k not in NOT_RESULTS and saved[k] != asked[k]]


def run_one(parser, common, config, seed, run_dir, stop, progress, announce=print):
    """One configuration and seed of a comparison: skipped if finished, resumed if interrupted, each only when
    the run there was made with the settings asked for now (else one line says what differs). Returns whether it
    trained; announce(line) says so before it does."""
    run_args = parser.parse_args(common + config_flags(config) + ["--seed", str(seed), "--out-dir", str(run_dir)])
    cfg = resolve(settings_given(run_args))
    summary_path = run_dir / "summary.json"
    summary = None
    if summary_path.is_file() and not isinstance(summary := parse_or_none(summary_path.read_text()), dict):
        raise TrainError(f"{summary_path} is damaged (not a JSON object); remove it to resume that run from its "
                         "checkpoint, or remove the run's folder to train it again")
    resume_ckpt = load_checkpoint(run_dir / "ckpt.pt", for_resume=True) if (run_dir / "ckpt.pt").is_file() else None
    saved = summary["config"] if summary else resume_ckpt["config"] if resume_ckpt else None
    if saved is not None and (differences := settings_differences(saved, cfg)):
        raise TrainError(f"{run_dir} holds a run of other settings ({', '.join(differences)}); give the sweep "
                         "another --out-dir, or remove that run")
    # the same --data path may hold another text by now: the run's text checksum (summary or checkpoint) must match
    saved_sha1 = summary.get("text_sha1") if summary else resume_ckpt["meta"].get("text_sha1") if resume_ckpt \
        else None
    if saved_sha1 and saved_sha1 != (sha1 := prepare_data.load_prepared(cfg.data, cfg.tokenizer)[1].get("text_sha1")):
        raise TrainError(f"{run_dir} holds a run on another text than --data's now (sha1 {saved_sha1[:10]} vs "
                         f"{str(sha1)[:10]}); give the sweep another --out-dir, or remove that run")
    if summary and summary.get("interrupted_at") is None:  # finished (or diverged: a result of the sweep too)
        print(f"{progress} {config} seed {seed}: done already ({summary_path})")
        return False
    announce(f"\n{progress} {config} seed {seed} -> {run_dir}")
    torch._dynamo.reset()  # each run compiles afresh: past the recompile limit dynamo would run the rest eager
    if resume_ckpt is not None:  # interrupted earlier: continue it
        train(resume_settings(settings_given(run_args), resume_ckpt), resume_ckpt, stop)
    else:
        check_fresh_start(run_dir, overwrite=True)  # a run folder of this sweep's, with nothing else in it
        train(cfg, None, stop, overwrite=True)
    return True


# ----------------------------------------------------------------------------------------------------
# The learning-rate sweep (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
# instabilities", arXiv 2309.14322): one row per run in runs.csv; its statistics and tables: tools/stability.py


def parameter_count(model_args):
    """The model's parameter count as nanoGPT's get_num_params() (all but wpe), built on the meta device."""
    if not model_args:
        return None
    from stable_gpt import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig(**model_args)).get_num_params()


def write_sweep_results(plan, data, tokenizer, root):
    """runs.csv (this sweep's runs added to those a sweep into the same folder wrote before), and from it
    tables.md and the figures (tools.stability.write_map); returns the tables."""
    data_dir, meta = prepare_data.load_prepared(data, tokenizer)
    unigram = stability.unigram_loss(data_dir, meta["vocab_size"])
    params, rows = {}, []
    for size, config, lr, seed, run_dir in plan:
        summary = json.loads((run_dir / "summary.json").read_text())
        if (size, config) not in params:  # the shape is one per size and configuration: counted once
            cfg = summary["config"]
            params[size, config] = (size or f"{cfg['n_layer']}x{cfg['n_embd']}",
                                    parameter_count(summary.get("model_args")))
        label, count = params[size, config]
        rows.append(stability.run_row(run_dir, label, config, lr, unigram, count))
    csv_path = root / "runs.csv"
    try:
        rows = stability.merge_rows(stability.read_runs_csv(csv_path) if csv_path.is_file() else [], rows)
    except stability.ProtocolError as e:
        raise TrainError(f"{root}: {e}; give the sweep another --out-dir (its runs are kept)") from None
    stability.write_runs_csv(csv_path, rows)
    written = stability.write_map(rows, root)
    print("wrote " + ", ".join(str(p) for p in [csv_path] + written))
    return written[0].read_text()


def compare_table(runs):
    """Markdown table: best and final val loss (mean +- std over seeds), diverged runs, spikes, tokens/s and
    the step-time ratio to the first configuration. The runs ran one after another, so a load on the machine
    during one of them shows in its time: a hint, not a benchmark (tools.bench interleaves configurations)."""
    def mean_std(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return "-"
        return f"{statistics.mean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    rows = ["| config | seeds | best val | final val | diverged | spikes | tokens/s "
            "| time vs first (not a benchmark) |", "|---|---|---|---|---|---|---|---|"]
    first_tps = None
    for config, dirs in runs.items():
        sums = [json.loads((d / "summary.json").read_text()) for d in dirs]
        tps = statistics.mean(s["tokens_per_s"] for s in sums)
        first_tps = first_tps or tps
        rows.append(f"| {config} | {len(sums)} | {mean_std([s['best_val_loss'] for s in sums])} | "
                    f"{mean_std([s['final_val_loss'] for s in sums])} | {sum(s['diverged'] for s in sums)} | "
                    f"{sum(s.get('spikes', 0) for s in sums)} | {tps:,.0f} | {first_tps / tps:.2f} |")
    return "\n".join(rows) + "\n"


def main(argv=None):
    try:
        return compare(sys.argv[1:] if argv is None else list(argv))
    except (TrainError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a signal while a run prepared its data: that run wrote nothing
        print("compare: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
