"""
stable-gpt: a nanoGPT-style GPT in one file, where every normalization placement and every recent
training stabilizer is one config flag away.

With every GPTConfig field at its default this *is* nanoGPT's GPT (same module and parameter names, same
forward, and the same seed draws nanoGPT's weights bit for bit), so nanoGPT checkpoints load with strict=True,
and this file works as nanoGPT's model.py for nanoGPT's train.py and sample.py (estimate_mfu, crop_block_size,
from_pretrained). The flags:

  norm            "layernorm" | "rmsnorm" | "dyt" (DyT, arXiv 2503.10622)      -> make_norm, DyT, emb_scale
  norm_position   "pre" (GPT-2) | "post" (Vaswani et al. 2017) | "mix" (Mix-LN, arXiv 2412.13795)
                  | "deepnorm" (DeepNet, arXiv 2203.00555) | "peri" (Peri-LN, arXiv 2502.02732)
                  | "reorder" (OLMo 2, arXiv 2501.00656)                      -> Block, emb_norm
  sdd             Scale-Distribution Decoupling, arXiv 2502.15499        -> SDDNorm, CausalSelfAttention, MLP,
                                                     GPT (emb_norm), GPT.configure_optimizers (decay groups)
  lns             LayerNorm Scaling ("The Curse of Depth"), arXiv 2502.05795 -> Block.lns_scale
                  (under sdd: Block.lns_branch_scale, this project's adaptation)
  wesar           Weight Scaling as Reparameterization, arXiv 2410.05052 -> WeSaRLinear, WeSaREmbedding,
                                                     make_linear, GPT._init_matrix (gates), fold_wesar
  lir             Layer Index Rescaling init, arXiv 2503.17500           -> GPT._init_stds
  tvr             Target Variance Rescaling, arXiv 2503.17500            -> target_variance_rescale(), tvr_after_step()
The fixes practitioners already use, to weigh the papers against:
  qk_norm         a norm on q and k per head (arXiv 2309.14322); qk_norm_full: over all heads (OLMo 2)
                                                                                  -> CausalSelfAttention
  qk_clip         QK-Clip (Kimi K2, arXiv 2507.20534)   -> CausalSelfAttention.record_max_logit, qk_clip_after_step()
  attn_gate       gated attention (arXiv 2505.06708)                              -> CausalSelfAttention.c_gate
  z_loss          PaLM's auxiliary loss z_loss * mean(log^2 Z), arXiv 2204.02311  -> GPT.forward, z_loss_term()
  logit_softcap   C * tanh(logits / C) (Gemma 2, arXiv 2408.00118)                -> GPT.softcap
  Muon            GPT.configure_optimizers(optimizer="muon"): torch.optim.Muon + AdamW -> MuonWithAdamW
  attn_sink       a learned sink logit per head (gpt-oss, arXiv 2508.10925)   -> CausalSelfAttention.attend_with_sink
  hyper_connections  "hc": Hyper-Connections (arXiv 2409.19606); "mhc": manifold-constrained (arXiv 2512.24880)
                                                     -> sinkhorn, HyperConnection, Block._residual, GPT.forward
  mup             muP (arXiv 2203.03466), as EleutherAI's nanoGPT-mup      -> GPT._init_stds, GPT.configure_optimizers
                  (lr_scale), CausalSelfAttention (attn_scale), GPT.forward (output multiplier)

Where a technique must touch several places (SDD wraps linears inside two modules), each place names the
paper at the point of use; CODE_MAP (after GPTConfig) lists every definition that reads each flag, kept true by
a test. Read top to bottom: the config, the norms, the stabilizers' modules, attention, MLP,
Block, GPT, then the functions a training loop calls (z-loss, TVR, WeSaR folding), the diagnostics of what
happens inside (per-layer residual variance, angular distance, layer importance, update ratios, activation
outliers, weight std), and last the config's rules: check_config() (what is refused, and why) and
combination_notes() (what acts differently from its paper in a given combination).

References:
1) nanoGPT model.py: https://github.com/karpathy/nanoGPT/blob/master/model.py
2) GPT-2: https://d4mucfpksywv.cloudfront.net/better-language-models/language_models_are_unsupervised_multitask_learners.pdf
"""

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

NORMS = ("layernorm", "rmsnorm", "dyt")
# OpenAI's GPT-2 sizes (124M, 350M, 774M, 1558M parameters), for GPT.from_pretrained
GPT2_SIZES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768),
              "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
              "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
              "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600)}
NORM_POSITIONS = ("pre", "post", "mix", "deepnorm", "peri", "reorder")
HYPER_CONNECTIONS = ("off", "hc", "mhc")


# ----------------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # True: bias in Linears and norms, like GPT-2. False: a bit better and faster
    norm: str = "layernorm"  # "layernorm" | "rmsnorm" | "dyt" (DyT: no normalization, a tanh)
    norm_eps: float = 1e-5  # eps of those norms (nanoGPT's 1e-5; OLMo 2's RMSNorms 1e-6); SDD's norms keep 1e-5
    norm_position: str = "pre"  # "pre" | "post" | "mix" | "deepnorm" | "peri" | "reorder" (OLMo 2)
    mix_fraction: float = 0.25  # Mix-LN: the first floor(mix_fraction * n_layer) blocks are Post-LN
    init_std: float = 0.02  # base std of every weight matrix (GPT-2); with lir, block l gets init_std/sqrt(l)
    scaled_init: Optional[bool] = None  # GPT-2's c_proj std init_std/sqrt(2*n_layer); None = auto (see below)
    sdd: bool = False  # Scale-Distribution Decoupling
    lns: bool = False  # LayerNorm Scaling
    wesar: bool = False  # Weight Scaling as Reparameterization
    wesar_sigma: float = math.sqrt(4e-5)  # WeSaR's common std of every raw matrix (sigma^2 = 4e-5)
    lir: bool = False  # Layer Index Rescaling init
    tvr: bool = False  # Target Variance Rescaling (applied by the training loop, see target_variance_rescale)
    tvr_target: float = 0.04  # target std of every block matrix
    tvr_interval: int = 50  # rescale after every tvr_interval optimizer steps
    tvr_threshold: float = 1.0  # rescale a matrix only when std > tvr_threshold * tvr_target
    qk_norm: bool = False  # a norm (of type `norm`, with a gain) on q and k per head
    qk_norm_full: bool = False  # with qk_norm: over the whole q and k projections (OLMo 2), not per head
    qk_clip: float = 0.0  # QK-Clip's tau (Kimi K2): after each step, heads whose max logit exceeded it shrink W_q, W_k
    attn_gate: bool = False  # gated attention: the attention output times sigmoid(x W_gate), elementwise
    z_loss: float = 0.0  # coefficient of PaLM's z-loss in the training loss (0: off; Wortsman et al. use 1e-4)
    logit_softcap: float = 0.0  # cap the output logits at +-logit_softcap with a tanh (0: off; Gemma 2 uses 30)
    attn_sink: bool = False  # a learned sink logit per head in the attention softmax (gpt-oss)
    hyper_connections: str = "off"  # "off" | "hc" (Hyper-Connections) | "mhc" (manifold-constrained, DeepSeek)
    hc_streams: int = 4  # hyper-connections: n, the number of residual streams (both papers' n = 4)
    hc_sinkhorn_iters: int = 20  # mhc: Sinkhorn-Knopp iterations projecting H_res (the paper's t_max = 20)
    mup: bool = False  # muP: width-scaled init, learning rates, attention scale and output multiplier
    mup_base_width: int = 128  # muP's base width: at n_embd == mup_base_width muP's init and LRs are the standard ones

    def __post_init__(self):
        check_config(self)  # the rules are at the end of this file

    def depth_scaled_init(self) -> bool:
        """GPT-2's residual-projection init 0.02/sqrt(2*n_layer): on by default only for the nanoGPT block
        (Pre-LN with no technique that replaces it). Post-LN and Mix-LN use nanoGPT's plain N(0, 0.02), as
        the LNS repository's Post-LN and Mix-LN baselines (the original Transformer used Xavier init); the
        norm after every residual add already bounds the stream, and a depth-scaled Post-LN is DeepNorm's job
        (norm_position="deepnorm"). Peri-LN: off, as its output norm removes c_proj's scale anyway."""
        if self.scaled_init is not None:
            return self.scaled_init
        return self.norm_position == "pre" and not (self.lns or self.sdd or self.lir)

    def is_post_norm(self, layer_idx: int) -> bool:
        """Whether block layer_idx (0-based) is Post-LN."""
        if self.norm_position == "mix":  # Mix-LN (arXiv 2412.13795): first floor(alpha * L) blocks Post-LN
            # the 1e-9 keeps float rounding from losing a block: 0.29 * 100 is 28.999999999999996
            return layer_idx < math.floor(self.mix_fraction * self.n_layer + 1e-9)
        return self.norm_position in ("post", "deepnorm")

    def scale_for_depth(self, x: float) -> float:
        """x / sqrt(2 * n_layer), one factor per residual branch: GPT-2's c_proj init std and the initial
        gain of SDD's residual-output norms (official code)."""
        return x / math.sqrt(2 * self.n_layer)

    def check_optimizer(self, optimizer: str):
        """Raise ValueError for an optimizer these techniques cannot use (configure_optimizers and the script's
        settings both ask here, so the rule and its message live once)."""
        if self.mup and optimizer == "muon":
            raise ValueError("muP with Muon: muP's per-layer learning rates are Adam's (arXiv 2203.03466, Table 3); "
                             "Muon's update already scales with each matrix's shape (match_rms_adamw). Use one of them")

    def mup_width_mult(self) -> float:
        """muP's width multiplier m = n_embd / mup_base_width (1 without muP)."""
        return self.n_embd / self.mup_base_width if self.mup else 1.0

    def techniques(self) -> str:
        """One line that says what is on, e.g. 'pre-layernorm + sdd + lns'."""
        on = [name for name in ("sdd", "lns", "wesar", "lir", "tvr", "qk_norm", "qk_norm_full", "attn_gate",
                                "attn_sink", "mup") if getattr(self, name)]
        if self.hyper_connections != "off":
            on.append(f"{self.hyper_connections}({self.hc_streams})")
        on += [f"{name}({getattr(self, name):g})" for name in ("z_loss", "logit_softcap", "qk_clip")
               if getattr(self, name)]
        place = f"mix({self.mix_fraction:g})" if self.norm_position == "mix" else self.norm_position
        return " + ".join([f"{place}-{self.norm}"] + on + (["scaled_init"] if self.depth_scaled_init() else []))


