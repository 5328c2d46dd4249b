"""
Train a stable-gpt model on tiny Shakespeare (or any text), then sample from it.

    python train_shakespeare.py                        # CPU quick preset: a Shakespeare model in ~3 minutes
    python train_shakespeare.py --sdd --lns            # the same with SDD and LayerNorm Scaling
    python train_shakespeare.py --norm-position post --lr 5e-3   # stress a Post-LN model
    python train_shakespeare.py --preset shakespeare-char        # nanoGPT's GPU config
    python train_shakespeare.py --compare baseline "--sdd" --lrs 1e-3 1e-2 1e-1   # a stability map (LR sweep)
    python train_shakespeare.py --resume               # continue the run in --out-dir
    python train_shakespeare.py --sample --prompt "ROMEO:"       # sample from the run in --out-dir
    torchrun --standalone --nproc_per_node=8 train_shakespeare.py --preset gpt2-124m --data DIR

Every hyperparameter is a flag that overrides the preset (--help lists them). Writes to --out-dir:
ckpt.pt (latest, for --resume), best.pt (best val loss), log.jsonl (one line per logged step and eval),
diag.jsonl (per-layer diagnostics) and summary.json.
"""

import argparse
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare_data
import stable_gpt
from prepare_data import Codec, DataError
from stable_gpt import GPT, GPT2_SIZES, NORM_POSITIONS, NORMS, GPTConfig
from support import (Batches, DiagnosticsRecorder, JsonlLog, RunLock, SpikeWatch, StepTimer, StopRequest,
                     TrainError, parse_or_none,
                     checkpoint_model_state, clear_outputs, finite_or_null, fmt_time, gpu_peak_flops,
                     keep_freed_memory, link_checkpoint, load_checkpoint, pick_device, pick_dtype, save_checkpoint)

MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # vocab comes from the data
TECHNIQUES = ("sdd", "lns", "wesar", "lir", "tvr")

# Training defaults under every preset (nanoGPT's train.py values unless said otherwise).
DEFAULTS = dict(
    {f.name: f.default for f in fields(GPTConfig) if f.name != "vocab_size"},
    bias=False, tokenizer="char", data=None, batch_size=12, grad_accum=1, max_iters=5000, lr=6e-4,
    min_lr=None, warmup_iters=100, lr_decay_iters=None, weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0, sdd_official_decay=True, init_from=None, eval_interval=250, eval_iters=200, log_interval=10,
    seed=1337,
    device="auto", dtype="auto", compile=None, out_dir=None, diag_interval=100, spike_factor=1.2, spike_window=50,
    plot=False, grad_checkpoint=False, skip_nonfinite=False,
)
GPT2_COMMON = dict(tokenizer="gpt2", block_size=1024, max_iters=600000, warmup_iters=2000, beta2=0.95, dropout=0.0,
                   eval_interval=1000, eval_iters=200, log_interval=10, diag_interval=1000)
PRESETS = {
    # CPU quick preset: nanoGPT's README CPU model (4/4/128, block 64), fed 2.7x the tokens per step (batch 32)
    # at a 3x higher learning rate for 1300 steps: val 1.73 in ~165 s on 2 cores (nanoGPT's recipe: 1.886)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=1300, lr=3e-3,
                min_lr=3e-4, warmup_iters=100, beta2=0.99, dropout=0.0, eval_interval=250, eval_iters=20),
    # nanoGPT's config/train_shakespeare_char.py: val ~1.47 on one A100 in ~3 minutes
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000,
                             lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, dropout=0.2,
                             eval_interval=250, eval_iters=200),
    # GPT-2 sizes with BPE and block 1024, ~0.5M tokens (2^19) per optimizer step as GPT-2/GPT-3 used, with the
    # micro-batch sized for one 80 GB GPU in bf16 and the rest as accumulation (split across torchrun ranks).
    # Learning rates from the GPT-3 paper's table (arXiv 2005.14165, Table 2.1) for the nearest size.
    "gpt2-124m": dict(GPT2_COMMON, n_layer=12, n_head=12, n_embd=768, batch_size=32, grad_accum=16, lr=6e-4,
                      min_lr=6e-5),
    "gpt2-350m": dict(GPT2_COMMON, n_layer=24, n_head=16, n_embd=1024, batch_size=16, grad_accum=32, lr=3e-4,
                      min_lr=3e-5),
    "gpt2-774m": dict(GPT2_COMMON, n_layer=36, n_head=20, n_embd=1280, batch_size=8, grad_accum=64, lr=2.5e-4,
                      min_lr=2.5e-5),
    "gpt2-1.5b": dict(GPT2_COMMON, n_layer=48, n_head=25, n_embd=1600, batch_size=8, grad_accum=64, lr=2e-4,
                      min_lr=2e-5, grad_checkpoint=True),
}


# ----------------------------------------------------------------------------------------------------
# Command line


def default(key):
    """The "(default: X)" of a help text, read from DEFAULTS, or from the presets where they set the key."""
    if any(key in preset for preset in PRESETS.values()):
        return f" (default: the preset's; cpu: {PRESETS['cpu'].get(key, DEFAULTS[key])})"
    return f" (default: {DEFAULTS[key]})"


