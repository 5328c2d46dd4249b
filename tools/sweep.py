"""
The compare runner and the learning-rate sweep: several configurations of train_shakespeare.py on the same data,
seeds and budget, one after another in this process; finished runs are skipped, interrupted ones resumed.

    python -m tools.sweep --max-iters 600 --compare baseline "--norm-position post" "--lns" --seeds 3
    python -m tools.sweep --max-iters 300 --compare baseline "--sdd" --lrs 1e-3 1e-2 1e-1 --seeds 2
    python -m tools.sweep --lrs 1e-3 1e-2 1e-1 --sdd          # one configuration (the command line's) swept
    python -m tools.sweep --compare baseline "--sdd" --lrs 1e-3 1e-2 --sizes 4x64 4x128 8x128 --seeds 3

--compare takes 'baseline' or quoted strings of flags; every other flag is common to all runs. Writes compare.md
and compare.png into --out-dir (default out/compare), or with --lrs (Wortsman et al., arXiv 2309.14322)
lr_sweep.json, lr_sweep.md, lr_sweep.png (the map, small multiples) and lr_sensitivity.png (sensitivity against
parameters) into out/lr_sweep; --min-lr follows each peak at the preset's ratio unless given. --sizes LxW[xH]
sweeps model sizes: L layers, W wide, H heads (default: W over the head size of the other flags' model).
"""

import json
import math
import random
import re
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

import prepare_data
from prepare_data import DataError
from tools.runs import (StopRequest, TrainError, check_fresh_start, load_checkpoint, parse_or_none,
                        write_json_atomically)
from train_shakespeare import Settings, build_parser, resolve, resume_settings, settings_given, train

# ----------------------------------------------------------------------------------------------------
# Compare runner


RUNNER_OPTIONS = ("--compare", "--seeds", "--lrs", "--sizes")


def split_compare(argv):
    """Not argparse: a configuration such as "--lns" is a flag string that argparse would take for an option.
(common flags, configurations, seeds, learning rates or None, sizes or None) from a command line with
    --compare or --lrs. --compare takes the words after it up to the next runner option or the end, each
    'baseline' or a string of flags ("--lns"); --seeds one whole number; --lrs the numbers after it; --sizes the
    words LxW or LxWxH after it. Every other word is a common flag."""
    common, configs, seeds, lrs, sizes = [], None, 1, None, None
    words = list(argv)
    while words:
        word = words.pop(0)
        if word == "--compare":
            configs = []
            while words and words[0] not in RUNNER_OPTIONS:
                configs.append(words.pop(0))
            if not configs:
                raise TrainError("--compare needs at least one configuration, e.g. --compare baseline \"--lns\"")
        elif word == "--seeds":
            if not words or not words[0].isdigit() or int(words[0]) < 1:
                raise TrainError("--seeds needs a positive whole number")
            seeds = int(words.pop(0))
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
    return common, configs or ["baseline"], seeds, lrs, sizes


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
    """Run every configuration x learning rate x seed (in this process, one after another), skip the finished
    ones, then write the table and the plots: compare.md and compare.png, or with --lrs the learning-rate
    sweep's lr_sweep.json, lr_sweep.md and lr_sweep.png."""
    common, configs, n_seeds, lrs, sizes = split_compare(argv)
    parser = build_parser()
    base = settings_given(parser.parse_args(common))
    seed0 = base.get("seed", Settings.seed)
    root = Path(base.get("out_dir") or Path("out") / ("lr_sweep" if lrs else "compare"))
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
    for config in configs:  # every configuration (at every size and learning rate) checked before any trains
        if lrs and any(w == "--lr" or w.startswith("--lr=") for w in common + config_flags(config)):
            raise TrainError(f"--lrs sets the peak learning rate of every run; drop --lr from {config!r} or the "
                             "common flags")
        for size, lr in ((size, lr) for size in size_args for lr in grid):
            check_compare_config(parser, common + size_args[size] + lr_flag(lr), config)
    slugs = [config_slug(config) for config in configs]
    if len(set(slugs)) < len(slugs):
        twins = sorted({c for c, slug in zip(configs, slugs) if slugs.count(slug) > 1})
        raise TrainError(f"--compare configurations {', '.join(map(repr, twins))} would share one run folder; "
                         "give each once, spelled so that their flags differ")
    plan = [(size, config, lr, seed, root / (size or "") / config_slug(config) / (f"lr{lr:g}" if lr else "") /
             f"seed{seed}") for size in size_args for config in configs for lr in grid
            for seed in range(seed0, seed0 + n_seeds)]
    with StopRequest() as stop:  # one for the whole comparison: a Ctrl-C between two runs is not lost
        for k, (size, config, lr, seed, run_dir) in enumerate(plan, start=1):
            run_one(parser, common + size_args[size] + lr_flag(lr), config, seed, run_dir, stop,
                    progress=f"[{k}/{len(plan)}]")
            if stop.signum is not None:
                print("compare: interrupted; run the same command again to continue")
                return 130
    if lrs:
        sweep = lr_sweep_results({size: {config: {lr: [d for s_, c, l, _, d in plan if (s_, c, l) == (size, config, lr)]
                                                  for lr in lrs} for config in configs} for size in size_args})
        sweep = with_saved_sizes(sweep, root / "lr_sweep.json")
        write_json_atomically(root / "lr_sweep.json", sweep)
        (root / "lr_sweep.md").write_text(table := lr_sweep_table(sweep))
        print("\n" + table)
        print_plots(lambda plots: plots.plot_lr_sweep(sweep, root) + plots.plot_lr_sensitivity(sweep, root))
        return 0
    runs = {config: [run_dir for _, c, _, _, run_dir in plan if c == config] for config in configs}
    table = compare_table(runs)
    (root / "compare.md").write_text(table)
    print("\n" + table)
    print_plots(lambda plots: plots.plot_compare(runs, root))
    return 0


