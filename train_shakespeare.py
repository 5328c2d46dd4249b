"""
Train a stable-gpt model on tiny Shakespeare (or any text), then sample from it. Reads top to bottom like
nanoGPT's train.py: settings, data, model and optimizer, the training loop, sampling.

    python train_shakespeare.py                        # CPU preset: a Shakespeare model in ~3 minutes
    python train_shakespeare.py --sdd --lns            # the same with SDD and LayerNorm Scaling
    python train_shakespeare.py --preset shakespeare-char        # nanoGPT's GPU config
    python train_shakespeare.py --resume               # continue the run in --out-dir
    python train_shakespeare.py --sample --prompt "ROMEO:"       # sample from the run in --out-dir
    torchrun --standalone --nproc_per_node=8 train_shakespeare.py --preset gpt2-124m --data DIR
    python -m tools.sweep --compare baseline "--sdd" --lrs 1e-3 1e-2 1e-1   # comparisons and LR sweeps

Every setting is a flag that overrides the preset (--help). Writes ckpt.pt, best.pt, log.jsonl, diag.jsonl and
summary.json to --out-dir; the run plumbing (checkpoints, logs, locks, torchrun) is in tools/runs.py.
"""

import argparse
import math
import os
import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch loads: one line and exit 130, not a traceback (main has its own)
    signal.signal(signal.SIGINT, lambda signum, frame: (print("interrupted while starting; nothing was written",
                                                              file=sys.stderr), sys.exit(130)))
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import prepare_data
from prepare_data import Codec, DataError
from stable_gpt import (GPT, GPT2_SIZES, HYPER_CONNECTIONS, NORM_POSITIONS, NORMS, GPTConfig, qk_clip_after_step,
                        tvr_after_step)
from tools.cli import (AT_LEAST_0, FINITE_AT_LEAST_0, FINITE_POSITIVE, POSITIVE, OneLineParser, add_flags,
                       check_ranges, default_out_dir, gpt2_architecture, model_setting, saved_settings, setting)
from tools.monitors import DiagnosticsRecorder
from tools.runs import (Batches, OutputThatSurvivesAClosedPipe, Run, StopRequest, TrainError, any_rank,
                        check_fresh_start, check_the_run_fits, compile_or_eager, cpu_has_bf16_matmul,
                        keep_freed_memory, load_checkpoint, load_gpt2, model_from_checkpoint, nonfinite_part,
                        pick_device, pick_dtype, setup_process, wrap_model)

# ----------------------------------------------------------------------------------------------------
# Settings. Each is defined once below: default, help and allowed range. The command line (--n-layer, ...), the
# range checks and the default --out-dir name are read from there. A preset overrides the defaults, a flag the preset.

PRESETS = {
    # nanoGPT's README CPU model (4/4/128, block 64), tuned for time to quality (docs/speed.md): 2.7x the tokens
    # per step (batch 32: the fastest tokens/s on 2 cores), 8x the learning rate with a 50-step warmup, 1200 steps;
    # it reaches nanoGPT's CPU-recipe val (1.886) in ~650 steps, 0.68x nanoGPT's time, and ends near 1.71
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=1200, lr=8e-3,
                min_lr=8e-4, warmup_iters=50, beta2=0.99, dropout=0.0, eval_interval=50, eval_iters=20),
    # nanoGPT's config/train_shakespeare_char.py: val ~1.47 on one A100 in ~3 minutes
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000,
                             lr=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99, dropout=0.2,
                             eval_interval=250, eval_iters=200),
}


def gpt2_preset(n_layer, n_head, n_embd, batch_size, lr, min_lr, **kw):
    """GPT-2 sizes, BPE, block 1024: 2^19 tokens per step (GPT-2/3), the micro-batch sized for one 80 GB GPU in bf16,
    the rest accumulated (split across ranks); the LR from GPT-3's Table 2.1 (arXiv 2005.14165), nearest size."""
    return dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, batch_size=batch_size, grad_accum=2**19 // (
        1024 * batch_size), lr=lr, min_lr=min_lr, tokenizer="gpt2", block_size=1024, max_iters=600000,
        warmup_iters=2000, beta2=0.95, dropout=0.0, eval_interval=1000, eval_iters=200, diag_interval=1000, **kw)