# Where each technique's code lives: for every GPTConfig field that switches a technique, each definition in this
# file that reads it (a class stands for all of its methods), besides GPTConfig's own methods and the rules at the
# end (check_config, combination_notes). Adding a flag: its field above, its line here, its code at the places named,
# its tests (docs/techniques.md, "Adding a technique"); test_the_code_map_names_every_place_that_reads_a_flag
# fails while a definition reads a field that its line does not name, or names a place that does not read it.
CODE_MAP = {
    "norm": ("make_norm", "GPT.__init__"),
    "norm_eps": ("make_norm",),
    "norm_position": ("Block.__init__", "GPT.__init__", "GPT._init_stds"),
    "mix_fraction": (),  # read through GPTConfig.is_post_norm
    "init_std": ("GPT._init_weights", "GPT._init_stds"),
    "scaled_init": (),  # read through GPTConfig.depth_scaled_init
    "sdd": ("make_linear", "CausalSelfAttention.__init__", "MLP.__init__", "Block.__init__", "GPT.__init__",
            "GPT.configure_optimizers"),
    "lns": ("Block.__init__",),
    "wesar": ("make_linear", "GPT.__init__"),
    "wesar_sigma": ("GPT._init_matrix",),
    "lir": ("GPT._init_stds",),
    "tvr": ("tvr_after_step",),
    "tvr_target": ("tvr_after_step",),
    "tvr_interval": ("tvr_after_step",),
    "tvr_threshold": ("tvr_after_step",),
    "qk_norm": ("CausalSelfAttention.__init__",),
    "qk_norm_full": ("CausalSelfAttention.__init__",),
    "qk_clip": ("CausalSelfAttention.__init__", "qk_clip_after_step"),
    "attn_gate": ("CausalSelfAttention.__init__",),
    "z_loss": ("GPT.forward",),
    "logit_softcap": ("GPT.softcap",),
    "attn_sink": ("CausalSelfAttention.__init__",),
    "hyper_connections": ("Block.__init__", "GPT.forward"),
    "hc_streams": ("Block.__init__", "GPT.forward"),
    "hc_sinkhorn_iters": ("Block.__init__",),
    "mup": ("CausalSelfAttention.__init__", "GPT.forward", "GPT._init_stds", "GPT.configure_optimizers"),
    "mup_base_width": (),  # read through GPTConfig.mup_width_mult
}
NANOGPT_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")  # the model itself


# ----------------------------------------------------------------------------------------------------
# Norms: each class copies on its own into any project that imports torch


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias. PyTorch's LayerNorm used to not support simply bias=False."""

    def __init__(self, ndim, bias, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467): x / sqrt(mean(x^2) + eps) * gain (+ bias)."""

    def __init__(self, ndim, bias=False, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):  # (..., ndim) -> (..., ndim)
        y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return y if self.bias is None else y + self.bias


class SDDNorm(nn.Module):
    """Scale-Distribution Decoupling (arXiv 2502.15499, Eq. 1): y = alpha * norm(V x), an RMSNorm with a
    learnable gain alpha (no bias, eps 1e-5, as the official dense code) on the *output* of a linear V.
    The norm fixes the distribution of y; alpha alone sets its scale, so V's scale no longer matters."""

    def __init__(self, ndim, gain=1.0, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((ndim,), float(gain)))  # alpha, one per feature

    def forward(self, x):  # (..., ndim) -> (..., ndim)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DyT(nn.Module):
    """Dynamic Tanh (Zhu et al. 2025, "Transformers without Normalization", arXiv 2503.10622, Eq. 1):
    gamma * tanh(alpha * x) (+ beta), in place of a norm. No statistics over the features: an elementwise
    squashing, with one learnable scalar alpha that sets where the tanh bends."""

    def __init__(self, ndim, alpha=0.5, bias=False):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), float(alpha)))
        self.weight = nn.Parameter(torch.ones(ndim))  # gamma
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None  # beta

    def forward(self, x):  # (..., ndim) -> (..., ndim)
        y = torch.tanh(self.alpha * x) * self.weight
        return y if self.bias is None else y + self.bias


class ScalarGain(nn.Module):
    """x * g, with one learnable scalar g."""

    def __init__(self, init):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return x * self.weight


# DyT's alpha init for LLMs (arXiv 2503.10622, its LLaMA 2 7B setting, the smallest LLM it reports; official code
# jiachenzhu/DyT, other_tasks/LLaMA: attn_alpha_init_value, ffn_ and dec_alpha_init_value): 0.8 for the norm of
# the attention sublayer, 0.2 for every other (the MLP's, the final one, output norms). An extrapolation at this
# project's widths: the official values fall as the models widen and 7B (4096 wide) is the narrowest LLM they
# give, so 64-768-wide models may want a larger alpha (docs/log.md: DyT learns slowly here); tune it. The
# official code also decays alpha, gamma and the shared scale; this project's decay groups leave them undecayed
# (norm-like gains, as nanoGPT's groups do).
DYT_ALPHA_ATTN, DYT_ALPHA_OTHER = 0.8, 0.2


def make_norm(config, ndim, dyt_alpha=DYT_ALPHA_OTHER, bias=None):
    """The model's norm type (--norm), with a bias where bias (default: config.bias); dyt_alpha: DyT's alpha."""
    bias = config.bias if bias is None else bias
    if config.norm == "dyt":
        return DyT(ndim, dyt_alpha, bias)
    return RMSNorm(ndim, bias, config.norm_eps) if config.norm == "rmsnorm" else LayerNorm(ndim, bias, config.norm_eps)


# ----------------------------------------------------------------------------------------------------
# WeSaR: weight scaling as reparameterization (arXiv 2410.05052)


def split_rows(weight, n):
    """The n row blocks of a weight, as a view: (out, in) -> (n, out / n, in); q, k, v of the fused c_attn."""
    return weight.view(n, -1, weight.shape[-1])


class WeSaRLinear(nn.Linear):
    """A Linear whose weight is gate * W (WeSaR, arXiv 2410.05052, Sec. 3): every raw W is drawn with one
    common std, and one learnable scalar gate per matrix carries the scale the init scheme asks for, so
    Adam's relative updates |dW|/|W| are the same for every matrix. A fused q/k/v matrix has one gate per
    row block (n_gates=3), as the paper gates W_q, W_k and W_v separately."""

    def __init__(self, in_features, out_features, bias=True, n_gates=1):
        super().__init__(in_features, out_features, bias)
        self.gate = nn.Parameter(torch.ones(n_gates))

    def effective_weight(self):
        w = split_rows(self.weight, len(self.gate))  # (n_gates, out/n_gates, in)
        return (w * self.gate.view(-1, 1, 1)).view_as(self.weight)  # (out, in)

    def forward(self, x):
        return F.linear(x, self.effective_weight(), self.bias)


class WeSaREmbedding(nn.Embedding):
    """An Embedding whose table is gate * W (WeSaR). Row lookup is linear, so the gate scales the output."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__(num_embeddings, embedding_dim)
        self.gate = nn.Parameter(torch.ones(1))

    def effective_weight(self):
        return self.weight * self.gate

    def forward(self, idx):
        return super().forward(idx) * self.gate


WESAR_MODULES = (WeSaRLinear, WeSaREmbedding)  # isinstance(m, WESAR_MODULES): m's weight in use is gate * W


def make_linear(config, in_features, out_features, n_gates=1, in_block=True):
    # Under SDD every block linear is followed by an output norm, which makes it invariant to the scale of
    # its weight: a WeSaR gate there would get zero gradient. SDD already decouples scale (its gains play
    # the gate's role), so WeSaR then gates only the embeddings and the head.
    if config.wesar and not (config.sdd and in_block):
        return WeSaRLinear(in_features, out_features, config.bias if in_block else False, n_gates)
    return nn.Linear(in_features, out_features, bias=config.bias if in_block else False)


def sinkhorn(logits, iters):
    """Sinkhorn-Knopp: a doubly stochastic matrix (entries > 0, every row and column summing to 1) from the
    logits (..., n, n), as mHC projects H_res onto the Birkhoff polytope (arXiv 2512.24880). As x-transformers'
    sinkhorn() does (this project's reference code for mHC): in fp32, start from a softmax over each column
    (the paper starts from exp(logits); this adds one column normalization), then iters times normalize the
    rows, then the columns. The columns then sum to 1 exactly, the rows to within the iterations' error."""
    m = logits.float().softmax(dim=-2)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)  # rows
        m = m / m.sum(dim=-2, keepdim=True)  # columns
    return m.to(logits.dtype)


