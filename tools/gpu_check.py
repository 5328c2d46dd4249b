"""
The GPU check: every figure the README's GPU paragraph promises, from one command on one GPU (under 8 minutes):

    python -m tools.gpu_check             # on a CUDA machine
    python -m tools.gpu_check --dry-run   # the same code paths at toy sizes on CPU, in under a minute (CI runs it)

1. gpt2-124m training steps (bf16 autocast, torch.compile, fused AdamW, flash attention confirmed), baseline and
   --sdd --lns: tokens/s and MFU (the FLOP count of GPT.estimate_mfu, PaLM's 6N + 12 L H Q T per token).
2. Peak memory of one eager training step of each preset at its micro-batch (torch.cuda.max_memory_allocated).
3. Graphs under torch.compile per flag set: one graph, no graph break, for the training forward.
4. Host syncs in one training step (CUDA's sync debug mode counts them).
5. The shakespeare-char preset to its best val loss, with its wall time (nanoGPT: 1.4697 in ~3 min on an A100).
"""

import argparse
import sys
import time
import warnings

import torch

import prepare_data
import train_shakespeare as ts
from stable_gpt import GPT, GPTConfig
from tools.bench import Runner
from tools.cli import OneLineParser
from tools.runs import TrainError, check_fresh_start, gpu_peak_flops

FLAG_SETS = {"baseline": {}, "sdd+lns": dict(sdd=True, lns=True), "qk_norm": dict(qk_norm=True),
             "peri": dict(norm_position="peri"), "wesar": dict(wesar=True), "z_loss": dict(z_loss=1e-4)}
TOY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)  # --dry-run's shape for every preset


def preset_model(preset, flags, dry_run):
    """(model config, micro-batch) of a preset, at toy size with --dry-run."""
    p = ts.PRESETS[preset]
    shape = TOY if dry_run else {k: p.get(k, getattr(ts.Settings, k)) for k in ("n_layer", "n_head", "n_embd",
                                                                               "block_size")}
    vocab = 50304 if p.get("tokenizer") == "gpt2" else 65
    return GPTConfig(vocab_size=vocab, bias=False, dropout=0.0, **shape, **flags), 2 if dry_run else p["batch_size"]


def Step(config, batch_size, device, compiled):
    """One model stepped as the training script steps it (autocast, clip, update): the benchmark's Runner."""
    torch.manual_seed(0)
    return Runner(GPT(config), batch_size, device, compiled)


def flash_attention_runs(device):
    """Whether SDPA's flash kernel takes a causal bf16 attention of the model's layout (it raises if not)."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 1024, 64, device=device, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return True


def check_throughput(args, device):
    peak = gpu_peak_flops(device)
    print(f"1. gpt2-124m steps (flash attention: {flash_attention_runs(device)}, peak {peak} FLOP/s)")
    for name in ("baseline", "sdd+lns"):
        config, batch = preset_model("gpt2-124m", FLAG_SETS[name], args.dry_run)
        step = Step(config, batch, device, compiled=not args.dry_run)  # on CPU compiling would take minutes
        step.step()  # warm-up (and compilation)
        dt = step.time(2 if args.dry_run else 20)
        mfu = step.model.estimate_mfu(batch, dt, peak) if peak else None
        print(f"   {name:<8} {batch * config.block_size / dt:12,.0f} tok/s" + (f"  MFU {mfu:.1%}" if mfu else ""))


def check_memory(args, device):
    print("2. peak memory of one step at each preset's micro-batch")
    for preset in ts.PRESETS:
        config, batch = preset_model(preset, {}, args.dry_run)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = Step(config, batch, device, compiled=False)  # eager: compiling six presets would take the budget
        step.model.grad_checkpointing = ts.PRESETS[preset].get("grad_checkpoint", False)
        step.step()
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "(CPU)"
        print(f"   {preset:<17} batch {batch:>3}: {peak}")
        del step


def check_graphs(args, device):
    print("3. graphs of the training forward under torch.compile (one graph, no break, for every flag set)")
    for name, flags in FLAG_SETS.items():
        config, batch = preset_model("shakespeare-char", flags, dry_run=True)
        torch._dynamo.reset()
        model = GPT(config).to(device)
        x = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)
        explained = torch._dynamo.explain(model)(x, x)
        print(f"   {name:<8} graphs {explained.graph_count}, breaks {explained.graph_break_count}")


def check_syncs(args, device):
    if device.type != "cuda":
        return print("4. host syncs per step: (CUDA only)")
    step = Step(*preset_model("gpt2-124m", {}, args.dry_run), device, compiled=not args.dry_run)
    step.step()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step.step()
    torch.cuda.set_sync_debug_mode("default")
    print(f"4. host syncs in one gpt2-124m step: {sum('synchroniz' in str(w.message) for w in caught)}")


def check_shakespeare(args, device, out_dir):
    print("5. shakespeare-char to its best val loss")
    extra = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
             "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "2", "--no-compile"] if args.dry_run else []
    started = time.time()
    code = ts.main(["--preset", "shakespeare-char", "--out-dir", out_dir, "--device", device.type,
                    "--max-new-tokens", "20", *(["--overwrite"] if args.overwrite else []),
                    *(["--data", args.data] if args.data else []), *extra])
    print(f"   exit {code}, {time.time() - started:.0f} s for the whole run (see the lines above for the loss)")
    return code


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="toy sizes on CPU: the code paths, no figures")
    p.add_argument("--data", help="the shakespeare-char run's --data (default: tiny Shakespeare)")
    p.add_argument("--out-dir", default="out/gpu_check", help="where the shakespeare-char run goes")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out-dir")
    args = p.parse_args(argv)
    try:  # a run already there, or data that is not, refused before any check spends the GPU's minutes
        check_fresh_start(args.out_dir, args.overwrite)
        prepare_data.load_prepared(args.data)  # (tiny Shakespeare when None: found, or downloaded once)
    except (TrainError, prepare_data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; --dry-run runs the same code paths on CPU")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for check in (check_throughput, check_memory, check_graphs, check_syncs):
        check(args, device)
    return check_shakespeare(args, device, args.out_dir)  # its exit code: a failed run fails the check


if __name__ == "__main__":
    raise SystemExit(main())