PRESETS.update({"gpt2-124m": gpt2_preset(12, 12, 768, 32, 6e-4, 6e-5),
                "gpt2-350m": gpt2_preset(24, 16, 1024, 16, 3e-4, 3e-5),
                "gpt2-774m": gpt2_preset(36, 20, 1280, 8, 2.5e-4, 2.5e-5),
                "gpt2-1.5b": gpt2_preset(48, 25, 1600, 8, 2e-4, 2e-5)})  # fits 80 GB without recompute


# --independent-wd's decay when --weight-decay is not given: Wortsman et al.'s 1e-4 (arXiv 2309.14322, Sec. 3.2.2).
# The coupled default 0.1 would decay 10% per step at the peak: 0.1 is meant to be multiplied by a learning rate.
INDEPENDENT_WD = 1e-4


@dataclass
class Settings:
    """Every setting of a run, as summary.json and the checkpoints store them."""
    # --- the run
    preset: Optional[str] = setting(None, "base config (default: cpu, or shakespeare-char with CUDA)", choices=PRESETS)
    data: Optional[str] = setting(None, "a text file (tokenized once, cached) or a folder of train/val.bin; default: "
                                  "tiny Shakespeare")
    tokenizer: str = setting("char", "char level or GPT-2 BPE, for text input", choices=prepare_data.TOKENIZERS)
    out_dir: Optional[str] = setting(None, "where checkpoints and logs go (default: out/<preset>[-<flags>][-<data>])")
    seed: int = setting(1337, "seed for init, data order and dropout", (lambda v: 0 <= v < 2**32, "in [0, 2^32)"))
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    dtype: str = setting("auto", "auto: bf16 on CUDA (else fp16), fp32 elsewhere", choices=("auto", "float32",
                                                                                         "bfloat16", "float16"))
    compile: Optional[bool] = setting(None, "torch.compile (default: on wherever it works; on CPU it needs a C++ "
                                      "compiler, else eager with a note)")
    init_from: Optional[str] = setting(None, "start from OpenAI's GPT-2 weights (needs transformers)",
                                       choices=GPT2_SIZES, out_dir=True)
    skip_nonfinite: bool = setting(False, "skip an update with a non-finite loss or gradient instead of stopping")
    zclip: bool = setting(False, "ZClip (arXiv 2504.02507): clip the gradient norm at a z-score of 2.5 over an EMA of "
                          "its mean and variance, --grad-clip on top (a host sync per step)")
    skip_spikes: bool = setting(False, "skip an update whose loss or gradient norm is 6 std off the last 128 steps' "
                                "(OLMo-core's skip-step; a host sync per step)")
    # --- the model: shape (GPTConfig's fields; stable_gpt.py documents each)
    n_layer: int = model_setting("n_layer", "number of blocks")
    n_head: int = model_setting("n_head", "attention heads (must divide --n-embd)")
    n_embd: int = model_setting("n_embd", "width of the residual stream")
    block_size: int = model_setting("block_size", "context length in tokens")
    dropout: float = model_setting("dropout", "dropout probability")
    bias: bool = setting(False, "biases in Linears and norms (off, as nanoGPT's configs; GPTConfig's default is on)")
    init_std: float = model_setting("init_std", "init std of every matrix (--lir: / sqrt(l))", aliases=("--lir-sigma",))
    scaled_init: Optional[bool] = model_setting("scaled_init", "GPT-2's c_proj init std/sqrt(2L) (default: Pre-LN)")
    # --- the four papers' stabilizers, each off by default (then the model is nanoGPT's)
    sdd: bool = model_setting("sdd", "SDD (arXiv 2502.15499): norm + gain on each block linear's output", out_dir=True)
    sdd_official_decay: bool = setting(True, "with --sdd, the official SDD weight-decay groups (off: nanoGPT's)")
    lns: bool = model_setting("lns", "LNS (arXiv 2502.05795): pre-norm output of layer l x 1/sqrt(l)", out_dir=True)
    wesar: bool = model_setting("wesar", "WeSaR (arXiv 2410.05052): one common raw std, one gate per matrix",
                                out_dir=True)
    wesar_sigma: float = model_setting("wesar_sigma", "WeSaR's common raw std")
    lir: bool = model_setting("lir", "LIR init (arXiv 2503.17500): block l ~ N(0, sigma^2 / l)", out_dir=True)
    tvr: bool = model_setting("tvr", "TVR (arXiv 2503.17500): block matrices' std held at a target", out_dir=True)
    tvr_target: float = model_setting("tvr_target", "TVR target std")
    tvr_interval: int = model_setting("tvr_interval", "TVR interval in optimizer steps")
    tvr_threshold: float = model_setting("tvr_threshold", "TVR rescales only when std > threshold * target")
    # --- the fixes practitioners use, to weigh the papers against (off by default)
    qk_norm: bool = model_setting("qk_norm", "--norm on q and k per head (arXiv 2309.14322)", out_dir=True)
    qk_norm_full: bool = model_setting("qk_norm_full", "QK-norm over all heads at once (OLMo 2)", out_dir=True)
    qk_clip: float = model_setting("qk_clip", "QK-Clip's tau (arXiv 2507.20534; 0: off)", out_dir=True)
    attn_gate: bool = model_setting("attn_gate", "gated attention (arXiv 2505.06708)", out_dir=True)
    attn_sink: bool = model_setting("attn_sink", "a learned sink logit per head in the softmax (gpt-oss)", out_dir=True)
    hyper_connections: str = model_setting("hyper_connections", "n residual streams mixed per sublayer: hc "
                                           "(arXiv 2409.19606) or mhc, H_res doubly stochastic (arXiv 2512.24880)",
                                           choices=HYPER_CONNECTIONS, out_dir=True)
    hc_streams: int = model_setting("hc_streams", "hyper-connections' number of streams n")
    hc_sinkhorn_iters: int = model_setting("hc_sinkhorn_iters", "mhc's Sinkhorn-Knopp iterations")
    mup: bool = model_setting("mup", "muP (arXiv 2203.03466): hidden init and lr / width multiplier, logits / it, "
                              "attention / hs", out_dir=True)
    mup_base_width: int = model_setting("mup_base_width", "muP's base width (where its init and lrs are standard)")
    olmo2: bool = setting(False, "OLMo 2's recipe (OLMO2 below; flags given win)", out_dir=True)
    z_loss: float = model_setting("z_loss", "COEF * mean(log^2 Z) added to the loss (arXiv 2204.02311)", out_dir=True)
    logit_softcap: float = model_setting("logit_softcap", "C * tanh(logits / C) (Gemma 2; 0: off)", out_dir=True)
    # --- normalization type and placement
    norm: str = model_setting("norm", "normalization layer", choices=NORMS, out_dir=True)
    norm_eps: float = model_setting("norm_eps", "eps of every --norm layer (not SDD's)")
    norm_position: str = model_setting("norm_position", "pre: x + f(norm(x)); post: norm(x + f(x)); mix: Mix-LN; "
                                       "deepnorm: DeepNet; peri: x + norm(f(norm(x))); reorder: x + norm(f(x))",
                                       choices=NORM_POSITIONS, out_dir=True)
    mix_fraction: float = model_setting("mix_fraction", "Mix-LN: fraction of Post-LN blocks at the bottom")
    # --- optimization
    batch_size: int = setting(12, "sequences per micro-batch", POSITIVE)
    grad_accum: int = setting(1, "micro-batches per optimizer step (split across torchrun ranks)", POSITIVE)
    max_iters: int = setting(5000, "optimizer steps", POSITIVE)
    lr: float = setting(6e-4, "peak learning rate", FINITE_POSITIVE)
    min_lr: Optional[float] = setting(None, "final learning rate (default: --lr x preset's ratio)", FINITE_AT_LEAST_0)
    warmup_iters: int = setting(100, "linear warmup steps", AT_LEAST_0)
    lr_decay_iters: Optional[int] = setting(None, "steps of the cosine decay (default: --max-iters)", POSITIVE)
    optimizer: str = setting("adamw", "muon: Muon for block matrices, AdamW for the rest", choices=("adamw", "muon"),
                             out_dir=True)
    weight_decay: float = setting(0.1, "AdamW weight decay (which tensors: configure_optimizers)", FINITE_AT_LEAST_0)
    independent_wd: bool = setting(False, "decay lr_t/lr x --weight-decay per step, not lr_t x it (2309.14322 3.2.2); "
                                   f"--weight-decay then defaults to Wortsman's {INDEPENDENT_WD:g}")
    olmo_decay: bool = setting(False, "decay every tensor but the embeddings (OLMo's groups; --sdd's by default)")
    beta1: float = setting(0.9, "AdamW beta1", (lambda v: 0 <= v < 1, "in [0, 1)"))
    beta2: float = setting(0.95, "AdamW beta2", (lambda v: 0 <= v < 1, "in [0, 1)"))
    grad_clip: float = setting(1.0, "clip the global gradient norm to this (0: off)",
                               (lambda v: 0 <= v < math.inf, "a finite number >= 0 (0: off)"))
    grad_checkpoint: bool = setting(False, "recompute each block in the backward (less memory, ~1/3 more compute)")
    # --- evaluation and logging
    eval_interval: int = setting(250, "evaluate (and write ckpt.pt) every this many steps", POSITIVE)
    eval_iters: int = setting(200, "batches per split per evaluation", POSITIVE)
    log_interval: int = setting(10, "print and log every this many steps", POSITIVE)
    diag_interval: int = setting(100, "per-layer diagnostics to diag.jsonl every this many steps (0: off)", AT_LEAST_0)
    spike_factor: float = setting(1.2, "a loss spike: a loss above this x the median of the last --spike-window",
                                  (lambda v: 1 < v < math.inf, "a finite number > 1"))
    spike_window: int = setting(50, "steps in the spike detector's running median", POSITIVE)
    plot: bool = setting(False, "write PNG plots into --out-dir at the end")