def flag(group, name, help):
    """Every on/off flag: --x / --no-x, None when not given (then the preset or default decides)."""
    group.add_argument(name, action=argparse.BooleanOptionalAction, help=help)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=None)
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=sorted(PRESETS), help="base config (default: cpu, or shakespeare-char "
                   "with CUDA); every flag below overrides it")
    g.add_argument("--data", help="a text file (tokenized on first use and cached under data/cache) or a folder "
                   "with train.bin/val.bin (prepare_data.py or nanoGPT format); default: tiny Shakespeare")
    g.add_argument("--tokenizer", choices=prepare_data.TOKENIZERS, help="char level or GPT-2 BPE, for text input"
                   + default("tokenizer"))
    g.add_argument("--out-dir", help="where checkpoints and logs go (default: out/<preset>[-<flags>])")
    flag(g, "--resume", "continue the run in --out-dir from its ckpt.pt")
    flag(g, "--overwrite", "start afresh in an --out-dir that holds a run (refused without it, so that no run is "
         "lost by accident)")
    flag(g, "--skip-nonfinite", "on a non-finite loss or gradient, skip that update and go on (counted in "
         "summary.json) instead of stopping")
    g.add_argument("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps" + default("device"))
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="autocast dtype; auto: bfloat16 on CUDA if supported, else float16 with a GradScaler; "
                   "float32 elsewhere" + default("dtype"))
    flag(g, "--compile", "torch.compile the model (default: on with CUDA; on CPU it needs a C++ compiler, compiles "
         "for 20-40 s, and makes --sdd cost ~1.1x the baseline instead of ~1.2x)")
    g.add_argument("--init-from", choices=GPT2_SIZES, help="start from OpenAI's GPT-2 weights (Hugging Face; needs "
                   "the transformers package and the weights downloaded or cached): the model's shape is GPT-2's, "
                   "the context is cropped to --block-size, the tokenizer is gpt2")
    g.add_argument("--seed", type=int, help="seed for init, data order and dropout" + default("seed"))

    add_model_flags(p)

    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch" + default("batch_size"))
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (split across DDP ranks)"
                   + default("grad_accum"))
    g.add_argument("--max-iters", type=int, help="optimizer steps" + default("max_iters"))
    g.add_argument("--lr", type=float, help="peak learning rate" + default("lr"))
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine decay (default: the preset's "
                   "ratio to its --lr, 1/10, times --lr)")
    g.add_argument("--warmup-iters", type=int, help="linear warmup steps" + default("warmup_iters"))
    g.add_argument("--lr-decay-iters", type=int, help="steps of the cosine decay (default: --max-iters)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (which tensors: see README)"
                   + default("weight_decay"))
    g.add_argument("--beta1", type=float, help="AdamW beta1" + default("beta1"))
    g.add_argument("--beta2", type=float, help="AdamW beta2" + default("beta2"))
    g.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this (0: off)"
                   + default("grad_clip"))
    flag(g, "--grad-checkpoint", "activation checkpointing: recompute each block in the backward (less memory, "
         "~1/3 more compute; on by default for gpt2-1.5b)")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, help="evaluate (and checkpoint) every this many steps"
                   + default("eval_interval"))
    g.add_argument("--eval-iters", type=int, help="batches per split per evaluation" + default("eval_iters"))
    g.add_argument("--log-interval", type=int, help="print and log every this many steps" + default("log_interval"))
    g.add_argument("--diag-interval", type=int, help="record per-layer diagnostics to diag.jsonl every this many "
                   "steps (0: off)" + default("diag_interval"))
    g.add_argument("--spike-factor", type=float, help="a loss spike is a step loss above this times the median "
                   "of the previous --spike-window steps" + default("spike_factor"))
    g.add_argument("--spike-window", type=int, help="steps in the spike detector's running median"
                   + default("spike_window"))
    flag(g, "--plot", "write PNG plots into --out-dir at the end")

    g = p.add_argument_group("compare runner")
    g.add_argument("--compare", nargs="+", metavar="CONFIG", help="run several configurations (each a quoted string "
                   "of flags, or 'baseline') on the same data, seeds and budget; every other flag is common to all. "
                   "Writes compare.md and compare.png into --out-dir (default out/compare). Finished runs are "
                   "not redone. Its configurations run up to --seeds, --lrs or the end of the command")
    g.add_argument("--seeds", type=int, default=1, help="with --compare or --lrs: seeds per configuration (seed, "
                   "seed+1, ...) (default: %(default)s)")
    g.add_argument("--lrs", nargs="+", type=float, metavar="LR", help="learning-rate sweep (Wortsman et al., arXiv "
                   "2309.14322): every configuration of --compare (or the one on the command line) at each of these "
                   "peak learning rates (--min-lr follows at the preset's ratio unless given). Writes lr_sweep.json, "
                   "lr_sweep.md (final val loss per learning rate, LR sensitivity) and lr_sweep.png into --out-dir "
                   "(default out/lr_sweep)")

    g = p.add_argument_group("sampling")
    flag(g, "--sample", "only sample from --out-dir/ckpt.pt")
    g.add_argument("--prompt", help="start of the sample (default: a newline, or where the vocabulary has none, "
                   "its first token)")
    g.add_argument("--num-samples", type=int, default=1, help="number of samples (default: %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=500, help="tokens per sample (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, > 0 (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens, 0: all "
                   "(default: %(default)s)")
    return p


def add_model_flags(p):
    """The model's flags: shape, normalization, the four papers' stabilizers and the practitioners' fixes."""
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, help="number of blocks" + default("n_layer"))
    g.add_argument("--n-head", type=int, help="attention heads (must divide --n-embd)" + default("n_head"))
    g.add_argument("--n-embd", type=int, help="width of the residual stream" + default("n_embd"))
    g.add_argument("--block-size", type=int, help="context length in tokens" + default("block_size"))
    g.add_argument("--dropout", type=float, help="dropout probability" + default("dropout"))
    flag(g, "--bias", "biases in Linears and norms (default: off, as nanoGPT's configs)")
    g.add_argument("--norm", choices=NORMS, help="normalization layer" + default("norm"))
    g.add_argument("--norm-position", choices=NORM_POSITIONS,
                   help="pre: x + f(norm(x)) (GPT-2); post: norm(x + f(x)) (Vaswani); mix: first --mix-fraction "
                   "of blocks post, rest pre (Mix-LN); deepnorm: norm(alpha x + f(x)) with DeepNet's init; "
                   "peri: x + norm(f(norm(x))) (Peri-LN, Gemma 2)"
                   + default("norm_position"))
    g.add_argument("--mix-fraction", type=float, help="Mix-LN: fraction of Post-LN blocks at the bottom"
                   + default("mix_fraction"))
    g.add_argument("--init-std", "--lir-sigma", dest="init_std", type=float,
                   help="base init std sigma of every matrix (GPT-2's); with --lir block l gets sigma/sqrt(l) "
                   "(the LIR paper's preset is 0.006 at width 2048)" + default("init_std"))
    flag(g, "--scaled-init", "GPT-2's c_proj init std/sqrt(2 n_layer) (default: on only for plain Pre-LN; off with "
         "--sdd, --lns, --lir)")

    g = p.add_argument_group("stabilizers (each off by default: then the model is nanoGPT's)")
    flag(g, "--sdd", "Scale-Distribution Decoupling (arXiv 2502.15499): RMSNorm + learnable gain on the output of "
         "every block linear, and on the embeddings")
    flag(g, "--sdd-official-decay", "with --sdd, the official SDD configs' weight-decay groups: every norm gain and "
         "bias decayed, the embeddings not (default: on; --no-sdd-official-decay: nanoGPT's groups)")
    flag(g, "--lns", "LayerNorm Scaling (arXiv 2502.05795): pre-norm output of layer l times 1/sqrt(l) (under "
         "--sdd: each branch output, this project's adaptation)")
    flag(g, "--wesar", "WeSaR (arXiv 2410.05052): raw matrices of one common std, one learnable gate per matrix")
    g.add_argument("--wesar-sigma", type=float, help="WeSaR's common raw std" + default("wesar_sigma"))
    flag(g, "--lir", "Layer Index Rescaling init (arXiv 2503.17500): block l matrices ~ N(0, (sigma/sqrt(l))^2)")
    flag(g, "--tvr", "Target Variance Rescaling (arXiv 2503.17500): every --tvr-interval steps, rescale each block "
         "matrix whose std exceeds the target back to it")
    g.add_argument("--tvr-target", type=float, help="TVR target std (see README)" + default("tvr_target"))
    g.add_argument("--tvr-interval", type=int, help="TVR interval in optimizer steps" + default("tvr_interval"))
    g.add_argument("--tvr-threshold", type=float, help="rescale only when std > threshold * target"
                   + default("tvr_threshold"))

    g = p.add_argument_group("the fixes practitioners use (off by default), to weigh the papers against")
    flag(g, "--qk-norm", "a norm (--norm's type, with a gain) on q and k per head before attention (OLMo 2; "
         "Wortsman et al., arXiv 2309.14322); refused with --sdd, which already normalizes q and k")
    g.add_argument("--z-loss", type=float, metavar="COEF", help="add COEF * mean(log^2 Z) of the output logits to "
                   "the training loss (PaLM, arXiv 2204.02311; Wortsman et al. use 1e-4); logged apart, never in "
                   "the val loss" + default("z_loss"))
    g.add_argument("--logit-softcap", type=float, metavar="C", help="C * tanh(logits / C) on the output logits "
                   "(Gemma 2; 0: off)" + default("logit_softcap"))


# model settings that --init-from takes from GPT-2 (its sizes come from stable_gpt.GPT2_SIZES)
GPT2_MODEL = dict(bias=True, norm="layernorm", norm_position="pre", sdd=False, lns=False, wesar=False, lir=False,
                  init_std=DEFAULTS["init_std"], scaled_init=None, qk_norm=False, logit_softcap=0.0)


def resolve_config(args, base=None):
    """The run's config, every setting resolved here: DEFAULTS < preset (or, on --resume, the checkpoint's
    config) < flags given. Returns (cfg, the flags given)."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k in DEFAULTS}  # the rest is CLI-only
    if base is None:
        preset = args.preset or ("shakespeare-char" if torch.cuda.is_available() else "cpu")
        base = dict(DEFAULTS, **PRESETS[preset], preset=preset)
    cfg = dict(base, **explicit)
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["lr"] / 10
    elif "lr" in explicit and "min_lr" not in explicit:  # the preset's final/peak ratio, at the new peak
        cfg["min_lr"] = base["min_lr"] * cfg["lr"] / base["lr"]
    cfg["lr_decay_iters"] = cfg["lr_decay_iters"] or cfg["max_iters"]
    if cfg["init_from"]:
        # GPT-2's weights fix the architecture: flags that would change it (or its init) are refused
        fixed = dict(GPT2_MODEL, **GPT2_SIZES[cfg["init_from"]], mix_fraction=DEFAULTS["mix_fraction"])
        changed = [k for k in fixed if k in explicit and explicit[k] != fixed[k]]
        if changed:
            raise TrainError(f"--init-from {cfg['init_from']} loads GPT-2's architecture and weights; it cannot "
                             f"be combined with --{', --'.join(k.replace('_', '-') for k in changed)}")
        if explicit.get("tokenizer", "gpt2") != "gpt2":
            raise TrainError(f"--init-from {cfg['init_from']} needs --tokenizer gpt2 (GPT-2's vocabulary)")
        cfg.update(fixed, tokenizer="gpt2")
    if cfg["out_dir"] is None:
        cfg["out_dir"] = default_out_dir(cfg)
    check_ranges(cfg, RANGES)
    if cfg["min_lr"] > cfg["lr"]:
        raise TrainError(f"--min-lr ({cfg['min_lr']}) must not exceed --lr ({cfg['lr']})")
    return cfg, explicit


# The allowed range of each numeric setting (NaN fails every comparison, so it is refused too)
POSITIVE_INT = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
RANGES = dict(
    {k: POSITIVE_INT for k in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                               "spike_window")},
    warmup_iters=(lambda v: v >= 0, ">= 0"), diag_interval=(lambda v: v >= 0, ">= 0"),
    lr=(lambda v: 0 < v < math.inf, "a finite number > 0"),
    min_lr=(lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    weight_decay=(lambda v: 0 <= v < math.inf, "a finite number >= 0"),
    beta1=(lambda v: 0 <= v < 1, "in [0, 1)"), beta2=(lambda v: 0 <= v < 1, "in [0, 1)"),
    grad_clip=(lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: off)"),
    spike_factor=(lambda v: 1 < v < math.inf, "a finite number > 1"),
)
SAMPLING_RANGES = dict(num_samples=POSITIVE_INT, max_new_tokens=POSITIVE_INT,
                       temperature=(lambda v: 0 < v < math.inf, "a finite number > 0"),
                       top_k=(lambda v: v >= 0, ">= 0 (0: all tokens)"))


def check_ranges(values, ranges):
    for key, (ok, what) in ranges.items():
        if values[key] is not None and not ok(values[key]):
            raise TrainError(f"--{key.replace('_', '-')} must be {what}, got {values[key]}")


def default_out_dir(cfg):
    """out/<preset>[-<flags>][-<data>][-bpe], e.g. out/cpu-sdd-lns, or out/cpu-my for --data my.txt."""
    parts = [cfg["preset"]] + [t for t in TECHNIQUES if cfg[t]] + (["qknorm"] if cfg["qk_norm"] else [])
    parts += [f"{k.replace('_', '')}{cfg[k]:g}" for k in ("z_loss", "logit_softcap") if cfg[k]]
    parts += [cfg[k] for k in ("norm_position", "norm") if cfg[k] != DEFAULTS[k]]
    if cfg["init_from"]:
        parts.append(cfg["init_from"])
    if cfg["data"]:
        parts.append(Path(cfg["data"]).stem)
    if cfg["tokenizer"] != "char" and not cfg["init_from"]:
        parts.append("bpe")
    return str(Path("out") / "-".join(parts))


def resume_config(args, ckpt):
    """The config of a resumed run: the checkpoint's (with defaults for settings added since), then flags."""
    cfg, explicit = resolve_config(args, base=dict(DEFAULTS, **ckpt["config"]))
    changed = {k: (ckpt["config"].get(k), v) for k, v in explicit.items()
               if k in MODEL_KEYS and ckpt["config"].get(k) != v}
    if changed:
        raise TrainError("cannot resume with a different model: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    return cfg


# ----------------------------------------------------------------------------------------------------
# Data


def load_data(cfg):
    """(data_dir, meta) for the run, preparing the text if needed, with the sizes checked."""
    data_dir = prepare_data.ensure_prepared(cfg["data"], cfg["tokenizer"])
    meta = prepare_data.load_meta(data_dir)
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing")
        size = path.stat().st_size
        if size % 2:
            raise DataError(f"{path} has an odd number of bytes: not a file of uint16 token ids")
        if size <= 2 * (cfg["block_size"] + 1):
            raise DataError(f"the {split} split has {size // 2} tokens, fewer than one block of "
                            f"{cfg['block_size']} + 1; use a longer text or a smaller --block-size")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        if len(data) < 200_000_000 and int(data.max()) >= meta["vocab_size"]:  # a full scan, small data only
            raise DataError(f"{path} holds token id {int(data.max())}, outside the vocabulary of {meta['vocab_size']}")
    return data_dir, meta


def model_vocab_size(meta):
    # GPT-2's 50257 padded to a multiple of 64 (50304) is faster on GPUs (nanoGPT); char vocabularies as-is
    return 50304 if meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 else meta["vocab_size"]


def load_gpt2(cfg):
    """GPT.from_pretrained(--init-from), cropped to --block-size (resolve_config set cfg's model to GPT-2's)."""
    try:
        model = GPT.from_pretrained(cfg["init_from"], dict(dropout=cfg["dropout"]))
        model.crop_block_size(cfg["block_size"])
    except ImportError as e:  # transformers is optional (not in requirements.txt)
        raise TrainError(f"--init-from {cfg['init_from']}: {e}") from None
    except ValueError as e:
        raise TrainError(f"--init-from {cfg['init_from']}: {e}") from None
    except Exception as e:  # offline and not cached: transformers/huggingface_hub raise OSError and others
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TrainError(f"--init-from {cfg['init_from']}: could not load GPT-2's weights ({type(e).__name__}: "
                         f"{first_line}); they are downloaded from Hugging Face on first use, so this needs a "
                         "network once, or a copy in the Hugging Face cache") from None
    return model


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(checkpoint_model_state(ckpt))
    return model


# ----------------------------------------------------------------------------------------------------
# Training


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then constant (nanoGPT)."""
    lr, min_lr, warmup, decay_iters = cfg["lr"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"]
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / max(1, decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@torch.no_grad()
def estimate_loss(model, cfg, data_dir, device, autocast):
    """Mean loss over eval_iters batches per split. The batches are the same at every evaluation (a fixed
    generator), so evaluations are comparable and consume none of the training randomness."""
    out = {}
    model.eval()
    for i, split in enumerate(("train", "val")):
        batches = Batches(data_dir / f"{split}.bin", cfg["block_size"], cfg["batch_size"], device, cfg["seed"] + i)
        losses = torch.zeros(cfg["eval_iters"])
        for k in range(cfg["eval_iters"]):
            x, y = batches.next()
            with autocast:
                _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def generate_text(model, codec, prompt, num_samples, max_new_tokens, temperature, top_k, device):
    """num_samples texts from prompt (None: a newline, or the vocabulary's first token where there is none)."""
    if prompt is None:
        ids = codec.encode("\n") if codec.name == "gpt2" or "\n" in codec.chars else [0]
    else:
        ids = codec.encode(prompt)
    if not ids:
        raise TrainError("the prompt is empty after tokenization; give at least one character")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    model.eval()
    texts = []
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None,
                           vocab_limit=codec.vocab_size)
        texts.append(codec.decode(y[0].tolist()))
    return texts


@dataclass
class Process:
    """This process's place in the run: rank and world size under torchrun (else 0 and 1) and its device."""
    rank: int
    world: int
    device: torch.device
    ddp: bool

    @property
    def master(self):
        return self.rank == 0  # rank 0 alone prints, logs, evaluates into files and writes checkpoints


def setup_process(cfg):
    """The device, and under torchrun (which sets RANK) the process group: NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Process(0, 1, pick_device(cfg["device"]), ddp=False)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    name = cfg["device"]
    if name in (None, "auto"):
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = pick_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Process(rank, world, device, ddp=True)


def micro_steps_per_rank(grad_accum, world):
    """--grad-accum is the micro-batches of one optimizer step over all processes: each of N processes does
    grad_accum / N of them, and at least one, so any preset runs on any N (with more processes than
    micro-batches, a step holds N micro-batches and the tokens per step grow; the start-up line says so)."""
    return max(1, grad_accum // world)


def build_model(cfg, meta, data_dir, resume_ckpt, proc, dtype):
    """The GPT of cfg on proc's device, its AdamW and its loss scaler (fp16 only): initialized (seed + rank),
    from GPT-2's weights with --init-from, or (restored later) from a checkpoint."""
    if cfg["init_from"] and meta["tokenizer"] != "gpt2":
        raise TrainError(f"--init-from {cfg['init_from']} needs GPT-2 BPE tokens; {data_dir} holds "
                         f"{meta['tokenizer']} tokens (prepare it with --tokenizer gpt2)")
    pretrained = load_gpt2(cfg) if cfg["init_from"] and resume_ckpt is None else None
    # a GPT-2 start keeps GPT-2's unpadded vocabulary of 50257 (as nanoGPT's init_from='gpt2')
    model_args = dict({k: cfg[k] for k in MODEL_KEYS},
                      vocab_size=meta["vocab_size"] if cfg["init_from"] else model_vocab_size(meta))
    try:
        config = GPTConfig(**model_args)
    except ValueError as e:
        raise TrainError(str(e)) from None
    torch.manual_seed(cfg["seed"] + proc.rank)
    model = GPT(config)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
    model = model.to(proc.device)
    model.grad_checkpointing = cfg["grad_checkpoint"]
    optimizer = model.configure_optimizers(cfg["weight_decay"], cfg["lr"], (cfg["beta1"], cfg["beta2"]),
                                           proc.device.type, sdd_official_decay=cfg["sdd_official_decay"])
    return model, optimizer, torch.amp.GradScaler(proc.device.type, enabled=dtype == torch.float16)


def restore(ckpt, meta, model, optimizer, scaler, batches, proc):
    """Put a checkpoint back into the model, optimizer, loss scaler and this rank's random streams (dropout
    and data order), so that the run continues bit for bit. Returns the run's state: iter_num, best val loss,
    and the spike rules' state (SpikeWatch)."""
    if ckpt is None:
        return 0, float("inf"), {}
    if any(ckpt["meta"].get(k) != meta.get(k) for k in ("tokenizer", "vocab_size", "chars")):
        raise TrainError("the checkpoint was trained on another tokenizer or vocabulary "
                         f"({ckpt['meta'].get('tokenizer')}, {ckpt['meta'].get('vocab_size')} "
                         f"tokens) than --data ({meta['tokenizer']}, {meta['vocab_size']} tokens)")
    model.load_state_dict(checkpoint_model_state(ckpt))
    optimizer.load_state_dict(ckpt["optimizer"])
    if "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"][proc.rank % len(ckpt["rng"])]  # a run resumed on more ranks reuses streams
    torch.set_rng_state(rng["torch"])
    if proc.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"])
    batches.gen.set_state(rng["data"])
    return ckpt["iter_num"], ckpt["best_val_loss"], {k: ckpt[k] for k in SpikeWatch.STATE_KEYS if k in ckpt}


def rng_states(data_state, proc):
    """Every rank's random streams (data order, dropout), so that each rank resumes its own."""
    mine = dict(data=data_state, torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if proc.device.type == "cuda" else None)
    if not proc.ddp:
        return [mine]
    states = [None] * proc.world
    dist.all_gather_object(states, mine)
    return states


def any_rank(flag, proc):
    """Whether flag holds on any rank: every rank must stop at the same step, or the collectives would hang."""
    if not proc.ddp:
        return flag
    t = torch.tensor(float(flag), device=proc.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def replica_max_diff(model, proc):
    """Self-check after a DDP run: the largest difference of any weight across ranks (DDP, and TVR's
    deterministic in-place edit, must keep the replicas identical). None without DDP."""
    if not proc.ddp:
        return None
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).max().item()


def open_run_folder(out_dir, resumed_at):
    """Rank 0's run folder: created, locked against a second run, cleared of an old run's files on a fresh
    start; returns (lock, log.jsonl, diag.jsonl), the logs cut back to resumed_at on a resume."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir)
    except OSError as e:  # a file in the way, a file above it, no permission, a read-only disk
        raise TrainError(f"cannot write into --out-dir {out_dir} ({e.strerror or e}); choose another folder") from None
    if resumed_at is None:
        clear_outputs(out_dir)
    return lock, JsonlLog(out_dir / "log.jsonl", resumed_at), JsonlLog(out_dir / "diag.jsonl", resumed_at)


def diagnostics_recorder(cfg, model, data_dir, device, diag_log):
    """Rank 0's diagnostics (diag_log None elsewhere) on one fixed validation batch of up to 8 sequences, the
    same at every record."""
    batch = Batches(data_dir / "val.bin", cfg["block_size"], min(8, cfg["batch_size"]), device, cfg["seed"] + 7).next()
    return DiagnosticsRecorder(model, batch, diag_log, cfg["diag_interval"] if diag_log else 0)


def wrap_model(model, compiled, proc):
    """The model the step runs: torch.compile'd (CUDA default), in DistributedDataParallel under torchrun."""
    model = torch.compile(model) if compiled else model
    if proc.ddp:
        model = DDP(model, device_ids=[proc.device.index] if proc.device.type == "cuda" else None)
    return model


def setup_precision(cfg, device):
    """(autocast dtype, autocast context, whether to compile): bf16 and compile on CUDA, fp32 eager elsewhere."""
    dtype = pick_dtype(cfg["dtype"], device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dtype, autocast, cfg["compile"] if cfg["compile"] is not None else device.type == "cuda"


def print_start(cfg, model, proc, grad_accum, tokens_per_iter, dtype, compiled, data_dir, resume_ckpt):
    config, out_dir = model.config, Path(cfg["out_dir"])
    print(f"model: {config.techniques()} | {model.get_num_params() / 1e6:.2f}M params | "
          f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, block {config.block_size}, "
          f"vocab {config.vocab_size}")
    for note in config.combination_notes():
        print(f"note: {note}")
    print(f"training: {cfg['max_iters']} iters x {tokens_per_iter:,} tokens on {proc.device} ({str(dtype)[6:]}"
          f"{', compiled' if compiled else ''}{f', {proc.world} processes' if proc.ddp else ''}), "
          f"data {data_dir}, out {out_dir}"
          + (f", resuming at iter {resume_ckpt['iter_num']}" if resume_ckpt else ""))
    if grad_accum * proc.world != cfg["grad_accum"]:
        print(f"note: --grad-accum {cfg['grad_accum']} on {proc.world} processes: {grad_accum} micro-batch(es) per "
              f"process, {grad_accum * proc.world} per step, {tokens_per_iter:,} tokens per step")
    resumed_world = len(resume_ckpt["rng"]) if resume_ckpt else None  # one RNG state per rank
    if resumed_world not in (None, proc.world):
        print(f"warning: resuming a run of {resumed_world} process(es) on {proc.world}: the data order and the "
              "tokens per step differ from the first part, so the losses will not continue as they would have")


MAX_SKIPS_IN_A_ROW = 10  # --skip-nonfinite: more non-finite steps in a row than this is a divergence


def report_stop(out_dir, iter_num, state, proc):
    save_checkpoint(out_dir / "ckpt.pt", state)
    launcher = f"torchrun --standalone --nproc_per_node={proc.world}" if proc.ddp else "python"
    print(f"stopped at iter {iter_num}; wrote {out_dir / 'ckpt.pt'}. Resume with:\n"
          f"  {launcher} train_shakespeare.py --resume --out-dir {out_dir}")


def report_spike(log, cfg, iter_num, loss, median):
    print(f"spike at iter {iter_num}: loss {loss:.4f} > {cfg['spike_factor']} x median {median:.4f}")
    log.write(iter=iter_num, type="spike", loss=loss, median=median)


def report_eval(log, out_dir, iter_num, losses, improved, state, elapsed):
    """elapsed: seconds since this run (or this resumed part) started training: the time to reach a loss."""
    print(f"eval  {iter_num:>6}: train {losses['train']:.4f}, val {losses['val']:.4f}"
          + (" (best)" if improved else "") + f" | {elapsed:.0f} s")
    log.write(iter=iter_num, type="eval", train_loss=losses["train"], val_loss=losses["val"], time_s=round(elapsed, 1))
    save_checkpoint(out_dir / "ckpt.pt", state)
    if improved:
        link_checkpoint(out_dir / "ckpt.pt", out_dir / "best.pt")


def report_nonfinite(log, out_dir, iter_num, what, loss, grad_norm, skip, skipped, last_saved):
    if skip:
        print(f"iter {iter_num}: non-finite {what} ({loss}, {grad_norm}); update skipped ({skipped} so far)")
        log.write(iter=iter_num, type="skipped", loss=loss, grad_norm=grad_norm)
    else:
        where = f"{out_dir / 'ckpt.pt'} (iter {last_saved})" if last_saved is not None else "none yet"
        print(f"iter {iter_num}: non-finite {what} (loss {loss}, gradient norm {grad_norm})"
              + (f", {MAX_SKIPS_IN_A_ROW} updates in a row skipped before it" if skipped else "")
              + f"; stopping without saving. The last good checkpoint: {where}")


def log_progress(log, cfg, iter_num, loss, z_loss, lr, grad_norm, dt, smooth_dt, tokens_per_iter, mfu):
    """The progress line and its log.jsonl record; the ETA from the smoothed step time, so it does not swing.
    loss is the cross-entropy; z_loss the z-loss term the step added to it (None when off)."""
    z_part = f" + z-loss {z_loss:.2e}" if z_loss is not None else ""
    print(f"iter {iter_num:>6}/{cfg['max_iters']} | loss {loss:.4f}{z_part} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
          f"{tokens_per_iter / dt:,.0f} tok/s" + (f" | MFU {mfu * 100:.1f}%" if mfu is not None else "")
          + f" | ETA {fmt_time(smooth_dt * (cfg['max_iters'] - iter_num))}")
    log.write(iter=iter_num, loss=loss, lr=lr, grad_norm=grad_norm, ms=dt * 1000,
              **({"z_loss": z_loss} if z_loss is not None else {}), **({"mfu": mfu} if mfu is not None else {}))


def finish_run(cfg, model, proc, t_start, tokens_per_step, tokens_trained, best_val, last_eval, iters, diverged_at,
               interrupted_at, skipped_updates, spikes, diag_s):
    """The end of a run: the DDP replica self-check, summary.json and the plots (rank 0), the process group
    closed. Returns the summary (None on the other ranks)."""
    wall = time.time() - t_start
    replica_diff = replica_max_diff(model, proc)
    summary = None
    if proc.master:
        summary = dict(config=cfg, model_args=asdict(model.config), techniques=model.config.techniques(),
                       best_val_loss=best_val, final_val_loss=last_eval["val"] if last_eval else None, iters=iters,
                       wall_s=round(wall, 2),
                       tokens_per_s=round(tokens_trained / max(wall, 1e-9)), diverged=diverged_at is not None,
                       diverged_at=diverged_at, interrupted_at=interrupted_at, skipped_updates=skipped_updates,
                       **spikes.summary(), diag_s=round(diag_s, 2),
                       world_size=proc.world, replica_max_diff=replica_diff, tokens_per_step=tokens_per_step)
        out_dir = Path(cfg["out_dir"])
        (out_dir / "summary.json").write_text(json.dumps(finite_or_null(summary), indent=2))
        ended = f"diverged at iter {diverged_at}" if diverged_at is not None else \
            f"interrupted at iter {interrupted_at}" if interrupted_at is not None else "done"
        print(f"{ended}: best val {best_val:.4f}, {iters} iters in {wall:.1f} s ({summary['tokens_per_s']:,} tok/s), "
              f"{summary['spikes']} loss spikes; wrote {out_dir}/summary.json")
        if cfg["plot"]:
            import plots

            print("plots: " + ", ".join(str(p) for p in plots.plot_run(out_dir)))
    if proc.ddp:  # leave together: a rank that tears down while another still talks to it can abort in gloo
        dist.barrier()
        dist.destroy_process_group()
    return summary


def train(cfg, resume_ckpt=None, stop=None):
    """Train with the resolved config cfg (continuing resume_ckpt if given); stop's signal ends the run at a
    step boundary with a checkpoint. Returns (model, codec, summary), the summary on rank 0 only."""
    stop = stop or StopRequest()
    proc = setup_process(cfg)
    device, master, grad_accum = proc.device, proc.master, micro_steps_per_rank(cfg["grad_accum"], proc.world)
    keep_freed_memory()
    dtype, autocast, compiled = setup_precision(cfg, device)

    data_dir, meta = load_data(cfg)
    raw_model, optimizer, scaler = build_model(cfg, meta, data_dir, resume_ckpt, proc, dtype)
    config = raw_model.config
    batches = Batches(data_dir / "train.bin", cfg["block_size"], cfg["batch_size"], device,
                      cfg["seed"] + 1000 + proc.rank)
    iter_num, best_val, spike_state = restore(resume_ckpt, meta, raw_model, optimizer, scaler, batches, proc)
    model = wrap_model(raw_model, compiled, proc)
    out_dir, resumed_at = Path(cfg["out_dir"]), iter_num if resume_ckpt else None
    tokens_per_iter = grad_accum * proc.world * cfg["batch_size"] * cfg["block_size"]
    log = diag_log = None
    if master:
        lock, log, diag_log = open_run_folder(out_dir, resumed_at)
        print_start(cfg, raw_model, proc, grad_accum, tokens_per_iter, dtype, compiled, data_dir, resume_ckpt)
    diag = diagnostics_recorder(cfg, raw_model, data_dir, device, diag_log)
    spikes = SpikeWatch(cfg["spike_factor"], cfg["spike_window"], spike_state)
    peak_flops = gpu_peak_flops(device)

    def checkpoint(data_state):  # every rank joins rng_states' gather; rank 0 writes
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    model_args=asdict(config), config=cfg, meta=meta, iter_num=iter_num, best_val_loss=best_val,
                    **spikes.state(), rng=rng_states(data_state, proc))

    t_start, timer = time.time(), StepTimer(iter_num)
    data_state = batches.gen.get_state()  # the data RNG state *before* this iteration's first batch
    x, y = batches.next()
    diverged = last_eval = interrupted = None
    tokens_trained, skipped, skips_in_a_row, last_saved = 0, 0, 0, resumed_at
    while True:
        if any_rank(stop.signum is not None, proc):
            state = checkpoint(data_state)
            if master:
                report_stop(out_dir, iter_num, state, proc)
            interrupted = iter_num
            break
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % cfg["eval_interval"] == 0 or iter_num == cfg["max_iters"]:
            last_eval = estimate_loss(raw_model, cfg, data_dir, device, autocast)
            improved, best_val = last_eval["val"] < best_val, min(best_val, last_eval["val"])
            state = checkpoint(data_state)
            if master:
                report_eval(log, out_dir, iter_num, last_eval, improved, state, time.time() - t_start)
            last_saved = iter_num
            timer.restart()
        if iter_num >= cfg["max_iters"]:
            break

        # --- the step: forward and backward over the micro-batches, clip, update -----------------------
        diag.before_step(iter_num)
        loss_sum = z_sum = 0.0
        for micro_step in range(grad_accum):
            if proc.ddp:  # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == grad_accum - 1
            with autocast:
                logits, loss = model(x, y)
                loss = loss / grad_accum
            if config.z_loss:  # the loss includes the z-loss; its share is logged apart from the cross-entropy
                z_sum = z_sum + stable_gpt.z_loss_term(logits.detach(), config.z_loss, y) / grad_accum
            if micro_step == grad_accum - 1:
                data_state = batches.gen.get_state()
            x, y = batches.next()  # prefetch the next batch while the backward runs
            scaler.scale(loss).backward()
            loss_sum = loss_sum + loss.detach()
        scaler.unscale_(optimizer)
        diag.after_backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(),
                                                   cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
        # checked every step: a non-finite value is a single-step event (one device sync per step). With
        # fp16, an inf gradient is the GradScaler's business (it skips the step and lowers its scale).
        lossf, normf, zf = float(loss_sum), float(grad_norm), float(z_sum)
        ce = lossf - zf  # the step's cross-entropy (lossf: what was optimized, the z-loss included)
        nonfinite = "loss" if not math.isfinite(lossf) else \
            "gradient norm" if not (math.isfinite(normf) or scaler.is_enabled()) else None
        if nonfinite is None:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)

        # --- what follows from the step ----------------------------------------------------------------
        skips_in_a_row = skips_in_a_row + 1 if nonfinite else 0
        if nonfinite:  # no update was made: with --skip-nonfinite count it and go on, else stop without saving
            skip = cfg["skip_nonfinite"] and skips_in_a_row <= MAX_SKIPS_IN_A_ROW
            skipped += skip
            if master:
                report_nonfinite(log, out_dir, iter_num + 1, nonfinite, lossf, normf, skip, skipped, last_saved)
            if not skip:
                diverged = iter_num + 1
                break
            iter_num += 1
            continue
        diag.after_update()
        stable_gpt.tvr_after_step(raw_model, iter_num + 1)  # TVR (arXiv 2503.17500), when on
        iter_num += 1
        tokens_trained += tokens_per_iter
        if (median := spikes.update(iter_num, ce)) is not None and master:
            report_spike(log, cfg, iter_num, ce, median)
        diag.end_step()
        if iter_num % cfg["log_interval"] == 0 or iter_num == cfg["max_iters"]:
            dt, smooth_dt = timer.lap(iter_num)
            if master:  # MFU against the detected GPU's bf16 peak, per GPU: each rank runs grad_accum micro-batches
                mfu = raw_model.estimate_mfu(grad_accum * cfg["batch_size"], dt, peak_flops) if peak_flops else None
                log_progress(log, cfg, iter_num, ce, zf if config.z_loss else None, lr, normf, dt, smooth_dt,
                             tokens_per_iter, mfu)

    summary = finish_run(cfg, raw_model, proc, t_start, tokens_per_iter, tokens_trained, best_val=best_val,
                         last_eval=last_eval, iters=iter_num, diverged_at=diverged, interrupted_at=interrupted,
                         skipped_updates=skipped, spikes=spikes, diag_s=diag.seconds)
    if master:
        lock.release()
    return raw_model, Codec(meta), summary


