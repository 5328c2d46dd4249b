"""
Plots of a training run (log.jsonl, diag.jsonl) and of a comparison of runs, as PNG files.

    python -m tools.plots out/cpu                 # the plots of one run, into out/cpu/
    python train_shakespeare.py --plot ...        # the same at the end of training
    python -m tools.sweep --compare ...           # compare.png: the configurations overlaid
    python -m tools.plots --logits twins.png RUN_A RUN_B  # attention-logit and log Z growth of runs side by side

Layer-indexed panels put the block index (1 = first block) on the x axis.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

from tools.oneline import OneLineParser

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter  # noqa: E402

KINDS = ("q", "k", "v", "attn_out", "fc", "mlp_out")  # the block matrices, as stable_gpt.BLOCK_MATRICES names them


def read_jsonl(path):
    """The records of a .jsonl file ([] if there is none), less a line that is not whole JSON: a run killed
    mid-write can leave a partial last line (the rule of tools.runs.parse_or_none, which this file does not import
    so that plotting needs no torch)."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def read_run(folder):
    """(log.jsonl's records, diag.jsonl's records) of a run folder."""
    return read_jsonl(Path(folder) / "log.jsonl"), read_jsonl(Path(folder) / "diag.jsonl")


def step_records(log):
    """The log.jsonl lines of optimizer steps with a loss (a skipped step's loss is null)."""
    return [r for r in log if isinstance(r.get("loss"), (int, float))]


def by_layer(record, key):
    """{kind: [value of layer 1, layer 2, ...]} from a diag record's {"<layer>.<kind>": value} dict."""
    out = {}
    for name, value in record[key].items():
        layer, kind = name.split(".")
        out.setdefault(kind, []).append((int(layer), value))
    return {kind: [v for _, v in sorted(values)] for kind, values in out.items()}


def snapshots(diag, n=5):
    """Up to n diag records spread evenly over training, the last one included."""
    if len(diag) <= n:
        return diag
    return [diag[round(i * (len(diag) - 1) / (n - 1))] for i in range(n)]


def layers(values):
    return list(range(1, len(values) + 1))


PLAIN = FuncFormatter(lambda value, _: f"{value:g}")  # 0.00145 and 6, not 1.45x10^-3 and 6x10^0


def save(fig, path, dpi=90, integer_x=True):
    for ax in fig.axes:
        if integer_x:  # blocks and iterations are whole numbers
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_yscale() == "log":
            ax.yaxis.set_major_formatter(PLAIN)
            ax.yaxis.set_minor_formatter(PLAIN if ax.get_ylim()[1] / ax.get_ylim()[0] < 20 else NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_run(out_dir):
    """Write loss.png and, when diag.jsonl exists, depth.png, updates.png, activations.png, weight_std.png (and
    logits.png where the records have attention logits). Returns the paths written."""
    out_dir = Path(out_dir)
    log, diag = read_run(out_dir)
    written = [plot_loss(log, out_dir.name, out_dir / "loss.png")]
    if not diag:
        return written
    snaps = snapshots(diag)
    colors = plt.cm.viridis([i / max(1, len(snaps) - 1) for i in range(len(snaps))])
    written += [plot_depth(snaps, colors, out_dir / "depth.png"), plot_updates(diag[-1], out_dir / "updates.png"),
                plot_activations(snaps, colors, out_dir / "activations.png"),
                plot_weight_std(diag, out_dir / "weight_std.png")]
    if "attn_logit_max" in diag[-1]:
        written += plot_logit_growth({out_dir.name: (log, diag)}, out_dir / "logits.png", with_loss=False)
    return written


def plot_loss(log, name, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = step_records(log)
    evals = [r for r in log if r.get("type") == "eval"]
    spikes = [r for r in log if r.get("type") == "spike"]
    ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.5, label="train (step)")
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "s-", label="val (eval)")
    if spikes:
        ax.plot([r["iter"] for r in spikes], [r["loss"] for r in spikes], "rx", ms=8, label="loss spike")
    ax.set(title=f"Loss: {name}", xlabel="iteration", ylabel="cross-entropy (nats/token)")
    ax.legend()
    return save(fig, path)


