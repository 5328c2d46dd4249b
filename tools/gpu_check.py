"""
The GPU check: does this code run at full speed on one GPU, and does it train as nanoGPT does? Two parts, each
under ~5 minutes on one H100-class GPU, each printing a verdict per figure (against THRESHOLDS below) and writing
them as JSON into --out-dir:

    python -m tools.gpu_check --prepare            # here, once, online or with the shared copies: tiny Shakespeare
                                                   # (char and GPT-2 BPE) and the BPE files into data/gpu_check,
                                                   # the folder a GPU machine needs carried to it
    python -m tools.gpu_check --part speed         # on the GPU: gpt2-124m through the training loop
    python -m tools.gpu_check --part shakespeare   # on the GPU: the shakespeare-char preset to its best val
    python -m tools.gpu_check --part stabilizers   # on the GPU, when time allows: the 2025-26 flags' throughput
    python -m tools.gpu_check --dry-run            # both parts' code paths at toy sizes on CPU (CI runs it)

speed: gpt2-124m (--preset gpt2-124m: its micro-batch, block 1024, gradient accumulation to 2^19 tokens per
step, bf16 autocast, torch.compile) for STEPS steps of the real training loop in each of CONFIGS: tokens/s and
MFU (the median of the logged step times after the warm-up), peak memory, graphs compiled and graph breaks
(dynamo's counters); then the baseline's isolated step (tools.bench's Runner: one micro-batch, no data loading,
no logging) for the loop's overhead, and one profiled step that names the attention kernel.
shakespeare: `--preset shakespeare-char` as it is (nanoGPT's GPU config: val 1.4697 in ~3 minutes on an A100),
its best val loss and the whole command's time.
stabilizers (a third call, only when asked): the same loop in each of STABILIZERS (muP, the attention sink, ZClip,
skip-step, mHC), each one's tokens/s against the baseline's, peak memory and graph breaks.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import prepare_data
import train_shakespeare as ts
from stable_gpt import GPT
from tools.bench import Runner
from tools.cli import OneLineParser
from tools.runs import (TrainError, check_fresh_start, compile_or_eager, gpu_peak_flops, parse_or_none,
                        write_json_atomically)

DATA = Path("data/gpu_check")  # what --prepare writes and a GPU machine needs carried (ignored by git: data/)
CONFIGS = {"baseline": [], "sdd+lns": ["--sdd", "--lns"], "muon": ["--optimizer", "muon"],
           "qk-clip": ["--optimizer", "muon", "--qk-clip", "100"]}
# the 2025-26 stabilizers (issue 32), --part stabilizers: each against the baseline in the same part, with the
# relative throughput expected of it (expectations from what each adds, not measurements): muP adds no work; the
# sink widens the head by one column (flash pads 64 to 72: +12.5% of the attention's FLOPs); ZClip and skip-step
# sync the host once per step; mHC's unfused fp32 stream mixing moves 4 streams per sublayer (the paper's fused
# kernels cost 6.7%; this reference's einsums, far more)
STABILIZERS = {"baseline": ([], None), "mup": (["--mup"], 0.95), "attn-sink": (["--attn-sink"], 0.85),
               "zclip": (["--zclip"], 0.9), "skip-spikes": (["--skip-spikes"], 0.9),
               "mhc": (["--hyper-connections", "mhc"], 0.5)}
STEPS, LOG_EVERY, WARMUP = 20, 4, 8  # speed: steps per configuration, logged every 4, the first 8 not timed
# What "full speed" means on an H100/H200 (issue 33, from the project's own FLOP count, 855 MFLOP/token): llm.c's
# 468K tokens/s per H100 is ~40% MFU; a compiled PyTorch path should give ~420-520K, below ~350K something is wrong.
THRESHOLDS = dict(baseline_tokens_per_s=400e3, sdd_lns_vs_baseline=0.8, loop_vs_isolated=0.95, graph_breaks=0,
                  graphs=2, shakespeare_val=(1.45, 1.49), shakespeare_seconds=240)
TOY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "2",
       "--grad-accum", "2", "--device", "cpu"]  # --dry-run's shape and device (compiled where a compiler works)


def prepare_device_data(data_dir, text=None):
    """--prepare: a text (default tiny Shakespeare) tokenized both ways into DATA_DIR/char and DATA_DIR/gpt2, and
    the GPT-2 BPE file tiktoken reads into DATA_DIR/tiktoken_cache: all a GPU machine without internet needs."""
    text = text or prepare_data.find_shakespeare()
    for tokenizer in ("char", "gpt2"):
        prepare_data.prepare(text, data_dir / tokenizer, tokenizer)
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or prepare_data.SHARED / "tiktoken_cache")
    if not cache.is_dir():
        raise TrainError(f"no tiktoken cache at {cache} to copy; set TIKTOKEN_CACHE_DIR to one")
    shutil.copytree(cache, data_dir / "tiktoken_cache", dirs_exist_ok=True)
    print(f"wrote {data_dir}/char, gpt2 and tiktoken_cache; carry {data_dir} to the GPU machine")


def check_device_data(data_dir, parts):
    """Before any compile: the prepared folders each part needs, and the BPE files, in one line if missing."""
    for name in [{"speed": "gpt2", "shakespeare": "char", "stabilizers": "gpt2"}[part] for part in parts]:
        try:
            prepare_data.load_prepared(data_dir / name)
        except prepare_data.DataError as e:
            raise TrainError(f"{e}: run `python -m tools.gpu_check --prepare` where the data is, and carry "
                             f"{data_dir} to this machine") from None
    if "speed" in parts or "stabilizers" in parts:
        if (data_dir / "tiktoken_cache").is_dir():
            os.environ["TIKTOKEN_CACHE_DIR"] = str(data_dir / "tiktoken_cache")
        prepare_data.Codec(prepare_data.load_meta(data_dir / "gpt2"))  # the BPE files, or one line (offline)


def verdict(ok, dry_run):
    return "n/a (dry run)" if dry_run else "PASS" if ok else "FAIL"


def steady_step_ms(run_dir):
    """The median logged step time after the warm-up (log.jsonl's ms of each logged step)."""
    log = [r for r in map(parse_or_none, (run_dir / "log.jsonl").read_text().splitlines()) if r and "ms" in r]
    return statistics.median(r["ms"] for r in log if r["iter"] > WARMUP)


def loop_runs(args, device, part, configs):
    """{name: figures} of gpt2-124m through the training loop in each configuration ({name: flags})."""
    results, peak = {}, gpu_peak_flops(device)
    compile_or_eager(None, device, say=lambda m: None)  # its probe's graph, once, before the counting starts
    for name, flags in configs.items():
        run_dir = Path(args.out_dir) / part / name
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        code = ts.main(["--preset", "gpt2-124m", "--data", str(args.data_dir / "gpt2"), "--out-dir",
                        str(run_dir), "--max-iters", str(STEPS), "--log-interval", str(LOG_EVERY), "--eval-iters", "2",
                        "--eval-interval", str(STEPS), "--diag-interval", "0", "--max-new-tokens", "8",
                        "--num-samples", "1", *(["--overwrite"] if args.overwrite else []), *flags,
                        *(TOY if args.dry_run else [])])
        if code != 0:
            raise TrainError(f"the {name} run exited {code} (see above)")
        summary = json.loads((run_dir / "summary.json").read_text())
        ms = steady_step_ms(run_dir)
        counters = torch._dynamo.utils.counters
        results[name] = dict(tokens_per_s=summary["tokens_per_step"] / (ms / 1000), step_ms=ms,
                             mfu=model_mfu(summary, ms / 1000, peak),
                             peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30
                             if device.type == "cuda" else None,
                             graphs=counters["stats"]["unique_graphs"],
                             graph_breaks=sum(counters["graph_break"].values()))
    for name, r in results.items():
        print(f"   {name:<11} {r['tokens_per_s']:12,.0f} tok/s  {r['step_ms']:8.1f} ms/step"
              + (f"  MFU {r['mfu']:.1%}" if r["mfu"] else "") + (f"  peak {r['peak_memory_gib']:.1f} GiB"
                                                                 if r["peak_memory_gib"] is not None else "")
              + f"  graphs {r['graphs']}, breaks {r['graph_breaks']}")
    return results


def part_speed(args, device):
    """gpt2-124m through the training loop in each configuration, then the isolated step and the profiler."""
    results = loop_runs(args, device, "speed", CONFIGS)
    isolated = isolated_step(args, device)
    graphs = graphs_of_every_flag_set(device)
    base, dry = results["baseline"], args.dry_run
    checks = {
        "baseline tokens/s": (base["tokens_per_s"], f">= {THRESHOLDS['baseline_tokens_per_s']:,.0f}",
                              base["tokens_per_s"] >= THRESHOLDS["baseline_tokens_per_s"]),
        "sdd+lns / baseline": (results["sdd+lns"]["tokens_per_s"] / base["tokens_per_s"],
                               f">= {THRESHOLDS['sdd_lns_vs_baseline']}",
                               results["sdd+lns"]["tokens_per_s"] / base["tokens_per_s"]
                               >= THRESHOLDS["sdd_lns_vs_baseline"]),
        "loop / isolated step": (base["tokens_per_s"] / isolated["tokens_per_s"],
                                 f">= {THRESHOLDS['loop_vs_isolated']}",
                                 base["tokens_per_s"] / isolated["tokens_per_s"] >= THRESHOLDS["loop_vs_isolated"]),
        "graph breaks (every config)": (max(r["graph_breaks"] for r in results.values()), "0",
                                        all(r["graph_breaks"] == 0 for r in results.values())),
        "graphs per config (train + eval)": (max(r["graphs"] for r in results.values()), f"<= {THRESHOLDS['graphs']}",
                                             all(r["graphs"] <= THRESHOLDS["graphs"] for r in results.values())),
        "every flag set's training forward: one graph, no break": (
            {k: f"{g} graph(s), {b} break(s)" for k, (g, b) in graphs.items() if (g, b) != (1, 0)} or "all",
            "all", all(v == (1, 0) for v in graphs.values())),
        "attention kernel": (isolated["attention_kernel"], "a flash / cuDNN / efficient kernel",
                             any(k in (isolated["attention_kernel"] or "").lower() for k in ("flash", "cudnn",
                                                                                            "efficient", "fmha"))),
    }
    print(f"   isolated baseline step: {isolated['tokens_per_s']:,.0f} tok/s; attention: {isolated['attention_kernel']}")
    return dict(configs=results, isolated=isolated, graphs_by_flag_set=graphs, checks={k: dict(value=v, want=want, verdict=verdict(ok, dry))
                                                            for k, (v, want, ok) in checks.items()})


def part_stabilizers(args, device):
    """The 2025-26 stabilizers at gpt2-124m through the training loop: each one's throughput against the baseline's
    (STABILIZERS' expectations), its peak memory, graphs and graph breaks."""
    results = loop_runs(args, device, "stabilizers", {k: flags for k, (flags, _) in STABILIZERS.items()})
    base = results["baseline"]["tokens_per_s"]
    checks = {f"{name} / baseline tokens/s": (results[name]["tokens_per_s"] / base, f">= {want}",
                                              results[name]["tokens_per_s"] / base >= want)
              for name, (_, want) in STABILIZERS.items() if want is not None}
    checks["graph breaks (every config)"] = (max(r["graph_breaks"] for r in results.values()), "0",
                                             all(r["graph_breaks"] == 0 for r in results.values()))
    return dict(configs=results, checks={k: dict(value=v, want=want, verdict=verdict(ok, args.dry_run))
                                         for k, (v, want, ok) in checks.items()})


def model_mfu(summary, step_s, peak):
    """MFU of a logged step (GPT.estimate_mfu's FLOP count, over the GPU's bf16 peak); None without a peak."""
    if not peak:
        return None
    with torch.device("meta"):
        model = GPT(ts.model_config(ts.Settings(**summary["config"]), summary["model_args"]["vocab_size"]))
    sequences = summary["tokens_per_step"] // summary["model_args"]["block_size"]
    return model.estimate_mfu(sequences, step_s, peak)


def isolated_step(args, device):
    """The baseline's step alone (tools.bench's Runner at the preset's micro-batch: no data loading, no logging,
    no accumulation), compiled as the loop is; and one profiled step, for the name of the attention kernel."""
    cfg = ts.resolve(ts.settings_given(ts.build_parser().parse_args(
        ["--preset", "gpt2-124m", *(TOY if args.dry_run else [])])))
    config = ts.model_config(cfg, 50304)
    torch._dynamo.reset()
    runner = Runner(GPT(config), cfg.batch_size, device, compile_model=compile_or_eager(None, device, say=lambda m: None))
    runner.time(3)  # warm-up (and compilation)
    dt = runner.time(3 if args.dry_run else 10)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                          if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        runner.time(1)
    names = [e.key for e in prof.key_averages() if any(w in e.key.lower() for w in ("attention", "flash", "fmha",
                                                                                    "sdpa"))]
    forward = [n for n in names if "backward" not in n.lower()] or names  # the forward's kernel names the choice
    kernels = [n for n in forward if not n.startswith(("aten::", "autograd::"))] or forward  # a device kernel first
    return dict(tokens_per_s=runner.tokens / dt, step_ms=dt * 1000, attention_kernel=kernels[0] if kernels else None)


# every flag alone (and OLMo 2's set), for the graph check: the training forward of each must be one graph
FLAG_SETS = {"baseline": {}, "sdd": dict(sdd=True), "lns": dict(lns=True), "wesar": dict(wesar=True),
             "lir+tvr": dict(lir=True, tvr=True), "post": dict(norm_position="post"), "mix": dict(norm_position="mix"),
             "deepnorm": dict(norm_position="deepnorm"), "peri": dict(norm_position="peri"),
             "reorder": dict(norm_position="reorder"), "qk_norm": dict(qk_norm=True),
             "olmo2": dict(norm_position="reorder", qk_norm=True, qk_norm_full=True, norm="rmsnorm", z_loss=1e-5),
             "qk_clip": dict(qk_clip=30.0), "attn_gate": dict(attn_gate=True), "z_loss": dict(z_loss=1e-4),
             "softcap": dict(logit_softcap=30.0), "rmsnorm": dict(norm="rmsnorm"), "dyt": dict(norm="dyt"),
             "attn_sink": dict(attn_sink=True), "hc": dict(hyper_connections="hc"),
             "mhc": dict(hyper_connections="mhc"), "mup": dict(mup=True)}


def graphs_of_every_flag_set(device):
    """{flag set: (graphs, graph breaks)} of the training forward and loss under dynamo, at a small shape."""
    counts = {}
    for name, flags in FLAG_SETS.items():
        torch._dynamo.reset()
        model = GPT(ts.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=128, bias=False,
                                 **flags)).to(device).train()
        x = torch.randint(0, 128, (2, 64), device=device)
        explained = torch._dynamo.explain(model)(x, x)
        counts[name] = (explained.graph_count, explained.graph_break_count)
    return counts