# ----------------------------------------------------------------------------------------------------
# Compare runner


RUNNER_OPTIONS = ("--compare", "--seeds", "--lrs")


def split_compare(argv):
    """(common flags, configurations, seeds, learning rates or None) from a command line with --compare or --lrs.
    --compare takes the words after it up to the next runner option or the end, each 'baseline' or a string of
    flags ("--lns"); --seeds one whole number; --lrs the numbers after it. Every other word is a common flag."""
    common, configs, seeds, lrs = [], None, 1, None
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
        else:
            common.append(word)
    return common, configs or ["baseline"], seeds, lrs


def parse_or_none_float(word):
    try:
        return float(word)
    except ValueError:
        return None


def config_slug(config):
    return "baseline" if config.strip() in ("", "baseline") else re.sub(r"[^A-Za-z0-9.]+", "-", config).strip("-")


def config_flags(config):
    return [] if config_slug(config) == "baseline" else shlex.split(config)


def compare(argv):
    """Run every configuration x learning rate x seed (in this process, one after another), skip the finished
    ones, then write the table and the plots: compare.md and compare.png, or with --lrs the learning-rate
    sweep's lr_sweep.json, lr_sweep.md and lr_sweep.png."""
    common, configs, n_seeds, lrs = split_compare(argv)
    parser = build_parser()
    base_args = parser.parse_args(common)
    seed0 = base_args.seed if base_args.seed is not None else DEFAULTS["seed"]
    root = Path(base_args.out_dir or Path("out") / ("lr_sweep" if lrs else "compare"))
    grid = lrs or [None]  # None: the learning rate of the flags (a comparison without a sweep)

    def lr_flag(lr):
        return ["--lr", f"{lr:g}"] if lr else []

    for config in configs:  # every configuration (at every learning rate) checked before any trains
        if lrs and any(w == "--lr" or w.startswith("--lr=") for w in common + config_flags(config)):
            raise TrainError(f"--lrs sets the peak learning rate of every run; drop --lr from {config!r} or the "
                             "common flags")
        for lr in grid:
            check_compare_config(parser, common + lr_flag(lr), config)
    plan = [(config, lr, seed, root / config_slug(config) / (f"lr{lr:g}" if lr else "") / f"seed{seed}")
            for config in configs for lr in grid for seed in range(seed0, seed0 + n_seeds)]
    with StopRequest() as stop:  # one for the whole comparison: a Ctrl-C between two runs is not lost
        for k, (config, lr, seed, run_dir) in enumerate(plan, start=1):
            run_one(parser, common + lr_flag(lr), config, seed, run_dir, stop, progress=f"[{k}/{len(plan)}]")
            if stop.signum is not None:
                print("compare: interrupted; run the same command again to continue")
                return 130
    import plots

    if lrs:
        sweep = lr_sweep_results({config: {lr: [d for c, l, _, d in plan if c == config and l == lr] for lr in lrs}
                                  for config in configs})
        (root / "lr_sweep.json").write_text(json.dumps(finite_or_null(sweep), indent=2))
        (root / "lr_sweep.md").write_text(table := lr_sweep_table(sweep))
        print("\n" + table)
        print("plots: " + ", ".join(str(p) for p in plots.plot_lr_sweep(sweep, root)))
        return 0
    runs = {config: [run_dir for c, _, _, run_dir in plan if c == config] for config in configs}
    table = compare_table(runs)
    (root / "compare.md").write_text(table)
    print("\n" + table)
    print("plots: " + ", ".join(str(p) for p in plots.plot_compare(runs, root)))
    return 0


