"""
The stability map's numbers (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", arXiv 2309.14322): one row per run of a learning-rate sweep (runs.csv, written by tools.sweep),
and from the rows the map's results, their statistics, verdicts, tables and figures.

    python -m tools.stability docs/experiments/stability_map_runs.csv --out-dir docs/experiments/stability_map

writes tables.md (the map's tables, the failure modes, the verdicts), stability_map.png, lr_sensitivity.png and
(two sizes or more) lr_transfer.png there, from the CSV alone: every table and figure of the map is regenerated
from its committed data.

The statistics, and what each claims (their error rates are checked by simulation in test_stable_gpt.py):
- A run's counted loss: its final val loss, or its val loss at init where it diverged (non-finite) or ended above
  it (Wortsman, Sec. 2.2). Its failure mode, from its diagnostics: failure_mode() below.
- Per configuration and size, the mean curve over seeds; its best learning rate lr* (the mean curve's argmin) and
  Wortsman's LR sensitivity, mean over the grid minus the best, split in two parts that add up to it: below lr*
  (the learning rates too small to have learned yet: slowness) and above it (instability).
- Each seed's curve gives one value of each (at the configuration's lr*): these are independent replicates, and
  their mean is the mean curve's value exactly, so a Student t interval over them (n - 1 degrees of freedom) is a
  95% interval for the sensitivity, its parts and the best loss.
- A configuration against the reference (the first) at one size is paired: seed s gives both the same init,
  batches and validation batches, so the test is a paired t test on the per-seed differences (seeds both have).
- A map makes many such comparisons (3 quantities x configurations x sizes); Holm's step-down correction keeps the
  chance of one or more false verdicts in the whole map at 5% or less. A difference is written "lower" or
  "higher" only where its Holm-adjusted p is <= 0.05; otherwise "not resolved", which is not "the same".
"""

import argparse
import csv
import functools
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------------------------------
# One row per run, and its failure mode

FIELDS = ("size", "params", "config", "model", "lr", "seed", "steps", "tokens", "init_val_loss", "best_val_loss",
          "final_val_loss", "counted_loss", "diverged", "failure_mode", "attn_logit_max", "log_z", "log_z_drift",
          "unigram_loss", "protocol", "hc_gain_max")
NUMBERS = {"params", "lr", "seed", "steps", "tokens", "init_val_loss", "best_val_loss", "final_val_loss",
           "counted_loss", "attn_logit_max", "log_z", "log_z_drift", "unigram_loss", "hc_gain_max"}

# The failure modes, in the order they are tested: the first that applies is the run's.
#   diverged          a non-finite loss (the run stopped there)
#   collapsed         final val loss within COLLAPSE_NATS of the unigram loss or above it: the model predicts one
#                     distribution at every position (the Post-LN failure of the first maps)
#   attention logits  the largest attention logit recorded (q.k / sqrt(d), any block) above ATTN_LOGIT_RUNAWAY:
#                     attention-logit growth, Wortsman Sec. 3.1.1 (their unstable runs reach 1e3-1e4; a
#                     softmax over logits 100 apart is one-hot)
#   output logits     mean log Z of the output logits drifted more than LOG_Z_DRIFT nats from log Z at init
#                     (ln vocab): output-logit divergence, Wortsman Sec. 3.1.2
#   trains            none of these
COLLAPSE_NATS = 0.05
ATTN_LOGIT_RUNAWAY = 100.0
LOG_Z_DRIFT = 10.0
MODES = ("trains", "diverged", "collapsed", "attention logits", "output logits")


def failure_mode(diverged, final_val_loss, unigram_loss, attn_logit_max, log_z_drift):
    if diverged or final_val_loss is None or not math.isfinite(final_val_loss):
        return "diverged"
    if unigram_loss is not None and final_val_loss >= unigram_loss - COLLAPSE_NATS:
        return "collapsed"
    if attn_logit_max is not None and attn_logit_max > ATTN_LOGIT_RUNAWAY:
        return "attention logits"
    if log_z_drift is not None and log_z_drift > LOG_Z_DRIFT:
        return "output logits"
    return "trains"


def unigram_loss(data_dir, vocab_size):
    """The val loss of the best model that ignores context: the train split's token frequencies (add-one
    smoothed) scored on the val split, in nats per token. A model that collapsed to one distribution ends here."""
    counts = [np.bincount(np.memmap(Path(data_dir) / f"{split}.bin", dtype=np.uint16, mode="r"),
                          minlength=vocab_size)[:vocab_size].astype(np.float64) for split in ("train", "val")]
    p = (counts[0] + 1) / (counts[0].sum() + vocab_size)
    return float(-(counts[1] * np.log(p)).sum() / counts[1].sum())