def plot_snapshots_by_block(snaps, colors, panels, path, width):
    """One panel per (title, ylabel, yscale, [(key, line style, name), ...]): each key's per-block values in every
    snapshot, one colour per snapshot, a legend in every panel."""
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.2))
    for ax, (title, ylabel, yscale, series) in zip(axes, panels):
        for r, c in zip(snaps, colors):
            for key, style, name in series:
                ax.plot(layers(r[key]), r[key], style, color=c, label=f"{name}iter {r['iter']}")
        ax.set(title=title, xlabel="block", ylabel=ylabel, yscale=yscale)
        low, high = ax.get_ylim()
        if yscale == "log" and high / low < 4:  # at least 4x shown, so a flat line (mHC's gain, 1 +- 1e-7) reads flat
            ax.set_ylim(math.sqrt(low * high) / 2, math.sqrt(low * high) * 2)
        ax.legend(fontsize=7, ncol=len(series))  # two series: a column each, half as tall
    return save(fig, path)


def plot_depth(snaps, colors, path):
    panels = [("Residual-stream variance after block", "variance (per feature)", "log", [("variance", "o-", "")]),
              ("Angular distance, block input to output", "arccos(cos sim) / pi", "linear",
               [("angular_distance", "o-", "")]),
              ("Layer importance: loss increase if removed", "delta loss (nats)", "linear",
               [("layer_importance", "o-", "")])]
    if "hc_gain_forward" in snaps[-1]:  # hyper-connections: mHC's Amax gain of the residual path (hc_gains)
        panels.append(("Hyper-connection gain, embeddings to block", "max abs row / column sum", "log",
                       [("hc_gain_forward", "o-", "forward, "), ("hc_gain_backward", "x--", "backward, ")]))
    return plot_snapshots_by_block(snaps, colors, panels, path, width=5 * len(panels))