def check_compare_config(parser, common, config):
    """A configuration of --compare that would fail is refused before any run starts, with its reason."""
    try:
        args, unknown = parser.parse_known_args(common + config_flags(config))
    except SystemExit:  # argparse has printed why (e.g. an invalid choice)
        raise TrainError(f"--compare configuration {config!r} is not valid (see above)") from None
    if unknown:
        raise TrainError(f"--compare configuration {config!r}: unknown flag(s) {' '.join(unknown)}")
    cfg, _ = resolve_config(args)
    try:
        GPTConfig(**{k: cfg[k] for k in MODEL_KEYS})  # the vocabulary comes later, from the data
    except ValueError as e:
        raise TrainError(f"--compare configuration {config!r}: {e}") from None


def run_one(parser, common, config, seed, run_dir, stop, progress):
    """One configuration and seed of a comparison: skipped if finished, resumed if interrupted."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("interrupted_at") is None:
        print(f"{progress} {config} seed {seed}: done already ({summary_path})")
        return
    print(f"\n{progress} {config} seed {seed} -> {run_dir}")
    run_args = parser.parse_args(common + config_flags(config) + ["--seed", str(seed), "--out-dir", str(run_dir)])
    if (run_dir / "ckpt.pt").is_file():  # interrupted earlier: continue it
        resume_ckpt = load_checkpoint(run_dir / "ckpt.pt")
        train(resume_config(run_args, resume_ckpt), resume_ckpt, stop)
    else:
        train(resolve_config(run_args)[0], None, stop)


# ----------------------------------------------------------------------------------------------------
# The learning-rate sweep (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
# instabilities", arXiv 2309.14322): a configuration's final loss against the learning rate


def run_outcome(run_dir):
    """One run of a sweep: its final and best val loss, the val loss at init (the eval at iter 0), whether it
    diverged, and the loss the sweep counts: the final val loss, or the loss at init for a run that diverged
    (a non-finite loss), never more than the loss at init (Wortsman et al., Sec. 2.3)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in map(parse_or_none, (run_dir / "log.jsonl").read_text().splitlines())
             if r and r.get("type") == "eval"]
    init = next(r["val_loss"] for r in evals if r["iter"] == 0)
    final = summary["final_val_loss"]
    diverged = summary["diverged"] or final is None or not math.isfinite(final)
    return dict(seed=summary["config"]["seed"], model=summary["techniques"], final_val_loss=final,
                best_val_loss=summary["best_val_loss"], init_val_loss=init, diverged=diverged,
                counted_loss=init if diverged else min(final, init))