def part_shakespeare(args, device):
    """The shakespeare-char preset as it is, to its best val loss, and the whole command's time."""
    run_dir = Path(args.out_dir) / "shakespeare"
    started = time.time()
    toy = ["--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2", *TOY] if args.dry_run else []
    code = ts.main(["--preset", "shakespeare-char", "--data", str(args.data_dir / "char"), "--out-dir",
                    str(run_dir), "--max-new-tokens", "20", *(["--overwrite"] if args.overwrite else []), *toy])
    seconds = time.time() - started
    if code != 0:
        raise TrainError(f"the shakespeare-char run exited {code} (see above)")
    best = json.loads((run_dir / "summary.json").read_text())["best_val_loss"]
    low, high = THRESHOLDS["shakespeare_val"]
    checks = {"best val loss (nanoGPT: 1.4697)": (best, f"{low}-{high}", low <= best <= high),
              "seconds, the whole command": (seconds, f"<= {THRESHOLDS['shakespeare_seconds']}",
                                             seconds <= THRESHOLDS["shakespeare_seconds"])}
    return dict(best_val_loss=best, seconds=seconds, checks={k: dict(value=v, want=want, verdict=verdict(ok, args.dry_run))
                                                             for k, (v, want, ok) in checks.items()})


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("speed", "shakespeare", "stabilizers"),
                   help="one part (default: speed and shakespeare, ~10 minutes; stabilizers: the 2025-26 flags' "
                        "throughput, ~5 minutes, only when asked)")
    p.add_argument("--prepare", action="store_true", help="write the data a GPU machine needs into --data-dir")
    p.add_argument("--text", help="with --prepare: the text to tokenize (default: tiny Shakespeare)")
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: the code paths, no figures")
    p.add_argument("--data-dir", type=Path, default=DATA,
                   help=f"the prepared char/, gpt2/ and tiktoken_cache/ (default {DATA})")
    p.add_argument("--out-dir", default="out/gpu_check", help="where the runs and gpu_check_<part>.json go")
    p.add_argument("--overwrite", action="store_true", help="replace the runs already in --out-dir")
    args = p.parse_args(argv)
    parts = [args.part] if args.part else ["speed", "shakespeare"]
    try:
        if args.prepare:
            prepare_device_data(args.data_dir, args.text)
            return 0
        # before any check spends the GPU's minutes: a folder of its own, runs already there, the data, the device
        out_dir = Path(args.out_dir)
        if out_dir.is_dir() and (foreign := sorted(p.name for p in out_dir.iterdir() if p.name not in (
                "speed", "shakespeare", "stabilizers") and not p.name.startswith("gpu_check_"))):
            raise TrainError(f"--out-dir {out_dir} holds other files ({', '.join(foreign[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}); give the GPU check a folder of its own")
        for part in parts:
            for name in {"speed": CONFIGS, "stabilizers": STABILIZERS}.get(part, ["."]):
                check_fresh_start(str(Path(args.out_dir) / part / name), args.overwrite)
        check_device_data(args.data_dir, parts)
        if not args.dry_run and not torch.cuda.is_available():
            raise TrainError("no CUDA device here; --dry-run runs the same code paths on CPU")
        device = torch.device("cpu" if args.dry_run else "cuda")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        failed = False
        for part in parts:
            print(f"--- gpu_check: {part} ---")
            result = {"speed": part_speed, "shakespeare": part_shakespeare, "stabilizers": part_stabilizers}[part](
                args, device)
            result.update(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
                          torch=torch.__version__, thresholds=THRESHOLDS)
            for name, c in result["checks"].items():
                value = f"{c['value']:,.3f}" if isinstance(c["value"], float) else str(c["value"])
                print(f"   {c['verdict']:<14} {name}: {value} (want {c['want']})")
                failed |= c["verdict"] == "FAIL"
            path = Path(args.out_dir) / f"gpu_check_{part}.json"
            write_json_atomically(path, result)
            print(f"   wrote {path}")
    except (TrainError, prepare_data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