class HyperConnection(nn.Module):
    """The maps of one hyper-connection: n residual streams x (B, T, n, C) in place of one, and per sublayer f

        x_next = H_res^T x + H_post (x) f(H_pre x)      (x_next_k = sum_s H_res[s, k] x_s + H_post[k] f)

    forward(x) returns (f's input H_pre x (B, T, C), H_res (B, T, n, n), H_post (B, T, n)); update() applies them.
    Each map is a static part plus a dynamic one read from the per-stream LayerNorm of x (Hyper-Connections, arXiv
    2409.19606, Appendix J, Algorithm 2, dynamic; its init: H_pre one-hot on stream layer_index mod n, H_res the
    identity, H_post ones, the dynamic weights 0 with scales 0.01). constrained (mHC, arXiv 2512.24880):
    H_pre = sigmoid(.), H_post = 2 sigmoid(.), and H_res made doubly stochastic by sinkhorn(), so that no product
    of H_res over depth can amplify the signal.
    As x-transformers' HyperConnection (num_residual_streams, hyper_conn_sinkhorn_iters): the mHC paper computes
    the dynamic part from the RMSNorm of all n streams flattened (nC wide); the code uses HC's per-stream norm,
    and, before H_post's sigmoid, adds 2 sigmoid(dynamic) x scale to the static part. Unconstrained (HC): the
    dynamic parts pass through tanh (Algorithm 2) and nothing bounds the maps."""

    def __init__(self, n_embd, n_streams, layer_index, constrained, sinkhorn_iters):
        super().__init__()
        n = n_streams
        self.constrained, self.sinkhorn_iters = constrained, sinkhorn_iters
        self.norm = nn.LayerNorm(n_embd, bias=False)  # HC's per-stream norm (x-transformers' too)
        h_pre = torch.zeros(n, 1)
        h_pre[layer_index % n] = 1.0  # each sublayer reads its own stream at init
        self.static_alpha = nn.Parameter(torch.cat([h_pre, torch.eye(n)], dim=1))  # (n, 1 + n): [H_pre | H_res]
        self.dynamic_alpha = nn.Parameter(torch.zeros(n_embd, 1 + n))
        self.dynamic_alpha_scale = nn.Parameter(torch.tensor(0.01))
        self.static_beta = nn.Parameter(torch.ones(n))  # H_post
        self.dynamic_beta = nn.Parameter(torch.zeros(n_embd))
        self.dynamic_beta_scale = nn.Parameter(torch.tensor(0.01))

    def forward(self, x):  # x: (B, T, n, C)
        with torch.autocast(x.device.type, enabled=False):  # fp32 under autocast: see update()
            return self._maps(x.float())

    def _maps(self, x):
        normed = self.norm(x)
        dynamic_alpha, dynamic_beta = normed @ self.dynamic_alpha, normed @ self.dynamic_beta  # (B,T,n,1+n), (B,T,n)
        if self.constrained:  # mHC
            alpha = dynamic_alpha * self.dynamic_alpha_scale + self.static_alpha
            h_pre, h_res = torch.sigmoid(alpha[..., 0]), sinkhorn(alpha[..., 1:], self.sinkhorn_iters)
            beta = 2 * torch.sigmoid(dynamic_beta) * self.dynamic_beta_scale + self.static_beta
            h_post = 2 * torch.sigmoid(beta)
        else:  # HC
            alpha = torch.tanh(dynamic_alpha) * self.dynamic_alpha_scale + self.static_alpha
            h_pre, h_res = alpha[..., 0], alpha[..., 1:]
            h_post = torch.tanh(dynamic_beta) * self.dynamic_beta_scale + self.static_beta
        branch_input = torch.einsum("bts,btsc->btc", h_pre, x)  # H_pre x: (B, T, C)
        return branch_input, h_res, h_post

    @staticmethod
    def update(x, h_res, h_post, branch_output):
        """x_next = H_res^T x + H_post (x) f: (B, T, n, C). In fp32 under autocast, as a plain residual add is: a
        bf16 einsum would round the residual streams to bf16 at every sublayer (and the maps' gradients, sums
        with cancellation, lose ~10%)."""
        with torch.autocast(x.device.type, enabled=False):
            mixed = torch.einsum("btsk,btsc->btkc", h_res, x.float())
            return mixed + h_post.unsqueeze(-1) * branch_output.float().unsqueeze(2)