def plot_updates(last, path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, ax, title, unit in (("update_ratio", axes[0], "Update ratio |dW|/|W| of one step", "ratio"),
                                 ("grad_norm", axes[1], "Gradient norm of each matrix", "L2 norm")):
        for kind, values in by_layer(last, key).items():
            ax.plot(layers(values), values, "o-", label=kind)
        ax.set(title=f"{title} (iter {last['iter']})", xlabel="block", ylabel=unit, yscale="log")
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_activations(snaps, colors, path):
    return plot_snapshots_by_block(snaps, colors, [
        ("Max |activation|", "max |x|", "linear",
         [("max_abs", "o-", "stream, "), ("mlp_in_max_abs", "x--", "MLP in, ")]),
        ("Kurtosis (Gaussian = 3)", "kurtosis", "linear",
         [("kurtosis", "o-", "stream, "), ("mlp_in_kurtosis", "x--", "MLP in, ")]),
    ], path, width=13)


def plot_weight_std(diag, path):
    last = diag[-1]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    iters = [r["iter"] for r in diag]
    for kind in KINDS:
        if kind in by_layer(diag[0], "weight_std"):
            axes[0].plot(iters, [max(by_layer(r, "weight_std")[kind]) for r in diag], label=kind)
    for kind, values in by_layer(last, "weight_std").items():
        axes[1].plot(layers(values), values, "o-", label=kind)
    axes[0].set(title="Weight std over training (max over blocks)", xlabel="iteration", ylabel="std")
    axes[1].set(title=f"Weight std by block (iter {last['iter']})", xlabel="block", ylabel="std")
    for ax in axes:
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_logit_growth(runs, path, dpi=90, with_loss=True):
    """The two logit divergences of Wortsman et al. (arXiv 2309.14322, Sec. 3) over training, one line per run:
    the step loss (with_loss: a run's own plots have it in loss.png), the largest attention logit q.k/sqrt(d) (signed,
    as Wortsman plot it) over blocks (Sec. 3.1.1; QK-norm bounds it) and the mean log Z of the output logits with
    its spread (Sec. 3.1.2; z-loss pulls it to 0). runs: {label: read_run()}."""
    fig, axes = plt.subplots(1, 3 if with_loss else 2, figsize=(18 if with_loss else 12, 4.8))
    axes = axes if with_loss else [None, *axes]
    for i, (label, (log, diag)) in enumerate(runs.items()):
        color = f"C{i}"
        steps = step_records(log)
        if with_loss:
            axes[0].plot([r["iter"] for r in steps], [r["loss"] for r in steps], color=color, label=label)
        diag = [r for r in diag if "attn_logit_max" in r]
        iters = [r["iter"] for r in diag]
        axes[1].plot(iters, [max(r["attn_logit_max"]) for r in diag], "o-", ms=3, color=color, label=label)
        mean = [r["logit_lse_mean"] for r in diag]
        std = [r["logit_lse_std"] for r in diag]
        axes[2].plot(iters, mean, "o-", ms=3, color=color, label=label)
        axes[2].fill_between(iters, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                             color=color, alpha=0.2)
    if with_loss:
        axes[0].set(title="Training loss (step)", xlabel="iteration", ylabel="cross-entropy (nats/token)")
    axes[1].set(title="Largest attention logit over blocks", xlabel="iteration", ylabel="max q.k / sqrt(d)",
                yscale="symlog")  # symlog: the signed max can be below 0
    axes[2].set(title="log Z of the output logits (mean +- std)", xlabel="iteration", ylabel="log Z")
    for ax in axes[0 if with_loss else 1:]:
        ax.legend(fontsize=8)
    return [save(fig, Path(path), dpi)]


def plot_arms(arms, path, dpi=90):
    """A failure and its fix over training, seeds with intervals: for each arm (a label and its seeds' run
    folders) the val loss, the largest attention logit over blocks (Wortsman Sec. 3.1.1; log axis) and the mean
    log Z of the output logits (Sec. 3.1.2), each the mean over seeds at every record with its 95% interval
    (Student's t over seeds; the logits' in log10). arms: {label: [run folder, ...]}."""
    from tools.stability import mean_interval

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8))
    panels = ((lambda log, diag: [(r["iter"], r["val_loss"]) for r in log if r.get("type") == "eval"], False),
              (lambda log, diag: [(r["iter"], math.log10(max(max(r["attn_logit_max"]), 1e-3))) for r in diag
                                  if "attn_logit_max" in r], True),
              (lambda log, diag: [(r["iter"], r["logit_lse_mean"]) for r in diag if "logit_lse_mean" in r], False))
    for i, (label, folders) in enumerate(arms.items()):
        seeds = [read_run(f) for f in folders]  # each run's logs read once, for all three panels
        series = [[dict(points(*run)) for run in seeds] for points, _ in panels]
        for ax, per_seed, (_, in_log10) in zip(axes, series, panels):
            steps = sorted(set.intersection(*(set(s) for s in per_seed)))
            mean = [sum(s[t] for s in per_seed) / len(per_seed) for t in steps]
            bands = [mean_interval([s[t] for s in per_seed]) for t in steps]
            unlog = (lambda v: 10 ** v) if in_log10 else (lambda v: v)
            ax.plot(steps, [unlog(m) for m in mean], "o-", ms=3, color=f"C{i}", label=f"{label} ({len(folders)} seeds)")
            if all(bands):
                ax.fill_between(steps, [unlog(b[0]) for b in bands], [unlog(b[1]) for b in bands], color=f"C{i}",
                                alpha=0.2)
    axes[0].set(title="Val loss", xlabel="iteration", ylabel="nats/token")
    axes[1].set(title="Largest attention logit over blocks", xlabel="iteration", ylabel="max q.k / sqrt(d)",
                yscale="log")
    axes[2].set(title="Mean log Z of the output logits", xlabel="iteration", ylabel="log Z")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("mean over seeds, band: 95% interval (Student's t over seeds)")
    return [save(fig, Path(path), dpi)]