def print_plots(draw):
    """The plots, drawn after the tables are written: a problem with matplotlib costs the figure, not the table."""
    try:
        from tools import plots

        print("plots: " + ", ".join(str(p) for p in draw(plots)))
    except Exception as e:  # an import or a drawing error: the runs and the tables are already safe
        print(f"warning: no plots ({type(e).__name__}: {e}); the tables are written")


def check_compare_config(parser, common, config):
    """A configuration of --compare that would fail is refused before any run starts, with its reason."""
    try:
        args, unknown = parser.parse_known_args(common + config_flags(config))
    except SystemExit:  # argparse has printed why (e.g. an invalid choice)
        raise TrainError(f"--compare configuration {config!r} is not valid (see above)") from None
    if unknown:
        raise TrainError(f"--compare configuration {config!r}: unknown flag(s) {' '.join(unknown)}")
    try:
        resolve(settings_given(args))  # GPTConfig's rules included; the vocabulary comes later, from the data
    except TrainError as e:
        raise TrainError(f"--compare configuration {config!r}: {e}") from None


# settings that change how a run is made or shown, not its result: a finished run is reused whatever they were
NOT_RESULTS = {"out_dir", "plot", "compile", "device"}


def settings_differences(saved, cfg):
    """What differs between a run's saved settings (summary.json's or a checkpoint's config) and cfg."""
    asked = asdict(cfg)
    saved = dict(asdict(Settings()), **{k: v for k, v in saved.items() if k in asked})
    return [f"{k} {saved[k]!r} -> {asked[k]!r}" for k in asked if k not in NOT_RESULTS and saved[k] != asked[k]]


def run_one(parser, common, config, seed, run_dir, stop, progress):
    """One configuration and seed of a comparison: skipped if finished, resumed if interrupted, each only when
    the run there was made with the settings asked for now (else one line says what differs)."""
    run_args = parser.parse_args(common + config_flags(config) + ["--seed", str(seed), "--out-dir", str(run_dir)])
    cfg = resolve(settings_given(run_args))
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    resume_ckpt = load_checkpoint(run_dir / "ckpt.pt") if (run_dir / "ckpt.pt").is_file() else None
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
        return
    print(f"\n{progress} {config} seed {seed} -> {run_dir}")
    torch._dynamo.reset()  # each run compiles afresh: past the recompile limit dynamo would run the rest eager
    if resume_ckpt is not None:  # interrupted earlier: continue it
        train(resume_settings(settings_given(run_args), resume_ckpt), resume_ckpt, stop)
    else:
        check_fresh_start(run_dir, overwrite=True)  # a run folder of this sweep's, with nothing else in it
        train(cfg, None, stop, overwrite=True)


# ----------------------------------------------------------------------------------------------------
# The learning-rate sweep (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
# instabilities", arXiv 2309.14322): a configuration's final loss against the learning rate