# ----------------------------------------------------------------------------------------------------
# The Transformer


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        head_size = config.n_embd // config.n_head
        # key, query, value projections for all heads, but in a batch
        self.c_attn = make_linear(config, config.n_embd, 3 * config.n_embd, n_gates=3)
        # output projection
        self.c_proj = make_linear(config, config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        # SDD, placed as the official dense code does (kaihemo/SDD@79cf800, dense/olmo/model.py): q and k
        # normalized per head (one gain of size head_size shared by all heads); v not normalized before
        # attention, but the attention output (the mixed values) normalized before c_proj; c_proj's output
        # normalized with a gain starting at 1/sqrt(2*n_layer) (official code; the paper text says 1/sqrt(L)),
        # which replaces GPT-2's depth-scaled c_proj init.
        sdd = config.sdd
        # QK-norm (--qk-norm): the model's norm type with a gain and no bias on q and k before attention, so the
        # attention logits q.k/sqrt(hs) cannot grow with the weights' scale (QK-layernorm: Dehghani et al. 2023,
        # arXiv 2302.05442; Wortsman et al., arXiv 2309.14322, Sec. 3.1.1; both without a bias). Per
        # head by default; qk_norm_full: over the whole q and k projections before they split into heads, as
        # OLMo 2 does (arXiv 2501.00656, Sec. 3; OLMo-core's attention builds q_norm over d_model). SDD's
        # q_norm and k_norm sit in the per-head place; GPTConfig refuses the pair.
        def qk_norm():  # one for q, one for k
            if sdd:
                return SDDNorm(head_size)
            width = config.n_embd if config.qk_norm_full else head_size
            return make_norm(config, width, bias=False) if config.qk_norm else nn.Identity()

        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.qk_norm_full = config.qk_norm_full
        self.context_norm = SDDNorm(config.n_embd) if sdd else nn.Identity()
        self.out_norm = SDDNorm(config.n_embd, gain=config.scale_for_depth(1.0)) if sdd else nn.Identity()
        # Gated attention (Qiu et al. 2025, arXiv 2505.06708, Sec. 2-3, their best variant G1: elementwise,
        # head-specific, sigmoid, after SDPA): Y' = Y * sigmoid(X W_gate), X the attention's input (after the
        # pre-norm, the hidden state q, k and v are computed from). Elementwise over the concatenated heads is
        # head-specific already. Under SDD the gate multiplies the normalized context, right before c_proj.
        self.c_gate = make_linear(config, config.n_embd, config.n_embd) if config.attn_gate else None
        # QK-Clip (Kimi K2, arXiv 2507.20534, Sec. 2.1): the largest logit of each head in the step's
        # forwards, kept here (not saved: it starts afresh each step) for qk_clip_after_step
        if config.qk_clip > 0:
            self.register_buffer("max_logit", torch.full((config.n_head,), -math.inf), persistent=False)
        # Learned attention sink (gpt-oss, arXiv 2508.10925, its architecture; x-transformers' head_learned_sink):
        # one logit s_h per head joins every query's softmax with a value of 0, so a head can put its mass nowhere
        # instead of on the first token. Init 0, as x-transformers (HF's gpt-oss draws N(0, 0.02)).
        self.sink = nn.Parameter(torch.zeros(config.n_head)) if config.attn_sink else None
        # muP's attention logits q.k / hs instead of / sqrt(hs) (arXiv 2203.03466, its attention scaling; EleutherAI's
        # nanoGPT-mup): q and k grow correlated as they train, so their dot product grows like hs, not sqrt(hs)
        self.attn_scale = 1 / head_size if config.mup else 1 / math.sqrt(head_size)
        self.sdpa_scale = self.attn_scale if config.mup else None  # None: SDPA's own 1/sqrt(hs), nanoGPT's exact call

    def forward(self, x):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        if self.qk_norm_full:  # OLMo 2: one norm over all heads' q (and k), (B, T, C)
            q, k = self.q_norm(q), self.k_norm(k)
        else:  # per head, (B, T, nh, hs)
            q, k = self.q_norm(q.view(B, T, self.n_head, hs)), self.k_norm(k.view(B, T, self.n_head, hs))
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if hasattr(self, "max_logit") and self.training:
            self.record_max_logit(q, k)
        # causal self-attention, fused (flash) kernels where available: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
        dropout_p = self.dropout if self.training else 0.0
        if self.sink is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.sdpa_scale)
        else:
            y = self.attend_with_sink(q, k, v, dropout_p)
        y = self.context_norm(y.transpose(1, 2).contiguous().view(B, T, C))  # all head outputs side by side
        if self.c_gate is not None:
            y = y * torch.sigmoid(self.c_gate(x))  # (B, T, C), the gate from the attention's input
        return self.resid_dropout(self.out_norm(self.c_proj(y)))

    def attend_with_sink(self, q, k, v, dropout_p):
        """Causal attention whose softmax has one more logit per head, the sink s_h, with a value of 0 (gpt-oss):
        p_ij = exp(l_ij) / (exp(s_h) + sum_{j' <= i} exp(l_ij')), y_i = sum_j p_ij v_j. Run in SDPA's fused kernel
        as one extra key: the sink key goes first; one zero query row goes first too, so that is_causal (aligned
        top-left) lets real query i see the sink and keys 0..i; one more feature column carries s_h: q' = [q, 1],
        k' = [k, 0] and [0, s_h / scale] for the sink, v' = [v, 0] and 0 for the sink (q', k', v' one width, which
        the flash kernel needs). The price: head size hs + 1 (flash pads it to a multiple of 8: +12.5% attention
        FLOPs at hs 64) and a copy of q, k, v. q, k, v: (B, nh, T, hs) -> (B, nh, T, hs)."""
        B, nh, T, hs = q.shape
        sink_key = F.pad((self.sink.to(k.dtype) / self.attn_scale).view(1, nh, 1, 1), (hs, 0)).expand(B, nh, 1, hs + 1)
        q = F.pad(F.pad(q, (0, 1), value=1.0), (0, 0, 1, 0))  # (B, nh, 1 + T, hs + 1)
        k = torch.cat([sink_key, F.pad(k, (0, 1))], dim=2)  # (B, nh, 1 + T, hs + 1)
        v = F.pad(v, (0, 1, 1, 0))  # (B, nh, 1 + T, hs + 1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=self.attn_scale)
        return y[:, :, 1:, :hs]

    QK_CLIP_ROWS = 128  # query rows per block of QK-Clip's statistic: (B, nh, 128, T) logits alive at once

    @torch.no_grad()
    def record_max_logit(self, q, k):
        """QK-Clip's statistic: each head's largest pre-softmax logit q_i . k_j x attn_scale (1/sqrt(hs); muP: 1/hs)
        over the causal pairs j <= i of this forward, the running max over the step's micro-batches. Flash attention
        never forms the logits, so this is one more q @ k^T (the cost QK-Clip pays; nothing when it is off), in blocks
        of QK_CLIP_ROWS query rows against the keys they may see, in the compute dtype (bf16 under autocast),
        the max in fp32: never the whole (B, nh, T, T) matrix, nor an fp32 copy of it (at gpt2-124m's micro-batch
        that would be 1.6 GB per layer)."""
        T, scale = q.size(2), self.attn_scale
        head_max = torch.full_like(self.max_logit, -math.inf)  # (nh,)
        for start in range(0, T, self.QK_CLIP_ROWS):
            stop = min(start + self.QK_CLIP_ROWS, T)
            logits = q[:, :, start:stop] @ k[:, :, :stop].transpose(-2, -1)  # (B, nh, rows, stop)
            causal = torch.ones(stop - start, stop, dtype=torch.bool, device=q.device).tril(diagonal=start)
            block_max = logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)).float() * scale  # (nh,)
            head_max = torch.maximum(head_max, block_max)
        self.max_logit.copy_(torch.maximum(self.max_logit, head_max))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = make_linear(config, config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = make_linear(config, 4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        # SDD (arXiv 2502.15499; official dense code): norm on the up-projection output before the
        # activation, and on the down-projection output with a gain starting at 1/sqrt(2*n_layer).
        sdd = config.sdd
        self.fc_norm = SDDNorm(4 * config.n_embd) if sdd else nn.Identity()
        self.out_norm = SDDNorm(config.n_embd, gain=config.scale_for_depth(1.0)) if sdd else nn.Identity()

    def forward(self, x):
        x = self.gelu(self.fc_norm(self.c_fc(x)))  # (B, T, 4C)
        return self.dropout(self.out_norm(self.c_proj(x)))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd, dyt_alpha=DYT_ALPHA_ATTN)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)
        self.post_norm = config.is_post_norm(layer_idx)
        # DeepNorm (arXiv 2203.00555, Sec. 2.3, decoder-only): x_{l+1} = LN(alpha * x_l + G(x_l)), alpha = (2N)^(1/4)
        self.deepnorm_alpha = (2 * config.n_layer) ** 0.25 if config.norm_position == "deepnorm" else None
        # LNS (arXiv 2502.05795, Eq. 12): the output of both pre-norms of layer l (1-based) times 1/sqrt(l).
        # A constant, not a parameter: folding it into the gain's init would change Adam's step on the gain.
        lns_scale = 1 / math.sqrt(layer_idx + 1) if config.lns and not self.post_norm else None
        # Under SDD, Eq. 12 would be a no-op: every branch is invariant to the scale of its input (q and k are
        # normalized, the context norm removes v's scale, c_fc is followed by a norm). This project's
        # adaptation keeps LNS's intent (damp deep blocks' contributions so the residual variance stops
        # growing with depth) by putting the same constant where scale survives: on each branch's output,
        # after SDD's output norm and gain. Not the paper's placement; see the README, "How the flags combine".
        # Under Peri-LN Eq. 12 is not a no-op (un-normalized q and k make q.k scale by 1/l, the GELU input by
        # 1/sqrt(l), before the output norm), so there the paper's placement stays.
        self.lns_scale = lns_scale if not config.sdd else None  # on the pre-norm output (Eq. 12)
        self.lns_branch_scale = lns_scale if config.sdd else None  # on the branch output (under SDD)
        # Peri-LN (arXiv 2502.02732, Sec. 3; CogView's Sandwich-LN, arXiv 2105.13290): a second norm on each sublayer's output,
        # x = x + norm_out(f(norm_in(x))), gain 1 at init. The stream itself is never normalized, so ln_f stays,
        # and GPT-2's 1/sqrt(2L) c_proj init is off (depth_scaled_init): the output norm would remove it. The
        # embeddings are normalized too (GPT.transformer.emb_norm).
        peri = config.norm_position == "peri"
        self.attn_out_norm = make_norm(config, config.n_embd) if peri else nn.Identity()
        self.mlp_out_norm = make_norm(config, config.n_embd) if peri else nn.Identity()
        # OLMo 2's reordered norm (arXiv 2501.00656, Sec. 3; OLMo-core ReorderedNormTransformerBlock):
        # x = x + norm(f(x)), the norm on each sublayer's output only (ln_1 and ln_2 keep their names)
        self.reorder = config.norm_position == "reorder"
        # Hyper-connections (arXiv 2409.19606; mHC, arXiv 2512.24880): each sublayer's residual add becomes the
        # mixing of n streams by its HyperConnection's maps (sublayer 2l and 2l + 1 of the stack: their layer_index)
        hc = config.hyper_connections
        self.hc_1, self.hc_2 = (HyperConnection(config.n_embd, config.hc_streams, 2 * layer_idx + i, hc == "mhc",
                                                config.hc_sinkhorn_iters) if hc != "off" else None for i in (0, 1))

    def forward(self, x):  # x: (B, T, C), or (B, T, n, C) with n hyper-connection streams
        if self.post_norm:  # Post-LN (Vaswani et al. 2017): x = norm(x + sublayer(x))
            x = self.ln_1(self._times(x, self.deepnorm_alpha) + self.attn(x))
            x = self.ln_2(self._times(x, self.deepnorm_alpha) + self.mlp(x))
        elif self.reorder:  # OLMo 2: x = x + norm(sublayer(x))
            x = self._residual(self.hc_1, x, lambda h: self.ln_1(self.attn(h)))
            x = self._residual(self.hc_2, x, lambda h: self.ln_2(self.mlp(h)))
        else:  # Pre-LN (GPT-2): x = x + sublayer(norm(x)); Peri-LN: x = x + norm_out(sublayer(norm(x)))
            x = self._residual(self.hc_1, x, lambda h: self._branch(self.ln_1, self.attn, self.attn_out_norm, h))
            x = self._residual(self.hc_2, x, lambda h: self._branch(self.ln_2, self.mlp, self.mlp_out_norm, h))
        return x

    @staticmethod
    def _residual(hc, x, branch):
        """x + branch(x); with a hyper-connection hc, its update of the n streams instead."""
        if hc is None:
            return x + branch(x)
        branch_input, h_res, h_post = hc(x)
        return hc.update(x, h_res, h_post, branch(branch_input))

    def _branch(self, norm_in, sublayer, norm_out, x):
        """One Pre-LN (or Peri-LN) residual branch, with LNS's constant where it applies."""
        return self._times(norm_out(sublayer(self._times(norm_in(x), self.lns_scale))), self.lns_branch_scale)

    @staticmethod
    def _times(x, scale):
        """x * scale, where scale None means 1 (no op, so that the default model runs nanoGPT's exact ops)."""
        return x if scale is None else x * scale


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.n_embd
        Embedding = WeSaREmbedding if config.wesar else nn.Embedding
        last_is_pre = not config.is_post_norm(config.n_layer - 1)
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(config.vocab_size, C),
            wpe=Embedding(config.block_size, C),
            drop=nn.Dropout(config.dropout),
            # SDD's embedding norm, as the official dense code (kaihemo/SDD@79cf800, dense/olmo/model.py): block
            # 0's input RMSNorm, whose output is also the residual stream, so the stream starts at RMS ~1 and
            # each SDD branch adds RMS ~1/sqrt(2L) to it. Without it the raw embeddings (RMS ~0.02) would be
            # swamped by block 0's normalized branches. Under SDD in every placement; gain 1, no bias, eps 1e-5.
            # Peri-LN has the same problem (its output norms make every branch add RMS ~1) and gets the model's
            # norm there (this project's choice; Gemma 2 scales its embeddings by sqrt(n_embd) to the same end).
            # Measured, 2 layers x 32, 100 steps: val 2.27 without, 1.63 with (Pre-LN: 1.66).
            emb_norm=RMSNorm(C) if config.sdd else make_norm(config, C) if config.norm_position == "peri"
            else nn.Identity(),
            # DyT's LLaMA recipe (official code, other_tasks/LLaMA: shared_scale): a learnable scalar after the
            # embeddings, init sqrt(n_embd), since no norm rescales the embeddings' std 0.02 any more
            emb_scale=ScalarGain(math.sqrt(C)) if config.norm == "dyt" else nn.Identity(),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            # Pre-LN needs a final norm before the head. A Post-LN stack already ends in a norm (the last
            # block's ln_2), so, as in the original Transformer, it gets none.
            ln_f=make_norm(config, C) if last_is_pre else nn.Identity(),
        ))
        self.lm_head = make_linear(config, C, config.vocab_size, in_block=False)
        # weight tying (https://paperswithcode.com/method/weight-tying). Under WeSaR the raw tensor is
        # shared but the embedding and the head keep separate gates, as WeSaR gates W_e and W_p separately.
        self.transformer.wte.weight = self.lm_head.weight
        self._init_weights()
        # activation checkpointing: recompute each block in the backward instead of storing its activations
        # (~1/3 more compute, for the largest configs). A switch like model.train(): it changes memory and
        # time, never a result, so it is not in GPTConfig or the state dict; the training script sets it.
        self.grad_checkpointing = False

    # --- init ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _init_weights(self):
        """Every weight matrix ~ N(0, std^2), biases 0; norms init themselves (gain 1; SDD's residual-output
        gains 1/sqrt(2L)). The std, with sigma = init_std, l the 1-based layer, L = n_layer, x = xavier
        sqrt(2/(fan_in + fan_out)):

        | matrix                  | default (nanoGPT) | scaled_init (1) | lir (2)       | deepnorm (3)  |
        |-------------------------|-------------------|-----------------|---------------|---------------|
        | wte (= lm_head), wpe    | sigma             | sigma           | sigma         | sigma         |
        | attn.c_attn: q, k       | sigma             | sigma           | sigma/sqrt(l) | x             |
        | attn.c_attn: v          | sigma             | sigma           | sigma/sqrt(l) | (8L)^(-1/4) x |
        | mlp.c_fc                | sigma             | sigma           | sigma/sqrt(l) | (8L)^(-1/4) x |
        | attn.c_proj, mlp.c_proj | sigma             | sigma/sqrt(2L)  | sigma/sqrt(l) | (8L)^(-1/4) x |

        (1) GPT-2; on by default for plain Pre-LN only (GPTConfig.depth_scaled_init). (2) arXiv 2503.17500,
        Sec. 3.1. (3) arXiv 2203.00555. WeSaR (arXiv 2410.05052, Sec. 3.2): every raw W ~ N(0, wesar_sigma^2)
        and gate = std / wesar_sigma, so gate * W has the std of the table.

        The draws follow nanoGPT's order, so that with every flag off the same seed gives nanoGPT's weights bit
        for bit: its self.apply(_init_weights) draws wte, wpe, each block's matrices (c_proj at sigma) and last
        lm_head, which redraws the tied wte; then a loop over named_parameters redraws every c_proj at GPT-2's
        sigma/sqrt(2L). A matrix is one draw unless its row blocks' stds differ (DeepNet's q, k against v)."""
        c = self.config
        self._init_matrix(self.transformer.wte, [c.init_std])  # redrawn below as lm_head: kept for the RNG order
        self._init_matrix(self.transformer.wpe, [c.init_std])
        redraw = []  # GPT-2's scaled c_proj: nanoGPT's second pass
        for layer, block in enumerate(self.transformer.h, start=1):
            for path, kinds in block_matrix_paths(block):
                module = block.get_submodule(path)
                stds = self._init_stds(path, kinds, module, layer)
                if path.endswith("c_proj") and c.depth_scaled_init():
                    redraw.append((module, stds))
                    stds = [c.init_std]
                self._init_matrix(module, stds)
        self._init_matrix(self.lm_head, [c.init_std])  # the tied wte (under WeSaR with its own gate)
        for module, stds in redraw:
            self._init_matrix(module, stds)

    def _init_stds(self, path, kinds, module, layer):
        """The init std of each row block ("kind") of the block matrix at path in block layer (1-based)."""
        c = self.config
        # muP (arXiv 2203.03466, Table 3, hidden weights: variance 1/fan_in; EleutherAI's nanoGPT-mup): the std of
        # every hidden matrix over sqrt(width multiplier), so that it is the usual std at the base width
        mup = 1 / math.sqrt(c.mup_width_mult()) if c.mup else 1.0
        if c.norm_position == "deepnorm":
            # DeepNet (arXiv 2203.00555, Fig. 2 pseudo-code): xavier_normal, gain beta = (8N)^(-1/4) on v,
            # the attention output and the FFN; gain 1 on q and k. (The LNS repo's 'deeppost' uses
            # alpha = 2.83 for all depths and gain (8N)^(+1/4); we follow the DeepNet paper.)
            beta = (8 * c.n_layer) ** -0.25
            fan_out, fan_in = module.weight.shape
            xavier = math.sqrt(2.0 / (fan_in + fan_out // len(kinds)))
            # (xavier's std already falls as 1/sqrt(width): muP's hidden-weight rule, so muP adds nothing here)
            return [xavier if kind in ("q", "k", "gate") else beta * xavier for kind in kinds]  # gate: off v's path
        if c.lir:
            # LIR (arXiv 2503.17500, Sec. 3.1): every matrix of block l drawn from N(0, (sigma/sqrt(l))^2),
            # l 1-based, plain (not truncated) normal; no extra shrink of the residual projections.
            return [c.init_std * mup / math.sqrt(layer)] * len(kinds)
        if path.endswith("c_proj") and c.depth_scaled_init():
            # GPT-2 paper: scale the residual projections by 1/sqrt(N), N = 2 * n_layer residual branches
            return [c.scale_for_depth(c.init_std) * mup]
        return [c.init_std * mup] * len(kinds)

    def _init_matrix(self, module, stds):
        if isinstance(module, WESAR_MODULES):
            nn.init.normal_(module.weight, 0.0, self.config.wesar_sigma)
            module.gate.copy_(torch.tensor(stds) / self.config.wesar_sigma)
        elif len(set(stds)) == 1:
            nn.init.normal_(module.weight, 0.0, stds[0])
        else:
            for rows, std in zip(split_rows(module.weight, len(stds)), stds):
                nn.init.normal_(rows, 0.0, std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    # --- forward ------------------------------------------------------------------------------------
    def get_num_params(self, non_embedding=True):
        """Number of parameters. The position embeddings are subtracted by default (as nanoGPT); the token
        embeddings would be too, except that they are shared with the head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, with_z_loss=False):
        """(logits, loss), nanoGPT's; with_z_loss: (logits, loss, the loss's z-loss term detached, None when off),
        for a trainer that logs it apart without a second logsumexp over the logits."""
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} is longer than block_size {self.config.block_size}")
        # Validating ids costs a device sync, so it is done on CPU only (the training script checks every
        # batch on the host before it moves); on GPU an out-of-range id would be a device-side assert.
        if idx.device.type == "cpu" and not torch.compiler.is_compiling() and t > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got min {lo}, max {hi}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        tok_emb = self.transformer.wte(idx)  # token embeddings (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings (t, n_embd)
        x = self.transformer.emb_norm(self.transformer.emb_scale(self.transformer.drop(tok_emb + pos_emb)))
        if self.config.hyper_connections != "off":  # n copies of the stream (arXiv 2409.19606)
            x = x.unsqueeze(2).expand(-1, -1, self.config.hc_streams, -1)  # (b, t, n, n_embd)
        for block in self.transformer.h:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        if self.config.hyper_connections != "off":
            x = x.sum(dim=2)  # the streams' sum goes on (the HC paper; x-transformers): (b, t, n_embd)
        x = self.transformer.ln_f(x)
        if self.config.mup:
            # muP's output multiplier 1/m (arXiv 2203.03466, Table 3, output weights; EleutherAI's nanoGPT-mup scales x,
            # as here): the head is the tied wte, whose init and learning rate stay the embedding's
            x = x * (1 / self.config.mup_width_mult())
        if targets is None:  # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.softcap(self.lm_head(x[:, [-1], :]))  # note: using list [-1] to preserve the time dim
            return (logits, None, None) if with_z_loss else (logits, None)
        logits = self.softcap(self.lm_head(x))  # (b, t, vocab_size)
        # in fp32: under CUDA autocast the logits are bf16, and bf16 log-probs lose the loss's last digits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        z = None
        if self.training and self.config.z_loss > 0:
            # z-loss (PaLM, arXiv 2204.02311, Sec. 5; Wortsman et al., arXiv 2309.14322, Sec. 3.1.2): pulls log Z
            # towards 0 so the output logits cannot drift to huge values. Training only: in eval mode the loss
            # is the cross-entropy alone, so val losses compare across runs with and without it.
            z = z_loss_term(logits, self.config.z_loss, targets)
            loss = loss + z
        if with_z_loss:
            return logits, loss, None if z is None else z.detach()
        return logits, loss

    def softcap(self, logits):
        """Logit soft-capping (Gemma 2, arXiv 2408.00118, Sec. 2; nanochat): C * tanh(logits / C) keeps every
        logit in (-C, C) and is ~ the identity well inside it. A no-op when logit_softcap is 0 (off)."""
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c > 0 else logits

    # --- training -----------------------------------------------------------------------------------
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, sdd_official_decay=True,
                             optimizer="adamw", olmo_decay=False):
        """AdamW with two groups, one decayed by weight_decay and one not; optimizer="muon": torch.optim.Muon for
        the block matrices and AdamW for the rest (MuonWithAdamW). Both decay a step by 1 - lr_t x weight_decay.
        nanoGPT's groups (the default): decay every >= 2-D tensor (matrices and embeddings), not the biases
        and norm gains. Under SDD with sdd_official_decay (default), the official SDD configs' groups instead
        (kaihemo/SDD@79cf800, dense yaml: decay_norm_and_bias true, embeddings not decayed): decay the block
        matrices, every norm gain (SDD's included) and every bias; not the embeddings (wte, which is also
        the head, and wpe). These are OLMo's groups (OLMo-core: every tensor decayed but the embeddings), and
        olmo_decay=True asks for them without SDD (OLMo 2 trains so, arXiv 2501.00656, Sec. 3). A difference: OLMo 2's
        head is untied from wte and decayed; here the head *is* wte (nanoGPT's weight tying), so under these groups
        the head is undecayed too. WeSaR gates are
        never decayed: decay would pull a whole matrix's scale toward 0, which the gate exists to set (arXiv
        2410.05052, Sec. 3).
        Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalizes the momentum of each 2-D hidden matrix with
        Newton-Schulz; everything else (embeddings, the tied head, gains, biases, gates, DyT's alpha) stays
        on AdamW, as modded-nanogpt and nanochat split it. adjust_lr_fn="match_rms_adamw" (Moonlight, arXiv
        2502.16982, Sec. 2: update scaled by 0.2 sqrt(max(A, B)), the RMS of an AdamW update) lets Muon take
        AdamW's learning rate and weight decay, so one --lr grid means the same for both. c_attn is one (3C, C)
        matrix, as nanoGPT's, orthogonalized whole (Megatron's Muon and modded-nanogpt split q, k, v)."""
        self.config.check_optimizer(optimizer)
        embeddings = {id(self.transformer.wte.weight), id(self.transformer.wpe.weight)}
        # never decayed: WeSaR's gates, and hyper-connections' maps (decay would pull H_res's static part off
        # the identity)
        never_decayed = {id(m.gate) for m in self.modules() if isinstance(m, WESAR_MODULES)}
        never_decayed |= {id(p) for m in self.modules() if isinstance(m, HyperConnection) for p in m.parameters()}
        olmo_groups = (self.config.sdd and sdd_official_decay) or olmo_decay
        muon = {id(m.weight) for _, _, m in _block_linears(self)} if optimizer == "muon" else set()
        # muP (arXiv 2203.03466, Table 3, Adam, hidden weights: learning rate / m; EleutherAI's nanoGPT-mup): every
        # block matrix in its own group with lr_scale 1/m, which the training loop multiplies into its learning rate;
        # embeddings, the tied head, gains and biases keep the base rate. Decay is lr x weight_decay as ever, so the
        # hidden matrices' decay per step falls by 1/m too (also with --independent-wd)
        hidden = {id(m.weight) for _, _, m in _block_linears(self)} if self.config.mup else set()

        def decayed(p):
            if id(p) in never_decayed:
                return False
            return id(p) not in embeddings if olmo_groups else p.dim() >= 2

        params = [p for p in self.parameters() if p.requires_grad]  # a tied tensor comes once
        rest = [p for p in params if id(p) not in muon]
        groups = [{"params": [p for p in rest if decayed(p) and id(p) not in hidden], "weight_decay": weight_decay},
                  {"params": [p for p in rest if not decayed(p)], "weight_decay": 0.0}]
        if hidden:
            scale = 1 / self.config.mup_width_mult()
            groups.append({"params": [p for p in rest if id(p) in hidden], "weight_decay": weight_decay,
                           "lr": learning_rate * scale, "lr_scale": scale})
        # the fused AdamW kernel is much faster on CUDA
        use_fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if use_fused else {}))
        if optimizer == "adamw":
            return adamw
        if optimizer != "muon":
            raise ValueError(f"unknown optimizer {optimizer!r}; valid: adamw, muon")
        return MuonWithAdamW(torch.optim.Muon([p for p in params if id(p) in muon], lr=learning_rate,
                                              weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilization, as nanoGPT's: fwdbwd_per_iter sequences of block_size tokens per iteration
        of dt seconds, over peak_flops (default nanoGPT's A100 bf16 peak, 312 TFLOP/s; the training script
        passes the detected GPU's). FLOPs per token from the PaLM paper's Appendix B (arXiv 2204.02311):
        6N + 12 * L * H * Q * T (matmuls, forward and backward, plus attention); SDD's norms and other
        elementwise work are not counted, as they use no tensor cores."""
        c = self.config
        flops_per_token = 6 * self.get_num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
        return flops_per_token * c.block_size * fwdbwd_per_iter / dt / peak_flops

    # --- nanoGPT's model surgery and GPT-2 weights ----------------------------------------------------
    def crop_block_size(self, block_size):
        """Shrink the context length, e.g. to fine-tune GPT-2 (block 1024) at 256: keeps the first block_size
        position embeddings. (nanoGPT also crops its causal-mask buffer; SDPA needs none.)"""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"crop_block_size: block_size must be in [1, {self.config.block_size}], got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        """GPT-2 weights from Hugging Face (needs the transformers package, and the weights downloaded or
        cached): model_type in gpt2, gpt2-medium, gpt2-large, gpt2-xl; override_args may set dropout only."""
        if model_type not in GPT2_SIZES:
            raise ValueError(f"unknown model_type {model_type!r}; valid: {', '.join(GPT2_SIZES)}")
        override_args = override_args or {}
        if set(override_args) - {"dropout"}:
            raise ValueError(f"override_args may set dropout only, got {sorted(override_args)}")
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            raise ImportError("GPT.from_pretrained needs the transformers package: pip install transformers") from None
        print(f"loading weights from pretrained gpt: {model_type}")
        return cls.from_hf_gpt2(GPT2LMHeadModel.from_pretrained(model_type), **override_args)

    @classmethod
    @torch.no_grad()
    def from_hf_gpt2(cls, hf_model, dropout=0.0):
        """A GPT with the weights of a transformers GPT2LMHeadModel. Hugging Face stores the four block
        matrices as Conv1D, (in, out), so they are transposed into nn.Linear's (out, in)."""
        hc = hf_model.config
        config = GPTConfig(block_size=hc.n_positions, vocab_size=hc.vocab_size, n_layer=hc.n_layer,
                           n_head=hc.n_head, n_embd=hc.n_embd, dropout=dropout, bias=True)
        model = cls(config)
        sd, sd_hf = model.state_dict(), hf_model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for name, p in sd.items():
            w = sd_hf[name]
            p.copy_(w.t() if name.endswith(conv1d) else w)
        return model

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None):
        """Take a conditioning sequence of indices idx (LongTensor of shape (b, t)) and complete it
        max_new_tokens times, feeding each prediction back in. Call model.eval() first. vocab_limit: sample
        only ids below it (a vocabulary padded for speed, 50257 -> 50304, has ids no tokenizer knows)."""
        for idx_next in self.generate_tokens(idx, max_new_tokens, temperature, top_k, vocab_limit):
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, vocab_limit=None):
        """generate, one token at a time: yields each new (b, 1) batch of ids as soon as it is drawn."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(max_new_tokens):
            # crop the context to block_size if it is too long
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :vocab_limit] / temperature  # (b, vocab_limit or vocab_size)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)  # (b, 1)
            idx = torch.cat((idx, idx_next), dim=1)
            yield idx_next


# ----------------------------------------------------------------------------------------------------
# Functions a training loop calls


class MuonWithAdamW:
    """Two optimizers stepped as one (what a training loop, a GradScaler and a checkpoint need of one):
    param_groups lists both's groups (the same dicts, so setting a group's "lr" sets it where it lives), and
    the state dict holds both."""

    def __init__(self, muon, adamw):
        self.optimizers = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self):  # read afresh: load_state_dict replaces each optimizer's group dicts
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self, closure=None):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        if set(state) != set(self.optimizers):
            raise ValueError(f"not a Muon + AdamW state: it holds {sorted(state)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def log_z(logits):
    """log Z = logsumexp of the output logits at each position, in fp32: (..., vocab) -> (...). The softmax is
    exp(logit - log Z); the logits can drift up together with no effect on it, which z-loss prevents."""
    return torch.logsumexp(logits.float(), dim=-1)


def z_loss_term(logits, coef, targets=None):
    """PaLM's z-loss, coef * mean(log^2 Z) over the positions (those whose target is not -1, the positions the
    cross-entropy counts, when targets are given)."""
    z2 = log_z(logits).square()  # (b, t)
    if targets is None:
        return coef * z2.mean()
    counted = (targets != -1).float()  # a mask, not boolean indexing: a fixed shape for torch.compile
    return coef * (z2 * counted).sum() / counted.sum()


@torch.no_grad()
def fold_wesar(model):
    """A plain GPT (wesar=False) that computes the same function as a WeSaR model: W <- gate * W everywhere
    (the reparameterization folds away after training), e.g. to export to nanoGPT. The tied embedding and
    head share one raw tensor but have two gates; the folded tensor takes the embedding's gate, and the
    head's extra factor gate_head / gate_emb goes into the gain and bias of the last norm before the head (the
    logits are linear in them, and nothing else reads that norm's output)."""
    plain = GPT(GPTConfig(**dict(vars(model.config), wesar=False))).to(model.lm_head.weight.device)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".gate")}
    for name, module in model.named_modules():
        if isinstance(module, WESAR_MODULES) and module is not model.lm_head:
            state[f"{name}.weight"] = module.effective_weight()
    state["lm_head.weight"] = state["transformer.wte.weight"]  # still tied
    plain.load_state_dict(state)
    ratio = model.lm_head.gate / model.transformer.wte.gate
    ln_f = plain.transformer.ln_f
    last_norm = plain.transformer.h[-1].ln_2 if isinstance(ln_f, nn.Identity) else ln_f
    for p in (last_norm.weight, last_norm.bias):
        if p is not None:
            p.mul_(ratio)
    return plain