@dataclass
class Sampling:
    """--sample's settings, and those of the sample printed after training."""
    prompt: Optional[str] = setting(None, "start of the sample (default: a newline, or the vocabulary's first token)")
    num_samples: int = setting(1, "number of samples", POSITIVE)
    max_new_tokens: int = setting(500, "tokens per sample", POSITIVE)
    temperature: float = setting(0.8, "sampling temperature",
                                 (lambda v: 1e-3 <= v < math.inf, "a finite number >= 0.001"))
    top_k: int = setting(200, "sample from the k most likely tokens", (lambda v: v >= 0, ">= 0 (0: all tokens)"))


# OLMo 2 (arXiv 2501.00656, Sec. 3; OLMo-core's configs): reorder, full-width QK-norm, z-loss, no embedding decay,
# RMSNorm with eps 1e-6 (OLMo-core's OLMo 2 configs; HF's Olmo2Config rms_norm_eps). At these widths eps matters:
# at 4x128 the attention output entering its norm has mean square ~2.3e-7 at init, so the norm's output RMS is
# 0.15 with nanoGPT's eps 1e-5 and 0.43 with 1e-6.
OLMO2 = dict(norm_position="reorder", qk_norm=True, qk_norm_full=True, z_loss=1e-5, norm="rmsnorm", norm_eps=1e-6,
             olmo_decay=True)