def mean_over(runs, fn):
    """Element-wise mean of fn(run) over runs (lists of equal length; shorter ones, e.g. diverged runs, are cut)."""
    values = [fn(r) for r in runs]
    values = [v for v in values if v]
    if not values:
        return []
    n = min(len(v) for v in values)
    return [sum(v[i] for v in values) / len(values) for i in range(n)]


def plot_compare(runs, out_dir, path=None, dpi=90):
    """compare.png: val loss and the largest weight std over training and, at the last diag record, per-layer
    variance, angular distance, importance, update ratio (mean over matrices), max |activation| and kurtosis,
    one line per configuration (mean over seeds). runs: {label: [run folder, ...]}; path: where to write
    (default out_dir/compare.png)."""
    out_dir = Path(out_dir)
    fig, axes = plt.subplots(2, 4, figsize=(20, 8.5))
    for label, dirs in runs.items():
        logs = [read_jsonl(Path(d) / "log.jsonl") for d in dirs]
        evals = [[r for r in log if r.get("type") == "eval"] for log in logs]
        iters = [r["iter"] for r in max(evals, key=len)] if evals else []
        val = mean_over(evals, lambda e: [r["val_loss"] for r in e])
        axes[0, 0].plot(iters[:len(val)], val, "o-", label=label)
        diags = [d for d in (read_jsonl(Path(d) / "diag.jsonl") for d in dirs) if d]
        last = [d[-1] for d in diags]
        if diags:
            std = mean_over(diags, lambda d: [max(r["weight_std"].values()) for r in d])
            axes[0, 3].plot([r["iter"] for r in diags[0]][:len(std)], std, label=label)
        for ax, key in ((axes[0, 1], "variance"), (axes[0, 2], "angular_distance"),
                        (axes[1, 0], "layer_importance"), (axes[1, 2], "max_abs"), (axes[1, 3], "kurtosis")):
            values = mean_over(last, lambda r: r[key])
            ax.plot(layers(values), values, "o-", label=label)
        ratio = mean_over(last, lambda r: [sum(v) / len(v) for v in zip(*by_layer(r, "update_ratio").values())])
        axes[1, 1].plot(layers(ratio), ratio, "o-", label=label)
    axes[0, 0].set(title="Validation loss", xlabel="iteration", ylabel="nats/token")
    axes[0, 1].set(title="Residual variance after block", xlabel="block", ylabel="variance", yscale="log")
    axes[0, 2].set(title="Angular distance, block in to out", xlabel="block", ylabel="arccos(cos sim) / pi")
    axes[1, 0].set(title="Layer importance (loss increase if removed)", xlabel="block", ylabel="delta loss (nats)")
    axes[1, 1].set(title="Update ratio |dW|/|W| (mean over matrices)", xlabel="block", ylabel="ratio", yscale="log")
    axes[1, 2].set(title="Max |activation| of the stream", xlabel="block", ylabel="max |x|")
    axes[0, 3].set(title="Largest weight std of the block matrices", xlabel="iteration", ylabel="std")
    axes[1, 3].set(title="Kurtosis of the stream (Gaussian = 3)", xlabel="block", ylabel="kurtosis")
    axes[0, 0].legend(fontsize=8)
    seeds = sorted({len(dirs) for dirs in runs.values()})
    fig.suptitle(f"every line: the mean over each configuration's {' or '.join(map(str, seeds))} seed(s); "
                 "per-block panels at the last diagnostics record", fontsize=10)
    return [save(fig, Path(path) if path else out_dir / "compare.png", dpi)]