# The weight matrices inside a block, by module path, with the names of their row blocks: the fused c_attn
# holds q, k and v, which the papers treat as three matrices.
BLOCK_MATRICES = (("attn.c_attn", ("q", "k", "v")), ("attn.c_proj", ("attn_out",)), ("mlp.c_fc", ("fc",)),
                  ("mlp.c_proj", ("mlp_out",)), ("attn.c_gate", ("gate",)))  # c_gate: with attn_gate only


def block_matrix_paths(block):
    """BLOCK_MATRICES' (path, kinds) that this block has (attn.c_gate only with attn_gate)."""
    return [(path, kinds) for path, kinds in BLOCK_MATRICES if path != "attn.c_gate" or block.attn.c_gate is not None]


def _block_linears(model):
    """Yield (layer, kinds, module) for every linear inside the blocks."""
    for layer, block in enumerate(model.transformer.h):
        for path, kinds in block_matrix_paths(block):
            yield layer, kinds, block.get_submodule(path)


def block_matrices(model):
    """Yield (layer, kind, rows, gate) for every weight matrix inside the blocks: rows is a view of the raw
    weight (q, k, v each their own), gate its WeSaR gate or None (the matrix in use is gate * rows)."""
    for layer, kinds, module in _block_linears(model):
        gates = module.gate if isinstance(module, WESAR_MODULES) else [None] * len(kinds)
        rows = split_rows(module.weight, len(kinds))
        yield from ((layer, kind, w, gate) for kind, w, gate in zip(kinds, rows, gates))