MODEL_KEYS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]  # the vocabulary comes from the data
GROUPS = dict(preset="run", n_layer="model", sdd="stabilizers", qk_norm="practitioners' fixes",
              norm="normalization", batch_size="optimization", eval_interval="evaluation and logging")


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    g = p.add_argument_group("what to do")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its ckpt.pt")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds a run")
    g.add_argument("--sample", action="store_true", help="only sample from --out-dir/ckpt.pt")
    add_flags(p, Settings, GROUPS, PRESETS["cpu"])
    add_flags(p, Sampling, GROUPS, PRESETS["cpu"], p.add_argument_group("sampling"))
    return p


def resolve(given, base=None):
    """The run's Settings from the flags given (a dict): defaults < preset (or, on --resume, the checkpoint's
    settings) < flags. --min-lr follows --lr at the preset's ratio, --lr-decay-iters defaults to --max-iters."""
    fresh = base is None  # (on --resume the checkpoint's settings are the base, its decay included)
    if fresh:
        preset = given.get("preset") or ("shakespeare-char" if torch.cuda.is_available() else "cpu")
        base = dict(asdict(Settings()), **PRESETS[preset], preset=preset)
    shorthand = OLMO2 if given.get("olmo2") else {}  # what --olmo2 stands for; flags given still win
    cfg = {**base, **shorthand, **{k: v for k, v in given.items() if k in base}}
    if fresh and cfg["independent_wd"] and "weight_decay" not in given:
        cfg["weight_decay"] = INDEPENDENT_WD
    if cfg["min_lr"] is None:
        cfg["min_lr"] = cfg["lr"] / 10
    elif "lr" in given and "min_lr" not in given:  # the preset's final/peak ratio, at the new peak
        cfg["min_lr"] = base["min_lr"] * cfg["lr"] / base["lr"]
    cfg["lr_decay_iters"] = cfg["max_iters"] if cfg["lr_decay_iters"] is None else cfg["lr_decay_iters"]
    if cfg["init_from"]:  # GPT-2's weights fix the architecture: flags that would change it are refused
        cfg.update(gpt2_architecture(cfg["init_from"], given, Settings))
    if cfg["out_dir"] is not None and not str(cfg["out_dir"]).strip():
        raise TrainError("--out-dir is empty; give a folder (or leave the flag out for out/<preset>[-<flags>])")
    cfg = Settings(**cfg)
    cfg = cfg if cfg.out_dir else replace(cfg, out_dir=default_out_dir(cfg))
    check_ranges(cfg)
    if cfg.min_lr > cfg.lr:
        raise TrainError(f"--min-lr ({cfg.min_lr}) must not exceed --lr ({cfg.lr})")
    model_config(cfg, vocab_size=1)  # GPTConfig's own rules (and the optimizers it takes), before any data is read
    return cfg