def config_colors(names):
    """A colour of its own for every configuration (tab20's, then turbo's beyond 20)."""
    n = len(names)
    colors = plt.get_cmap("tab20").colors if n <= 20 else [plt.get_cmap("turbo")(0.05 + 0.9 * i / (n - 1))
                                                              for i in range(n)]
    return dict(zip(names, colors))


def interval_bars(centers, intervals):
    """Matplotlib's asymmetric yerr from [low, high] intervals (None: no bar)."""
    return [[c - iv[0] if iv else 0 for c, iv in zip(centers, intervals)],
            [iv[1] - c if iv else 0 for c, iv in zip(centers, intervals)]]


def config_names(sweep):
    """Every configuration of a sweep, in the order of the sizes that ran them (a size may run fewer)."""
    return list(dict.fromkeys(name for size in sweep["sizes"].values() for name in size["configs"]))


def plot_mean_curve(ax, c, **style):
    """One configuration's mean curve at one size (c: a configuration of map_results()), loss against learning rate
    with its 95% intervals; returns its learning rates."""
    lrs = sorted(c["runs"])
    mean = [c["mean_loss"][lr] for lr in lrs]
    ax.errorbar(lrs, mean, yerr=interval_bars(mean, [c["mean_loss_ci95"][lr] for lr in lrs]), marker="o", capsize=2,
                **style)
    return lrs


def lr_axis(ax, lrs, title):
    """A log learning-rate axis ticked at the grid's learning rates, plain numbers."""
    ax.set(xscale="log", title=title)
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], fontsize=7)
    ax.minorticks_off()


PANEL_CONFIGS = 4  # configurations per panel of the map, beside the first one (the reference in every panel)


# the failure modes of tools.stability, one marker each on the map (a run that trains: no marker of its own)
MODE_MARKERS = {"diverged": "x", "collapsed": "v", "attention logits": "^", "output logits": "s"}