def run_outcome(run_dir):
    """One run of a sweep: its final and best val loss, the val loss at init (the eval at iter 0), whether it
    diverged, and the loss the sweep counts: the final val loss, or the loss at init for a run that diverged
    (a non-finite loss), never more than the loss at init (Wortsman et al., Sec. 2.2)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in map(parse_or_none, (run_dir / "log.jsonl").read_text().splitlines())
             if r and r.get("type") == "eval"]
    init = next(r["val_loss"] for r in evals if r["iter"] == 0)
    final = summary["final_val_loss"]
    diverged = summary["diverged"] or final is None or not math.isfinite(final)
    return dict(seed=summary["config"]["seed"], model=summary["techniques"], final_val_loss=final,
                best_val_loss=summary["best_val_loss"], init_val_loss=init, diverged=diverged,
                counted_loss=init if diverged else min(final, init))


def parameter_count(model_args):
    """The model's parameter count as nanoGPT's get_num_params() (all but wpe), built on the meta device."""
    if not model_args:
        return None
    from stable_gpt import GPT, GPTConfig

    with torch.device("meta"):
        return GPT(GPTConfig(**model_args)).get_num_params()


def lr_sensitivity(losses):
    """Wortsman et al. (arXiv 2309.14322, Sec. 2.2): E_lr[min(loss(lr), loss at init)] - min_lr loss(lr) over
    the grid; losses {lr: loss already capped at the loss at init}. 0: every learning rate of the grid trains
    as well as the best one; large: the configuration is sensitive to its learning rate."""
    values = list(losses.values())
    return statistics.fmean(values) - min(values)


# Student's t, 0.975 quantile, by degrees of freedom (n seeds - 1): a 95% interval for a mean of few seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def mean_interval(values):
    """A 95% interval for the mean over seeds: mean +- t(0.975, n-1) s / sqrt(n) (one seed: none). Student's t,
    not a bootstrap, for the means: with 3 seeds a bootstrap's interval would be far too narrow."""
    if len(values) < 2:
        return None
    df, z = len(values) - 1, 1.959964
    # the table, then the Cornish-Fisher expansion of t in 1/df (within 0.003 from df 11 on)
    t = T_975.get(df) or z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return [statistics.fmean(values) - half, statistics.fmean(values) + half]


BOOTSTRAP_DRAWS = 2000


def sensitivity_interval(losses_by_lr, draws=BOOTSTRAP_DRAWS, seed=0):
    """A 95% bootstrap interval for the LR sensitivity: draw the seeds with replacement (the same draw at every
    learning rate, as a seed's runs are one replicate of the whole curve), take the sensitivity of the mean
    curve, and the 2.5 and 97.5 percentiles of those. losses_by_lr: {lr: [capped loss per seed]}, every list
    in the same seed order. None with one seed."""
    n = min(len(v) for v in losses_by_lr.values())
    if n < 2:
        return None
    rng = random.Random(seed)
    values = sorted(lr_sensitivity({lr: statistics.fmean(v[i] for i in picks) for lr, v in losses_by_lr.items()})
                    for picks in ([rng.randrange(n) for _ in range(n)] for _ in range(draws)))
    return [values[int(0.025 * (draws - 1))], values[int(0.975 * (draws - 1))]]


def interval_order(ci, reference):
    """"lower" or "higher" when two 95% intervals do not overlap, "overlap" when they do, None without both:
    a difference the map claims only when the intervals are apart (conservative: non-overlap of two 95%
    intervals is a difference at well below the 5% level)."""
    if not ci or not reference:
        return None
    return "lower" if ci[1] < reference[0] else "higher" if ci[0] > reference[1] else "overlap"


def lr_sweep_results(runs):
    """lr_sweep.json's content from {size: {config: {lr: [run folders, one per seed]}}} (size None: the flags'
    one): per size its parameter count, per configuration and learning rate the outcome of each seed, the mean
    counted loss and its 95% interval; the best learning rate (and whether it is at an end of the grid), the
    best loss, the LR sensitivity of the mean curve and its 95% bootstrap interval; vs_first: where those two
    intervals lie against the first configuration's (interval_order)."""
    sizes = {}
    for size, by_config in runs.items():
        configs = {}
        for config, by_lr in by_config.items():
            outcomes = {lr: [run_outcome(d) for d in dirs] for lr, dirs in by_lr.items()}
            losses = {lr: [o["counted_loss"] for o in runs_] for lr, runs_ in outcomes.items()}
            mean_loss = {lr: statistics.fmean(v) for lr, v in losses.items()}
            best_lr = min(mean_loss, key=mean_loss.get)
            first = first_run_summary(by_lr)  # the shape is one per configuration: counted once, not per run
            configs[config] = dict(
                model=first["techniques"], params=parameter_count(first.get("model_args")),
                runs={f"{lr:g}": o for lr, o in outcomes.items()},
                mean_loss={f"{lr:g}": v for lr, v in mean_loss.items()},
                mean_loss_ci95={f"{lr:g}": mean_interval(v) for lr, v in losses.items()}, best_lr=best_lr,
                best_lr_at_edge=best_lr in (min(by_lr), max(by_lr)) and len(by_lr) > 1,
                best_loss=mean_loss[best_lr], best_loss_ci95=mean_interval(losses[best_lr]),
                lr_sensitivity=lr_sensitivity(mean_loss), lr_sensitivity_ci95=sensitivity_interval(losses))
        reference = next(iter(configs.values()))  # the first configuration: what the others are read against
        for c in configs.values():
            c["vs_first"] = None if c is reference else {
                key: interval_order(c[f"{key}_ci95"], reference[f"{key}_ci95"]) for key in ("best_loss", "lr_sensitivity")}
        label = size or run_shape(by_config)
        sizes[label] = dict(params=reference["params"], configs=configs)
    return dict(reference="Wortsman et al. 2023, arXiv 2309.14322",
                loss="final val loss; a diverged run counts at its val loss at init, and no run above it",
                intervals="95%: Student's t over seeds for mean losses; a bootstrap over seeds (2,000 draws) for the "
                          "LR sensitivity",
                params="nanoGPT's get_num_params(): every parameter but the position embeddings, of the baseline "
                       "shape (a flag's own gains add a few)",
                lrs=sorted({lr for by_config in runs.values() for by_lr in by_config.values() for lr in by_lr}),
                sizes=sizes)