@torch.no_grad()
def target_variance_rescale(model, target, threshold=1.0):
    """TVR (arXiv 2503.17500, Sec. 3.2): w <- (w - mean(w)) / std(w) * target + mean(w) for every weight
    matrix inside the blocks whose std exceeds threshold * target (down only, as the paper's runs behave;
    the official code's default threshold is 1.2). Call it after optimizer.step(), every N steps.

    Per matrix, with q, k and v (row blocks of the fused c_attn) each rescaled on their own, as the
    paper's separate projections. The std is the unbiased fp32 std of the *effective* weight (gate * W
    under WeSaR). Untouched: embeddings, lm_head, norms, biases (the official code zeroes biases; their
    runs had none, so we leave them), AdamW state. Returns the number of matrices rescaled."""
    n_rescaled = 0
    for _, _, rows, gate in block_matrices(model):
        w = rows.float()
        mean, std = w.mean(), w.std() * (1.0 if gate is None else gate.abs())
        if std > threshold * target:
            rows.copy_((w - mean) * (target / std) + mean)
            n_rescaled += 1
    return n_rescaled


def tvr_after_step(model, step):
    """TVR's schedule (arXiv 2503.17500, Sec. 3.2; official code: every 50 steps): call after optimizer step
    `step` (1-based; optimizer steps, not micro-batches). Rescales when the model has tvr on and step is a
    multiple of tvr_interval; deterministic, so every DDP rank makes the same edit. Returns the number of
    matrices rescaled."""
    c = model.config
    if not (c.tvr and step % c.tvr_interval == 0):
        return 0
    return target_variance_rescale(model, c.tvr_target, c.tvr_threshold)