def resume_settings(given, ckpt):
    """The settings of a resumed run: the checkpoint's, then the flags given (what may not change: saved_settings)."""
    return resolve(given, base=saved_settings(given, ckpt, Settings))


# ----------------------------------------------------------------------------------------------------
# Data, model and optimizer


def model_config(cfg, vocab_size):
    try:
        config = GPTConfig(**{k: getattr(cfg, k) for k in MODEL_KEYS}, vocab_size=vocab_size)
        config.check_optimizer(cfg.optimizer)
        return config
    except ValueError as e:
        raise TrainError(str(e)) from None


def build_model(cfg, meta, resume_ckpt, proc):
    """The GPT of cfg on proc's device (initialized with seed + rank, or GPT-2's weights) and its AdamW."""
    if cfg.init_from and meta["tokenizer"] != "gpt2":
        raise TrainError(f"--init-from {cfg.init_from} needs GPT-2 BPE tokens; the data holds {meta['tokenizer']} "
                         "tokens (prepare it with --tokenizer gpt2)")
    pretrained = load_gpt2(cfg.init_from, cfg.dropout, cfg.block_size) if cfg.init_from and not resume_ckpt else None
    # GPT-2's 50257 padded to a multiple of 64 (50304) is faster on GPUs (nanoGPT); a GPT-2 start keeps GPT-2's
    # 50257 (as nanoGPT's init_from='gpt2'); char vocabularies stay as they are
    padded = meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257 and not cfg.init_from
    config = model_config(cfg, 50304 if padded else meta["vocab_size"])
    torch.manual_seed(cfg.seed + proc.rank)
    model = GPT(config)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
    model = model.to(proc.device)
    model.grad_checkpointing = cfg.grad_checkpoint
    # PyTorch decays a step by lr_t x weight_decay; --independent-wd (Wortsman et al., arXiv 2309.14322, Sec. 3.2.2)
    # divides by the peak lr, so the decay per step is lr_t / lr x --weight-decay at every peak learning rate
    weight_decay = cfg.weight_decay / cfg.lr if cfg.independent_wd else cfg.weight_decay
    optimizer = model.configure_optimizers(weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), proc.device.type,
                                           sdd_official_decay=cfg.sdd_official_decay, optimizer=cfg.optimizer,
                                           olmo_decay=cfg.olmo_decay)
    return model, optimizer