def lr_sensitivity(losses):
    """Wortsman et al. (arXiv 2309.14322, Sec. 2.3): E_lr[min(loss(lr), loss at init)] - min_lr loss(lr) over
    the grid; losses {lr: loss already capped at the loss at init}. 0: every learning rate of the grid trains
    as well as the best one; large: the configuration is sensitive to its learning rate."""
    values = list(losses.values())
    return statistics.fmean(values) - min(values)


def lr_sweep_results(runs):
    """lr_sweep.json's content from {config: {lr: [run folders, one per seed]}}: per configuration, per
    learning rate the outcome of each seed and the mean counted loss; the best learning rate and loss, and
    the LR sensitivity of the mean curve."""
    configs = {}
    for config, by_lr in runs.items():
        outcomes = {lr: [run_outcome(d) for d in dirs] for lr, dirs in by_lr.items()}
        mean_loss = {lr: statistics.fmean(o["counted_loss"] for o in runs_) for lr, runs_ in outcomes.items()}
        best_lr = min(mean_loss, key=mean_loss.get)
        configs[config] = dict(model=next(iter(outcomes.values()))[0]["model"],
                               runs={f"{lr:g}": o for lr, o in outcomes.items()},
                               mean_loss={f"{lr:g}": v for lr, v in mean_loss.items()}, best_lr=best_lr,
                               best_loss=mean_loss[best_lr], lr_sensitivity=lr_sensitivity(mean_loss))
    return dict(reference="Wortsman et al. 2023, arXiv 2309.14322",
                loss="final val loss; a diverged run counts at its val loss at init, and no run above it",
                lrs=sorted({lr for by_lr in runs.values() for lr in by_lr}), configs=configs)