def run_row(run_dir, size, config, lr, unigram, params):
    """runs.csv's row of one finished run: its settings, losses (counted_loss: Wortsman's capped loss), the
    largest attention logit and the log Z of its diagnostics (diag.jsonl; None without them), its failure mode and,
    with hyper-connections, the largest forward gain of the residual path recorded (any block: mHC's Amax gain, arXiv
    2512.24880, Sec. 3; 1 under mHC, compounding under HC)."""
    import json

    from tools.runs import parse_or_none

    summary = json.loads((run_dir / "summary.json").read_text())
    records = lambda name: [r for r in map(parse_or_none, (run_dir / name).read_text().splitlines()) if r] \
        if (run_dir / name).is_file() else []
    evals = [r for r in records("log.jsonl") if r.get("type") == "eval"]
    init = next(r["val_loss"] for r in evals if r["iter"] == 0)
    final = summary["final_val_loss"]
    diverged = bool(summary["diverged"]) or final is None or not math.isfinite(final)
    diag = records("diag.jsonl")
    recorded = lambda key: [x for r in diag for x in r.get(key, []) if x is not None and math.isfinite(x)]
    logits = recorded("attn_logit_max")  # every block of every record
    log_z = [r["logit_lse_mean"] for r in diag if math.isfinite(r.get("logit_lse_mean", math.nan))]
    log_z_init = math.log(summary["model_args"]["vocab_size"])  # all logits equal: log Z = ln V
    gains = recorded("hc_gain_forward")
    attn_max = max(logits) if logits else None
    drift = max(abs(z - log_z_init) for z in log_z) if log_z else None
    return dict(size=size, params=params, config=config, model=summary["techniques"], lr=lr, protocol=protocol(summary),
                seed=summary["config"]["seed"], steps=summary["iters"],
                tokens=summary["iters"] * summary.get("tokens_per_step", 0), init_val_loss=init,
                best_val_loss=summary["best_val_loss"], final_val_loss=final,
                counted_loss=init if diverged else min(final, init), diverged=diverged,
                failure_mode=failure_mode(diverged, final, unigram, attn_max, drift), attn_logit_max=attn_max,
                log_z=log_z[-1] if log_z else None, log_z_drift=drift, unigram_loss=unigram,
                hc_gain_max=max(gains) if gains else None)


def protocol(summary):
    """What every run of one map shares, in one string: steps, tokens per step, warmup, weight decay and the
    text's checksum. Runs of two protocols are never tabled together (merge_rows)."""
    cfg = summary["config"]
    decay = f"wd {cfg.get('weight_decay')}{' independent' if cfg.get('independent_wd') else ''}"
    return (f"{summary['iters']} x {summary.get('tokens_per_step')} tokens, warmup {cfg.get('warmup_iters')}, {decay}, "
            f"text {str(summary.get('text_sha1'))[:10]}")


def write_runs_csv(path, rows):
    """runs.csv, atomically (a temporary file renamed over the old one): one row per run, FIELDS in order,
    rounded to what the tables show and a little more."""
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.6f}".rstrip("0").rstrip(".")
        return str(v)

    tmp = Path(f"{path}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        writer.writerows([cell(row[k]) for k in FIELDS] for row in rows)
    os.replace(tmp, path)


def read_runs_csv(path):
    """The rows of a runs.csv (numbers as floats, seed, steps, tokens and params as ints, diverged a bool)."""
    def value(key, text):
        if text == "":
            return None
        if key == "diverged":
            return text == "True"
        if key in NUMBERS:
            number = float(text)
            return int(number) if key in ("seed", "steps", "tokens", "params") else number
        return text

    with open(path, newline="") as f:
        return [{k: value(k, row.get(k, "")) for k in FIELDS} for row in csv.DictReader(f)]


class ProtocolError(ValueError):
    """Runs of another protocol in a runs.csv that a sweep would add its runs to."""


def merge_rows(saved, new):
    """The rows of a saved runs.csv with this sweep's rows: a run (size, config, lr, seed) this sweep has replaces
    the saved one in its place, and the runs the saved rows lack come after them, so a map that grows keeps its
    order (the tables and panels follow it: configurations in the order they joined the map); sweeps into one folder
    add up (e.g. the largest size run later with fewer configurations), but only runs of one protocol (steps,
    tokens, warmup, decay, text): else ProtocolError, saying what differs."""
    protocols = {r["protocol"] for r in new}
    if others := {r["protocol"] for r in saved} - protocols:
        raise ProtocolError(f"its runs.csv holds runs of another protocol ({'; '.join(sorted(others))}) than this "
                            f"sweep's ({'; '.join(sorted(protocols))})")
    key = lambda r: (r["size"], r["config"], float(r["lr"]), int(r["seed"]))
    latest = {key(r): r for r in new}
    saved_keys = {key(r) for r in saved}
    return [latest.get(key(r), r) for r in saved] + [r for r in new if key(r) not in saved_keys]


# ----------------------------------------------------------------------------------------------------
# Statistics: Student's t, paired tests, Holm


def incomplete_beta(a, b, x):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz; Numerical
    Recipes, Sec. 6.4), accurate to ~1e-12 for the t distribution's use here."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast below this point: use the symmetry
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            numerator = 1.0
        elif i % 2 == 0:
            numerator = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            numerator = -((a + m) * (a + b + m) * x) / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + numerator * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + numerator / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    return incomplete_beta(df / 2, 0.5, df / (df + t * t)) if math.isfinite(t) else 0.0