def with_saved_sizes(sweep, path):
    """The sweep plus the sizes of the lr_sweep.json already at path that this sweep did not run, so that
    sweeps into one --out-dir add up: e.g. the largest size run later with fewer configurations. Sizes in order
    of parameter count; a saved sweep of another learning-rate grid is replaced (its runs stay on disk)."""
    saved = parse_or_none(path.read_text()) if path.is_file() else None
    if not saved or saved.get("lrs") != sweep["lrs"] or "sizes" not in saved:
        return sweep
    sizes = {**{k: v for k, v in saved["sizes"].items() if k not in sweep["sizes"]}, **sweep["sizes"]}
    return dict(sweep, sizes=dict(sorted(sizes.items(), key=lambda kv: kv[1]["params"] or 0)))


def first_run_summary(by_lr):
    """summary.json of the first run of {lr: [run folders]}."""
    return json.loads((next(iter(by_lr.values()))[0] / "summary.json").read_text())


def run_shape(by_config):
    """LxW of the runs of one size, from the first run's settings (the label of a sweep without --sizes)."""
    cfg = first_run_summary(next(iter(by_config.values())))["config"]
    return f"{cfg['n_layer']}x{cfg['n_embd']}" if "n_layer" in cfg else "one size"


def lr_sweep_table(sweep):
    """lr_sweep.md: per size, the mean counted loss of each configuration at each learning rate (+- the half
    width of its 95% interval, a dagger per diverged run), its best learning rate (* at an end of the grid),
    best loss and LR sensitivity with its 95% interval, and where the intervals of those two are apart from the
    first configuration's (lower or higher)."""
    lrs = [f"{lr:g}" for lr in sweep["lrs"]]
    out = []
    for label, size in sweep["sizes"].items():
        params = f" ({size['params'] / 1e6:.2f}M parameters)" if size["params"] else ""
        out += [f"### {label}{params}", "",
                "| config | model | " + " | ".join(f"lr {lr}" for lr in lrs) +
                " | best lr | best loss | LR sensitivity [95%] | vs the first: best loss, sensitivity |",
                "|---|---|" + "---|" * len(lrs) + "---|---|---|---|"]
        for config, c in size["configs"].items():
            cells = []
            for lr in lrs:
                ci = c["mean_loss_ci95"][lr]
                half = f" +- {(ci[1] - ci[0]) / 2:.3f}" if ci else ""
                cells.append(f"{c['mean_loss'][lr]:.3f}{half}" + "\u2020" * sum(o["diverged"] for o in c["runs"][lr]))
            ci = c["lr_sensitivity_ci95"]
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            out.append(f"| {config} | {c['model']} | " + " | ".join(cells) + f" | {c['best_lr']:g}"
                       f"{'*' if c['best_lr_at_edge'] else ''} | {c['best_loss']:.4f} | "
                       f"{c['lr_sensitivity']:.4f}{interval} | {vs_first(c)} |")
        out.append("")
    seeds = sorted({len(o) for size in sweep["sizes"].values() for c in size["configs"].values()
                    for o in c["runs"].values()})
    return "\n".join(out) + (
        f"\nFinal val loss, the mean over {' or '.join(map(str, seeds))} seed(s), +- the half width of its 95% "
        "interval (Student's t). \u2020: a run that diverged (non-finite loss), counted at its loss at init, as is "
        "any run that ends above it (Wortsman et al., arXiv 2309.14322). *: the best learning rate is at an end of "
        "the grid, so the optimum is not measured. LR sensitivity: the mean over the grid of those losses minus the "
        "best one; in brackets its 95% interval, a bootstrap over seeds. vs the first: lower or higher where the 95% "
        "intervals of the two are apart, = where they overlap (no difference shown), - without intervals.\n")


def vs_first(c):
    """The table's cell of a configuration's vs_first (the first configuration itself: "reference"; "-" in an
    lr_sweep.json saved before there was vs_first)."""
    if "vs_first" not in c:
        return "-"
    if c["vs_first"] is None:
        return "reference"
    return ", ".join({"lower": "lower", "higher": "higher", "overlap": "="}.get(v, "-") for v in c["vs_first"].values())


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