def lr_sweep_table(sweep):
    """lr_sweep.md: the mean counted loss of each configuration at each learning rate (+- std over seeds,
    with a dagger per diverged run), its best learning rate and LR sensitivity."""
    lrs = [f"{lr:g}" for lr in sweep["lrs"]]
    rows = ["| config | model | " + " | ".join(f"lr {lr}" for lr in lrs) + " | best lr | best loss | LR sensitivity |",
            "|---|---|" + "---|" * len(lrs) + "---|---|---|"]
    for config, c in sweep["configs"].items():
        cells = []
        for lr in lrs:
            outcomes = c["runs"][lr]
            values = [o["counted_loss"] for o in outcomes]
            spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{c['mean_loss'][lr]:.3f}{spread}" + "†" * sum(o["diverged"] for o in outcomes))
        rows.append(f"| {config} | {c['model']} | " + " | ".join(cells) +
                    f" | {c['best_lr']:g} | {c['best_loss']:.4f} | {c['lr_sensitivity']:.4f} |")
    seeds = sorted({len(o) for c in sweep["configs"].values() for o in c["runs"].values()})
    return "\n".join(rows) + (f"\n\nFinal val loss, the mean over {' or '.join(map(str, seeds))} seed(s). \u2020: a "
                              "run that diverged (non-finite loss), counted at its loss at init, as is any run "
                              "that ends above it (Wortsman et al., arXiv 2309.14322). LR sensitivity: the mean "
                              "over the grid of those losses minus the best one.\n")