@torch.no_grad()
def qk_clip_after_step(model):
    """QK-Clip (Kimi K2, arXiv 2507.20534, Sec. 2.1; per head, its form for multi-head attention): call after
    each optimizer step. For every head h whose largest logit S_h in the step's forwards (record_max_logit)
    exceeded tau, scale that head's rows of W_q and of W_k (and their biases) by sqrt(tau / S_h), so that the
    same inputs would give a largest logit of exactly tau; other heads are left alone. Under torchrun the ranks
    first agree on S_h (the max over all ranks' batches), so that every replica makes the same edit. Returns
    the number of heads clipped, as a tensor (reading it would cost a device sync)."""
    tau, clipped = model.config.qk_clip, torch.zeros((), dtype=torch.long)
    if tau <= 0:
        return clipped
    if torch.distributed.is_initialized():  # one all-reduce for every layer's statistic, not one per layer
        stacked = torch.stack([block.attn.max_logit for block in model.transformer.h])  # (L, nh)
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX)
        for block, agreed in zip(model.transformer.h, stacked):
            block.attn.max_logit.copy_(agreed)
    for block in model.transformer.h:
        attn = block.attn
        over = attn.max_logit > tau  # (nh,); -inf (no forward this step) never is
        gamma = torch.where(over, tau / attn.max_logit, torch.ones_like(attn.max_logit))  # (nh,)
        row_scale = gamma.sqrt().repeat_interleave(attn.n_embd // attn.n_head)  # (C,): each head's rows of q or k
        q_rows, k_rows = split_rows(attn.c_attn.weight, 3)[:2]  # (C, C) each, views (raw W under WeSaR)
        q_rows.mul_(row_scale[:, None])
        k_rows.mul_(row_scale[:, None])
        if attn.c_attn.bias is not None:
            for b in attn.c_attn.bias.view(3, -1)[:2]:
                b.mul_(row_scale)
        attn.max_logit.fill_(-math.inf)  # the next step's forwards record afresh
        clipped = clipped.to(over.device) + over.sum()
    return clipped


# ----------------------------------------------------------------------------------------------------
# Diagnostics: what happens inside, per layer and per matrix. Nothing here runs unless called.


def angular_distance(a, b):
    """Curse of Depth (arXiv 2502.05795, Eq. 1): arccos(cos(a_t, b_t)) / pi for each token t, averaged.
    0: same direction (a block that leaves the stream's direction alone); 0.5: orthogonal; 1: opposite."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
    return (torch.arccos(cos) / math.pi).mean().item()


def kurtosis(x):
    """E[(x - mean)^4] / var^2 over all elements: 3 for a Gaussian, large when a few activations are huge
    (the massive activations that TVR targets, arXiv 2503.17500 / 2503.22329)."""
    d = x.float().flatten()
    d = d - d.mean()
    return (d.pow(4).mean() / d.pow(2).mean().pow(2)).item()


def attention_logit_max(q, k, scale=None):
    """The largest attention logit q_i . k_j x scale (default 1/sqrt(head size); muP's 1/hs) over heads and causal
    pairs j <= i, signed, as Wortsman et al. plot it (arXiv 2309.14322, Sec. 3.1.1; Dehghani et al. 2023, arXiv
    2302.05442): the logits whose growth makes the softmax one-hot and training diverge, and what QK-Clip bounds.
    q, k: (B, T, n_head, head_size), as they enter attention."""
    T, hs = q.shape[1], q.shape[-1]
    scale = 1 / math.sqrt(hs) if scale is None else scale
    logits = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * scale  # (B, nh, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, -math.inf).max().item()


@torch.no_grad()
def activation_stats(model, idx, targets=None):
    """Per-block statistics of one forward pass over idx (B, T), in eval mode, for block l = 0..L-1:
    variance: the residual stream's variance after block l, over features, averaged over tokens (Curse
      of Depth Fig. 4; before ln_f); rms: its root mean square;
    angular_distance: between the stream entering and leaving block l (0 = the block does nothing);
    max_abs, kurtosis: of the stream after block l; mlp_in_max_abs, mlp_in_kurtosis: of the MLP's input;
    attn_logit_max: attention_logit_max() of block l (q and k after any q/k norm).
    With targets (the forward then computes every position's logits), also, over all positions:
    logit_lse_mean, logit_lse_std: of log Z of the output logits (output-logit divergence, Wortsman et al.,
      arXiv 2309.14322, Sec. 3.1.2: what z-loss controls).
    With hyper-connections, hc_gain_forward and hc_gain_backward: hc_gains() of the stack's H_res."""
    stats = {k: [] for k in ("variance", "rms", "angular_distance", "max_abs", "kurtosis", "mlp_in_max_abs",
                             "mlp_in_kurtosis", "attn_logit_max")}
    queries = []

    def after_block(module, args, out):
        stats["variance"].append(out.float().var(-1).mean().item())
        stats["rms"].append(out.float().pow(2).mean().sqrt().item())
        stats["angular_distance"].append(angular_distance(args[0], out))
        stats["max_abs"].append(out.abs().max().item())
        stats["kurtosis"].append(kurtosis(out))

    def before_mlp(module, args):
        stats["mlp_in_max_abs"].append(args[0].abs().max().item())
        stats["mlp_in_kurtosis"].append(kurtosis(args[0]))

    heads = lambda t, attn: t.view(*t.shape[:2], attn.n_head, -1)  # (B, T, C) (full-width QK-norm) or heads

    def after_q_norm(attn):  # called before k_norm in every block
        return lambda module, args, q: queries.append(heads(q, attn))

    def after_k_norm(attn):
        return lambda module, args, k: stats["attn_logit_max"].append(attention_logit_max(queries.pop(),
                                                                                          heads(k, attn),
                                                                                          attn.attn_scale))

    hooks = [h for b in model.transformer.h for h in (b.register_forward_hook(after_block),
                                                      b.mlp.register_forward_pre_hook(before_mlp),
                                                      b.attn.q_norm.register_forward_hook(after_q_norm(b.attn)),
                                                      b.attn.k_norm.register_forward_hook(after_k_norm(b.attn)))]
    h_res = []  # each sublayer's H_res, in order
    hooks += [hc.register_forward_hook(lambda module, args, out: h_res.append(out[1]))
              for b in model.transformer.h for hc in (b.hc_1, b.hc_2) if hc is not None]
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(idx, targets)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if targets is not None:
        lse = log_z(logits)
        stats.update(logit_lse_mean=lse.mean().item(), logit_lse_std=lse.std().item())
    if h_res:
        stats.update(hc_gains(h_res))
    return stats


def hc_gains(h_res):
    """mHC's "Amax gain magnitude" (arXiv 2512.24880, its measure of HC's instability) of the residual path: for the
    composite map from the embeddings to the end of block l (the product of H_res^T over its sublayers, two per
    block), its largest absolute row sum (hc_gain_forward: how much it can amplify the signal) and column sum
    (hc_gain_backward: the gradient), each the max over tokens. Under mHC, at any depth, the forward gain is exactly 1
    (H_res's columns sum to 1, so every product's rows do) and the backward gain ~1 (its rows, to Sinkhorn's error);
    HC's unconstrained maps compound. h_res: [(B, T, n, n)] per sublayer."""
    composite, forward, backward = None, [], []
    for i, h in enumerate(h_res):
        step = h.float().transpose(-1, -2)  # x_next = H_res^T x: (B, T, n, n)
        composite = step if composite is None else step @ composite
        if i % 2 == 1:  # the end of a block
            forward.append(composite.abs().sum(-1).amax().item())
            backward.append(composite.abs().sum(-2).amax().item())
    return dict(hc_gain_forward=forward, hc_gain_backward=backward)


@torch.no_grad()
def loss_without_blocks(model, idx, targets, skip=()):
    """The loss of the model with the blocks in `skip` removed (no fine-tuning), in eval mode."""
    blocks, was_training = model.transformer.h, model.training
    model.transformer.h = nn.ModuleList([b for i, b in enumerate(blocks) if i not in set(skip)])
    model.eval()
    try:
        return model(idx, targets)[1].item()
    finally:
        model.transformer.h = blocks
        model.train(was_training)


def layer_importance(model, idx, targets):
    """Curse of Depth (arXiv 2502.05795, Sec. 2, "performance drop"): for each block l, the loss increase
    when block l alone is removed. Near 0 for a block that does nothing."""
    full = loss_without_blocks(model, idx, targets)
    return [loss_without_blocks(model, idx, targets, skip=(l,)) - full for l in range(len(model.transformer.h))]


def effective_weight(module):
    """The weight a linear uses: gate * W for a WeSaR module (its effective_weight()), else W."""
    return module.effective_weight() if isinstance(module, WESAR_MODULES) else module.weight


def matrices_in_use(model):
    """Yield ("<layer>.<kind>", matrix) for every block matrix as the forward uses it (q, k, v each their own)."""
    for layer, kinds, module in _block_linears(model):
        rows = split_rows(effective_weight(module), len(kinds))
        yield from ((f"{layer}.{kind}", w) for kind, w in zip(kinds, rows))


@torch.no_grad()
def weight_stds(model):
    """{"<layer>.<kind>": std} of every block matrix in use (gate * W under WeSaR): what TVR controls."""
    return {name: w.float().std().item() for name, w in matrices_in_use(model)}


@torch.no_grad()
def grad_norms(model):
    """{"<layer>.<kind>": norm of the gradient of the raw matrix} (SDD Fig. 7's metric). Call it after backward
    and *before* gradient clipping, as OLMo's logs and SDD's Fig. 7 report them (clipping rescales them all)."""
    return {f"{layer}.{kind}": g.float().norm().item()
            for layer, kinds, module in _block_linears(model) if module.weight.grad is not None
            for kind, g in zip(kinds, split_rows(module.weight.grad, len(kinds)))}


@torch.no_grad()
def matrix_snapshot(model):
    """A copy of every block matrix in use, for update_ratios."""
    return {name: w.detach().float().clone() for name, w in matrices_in_use(model)}


@torch.no_grad()
def update_ratios(before, model):
    """WeSaR's metric (arXiv 2410.05052, Fig. 1): |W_after - W_before| / |W_before| for every block matrix
    in use, given matrix_snapshot(model) taken before the optimizer step."""
    ratios = {}
    for name, w in matrices_in_use(model):  # one matrix at a time, each snapshot freed once used: no second copy
        w_before = before.pop(name)
        ratios[name] = (w.detach().float() - w_before).norm() / w_before.norm()
    return dict(zip(ratios, torch.stack(list(ratios.values())).tolist()))  # one device sync


# ----------------------------------------------------------------------------------------------------
# The config's rules: what each field accepts, what is refused together, and what acts differently


def check_config(config):
    """GPTConfig's rules (run by GPTConfig.__post_init__): every field in its range, and the combinations that make
    no sense refused with the reason (the README's "How the flags combine" lists every pair)."""
    def refuse(msg):
        raise ValueError(f"GPTConfig: {msg}")

    for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "tvr_interval", "hc_streams",
                 "hc_sinkhorn_iters", "mup_base_width"):
        if not isinstance(getattr(config, name), int) or getattr(config, name) <= 0:
            refuse(f"{name} must be a positive integer, got {getattr(config, name)!r}")
    if config.n_embd % config.n_head != 0:
        refuse(f"n_embd ({config.n_embd}) must be divisible by n_head ({config.n_head}); "
               f"e.g. n_head in {[h for h in range(1, 17) if config.n_embd % h == 0]}")
    if config.norm not in NORMS:
        refuse(f"unknown norm {config.norm!r}; valid: {', '.join(NORMS)}")
    if config.norm_position not in NORM_POSITIONS:
        refuse(f"unknown norm_position {config.norm_position!r}; valid: {', '.join(NORM_POSITIONS)}")
    if config.hyper_connections not in HYPER_CONNECTIONS:
        refuse(f"unknown hyper_connections {config.hyper_connections!r}; valid: {', '.join(HYPER_CONNECTIONS)}")
    if not 0.0 <= config.dropout < 1.0:
        refuse(f"dropout must be in [0, 1), got {config.dropout}")
    if not 0.0 <= config.mix_fraction <= 1.0:
        refuse(f"mix_fraction must be in [0, 1], got {config.mix_fraction}")
    for name in ("init_std", "wesar_sigma", "tvr_target", "tvr_threshold"):
        if not 0 < getattr(config, name) < math.inf:
            refuse(f"{name} must be a finite number > 0, got {getattr(config, name)}")
    for name in ("z_loss", "logit_softcap", "qk_clip"):
        if not 0 <= getattr(config, name) < math.inf:
            refuse(f"{name} must be a finite number >= 0 (0: off), got {getattr(config, name)}")
    # Combinations that make no sense are refused here, with the reason.
    if config.lns and config.norm_position in ("post", "deepnorm", "reorder"):
        refuse(f"lns scales the output of a *pre*-norm (arXiv 2502.05795, Eq. 12); {config.norm_position!r} has "
               "none, and scaling after the residual add diverges (paper Table 8). Use norm_position 'pre' or "
               "'mix'")
    if config.sdd and config.qk_norm:
        refuse("qk_norm with sdd: SDD already normalizes q and k per head (its q_norm and k_norm); drop one")
    if config.sdd and config.norm_position in ("peri", "reorder"):
        refuse(f"sdd with norm_position {config.norm_position!r}: SDD already normalizes every branch output (its "
               "out_norm, gain 1/sqrt(2L)); another output norm on top would undo that gain. Use 'pre' or 'post' "
               "with sdd")
    if config.qk_norm_full and not config.qk_norm:
        refuse("qk_norm_full says where QK-norm normalizes (over all heads, as OLMo 2); it needs qk_norm=True")
    if config.qk_clip and (config.qk_norm or config.sdd):
        refuse(f"qk_clip with {'qk_norm' if config.qk_norm else 'sdd'}: QK-Clip shrinks W_q and W_k, and the norm "
               "on q and k undoes any scale of theirs, so the clip would change nothing; QK-Clip is the fix for "
               "attention without QK-norm (arXiv 2507.20534, Sec. 2.1): use one of them")
    if not 0 < config.norm_eps < 1:
        refuse(f"norm_eps must be in (0, 1), got {config.norm_eps!r}")
    if config.norm == "dyt" and config.norm_eps != GPTConfig.norm_eps:
        refuse("norm_eps with norm 'dyt': DyT has no eps (gamma tanh(alpha x) divides by nothing)")
    if config.norm == "dyt" and config.qk_norm:
        refuse("qk_norm with norm 'dyt': DyT does not normalize (tanh(alpha q) keeps q's scale below the bend), so "
               "it would not bound the logits as QK-norm does; use --norm layernorm or rmsnorm with qk_norm")
    if config.hyper_connections != "off" and config.norm_position in ("post", "mix", "deepnorm"):
        refuse(f"hyper_connections with norm_position {config.norm_position!r}: hyper-connections widen the residual "
               "stream that a Pre-LN block adds to (and mHC keeps its identity path); a Post-LN block normalizes "
               "the stream after every add, so there is no such path. Use 'pre', 'peri' or 'reorder'")
    if config.lir and config.norm_position == "deepnorm":
        refuse("lir and deepnorm both define the block init (sigma/sqrt(l) vs DeepNet's xavier gain); pick one")
    if config.scaled_init:
        for flag, why in (("sdd", "SDD moves the 1/sqrt(2L) residual scaling into its output gains"),
                          ("lir", "LIR replaces it (applying both gives neither scheme)")):
            if getattr(config, flag):
                refuse(f"scaled_init=True with {flag}: {why}")
        if config.norm_position == "deepnorm":
            refuse("scaled_init=True with deepnorm: DeepNet has its own init gain")


def combination_notes(config) -> list:
    """One line for each flag that, in this combination, acts differently from its paper (printed by
    the training script at start-up; the README's "How the flags combine" table lists every pair)."""
    notes = []
    if config.lns and config.sdd:
        notes.append("lns under sdd: 1/sqrt(l) multiplies each branch's output (after its output norm), since "
                     "sdd's norms would cancel it on the pre-norm output (this project's adaptation)")
    for flag in ("lir", "tvr"):
        if config.sdd and getattr(config, flag):
            notes.append(f"{flag} under sdd: SDD's output norms hide a block matrix's scale from the forward "
                         f"pass, so {flag} acts only through the effective learning rate of those matrices")
    if config.sdd and config.wesar:
        notes.append("wesar under sdd: only the embeddings and the head are gated (SDD's gains already "
                     "carry the block matrices' scale)")
    for flag, on, which in (("qk_norm", config.qk_norm, "q and k"),
                            ("peri", config.norm_position == "peri", "attn.c_proj and mlp.c_proj"),
                            ("reorder", config.norm_position == "reorder", "attn.c_proj and mlp.c_proj")):
        if config.wesar and on:
            notes.append(f"wesar under {flag}: the gates of {which} get no gradient (the norm after them "
                         "removes their scale); they stay at their init")
    return notes