@functools.lru_cache(maxsize=None)
def t_quantile(q, df):
    """The q quantile of Student's t (q > 0.5), by bisection on t_two_sided_p."""
    low, high = 0.0, 1e6
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_two_sided_p(mid, df) > 2 * (1 - q) else (low, mid)
    return (low + high) / 2


def mean_interval(values):
    """A 95% interval for the mean of independent replicates (seeds): mean +- t(0.975, n-1) s / sqrt(n).
    None with fewer than two."""
    if len(values) < 2:
        return None
    half = t_quantile(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [statistics.fmean(values) - half, statistics.fmean(values) + half]


def paired_test(a, b):
    """The paired t test of a against b (one value each per seed, the same seeds in the same order): the mean
    difference a - b, its 95% interval and the two-sided p of "no difference". None with fewer than two pairs."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return None
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    t = math.copysign(math.inf, mean) if sd == 0 and mean != 0 else 0.0 if sd == 0 else mean / (sd / math.sqrt(len(d)))
    return dict(diff=mean, ci95=mean_interval(d), p=t_two_sided_p(t, len(d) - 1), n=len(d))


def holm(pvalues):
    """Holm's step-down adjusted p-values (Holm 1979): reject where adjusted p <= alpha and the chance of any
    false rejection among them all is <= alpha, whatever the dependence between the tests."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [None] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


# ----------------------------------------------------------------------------------------------------
# One configuration's curve, and the map


def lr_sensitivity(losses):
    """Wortsman et al. (arXiv 2309.14322, Sec. 2.2): E_lr[min(loss(lr), loss at init)] - min_lr loss(lr) over
    the grid; losses {lr: loss already capped at the loss at init}. 0: every learning rate of the grid trains
    as well as the best one; large: the configuration is sensitive to its learning rate."""
    values = list(losses.values())
    return statistics.fmean(values) - min(values)


def curve_stats(losses_by_lr):
    """One configuration at one size: losses_by_lr {lr: [counted loss per seed]}, every list in the same seed
    order. The mean curve's best lr and loss, Wortsman's sensitivity and its two parts (below lr*: slowness, above:
    instability; they add up to it), and per seed the same quantities at the configuration's lr*, whose means they
    are exactly (the replicates of the intervals and paired tests)."""
    lrs = sorted(losses_by_lr)
    n = min(len(v) for v in losses_by_lr.values())
    mean = {lr: statistics.fmean(losses_by_lr[lr][:n]) for lr in lrs}
    best = min(lrs, key=mean.get)
    per_seed = dict(best_loss=[], lr_sensitivity=[], slow=[], unstable=[])
    for i in range(n):
        curve = {lr: losses_by_lr[lr][i] for lr in lrs}
        gap = {lr: curve[lr] - curve[best] for lr in lrs}
        per_seed["best_loss"].append(curve[best])
        per_seed["lr_sensitivity"].append(statistics.fmean(gap.values()))
        per_seed["slow"].append(sum(gap[lr] for lr in lrs if lr < best) / len(lrs))
        per_seed["unstable"].append(sum(gap[lr] for lr in lrs if lr > best) / len(lrs))
    gap = {lr: mean[lr] - mean[best] for lr in lrs}
    return dict(mean_loss=mean, best_lr=best, best_lr_at_edge=len(lrs) > 1 and best in (lrs[0], lrs[-1]),
                best_loss=mean[best], lr_sensitivity=lr_sensitivity(mean),
                slow=sum(gap[lr] for lr in lrs if lr < best) / len(lrs),
                unstable=sum(gap[lr] for lr in lrs if lr > best) / len(lrs), per_seed=per_seed, seeds=n)


VERDICT_KEYS = ("best_loss", "lr_sensitivity", "unstable")  # the quantities a map compares with its reference
ALPHA = 0.05


def map_results(rows):
    """The map from runs.csv's rows: per size (in order of parameters) and configuration (the baseline first, as the
    reference, where there is one; else the first configuration of the rows; the rest in the rows' order), the runs
    by learning rate, the mean curve with its 95% intervals, curve_stats() with 95%
    intervals, and against the reference the paired tests of VERDICT_KEYS, Holm-corrected over the whole map:
    each "lower", "higher" or "not resolved"."""
    sizes = {}
    for r in rows:
        sizes.setdefault(r["size"], {}).setdefault(r["config"], {}).setdefault(r["lr"], []).append(r)
    results = {}
    size_params = lambda by_config: next(r["params"] for by_lr in by_config.values() for rs in by_lr.values()
                                         for r in rs) or 0
    for size, by_config in sorted(sizes.items(), key=lambda kv: size_params(kv[1])):
        configs = {}
        # the reference: the baseline where the map has one, else its first configuration; the rest in row order
        for config, by_lr in sorted(by_config.items(), key=lambda kv: kv[0] != "baseline"):
            seeds = sorted(set.intersection(*({r["seed"] for r in runs} for runs in by_lr.values())))
            runs = {lr: sorted((r for r in by_lr[lr] if r["seed"] in seeds), key=lambda r: r["seed"])
                    for lr in sorted(by_lr)}
            losses = {lr: [r["counted_loss"] for r in rs] for lr, rs in runs.items()}
            c = curve_stats(losses)
            first = next(iter(runs.values()))[0]
            configs[config] = dict(c, model=first["model"], params=first["params"], seed_list=seeds, runs=runs,
                                   mean_loss_ci95={lr: mean_interval(v) for lr, v in losses.items()},
                                   **{f"{k}_ci95": mean_interval(c["per_seed"][k]) for k in VERDICT_KEYS + ("slow",)},
                                   modes={m: sum(r["failure_mode"] == m for rs in runs.values() for r in rs)
                                          for m in MODES})
        reference = next(iter(configs.values()))
        for c in configs.values():
            c["vs_reference"] = None if c is reference else {k: paired(c, reference, k) for k in VERDICT_KEYS}
        results[size] = dict(params=reference["params"], configs=configs)
    tests = [t for s in results.values() for c in s["configs"].values() if c["vs_reference"]
             for t in c["vs_reference"].values() if t]
    for t, adjusted in zip(tests, holm([t["p"] for t in tests])):
        t["p_holm"] = adjusted
        t["verdict"] = "not resolved" if adjusted > ALPHA else "lower" if t["diff"] < 0 else "higher"
    lrs = sorted({r["lr"] for r in rows})
    return dict(reference="Wortsman et al. 2023, arXiv 2309.14322", lrs=lrs, tests=len(tests), sizes=results)


def paired(c, reference, key):
    """The paired test of one quantity of configuration c against the reference, on the seeds both have."""
    common = [s for s in c["seed_list"] if s in reference["seed_list"]]
    pick = lambda x: [x["per_seed"][key][x["seed_list"].index(s)] for s in common]
    return paired_test(pick(c), pick(reference))


# ----------------------------------------------------------------------------------------------------
# Tables

MODE_MARKS = {"diverged": "\u2020", "collapsed": "c", "attention logits": "a", "output logits": "z"}


def map_tables(results):
    """tables.md: per size, the mean counted loss at each learning rate (+- its 95% half width, and a mark per run
    that failed: MODE_MARKS), the best lr (* at an end of the grid), best loss, sensitivity = slow + unstable with
    95% intervals; then the verdicts against the reference, then the failure modes counted."""
    lrs = results["lrs"]
    out = []
    for label, size in results["sizes"].items():
        params = f" ({size['params'] / 1e6:.2f}M parameters)" if size["params"] else ""
        out += [f"### {label}{params}", "", "| config | model | " + " | ".join(f"lr {lr:g}" for lr in lrs) +
                " | best lr | best loss [95%] | LR sensitivity [95%] | = slow + unstable [95%] |",
                "|---|---|" + "---|" * len(lrs) + "---|---|---|---|"]
        for config, c in size["configs"].items():
            cells = []
            for lr in lrs:
                if lr not in c["mean_loss"]:
                    cells.append("")
                    continue
                ci = c["mean_loss_ci95"][lr]
                marks = "".join(MODE_MARKS.get(r["failure_mode"], "") for r in c["runs"][lr])
                cells.append(f"{c['mean_loss'][lr]:.3f}" + (f" +- {(ci[1] - ci[0]) / 2:.3f}" if ci else "") +
                             (f" {marks}" if marks else ""))
            out.append(f"| {config} | {c['model']} | " + " | ".join(cells) +
                       f" | {c['best_lr']:g}{'*' if c['best_lr_at_edge'] else ''} | "
                       f"{c['best_loss']:.3f}{interval(c['best_loss_ci95'])} | "
                       f"{c['lr_sensitivity']:.3f}{interval(c['lr_sensitivity_ci95'])} | "
                       f"{c['slow']:.3f}{interval(c['slow_ci95'])} + {c['unstable']:.3f}"
                       f"{interval(c['unstable_ci95'])} |")
        seeds = sorted({c["seeds"] for c in size["configs"].values()})
        out += ["", f"Seeds per point: {' or '.join(map(str, seeds))}.", "",
                "| against " + next(iter(size["configs"])) + " | best loss | LR sensitivity | unstable part |",
                "|---|---|---|---|"]
        for config, c in size["configs"].items():
            if c["vs_reference"]:
                out.append(f"| {config} | " + " | ".join(verdict_cell(c["vs_reference"][k]) for k in VERDICT_KEYS)
                           + " |")
        out += ["", "| failure modes (runs) | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
        out += [f"| {config} | " + " | ".join(str(c["modes"][m]) for m in MODES) + " |"
                for config, c in size["configs"].items()]
        out.append("")
    return "\n".join(out) + TABLE_NOTE.format(tests=results["tests"])


TABLE_NOTE = """
Counted loss: the final val loss, or the val loss at init for a run that diverged or ended above it (Wortsman et
al., arXiv 2309.14322); the mean over seeds +- the half width of its 95% interval (Student's t). Marks, one per
run: \u2020 diverged (non-finite), c collapsed to the unigram loss, a attention logits above 100, z log Z drifted
over 10 nats from init. *: the best learning rate is at an end of the grid, so the optimum is not measured. LR
sensitivity: the mean over the grid of the mean curve minus its best; slow: the part from learning rates below
the best one, unstable: from those above (they add up to it); [95%]: Student's t over the per-seed values.
Verdicts: a paired t test over seeds (the same seed: the same init and batches) of the difference from the
reference, "lower" or "higher" where its Holm-adjusted p (over all {tests} tests of the map) is <= 0.05, else "not
resolved" (no difference shown, which is not "the same"); in brackets the difference and its 95% interval.
"""


def interval(ci):
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def verdict_cell(test):
    if not test:
        return "-"
    signed = lambda x: f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000" for a difference that rounds to 0
    ci = test["ci95"]
    return f"{test['verdict']} ({signed(test['diff'])} [{signed(ci[0])}, {signed(ci[1])}], p_Holm {test['p_holm']:.2g})"


# ----------------------------------------------------------------------------------------------------
# The command: tables and figures from a runs.csv


def write_map(rows, out_dir):
    """tables.md, stability_map.png, lr_sensitivity.png and (with two sizes or more) lr_transfer.png in out_dir
    from runs.csv's rows; returns the paths (the figures only where matplotlib draws them)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = map_results(rows)
    (out_dir / "tables.md").write_text(map_tables(results))
    written = [out_dir / "tables.md"]
    try:
        from tools import plots

        written += (plots.plot_stability_map(results, out_dir) + plots.plot_lr_sensitivity(results, out_dir)
                    + plots.plot_lr_transfer(results, out_dir))
    except Exception as e:  # a problem with matplotlib costs the figures, not the tables
        print(f"warning: no plots ({type(e).__name__}: {e}); the tables are written")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_csv", help="a runs.csv written by tools.sweep (e.g. docs/experiments/"
                        "stability_map_runs.csv)")
    parser.add_argument("--out-dir", required=True, help="where tables.md and the figures go")
    args = parser.parse_args(argv)
    try:
        rows = read_runs_csv(args.runs_csv)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot read {args.runs_csv} ({e})", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.runs_csv} holds no runs", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in write_map(rows, args.out_dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