def plot_stability_map(results, out_dir, dpi=90):
    """stability_map.png, the stability map as small multiples: final val loss against the peak learning rate (log
    axis), one row of panels per model size, each panel the first configuration (grey, the reference) and up to
    PANEL_CONFIGS others (a column's legend under it): the mean over seeds with its 95% interval, as Wortsman et
    al.'s Fig. 1 (arXiv 2309.14322), and every run that failed at the loss it counts, marked by its failure mode
    (MODE_MARKERS). results: tools.stability.map_results()."""
    sizes = results["sizes"]
    names = config_names(results)
    reference, others = names[0], names[1:]
    groups = [others[i:i + PANEL_CONFIGS] for i in range(0, len(others), PANEL_CONFIGS)] or [[]]
    palette = plt.get_cmap("tab10").colors  # within a panel: four colours far apart, the legend under the column
    fig, axes = plt.subplots(len(sizes), len(groups), figsize=(4.3 * len(groups), 3.2 * len(sizes) + 1.6),
                             sharey="row", squeeze=False)
    for row, (label, size) in zip(axes, sizes.items()):
        params = f", {size['params'] / 1e6:.2f}M params" if size["params"] else ""
        for ax, group in zip(row, groups):
            for k, config in enumerate([reference] + group):
                if config not in size["configs"]:  # a size run with fewer configurations
                    continue
                c = size["configs"][config]
                color = "0.45" if k == 0 else palette[k - 1]
                lrs = plot_mean_curve(ax, c, color=color, linestyle="--" if k == 0 else "-", ms=3.5, label=config)
                for mode, marker in MODE_MARKERS.items():
                    failed = [(lr, r["counted_loss"]) for lr in lrs for r in c["runs"][lr] if r["failure_mode"] == mode]
                    if failed:
                        ax.plot(*zip(*failed), marker, ms=6, mew=1.5, color=color, fillstyle="none")
            lr_axis(ax, results["lrs"], f"{label}{params}")
        row[0].set_ylabel("final val loss (nats/token)")
    for column in axes.T:  # a column's legend under it: every configuration of its panels, whichever sizes ran it
        handles = {}
        for ax in column:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(label, handle)
        column[-1].set_xlabel("peak learning rate")
        column[-1].legend(handles.values(), handles.keys(), fontsize=8, loc="upper center",
                          bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
    fig.suptitle("Stability map: final loss against learning rate (mean over seeds, 95% interval)\nruns that failed: "
                 + ", ".join(f"{m} {mode}" for mode, m in MODE_MARKERS.items()))
    return [save(fig, Path(out_dir) / "stability_map.png", dpi, integer_x=False)]


def plot_lr_transfer(results, out_dir, dpi=90):
    """lr_transfer.png: a panel per configuration run at two sizes or more, its mean curve at each size (one colour
    per size, dark to light as the model grows) with 95% intervals, each curve's best learning rate starred
    (hollow: at an end of the grid, so not measured). Wortsman et al.'s Fig. 1 left (arXiv 2309.14322), and muP's
    transfer plot (Yang et al., arXiv 2203.03466, Fig. 1): under muP the optimum should stay put as the model
    widens. Returns [] where no configuration has two sizes."""
    sizes = results["sizes"]
    names = [n for n in config_names(results) if sum(n in s["configs"] for s in sizes.values()) >= 2]
    if not names:
        return []
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.2 * rows + 1.0), sharey=True, squeeze=False)
    shades = plt.cm.viridis([0.85 * i / max(1, len(sizes) - 1) for i in range(len(sizes))])
    for ax, name in zip(axes.flat, names):
        for shade, (label, size) in zip(shades, sizes.items()):
            if name not in size["configs"]:
                continue
            c = size["configs"][name]
            plot_mean_curve(ax, c, color=shade, ms=3, label=label)
            ax.plot(c["best_lr"], c["best_loss"], "*", ms=13, color=shade,
                    mfc="none" if c["best_lr_at_edge"] else shade)
        lr_axis(ax, results["lrs"], name)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    means = [v for s in sizes.values() for n in names if n in s["configs"]
             for v in s["configs"][n]["mean_loss"].values()]
    axes[0, 0].set_ylim(min(means) - 0.15, max(means) + 0.15)  # the curves, not a 3-seed interval's reach
    for ax in axes[:, 0]:
        ax.set_ylabel("final val loss (nats/token)")
    fig.suptitle("Learning-rate transfer across sizes: mean over seeds, 95% interval; * the best learning rate of "
                 "each size (hollow: at the grid's end)")
    return [save(fig, Path(out_dir) / "lr_transfer.png", dpi, integer_x=False)]