def get_lr(it, cfg):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters, then constant (nanoGPT)."""
    if it < cfg.warmup_iters:
        return cfg.lr * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def set_learning_rate(optimizer, lr):
    """lr into every parameter group, times the group's lr_scale (muP's hidden matrices: 1/m, configure_optimizers)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def estimate_loss(model, cfg, data_dir, vocab_size, proc, autocast):
    """Mean loss over eval_iters batches per split, the same batches at every evaluation (a fixed generator) and
    none of the training randomness. Under torchrun each rank computes every world-th batch, one all-reduce the rest."""
    out = {}
    model.eval()
    for i, split in enumerate(("train", "val")):
        batches = Batches(data_dir / f"{split}.bin", cfg.block_size, cfg.batch_size, proc.device, cfg.seed + i,
                          vocab_size)
        losses = torch.zeros(cfg.eval_iters, device=proc.device)  # (eval_iters,), this rank's entries filled in
        for k in range(cfg.eval_iters):
            x, y = batches.next()  # every rank draws every batch, so that the k-th is the same on all
            if k % proc.world == proc.rank:
                with autocast:
                    losses[k] = model(x, y)[1].float()
        if proc.ddp:  # x + 0 is x: the sum of the ranks' vectors is the whole vector, exactly
            dist.all_reduce(losses)
        out[split] = losses.mean().item()
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------
# Training