def compare_table(runs):
    """Markdown table: best and final val loss (mean +- std over seeds), diverged runs, spikes, tokens/s and
    the step-time ratio to the first configuration."""
    def mean_std(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        if not values:
            return "-"
        return f"{statistics.mean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")

    rows = ["| config | seeds | best val | final val | diverged | spikes | tokens/s | step time vs first |",
            "|---|---|---|---|---|---|---|---|"]
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in argv or "--lrs" in argv:
        try:
            return compare(argv)
        except (TrainError, DataError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        check_ranges(vars(args), SAMPLING_RANGES)  # before training, so that a run never ends in a bad sample
        if args.sample:
            cfg, _ = resolve_config(args)
            ckpt = load_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt")
            device = pick_device(cfg["device"])
            model = model_from_checkpoint(ckpt).to(device)
            torch.manual_seed(cfg["seed"])
            for text in generate_text(model, Codec(ckpt["meta"]), args.prompt, args.num_samples,
                                      args.max_new_tokens, args.temperature, args.top_k, device):
                print(text)
                print("-" * 60)
            return 0
        resume_ckpt = None
        if args.resume:
            cfg0, _ = resolve_config(args)
            resume_ckpt = load_checkpoint(Path(cfg0["out_dir"]) / "ckpt.pt")
            cfg = resume_config(args, resume_ckpt)
            if resume_ckpt["iter_num"] >= cfg["max_iters"]:
                raise TrainError(f"the run in {cfg['out_dir']} is finished ({resume_ckpt['iter_num']} of "
                                 f"{cfg['max_iters']} iters); raise --max-iters to train on, or plot it with: "
                                 f"python plots.py {cfg['out_dir']}")
        else:
            cfg, _ = resolve_config(args)
            if (Path(cfg["out_dir"]) / "ckpt.pt").is_file() and not args.overwrite:
                raise TrainError(f"{cfg['out_dir']} already holds a run; --resume to continue it, --overwrite to "
                                 "start afresh there, --out-dir elsewhere, or plot it: "
                                 f"python plots.py {cfg['out_dir']}")
        with StopRequest() as stop:
            model, codec, summary = train(cfg, resume_ckpt, stop)
        if summary is not None:
            if summary["diverged"]:
                return 1
            if summary["interrupted_at"] is not None:
                return 128 + stop.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
            torch.manual_seed(cfg["seed"])
            device = next(model.parameters()).device
            print("\n--- sample ---")
            print(generate_text(model, codec, args.prompt, 1, args.max_new_tokens, args.temperature, args.top_k,
                                device)[0])
        return 0
    except (TrainError, DataError) as e:
        if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one line, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