def plot_lr_sensitivity(results, out_dir, dpi=90):
    """lr_sensitivity.png: each configuration's LR sensitivity (with its 95% interval over seeds) against the
    model's parameter count, log axis, one line per configuration: Wortsman et al.'s Fig. 1, right panel (arXiv
    2309.14322); beside it its part above the best learning rate (instability), the part that scale brings out;
    last, the best learning rate of the mean curve against size (hollow: at an end of the grid, so not measured),
    what muP claims to hold still as the model widens."""
    sizes = list(results["sizes"].values())
    names = config_names(results)
    colors = config_colors(names)
    fig, (*axes, legend) = plt.subplots(1, 4, figsize=(21, 5.5), gridspec_kw=dict(width_ratios=(1, 1, 1, 0.45)))
    axes[1].sharey(axes[0])
    for i, config in enumerate(names):
        points = [(s["params"], s["configs"][config]) for s in sizes if s["params"] and config in s["configs"]]
        axes[2].plot([p for p, _ in points], [c["best_lr"] for _, c in points], color=colors[config],
                     linestyle=("-", "--", ":")[i % 3], lw=1)
        for p, c in points:
            axes[2].plot(p, c["best_lr"], "osD^v"[i % 5], ms=6, color=colors[config],
                         mfc="none" if c["best_lr_at_edge"] else colors[config])
    axes[2].set(xscale="log", yscale="log", xlabel="parameters (nanoGPT's count)", ylabel="peak learning rate",
                title="best learning rate against model size")
    for ax, key, title in zip(axes, ("lr_sensitivity", "unstable"),
                              ("LR sensitivity against model size", "its part above the best learning rate")):
        for i, config in enumerate(names):
            points = [(s["params"], s["configs"][config]) for s in sizes if s["params"] and config in s["configs"]]
            if not points:
                continue
            x = [p for p, _ in points]
            y = [c[key] for _, c in points]
            ax.errorbar(x, y, yerr=interval_bars(y, [c[f"{key}_ci95"] for _, c in points]), color=colors[config],
                        linestyle=("-", "--", ":")[i % 3], marker="osD^v"[i % 5], ms=5, capsize=3, label=config)
        ax.set(xscale="log", xlabel="parameters (nanoGPT's count)", title=f"{title} (95% interval over seeds)")
    axes[0].set_ylabel("nats")
    legend.axis("off")  # a panel of its own for the legend, which tight_layout then keeps clear of the others
    legend.legend(*axes[1].get_legend_handles_labels(), fontsize=8, loc="center left")
    return [save(fig, Path(out_dir) / "lr_sensitivity.png", dpi, integer_x=False)]


def main(argv=None):
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="*", default=["out/cpu"], metavar="RUN_DIR",
                        help="a run folder written by train_shakespeare.py (default: out/cpu)")
    parser.add_argument("--arms", metavar="PNG", help="instead of each run's plots, one figure of the val loss, "
                        "attention logits and log Z, mean over seeds with 95%% intervals: each RUN_DIR a folder of "
                        "seed runs (e.g. out/stability_map_v3/4x32/baseline/lr0.1, its seed*/ runs)")
    parser.add_argument("--logits", metavar="PNG", help="instead of each run's plots, one figure of the runs' "
                        "attention-logit and log Z growth side by side (they need --diag-interval > 0); a bare "
                        "file name goes into the first run's folder")
    args = parser.parse_args(argv)
    if args.logits and Path(args.logits).suffix.lower() != ".png":
        parser.error(f"--logits {args.logits}: give a .png file")
    if args.arms:
        arms = {"/".join(Path(d).parts[-2:]): sorted(Path(d).glob("seed*/")) for d in args.run_dirs}
        if empty := [d for d, seeds in zip(args.run_dirs, arms.values()) if not seeds]:
            print(f"error: {', '.join(empty)} holds no seed*/ runs", file=sys.stderr)
            return 2
        print(plot_arms(arms, args.arms)[0])
        return 0
    for folder in args.run_dirs:
        if not (Path(folder) / "log.jsonl").is_file():
            print(f"error: {folder} holds no run (no log.jsonl); give a folder train_shakespeare.py wrote",
                  file=sys.stderr)
            return 2
    if args.logits:
        png = Path(args.logits)
        png = png if png.parent != Path(".") else Path(args.run_dirs[0]) / png  # not into the working folder
        if not png.parent.is_dir():
            print(f"error: --logits {png}: no folder {png.parent}", file=sys.stderr)
            return 2
        records = [read_run(folder) for folder in args.run_dirs]
        if without := [f for f, (_, diag) in zip(args.run_dirs, records)
                       if not any("attn_logit_max" in r for r in diag)]:
            print(f"error: {', '.join(without)} recorded no attention logits (diag.jsonl); train with --diag-interval "
                  "> 0 to plot them", file=sys.stderr)
            return 2
        labels = ["/".join(Path(folder).parts[-3:]) for folder in args.run_dirs]  # e.g. baseline/lr0.1/seed1337
        print(plot_logit_growth(dict(zip(labels, records)), png)[0])
        return 0
    for folder in args.run_dirs:
        print("\n".join(str(p) for p in plot_run(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