def train(cfg, resume_ckpt=None, stop=None, overwrite=False):
    """Train with the resolved settings cfg (continuing resume_ckpt if given; a fresh run replaces one in
    cfg.out_dir only with overwrite); stop's signal ends the run at a step boundary with a checkpoint. Returns
    (model, codec, summary), the summary on rank 0 only."""
    stop = stop or StopRequest()
    stop.before_start = True  # until the run folder is opened, Ctrl-C stops at once: nothing to save yet
    proc = setup_process(cfg.device, lambda: stop.signum is not None)
    keep_freed_memory()  # fewer page faults per step on CPU (docs/speed.md)
    dtype = pick_dtype(cfg.dtype, proc.device)  # bf16 on CUDA (fp16 + GradScaler where bf16 is missing), else fp32
    autocast = torch.autocast(proc.device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = proc.device.type == "cuda"
    # compiled by default, CPU included (a step ~1.2x faster there); eager with a note where compile does not work
    compiled = compile_or_eager(cfg.compile, proc.device, say=print if proc.master else lambda _: None)
    if cfg.optimizer == "muon" and proc.device.type == "cpu" and cpu_has_bf16_matmul() is False and proc.master:
        print("note: this CPU has no bf16 matmul instructions and torch.optim.Muon runs Newton-Schulz in bf16: "
              "expect a step of several AdamW steps (docs/speed.md)")

    data_dir, meta = prepare_data.load_prepared(cfg.data, cfg.tokenizer, cfg.block_size)
    check_the_run_fits(cfg, meta["vocab_size"], proc.device)  # before the model and batches are allocated
    raw_model, optimizer = build_model(cfg, meta, resume_ckpt, proc)
    vocab = meta["vocab_size"]
    batches = Batches(data_dir / "train.bin", cfg.block_size, cfg.batch_size, proc.device,
                      cfg.seed + 1000 + proc.rank, vocab)
    codec = Codec(meta)  # what sampling needs (a tokenizer), checked before the run folder is touched
    stop.before_start = False
    run = Run(cfg, proc, raw_model, optimizer, batches, meta, resume_ckpt, overwrite)  # restores resume_ckpt
    model = wrap_model(raw_model, compiled, proc)
    run.print_start(dtype, compiled, data_dir, resume_ckpt)
    # rank 0's diagnostics, on one fixed validation batch of up to 8 sequences, the same at every record
    diag_batch = Batches(data_dir / "val.bin", cfg.block_size, min(8, cfg.batch_size), proc.device, cfg.seed + 7,
                         vocab).next()
    diag = DiagnosticsRecorder(raw_model, diag_batch, run.diag_log, cfg.diag_interval if run.diag_log else 0)
    stop.at_once = not proc.ddp  # a second Ctrl-C stops at once (under torchrun the launcher ends every rank)
    try:
        eval_model = model.module if proc.ddp else model  # compiled where training is, without DDP's hooks
        training_loop(run, model, diag, lambda: estimate_loss(eval_model, cfg, data_dir, vocab, proc, autocast),
                      autocast, stop)
    except KeyboardInterrupt:
        run.stopped_at_once()
    stop.at_once = False  # from here on, writing summary.json, further signals are ignored
    return raw_model, codec, run.write_summary_and_close(diag.seconds)


def training_loop(run, model, diag, evaluate, autocast, stop):
    """Optimizer steps until run.cfg.max_iters, a stop request or a divergence. model: what the step runs (compiled,
    DDP); run.model: the model itself."""
    cfg, proc, optimizer, scaler, batches = run.cfg, run.proc, run.optimizer, run.scaler, run.batches
    data_state = batches.gen.get_state()  # the data RNG state *before* this iteration's first batch
    x, y = batches.next()
    while True:
        evaluating = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters
        # the host learns the steps' losses (a divergence, a spike) and of a stop request every --log-interval
        # steps and before each checkpoint: one device sync then, not one per step (nanoGPT's rhythm)
        if evaluating or run.iter_num % cfg.log_interval == 0:
            if run.settle_steps():
                return
            if any_rank(stop.signum is not None, proc):
                return run.write_checkpoint_and_stop(data_state)
        lr = get_lr(run.iter_num, cfg)
        set_learning_rate(optimizer, lr)
        if evaluating:
            run.record_eval_and_write_checkpoint(evaluate(), data_state)
        if run.iter_num >= cfg.max_iters:
            return

        # --- the step: forward and backward over the micro-batches, clip, update -----------------------
        diag.before_step(run.iter_num)
        loss_sum = z_sum = None
        for micro_step in range(run.grad_accum):
            if proc.ddp:  # all-reduce the gradients only on the last micro-step
                model.require_backward_grad_sync = micro_step == run.grad_accum - 1
            with autocast:  # the z-loss term comes back apart (None when off), to be logged apart
                _, loss, z = model(x, y, with_z_loss=True)  # the logits not kept: no two alive at once
                loss = loss / run.grad_accum
            if micro_step == run.grad_accum - 1:
                data_state = batches.gen.get_state()
            x, y = batches.next()  # prefetch the next batch while the backward runs
            scaler.scale(loss).backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            if z is not None:
                z_sum = z / run.grad_accum if z_sum is None else z_sum + z / run.grad_accum
        scaler.unscale_(optimizer)
        diag.after_backward()
        grad_norm = run.clip_gradients()  # the global norm before clipping; clipped at --grad-clip (and --zclip's)
        # with --skip-nonfinite a bad step must be known before its update (a host sync per step); else it is
        # found by settle_steps, before anything is saved, and the run stops there
        nonfinite = cfg.skip_nonfinite and nonfinite_part(float(loss_sum), float(grad_norm), scaler, proc)
        # --skip-spikes (OLMo-core's skip-step): a step whose loss or gradient norm is a spike makes no update
        spike = not nonfinite and run.skip_this_spike(loss_sum, grad_norm)
        if not (nonfinite or spike):
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        # --------------------------------------------------------------------------------------------------

        if spike:  # counted and logged by skip_this_spike: on to the next step
            continue
        if nonfinite:  # no update was made: count it and go on, or stop without saving after too many
            if run.skip_or_stop_on_nonfinite(nonfinite, float(loss_sum), float(grad_norm)):
                continue
            return
        diag.after_update()  # update ratios, before TVR edits the weights
        tvr_after_step(run.model, run.iter_num + 1)  # TVR (arXiv 2503.17500), when on
        qk_clip_after_step(run.model)  # QK-Clip (arXiv 2507.20534), when on
        run.count_step(loss_sum, z_sum, grad_norm, lr)
        diag.end_step()


# ----------------------------------------------------------------------------------------------------
# Sampling


def print_samples(model, codec, sampling, device):
    """sampling.num_samples samples from its prompt, each token printed as soon as it is drawn."""
    prompt = codec.prompt_ids(sampling.prompt)
    model.eval()
    for _ in range(sampling.num_samples):
        tokens = model.generate_tokens(torch.tensor([prompt], device=device), sampling.max_new_tokens,
                                       sampling.temperature, sampling.top_k or None, vocab_limit=codec.vocab_size)
        for piece in codec.decode_as_drawn(prompt, (int(t) for t in tokens)):
            print(piece, end="", flush=True)
        print("\n" + "-" * 60)


def sample_from_checkpoint(cfg, sampling):
    ckpt, device = load_checkpoint(path := Path(cfg.out_dir) / "ckpt.pt"), pick_device(cfg.device)
    model = model_from_checkpoint(ckpt, path).to(device)
    torch.manual_seed(cfg.seed)
    print_samples(model, Codec(ckpt["meta"]), sampling, device)


def settings_given(args):  # the Settings given on a command line: build_parser's namespace holds only those
    return {k: v for k, v in vars(args).items() if k in Settings.__dataclass_fields__}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in argv or "--lrs" in argv:
        print(f"error: comparisons and LR sweeps run with: python -m tools.sweep {' '.join(argv)}", file=sys.stderr)
        return 2
    parsed = build_parser().parse_args(argv)
    args, given = vars(parsed), settings_given(parsed)
    try:
        sampling = Sampling(**{k: v for k, v in args.items() if k in Sampling.__dataclass_fields__})
        check_ranges(sampling)  # before training, so that a run never ends in a bad sample
        cfg, resume_ckpt = resolve(given), None
        if args.get("sample"):
            sample_from_checkpoint(cfg, sampling)
            return 0
        if args.get("resume"):
            resume_ckpt = load_checkpoint(Path(cfg.out_dir) / "ckpt.pt", for_resume=True)
            cfg = resume_settings(given, resume_ckpt)
            if resume_ckpt["iter_num"] >= cfg.max_iters:
                raise TrainError(f"the run in {cfg.out_dir} is finished ({resume_ckpt['iter_num']} of "
                                 f"{cfg.max_iters} iters); raise --max-iters to train on, or plot it with: "
                                 f"python -m tools.plots {cfg.out_dir}")
        else:
            check_fresh_start(cfg.out_dir, args.get("overwrite"))
        with StopRequest() as stop:
            model, codec, summary = train(cfg, resume_ckpt, stop, args.get("overwrite", False))
        if summary is not None:
            if summary["diverged"]:
                return 1
            if summary["interrupted_at"] is not None:
                return 128 + (stop.signum or signal.SIGINT)  # the shell's convention: 130 SIGINT, 143 SIGTERM
            torch.manual_seed(cfg.seed)
            print("\n--- sample ---")
            print_samples(model, codec, replace(sampling, num_samples=1), next(model.parameters()).device)
        return 0
    except (TrainError, DataError) as e:
        # under torchrun one line per node (its local rank 0), not one per process; without torchrun always
        if os.environ.get("LOCAL_RANK", "0") == "0" or "TORCHELASTIC_RUN_ID" not in os.environ:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside training (sampling, data preparation): one line, the shell's 130
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.stdout = OutputThatSurvivesAClosedPipe(sys.stdout)  # | head must not end the run
    sys.exit(main())
