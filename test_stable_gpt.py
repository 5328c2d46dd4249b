"""Tests for stable-gpt: tiny models on a synthetic text the tests write themselves (no Shakespeare needed).

    python -m pytest -q
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
import io
import itertools
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare_data
import stable_gpt
import train_shakespeare
from tools import bench, monitors, plots, runs, stability, sweep
from stable_gpt import GPT, GPTConfig, LayerNorm, RMSNorm, SDDNorm

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny(**kw):
    """A tiny config: 2 layers, 4 heads, 32 wide, context 16, 40-token vocab."""
    return GPTConfig(**dict(dict(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, bias=False), **kw))


def synthetic_text(n_chars=60_000, seed=0):
    """A small, learnable text: sentences from a tiny grammar, so a model can beat ln(vocab) by far."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "a young queen", "our horse"]
    verbs = ["sees", "loves", "finds", "hears", "follows", "praises"]
    objects = ["the moon", "a rose", "the river", "my sword", "the crown", "a bird"]
    out, n = [], 0
    while n < n_chars:
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}.\n"
        out.append(s)
        n += len(s)
    return "".join(out)


@pytest.fixture(autouse=True, scope="session")
def data_cache_in_a_temporary_folder(tmp_path_factory):
    """Texts given with --data are tokenized into prepare_data.CACHE: a temporary folder, not the work tree."""
    saved = prepare_data.CACHE
    prepare_data.CACHE = tmp_path_factory.mktemp("data_cache")
    yield
    prepare_data.CACHE = saved


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "synthetic.txt"
    path.write_text(synthetic_text())
    return path


def prepared(tmp_path_factory, text_file, tokenizer):
    out = tmp_path_factory.mktemp(f"data_{tokenizer}")
    prepare_data.prepare(text_file, out, tokenizer)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, text_file):
    return prepared(tmp_path_factory, text_file, "char")


def train_args(data_dir, out_dir, *extra):
    """Command-line arguments for a tiny training run on the synthetic data, eager: at this size compiling costs
    more than it saves (the tests of compile pass --compile, or leave the default)."""
    return ["--data", str(data_dir), "--out-dir", str(out_dir), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-iters", "60", "--eval-interval", "20",
            "--eval-iters", "4", "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "5",
            "--max-new-tokens", "20", "--device", "cpu", "--no-compile", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_log(out_dir):
    return read_jsonl(out_dir / "log.jsonl")


# ----------------------------------------------------------------------------------------------------
# The model: nanoGPT's, with every flag off


def test_output_shapes():
    model = GPT(tiny())
    idx = torch.randint(0, 40, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 40) and loss.shape == ()
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 40) and loss is None  # inference: last position only


@pytest.mark.parametrize("position", ["pre", "post", "mix", "deepnorm"])
def test_causality(position):
    """Changing token t never changes the logits before t."""
    torch.manual_seed(0)
    model = GPT(tiny(norm_position=position, n_layer=4)).eval()
    idx = torch.randint(0, 40, (2, 16))
    base, _ = model(idx, idx)
    t = 9
    idx2 = idx.clone()
    idx2[:, t] = (idx2[:, t] + 1) % 40
    changed, _ = model(idx2, idx2)
    assert torch.equal(base[:, :t], changed[:, :t])
    assert not torch.allclose(base[:, t], changed[:, t])


def test_the_reference_is_four_files_at_the_top_level():
    """The design card's top level: the model, the training script, the data preparation and the tests; every
    other piece is an optional tool in tools/. (No line or parameter counts: they are a picture of the style,
    nanoGPT's, not limits to meet.)"""
    root = Path(__file__).parent
    assert sorted(p.name for p in root.glob("*.py")) == ["prepare_data.py", "stable_gpt.py", "test_stable_gpt.py",
                                                         "train_shakespeare.py"]


def test_weight_tying():
    model = GPT(tiny())
    assert model.lm_head.weight is model.transformer.wte.weight


def test_default_init_is_nanogpt():
    """N(0, 0.02) for matrices and embeddings, 0.02/sqrt(2 n_layer) for c_proj, zero biases, unit gains."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256))
    target = {"c_attn": 0.02, "c_fc": 0.02, "c_proj": 0.02 / math.sqrt(8), "wte": 0.02, "wpe": 0.02}
    for name, p in model.named_parameters():
        key = name.split(".")[-2]
        if name.endswith("weight") and key in target:
            assert p.std().item() == pytest.approx(target[key], rel=0.04), name
            assert abs(p.mean().item()) < 0.1 * target[key], name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert torch.all(p == 1), name  # LayerNorm gains


def nanogpt_init_transcription(config, seed):
    """The weights nanoGPT's model.py draws for GPT(config) after torch.manual_seed(seed), its RNG calls written
    out in order: the constructors' default inits (each nn.Embedding's N(0, 1), each nn.Linear's uniform weight
    and bias) in module order; then self.apply(_init_weights), which visits modules children first: wte, wpe,
    per block c_attn, c_proj, c_fc, c_proj at N(0, 0.02), lm_head last (the tied wte again); then the loop over
    named_parameters that redraws each c_proj weight at 0.02/sqrt(2 n_layer). Biases 0, norms 1."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    torch.manual_seed(seed)
    shapes = [("attn.c_attn", 3 * C, C), ("attn.c_proj", C, C), ("mlp.c_fc", 4 * C, C), ("mlp.c_proj", C, 4 * C)]
    torch.nn.Embedding(V, C), torch.nn.Embedding(config.block_size, C)  # construction: draws that are overwritten
    for _ in range(L):
        for _, out_f, in_f in shapes:
            torch.nn.Linear(in_f, out_f, bias=config.bias)
    torch.nn.Linear(C, V, bias=False)
    sd = {"transformer.wte.weight": torch.empty(V, C).normal_(0, 0.02),
          "transformer.wpe.weight": torch.empty(config.block_size, C).normal_(0, 0.02)}
    for i in range(L):
        for name, out_f, in_f in shapes:
            sd[f"transformer.h.{i}.{name}.weight"] = torch.empty(out_f, in_f).normal_(0, 0.02)
    sd["transformer.wte.weight"] = torch.empty(V, C).normal_(0, 0.02)  # lm_head's turn: the tied tensor
    for i in range(L):
        for name in ("attn.c_proj", "mlp.c_proj"):
            sd[f"transformer.h.{i}.{name}.weight"] = torch.empty(C, C if name == "attn.c_proj" else 4 * C).normal_(
                0, 0.02 / math.sqrt(2 * L))
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


@pytest.mark.parametrize("shape", [dict(n_layer=3, n_head=4, n_embd=64, bias=True),
                                   dict(n_layer=2, n_head=3, n_embd=36, bias=False)])  # 36: rows not a multiple of 16
def test_same_seed_gives_nanogpts_weights_bit_for_bit(shape):
    config = GPTConfig(block_size=16, vocab_size=50, **shape)
    reference = nanogpt_init_transcription(config, seed=1337)
    torch.manual_seed(1337)
    ours = GPT(config).state_dict()
    for name, tensor in ours.items():
        if name in reference:
            assert torch.equal(tensor, reference[name]), name
        elif name.endswith("bias"):
            assert torch.all(tensor == 0), name
        else:
            assert torch.all(tensor == 1), name  # the norms' gains
    assert set(reference) <= set(ours)
    nanogpt_py = os.environ.get("NANOGPT_MODEL_PY")  # nanoGPT's own model.py, where a checkout is at hand
    if nanogpt_py:
        with contextlib.redirect_stdout(io.StringIO()):  # its "number of parameters" line
            nanogpt = bench.load_nanogpt(nanogpt_py)
            torch.manual_seed(1337)
            theirs = nanogpt.GPT(nanogpt.GPTConfig(block_size=16, vocab_size=50, dropout=0.0, **shape)).state_dict()
        assert theirs.keys() == ours.keys()
        for name, tensor in theirs.items():
            assert torch.equal(tensor, ours[name]), name


def nanogpt_reference_logits(sd, idx, n_head):
    """nanoGPT's GPT.forward written out with plain tensor ops on a state dict with nanoGPT's names
    (explicit causal mask, explicit softmax attention): an independent check of our forward."""
    def ln(x, p):
        return F.layer_norm(x, (x.size(-1),), sd[p + ".weight"], sd.get(p + ".bias"), 1e-5)

    def lin(x, p):
        y = x @ sd[p + ".weight"].T
        return y + sd[p + ".bias"] if p + ".bias" in sd else y

    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    C = x.size(-1)
    hs = C // n_head
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(x, p + "ln_1"), p + "attn.c_attn").split(C, dim=2)
        q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.c_proj")
        x = x + lin(F.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["lm_head.weight"].T


def nanogpt_state_dict(config, seed=0):
    """A random state dict with exactly nanoGPT's parameter names and shapes."""
    g = torch.Generator().manual_seed(seed)
    C, L = config.n_embd, config.n_layer
    shapes = {"transformer.wte.weight": (config.vocab_size, C), "transformer.wpe.weight": (config.block_size, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update({p + "ln_1.weight": (C,), p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_proj.weight": (C, C),
                       p + "ln_2.weight": (C,), p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_proj.weight": (C, 4 * C)})
        if config.bias:
            shapes.update({p + "ln_1.bias": (C,), p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.bias": (C,),
                           p + "ln_2.bias": (C,), p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.bias": (C,)})
    shapes["transformer.ln_f.weight"] = (C,)
    if config.bias:
        shapes["transformer.ln_f.bias"] = (C,)
    sd = {k: torch.randn(s, generator=g) * (0.3 if len(s) == 2 else 0.1) + (1.0 if "ln" in k and "weight" in k else 0)
          for k, s in shapes.items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


@pytest.mark.parametrize("bias", [True, False])
def test_loads_nanogpt_state_dict_and_matches_its_logits(bias):
    config = tiny(bias=bias, n_layer=3)
    sd = nanogpt_state_dict(config)
    model = GPT(config)
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    idx = torch.randint(0, 40, (2, 16))
    targets = torch.randint(0, 40, (2, 16))
    logits, loss = model(idx, targets)
    ref = nanogpt_reference_logits(sd, idx, config.n_head)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, F.cross_entropy(ref.view(-1, 40), targets.view(-1)), atol=1e-5, rtol=1e-5)


def test_generate_never_samples_ids_beyond_the_tokenizer():
    """A vocabulary padded for speed (50257 -> 50304) has ids no tokenizer can decode: vocab_limit keeps
    them out, even when the model prefers them."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=48)).eval()
    with torch.no_grad():
        model.lm_head.weight[40:] = model.transformer.ln_f.weight * 5  # logits of ids 40..47 dominate
    prompt = torch.zeros(1, 1, dtype=torch.long)
    assert (model.generate(prompt, 20)[0, 1:] >= 40).any()
    assert (model.generate(prompt, 20, vocab_limit=40)[0, 1:] < 40).all()


def test_nanogpt_train_py_call_sequence():
    """nanoGPT's train.py and sample.py, flags off: GPTConfig(**model_args), GPT(conf), configure_optimizers
    with its four arguments, a step, estimate_mfu(batch_size * grad_accum, dt), crop_block_size, generate."""
    model_args = dict(n_layer=2, n_head=4, n_embd=32, block_size=16, bias=False, vocab_size=40, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    x = torch.randint(0, 40, (3, 16))
    logits, loss = model(x, x)
    loss.backward()
    optimizer.step()
    mfu = model.estimate_mfu(3 * 2, 0.1)
    assert 0 < mfu < 1e-3  # a tiny model on "an A100" for 0.1 s
    model.crop_block_size(8)
    assert model.config.block_size == 8 and model.transformer.wpe.weight.shape == (8, 32)
    short = x[:, :8].contiguous()
    assert model(short, short)[0].shape == (3, 8, 40)
    model.eval()
    assert model.generate(x[:1, :3], 10, temperature=0.8, top_k=200).shape == (1, 13)
    with pytest.raises(ValueError, match="block_size must be in"):
        model.crop_block_size(9)


def test_from_pretrained_rejects_unknown_names_and_overrides():
    with pytest.raises(ValueError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(ValueError, match="dropout only"):
        GPT.from_pretrained("gpt2", dict(n_layer=3))


def small_hf_gpt2(seed=0):
    """A small randomly initialized transformers GPT2LMHeadModel, with exact GELU as nanoGPT's nn.GELU (GPT-2
    itself uses the tanh approximation, a difference nanoGPT's from_pretrained shares)."""
    transformers = pytest.importorskip("transformers", reason="transformers is optional (.ci/run installs it)")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # move the norms and biases off their init so that a mix-up would show
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def test_from_hf_gpt2_matches_transformers_logits():
    hf = small_hf_gpt2()
    model = GPT.from_hf_gpt2(hf).eval()
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size, model.config.bias) == (2, 32, 50, True)
    idx = torch.randint(0, 50, (2, 20))
    with torch.no_grad():
        ref = hf(idx).logits
        ours, _ = model(idx, idx)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_generate_length_and_top_k():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.randint(0, 40, (2, 5))
    out = model.generate(prompt, 30, top_k=5)  # longer than block_size: the context is cropped
    assert out.shape == (2, 35) and torch.equal(out[:, :5], prompt)
    # top_k=1 is greedy decoding: every new token is the argmax of the logits
    greedy = model.generate(prompt, 6, top_k=1)
    idx = prompt
    for _ in range(6):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(greedy, idx)


def test_optimizer_groups():
    model = GPT(tiny(bias=True))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


@pytest.mark.parametrize("kw, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(norm="batchnorm"), "layernorm, rmsnorm"),
    (dict(norm_position="sandwich"), "pre, post, mix, deepnorm"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_config_raises_clear_error(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def test_bad_input_raises_clear_error():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model(torch.tensor([[1, 2, 40]]))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        model(torch.tensor([[-1, 2, 3]]))


# ----------------------------------------------------------------------------------------------------
# The techniques, in stable_gpt.py's order: norms


def test_layernorm_and_rmsnorm_math():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    ln = LayerNorm(8, bias=True)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    torch.testing.assert_close(ln(x), (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)
    rms = RMSNorm(8, bias=True)
    with torch.no_grad():
        rms.weight.uniform_(0.5, 1.5)
        rms.bias.uniform_(-1, 1)
    torch.testing.assert_close(rms(x), x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * rms.weight + rms.bias)


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm", "SDDNorm"])
def test_each_norm_class_copies_on_its_own(name):
    """A norm class pasted alone into a file that imports torch runs, and computes what stable_gpt's does."""
    namespace = {}
    exec("import torch\nimport torch.nn as nn\nfrom torch.nn import functional as F\n\n"
         + inspect.getsource(getattr(stable_gpt, name)), namespace)
    args = dict(LayerNorm=(8, True), RMSNorm=(8, True), SDDNorm=(8, 0.5))[name]
    torch.manual_seed(0)
    copied, ours, x = namespace[name](*args), getattr(stable_gpt, name)(*args), torch.randn(3, 8)
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in ours.named_parameters()]
    torch.testing.assert_close(copied(x), ours(x), rtol=0, atol=0)


def test_norm_eps_reaches_every_norm_of_the_model_and_olmo2_takes_1e_6():
    """--norm-eps sets the eps of every LayerNorm and RMSNorm the config makes (not SDD's, whose official code
    fixes 1e-5); nanoGPT's 1e-5 by default; --olmo2 takes OLMo 2's 1e-6; DyT has none, so it is refused there."""
    x = torch.randn(3, 32) * 1e-3  # a mean square ~1e-6: eps shows
    for norm, eps in (("layernorm", 1e-5), ("rmsnorm", 1e-6), ("layernorm", 1e-3)):
        model = GPT(tiny(norm=norm, norm_eps=eps, qk_norm=True, norm_position="peri", sdd=False))
        norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
        assert len(norms) == 2 * 2 + 2 * 2 + 2 * 2 + 1 + 1 and all(m.eps == eps for m in norms)  # ln_1/2, peri's
        centred = x - x.mean(-1, keepdim=True) if norm == "layernorm" else x  # two, q/k norms, emb_norm, ln_f
        torch.testing.assert_close(norms[0](x), centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps))
    assert all(m.eps == 1e-5 for m in GPT(tiny(sdd=True, norm="rmsnorm", norm_eps=1e-6)).modules()
               if isinstance(m, SDDNorm))
    assert train_shakespeare.resolve({"olmo2": True}).norm_eps == 1e-6
    assert train_shakespeare.resolve({}).norm_eps == 1e-5 and GPTConfig().norm_eps == 1e-5
    with pytest.raises(ValueError, match="DyT has no eps"):
        tiny(norm="dyt", norm_eps=1e-6)


def test_dyt_forward_and_its_alpha_init():
    """DyT (arXiv 2503.10622): gamma * tanh(alpha * x) + beta; alpha 0.8 on the attention sublayer's norm and
    0.2 elsewhere (the paper's LLaMA 2 7B values), and a learnable scalar sqrt(n_embd) after the embeddings."""
    dyt = stable_gpt.DyT(4, alpha=0.7, bias=True)
    with torch.no_grad():
        dyt.weight.copy_(torch.tensor([1.0, 2.0, -1.0, 0.5]))
        dyt.bias.copy_(torch.tensor([0.0, 0.1, 0.2, 0.3]))
    x = torch.randn(3, 4)
    torch.testing.assert_close(dyt(x), dyt.weight * torch.tanh(0.7 * x) + dyt.bias)
    model = GPT(tiny(norm="dyt"))
    for block in model.transformer.h:
        assert block.ln_1.alpha.item() == pytest.approx(0.8) and block.ln_2.alpha.item() == pytest.approx(0.2)
    assert model.transformer.ln_f.alpha.item() == pytest.approx(0.2) and model.transformer.ln_f.bias is None
    assert model.transformer.emb_scale.weight.item() == pytest.approx(math.sqrt(32))
    assert not any(isinstance(m, (LayerNorm, RMSNorm)) for m in model.modules())  # no norm left
    with pytest.raises(ValueError, match="qk_norm with norm 'dyt'"):
        tiny(norm="dyt", qk_norm=True)


# ----------------------------------------------------------------------------------------------------
# Norm placements: Post-LN, Mix-LN, DeepNorm, Peri-LN, OLMo 2's reordered norm


def test_mix_ln_blocks():
    post = lambda **kw: [b.post_norm for b in GPT(tiny(norm_position="mix", n_layer=12, **kw)).transformer.h]
    assert post() == [True] * 3 + [False] * 9
    # floor(alpha * L) without float rounding: 0.29 * 100 is 28.999999999999996 in floats
    config = GPTConfig(n_layer=100, norm_position="mix", mix_fraction=0.29)
    assert sum(config.is_post_norm(i) for i in range(100)) == 29
    assert post(mix_fraction=0.0) == [False] * 12 and post(mix_fraction=1.0) == [True] * 12
    # mix_fraction 0 is exactly Pre-LN and 1 exactly Post-LN (same weights, same logits)
    idx = torch.randint(0, 40, (2, 16))
    for fraction, position in ((0.0, "pre"), (1.0, "post")):
        mix = GPT(tiny(norm_position="mix", mix_fraction=fraction)).eval()
        ref = GPT(tiny(norm_position=position)).eval()
        ref.load_state_dict(mix.state_dict())
        torch.testing.assert_close(mix(idx, idx)[0], ref(idx, idx)[0], rtol=0, atol=0)


def test_deepnorm_constants():
    """DeepNet (arXiv 2203.00555), decoder-only, N layers: residual alpha = (2N)^(1/4); xavier-normal init
    with gain beta = (8N)^(-1/4) on v, the attention output and the FFN, gain 1 on q and k."""
    torch.manual_seed(0)
    N, C = 6, 256
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=N, n_head=4, n_embd=C, norm_position="deepnorm"))
    alpha, beta = (2 * N) ** 0.25, (8 * N) ** -0.25
    assert all(b.deepnorm_alpha == pytest.approx(alpha) and b.post_norm for b in model.transformer.h)
    assert isinstance(model.transformer.ln_f, torch.nn.Identity)
    block = model.transformer.h[3]
    q, k, v = block.attn.c_attn.weight.view(3, C, C)
    xavier = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))
    for w, std in ((q, xavier(C, C)), (k, xavier(C, C)), (v, beta * xavier(C, C)),
                   (block.attn.c_proj.weight, beta * xavier(C, C)), (block.mlp.c_fc.weight, beta * xavier(C, 4 * C)),
                   (block.mlp.c_proj.weight, beta * xavier(4 * C, C))):
        assert w.std().item() == pytest.approx(std, rel=0.03)
    # the block computes LN(alpha * x + f(x))
    x = torch.randn(2, 16, C)
    with torch.no_grad():
        h = block.ln_1(alpha * x + block.attn(x))
        torch.testing.assert_close(block(x), block.ln_2(alpha * h + block.mlp(h)))


def test_peri_ln_normalizes_every_sublayer_output():
    model = perturbed(GPT(tiny(norm_position="peri", norm="rmsnorm", init_std=0.3))).eval()
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    block = model.transformer.h[1]
    x = torch.randn(2, 16, 32)
    with torch.no_grad():  # x + norm_out(f(norm_in(x))), twice
        h = x + block.attn_out_norm(block.attn(block.ln_1(x)))
        assert torch.allclose(block(x), h + block.mlp_out_norm(block.mlp(block.ln_2(h))), atol=1e-6)
        for name in ("attn_out_norm", "mlp_out_norm"):
            norm = block.get_submodule(name)
            out = outputs_of(name, model, idx)[1]
            assert torch.allclose(out / norm.weight, torch.nn.functional.rms_norm(out / norm.weight, (32,)), atol=1e-4)
    assert not isinstance(model.transformer.ln_f, torch.nn.Identity)  # the stream is never normalized: ln_f stays
    # the embeddings enter the stream normalized, else the branches' RMS ~1 outputs would swamp them
    model.transformer.emb_norm.weight.data.fill_(1.0)
    seen = {}
    model.transformer.emb_norm.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model(idx)
    assert torch.allclose(seen["out"].pow(2).mean(-1), torch.ones(2, 16), atol=1e-3)
    assert not model.config.depth_scaled_init()  # the output norm would remove the 1/sqrt(2L) c_proj init
    with pytest.raises(ValueError, match="SDD already normalizes every branch output"):
        tiny(norm_position="peri", sdd=True)


def test_reordered_norm_block_is_x_plus_norm_of_each_sublayer():
    """OLMo 2 (OLMo-core's ReorderedNormTransformerBlock): h = x + norm(attn(x)); out = h + norm(mlp(h))."""
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(norm_position="reorder", norm="rmsnorm"))).eval()
    block, x = model.transformer.h[1], torch.randn(2, 7, 32)
    with torch.no_grad():
        h = x + block.ln_1(block.attn(x))
        torch.testing.assert_close(block(x), h + block.ln_2(block.mlp(h)), rtol=0, atol=0)
    assert isinstance(model.transformer.emb_norm, torch.nn.Identity) and not model.config.depth_scaled_init()
    for kw, message in ((dict(lns=True), "lns scales the output of a \\*pre\\*-norm"),
                        (dict(sdd=True), "sdd with norm_position 'reorder'")):
        with pytest.raises(ValueError, match=message):
            tiny(norm_position="reorder", **kw)


def test_olmo2_shorthand_and_its_decay_groups(capsys):
    """--olmo2 = reorder + QK-norm over the full q and k + z-loss 1e-5 + RMSNorm + no decay on the embeddings
    (every other tensor, gains included, decayed); flags given still win."""
    cfg = train_shakespeare.resolve({"olmo2": True})
    assert (cfg.norm_position, cfg.qk_norm, cfg.qk_norm_full, cfg.z_loss, cfg.norm, cfg.olmo_decay) == \
        ("reorder", True, True, 1e-5, "rmsnorm", True)
    assert train_shakespeare.resolve({"olmo2": True, "z_loss": 1e-4}).z_loss == 1e-4
    model = GPT(tiny(norm_position="reorder", qk_norm=True, qk_norm_full=True, norm="rmsnorm"))
    decayed, plain = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", olmo_decay=True).param_groups
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    assert {id(p) for p in plain["params"]} == embeddings
    assert any(p.dim() == 1 for p in decayed["params"])  # the norm gains


# ----------------------------------------------------------------------------------------------------
# SDD (arXiv 2502.15499)


from stable_gpt import WeSaRLinear, fold_wesar, target_variance_rescale  # noqa: E402

ALL_FLAGS = dict(sdd=True, lns=True, wesar=True, lir=True, tvr=True)
# the practitioners' fixes together, with every paper's flag that composes with them (SDD does not)
ALL_PRACTITIONER_FIXES = dict(qk_norm=True, norm_position="peri", z_loss=1e-4, logit_softcap=30.0, lns=True,
                              wesar=True, lir=True, tvr=True)
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def block_linears(model):
    return [(i, name, block.get_submodule(name)) for i, block in enumerate(model.transformer.h)
            for name in BLOCK_LINEARS]


@pytest.mark.parametrize("position", ["pre", "post", "mix"])
def test_sdd_linear_is_invariant_to_weight_scale(position):
    """SDD: multiplying the weight of any block linear by 7 leaves the model output unchanged (exactly, up to
    the eps inside the RMS, which the test sets to 0 and checks in float64)."""
    torch.manual_seed(0)
    model = GPT(tiny(sdd=True, norm_position=position, n_layer=3)).double().eval()
    for m in model.modules():
        if isinstance(m, SDDNorm):
            m.eps = 0.0
    idx = torch.randint(0, 40, (2, 16))
    base, _ = model(idx, idx)
    for _, _, linear in block_linears(model):
        with torch.no_grad():
            linear.weight.mul_(7.0)
        scaled, _ = model(idx, idx)
        torch.testing.assert_close(scaled, base, atol=1e-10, rtol=1e-10)
    # and it is the SDD norms that do it: without them, the same scaling changes the output
    plain = GPT(tiny(norm_position=position, n_layer=3)).double().eval()
    before, _ = plain(idx, idx)
    with torch.no_grad():
        plain.transformer.h[1].mlp.c_fc.weight.mul_(7.0)
    assert not torch.allclose(plain(idx, idx)[0], before, atol=1e-3)


def test_sdd_placement_and_gains():
    """SDD norms sit where the official dense code puts them; each output has RMS equal to its gain; the
    residual-output gains start at 1/sqrt(2L); c_proj keeps the plain init std (no depth scaling)."""
    torch.manual_seed(0)
    L = 3
    model = GPT(tiny(sdd=True, n_layer=L))
    hs = 32 // 4
    names = {n: tuple(p.shape) for n, p in model.named_parameters() if "_norm" in n}
    assert names == {"transformer.emb_norm.weight": (32,)} | {
        f"transformer.h.{i}.{k}": s for i in range(L) for k, s in
        [("attn.q_norm.weight", (hs,)), ("attn.k_norm.weight", (hs,)), ("attn.context_norm.weight", (32,)),
         ("attn.out_norm.weight", (32,)), ("mlp.fc_norm.weight", (128,)), ("mlp.out_norm.weight", (32,))]}
    rms_out = []
    for m in model.modules():
        if isinstance(m, SDDNorm):
            m.eps = 0.0  # else the RMS is gain * sqrt(ms / (ms + eps)), a hair below the gain
            m.register_forward_hook(lambda m, i, o: rms_out.append((o.pow(2).mean(-1).sqrt(), m.weight[0].item())))
    model(torch.randint(0, 40, (2, 16)))
    assert len(rms_out) == 6 * L
    for rms, gain in rms_out:
        torch.testing.assert_close(rms, torch.full_like(rms, gain), rtol=1e-5, atol=0)
    for block in model.transformer.h:
        for norm in (block.attn.out_norm, block.mlp.out_norm):
            assert torch.allclose(norm.weight, torch.full((32,), 1 / math.sqrt(2 * L)))
        for norm in (block.attn.q_norm, block.attn.k_norm, block.attn.context_norm, block.mlp.fc_norm):
            assert torch.all(norm.weight == 1)
    big = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=4, n_head=4, n_embd=256, sdd=True))
    assert big.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02, rel=0.04)
    assert not any(isinstance(m, SDDNorm) for n, m in big.named_modules() if not n.startswith("transformer.h."))


@pytest.mark.parametrize("wesar", [False, True])
def test_sdd_weight_decay_groups_follow_the_official_configs(wesar):
    """Under SDD (official configs: decay_norm_and_bias true, embeddings not decayed): every norm gain, bias and
    block matrix decayed; wte/lm_head, wpe and WeSaR gates not. sdd_official_decay=False gives nanoGPT's groups."""
    model = GPT(tiny(sdd=True, bias=True, wesar=wesar))
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    gates = {n for n in names.values() if n.endswith(".gate")}
    assert gates == ({"transformer.wte.gate", "transformer.wpe.gate", "lm_head.gate"} if wesar else set())
    assert not_decayed == {"transformer.wte.weight", "transformer.wpe.weight"} | gates
    assert {names[id(p)] for p in decay["params"]} >= {"transformer.emb_norm.weight", "transformer.ln_f.weight",
                                                       "transformer.ln_f.bias", "transformer.h.0.attn.q_norm.weight",
                                                       "transformer.h.1.mlp.out_norm.weight",
                                                       "transformer.h.0.attn.c_attn.bias"}
    decay, no_decay = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", sdd_official_decay=False).param_groups
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() >= 2}


def test_sdd_embedding_norm_starts_the_stream_at_unit_rms():
    """SDD's embedding norm (official dense code): the stream entering block 0 has RMS 1 (gain 1, eps 0), and
    block 0's branches (each of RMS 1/sqrt(2L)) no longer swamp it: the stream after block 0 keeps the direction
    of the embeddings (cosine ~1/sqrt(1 + 1/L) = 0.89 at L=4; ~0.1 without the norm), in every placement.
    With --init-std 0.002 (the released scripts' 0.1x) the SDD norms of a Post-LN model still normalize (output
    RMS > 0.9 x gain), which they did not without the embedding norm."""
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    for position in ("pre", "post", "mix"):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=4, n_head=4, n_embd=64, bias=False, sdd=True,
                              norm_position=position)).eval()
        model.transformer.emb_norm.eps = 0.0
        seen = {}
        model.transformer.emb_norm.register_forward_hook(lambda m, i, o: seen.update(emb=i[0], stream=o))
        model.transformer.h[0].register_forward_hook(lambda m, i, o: seen.update(block0=o))
        model(idx)
        rms = seen["stream"].pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-5, atol=0)
        cos = F.cosine_similarity(seen["emb"], seen["block0"], dim=-1).mean().item()
        assert cos > 0.85, (position, cos)
        model.transformer.emb_norm = torch.nn.Identity()  # the project before the fix: the branches swamp it
        model(idx)
        assert F.cosine_similarity(seen["emb"], seen["block0"], dim=-1).mean().item() < 0.5
    for emb_norm in (True, False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=128, sdd=True,
                              init_std=0.002, norm_position="post"))
        if not emb_norm:
            model.transformer.emb_norm = torch.nn.Identity()
        ratios = []  # mean output RMS / gain of each SDD norm
        for m in model.modules():
            if isinstance(m, SDDNorm):
                m.register_forward_hook(lambda m, i, o: ratios.append((o.pow(2).mean(-1).sqrt() / m.weight[0]).mean()))
        model(idx)
        if emb_norm:
            assert len(ratios) == 12 and min(ratios).item() > 0.9, ratios
        else:  # block 0's attention norms see an input of RMS ~0.003: eps dominates (measured 0.01-0.06)
            assert max(ratios[:4]).item() < 0.2, ratios


# ----------------------------------------------------------------------------------------------------
# LNS (arXiv 2502.05795), and under SDD


def test_sdd_lns_is_not_sdd():
    """The known failure: under SDD, LNS on the pre-norm output (Eq. 12) was cancelled by SDD's norms, so
    --sdd --lns computed the same function as --sdd (1e-7 relative). On the same weights they must differ."""
    torch.manual_seed(0)
    sdd_lns = perturbed(GPT(tiny(sdd=True, lns=True, n_layer=4))).eval()
    sdd = GPT(tiny(sdd=True, n_layer=4)).eval()
    sdd.load_state_dict(sdd_lns.state_dict())
    idx = torch.randint(0, 40, (2, 16))
    a, b = sdd_lns(idx, idx)[1].item(), sdd(idx, idx)[1].item()
    assert abs(a - b) / b > 1e-3, (a, b)


def test_lns_under_sdd_scales_each_branch_output_by_one_over_sqrt_layer():
    """The project's adaptation: under SDD, block l (1-based) adds (1/sqrt(l)) * branch(norm(x)), where branch
    ends in SDD's output norm and gain; the pre-norm output itself is not scaled."""
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(sdd=True, lns=True, n_layer=4))).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            s = 1 / math.sqrt(i + 1)
            h = x + s * block.attn(block.ln_1(x))
            torch.testing.assert_close(block(x), h + s * block.mlp(block.ln_2(h)), rtol=0, atol=0)
            assert block.lns_scale is None and block.lns_branch_scale == s


def test_lns_scales_pre_norm_output_by_one_over_sqrt_layer():
    """LNS: the tensor fed to attention and to the MLP of block l is exactly norm(x) / sqrt(l); ln_f untouched."""
    torch.manual_seed(0)
    model = GPT(tiny(lns=True, n_layer=4)).eval()
    seen = {}

    def save(key):
        return lambda m, args, out=None: seen.__setitem__(key, (out if out is not None else args[0]).detach())

    for i, block in enumerate(model.transformer.h):
        block.ln_1.register_forward_hook(save((i, "ln_1")))
        block.attn.register_forward_pre_hook(save((i, "attn_in")))
        block.ln_2.register_forward_hook(save((i, "ln_2")))
        block.mlp.register_forward_pre_hook(save((i, "mlp_in")))
    model.transformer.ln_f.register_forward_pre_hook(save("ln_f_in"))
    model.transformer.ln_f.register_forward_hook(save("ln_f_out"))
    model(torch.randint(0, 40, (2, 16)))
    for i in range(4):
        scale = 1 / math.sqrt(i + 1)
        torch.testing.assert_close(seen[(i, "attn_in")], seen[(i, "ln_1")] * scale, rtol=0, atol=0)
        torch.testing.assert_close(seen[(i, "mlp_in")], seen[(i, "ln_2")] * scale, rtol=0, atol=0)
    torch.testing.assert_close(seen["ln_f_out"], model.transformer.ln_f(seen["ln_f_in"]), rtol=0, atol=0)


def test_lns_equals_pre_ln_with_gains_scaled():
    """LNS is the plain Pre-LN model whose block-l LayerNorm gain and bias are multiplied by 1/sqrt(l)."""
    torch.manual_seed(0)
    lns = GPT(tiny(lns=True, bias=True, n_layer=3)).eval()
    plain = GPT(tiny(bias=True, n_layer=3)).eval()
    assert set(lns.state_dict()) == set(plain.state_dict())  # no new parameters
    plain.load_state_dict(lns.state_dict())
    with torch.no_grad():
        for i, block in enumerate(plain.transformer.h):
            for ln in (block.ln_1, block.ln_2):
                ln.weight.div_(math.sqrt(i + 1))
                ln.bias.div_(math.sqrt(i + 1))
    idx = torch.randint(0, 40, (2, 16))
    torch.testing.assert_close(lns(idx, idx)[0], plain(idx, idx)[0], atol=1e-5, rtol=1e-5)


def residual_variance_by_layer(model, idx):
    """Per-element variance of the residual stream after each block (over features, averaged over tokens)."""
    out = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda m, i, o: out.append(o.var(-1).mean().item()))
    with torch.no_grad():
        model(idx)
    return out


def test_lns_slows_variance_growth_with_depth():
    """At init, in a 24-layer Pre-LN model, variance(block 24) / variance(block 1) grows far less with LNS
    (the Curse of Depth, arXiv 2502.05795, Sec. 4; measured ~32 without and ~4 with)."""
    idx = torch.randint(0, 64, (4, 64), generator=torch.Generator().manual_seed(0))
    ratios = {}
    for lns in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=24, n_head=4, n_embd=128, lns=lns,
                              scaled_init=False)).eval()
        var = residual_variance_by_layer(model, idx)
        ratios[lns] = var[-1] / var[0]
    assert ratios[True] < 0.5 * ratios[False], ratios


def test_lns_turns_off_depth_scaled_init_unless_asked():
    assert not GPTConfig(lns=True).depth_scaled_init() and GPTConfig().depth_scaled_init()
    assert GPTConfig(lns=True, scaled_init=True).depth_scaled_init()  # the paper's LNS + Scaled Init ablation


def test_lns_on_mix_scales_only_the_pre_ln_blocks():
    model = GPT(tiny(lns=True, norm_position="mix", mix_fraction=0.5, n_layer=4))
    assert [b.post_norm for b in model.transformer.h] == [True, True, False, False]
    assert [b.lns_scale for b in model.transformer.h][2:] == [1 / math.sqrt(3), 1 / math.sqrt(4)]


# ----------------------------------------------------------------------------------------------------
# WeSaR (arXiv 2410.05052)


def wesar_pair(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=128, bias=False, **kw)
    return GPT(cfg), GPT(replace(cfg, wesar=True))


def test_wesar_gates_and_stds():
    """One scalar gate per matrix (q, k, v separately): 6L + 3 extra parameters; every raw matrix has the
    common std; gate * raw has the std the plain init gives; gate = target / sigma exactly."""
    base, wesar = wesar_pair()
    L, sigma = 4, wesar.config.wesar_sigma
    assert wesar.get_num_params() - base.get_num_params() == 6 * L + 3
    gates = [n for n, p in wesar.named_parameters() if n.endswith("gate")]
    assert len(gates) == 4 * L + 3 and all(p.requires_grad for n, p in wesar.named_parameters() if n in gates)
    base_w = dict(base.named_parameters())
    for name, module in wesar.named_modules():
        if hasattr(module, "gate") and module is not wesar.lm_head:
            rows = module.weight.view(len(module.gate), -1, module.weight.shape[-1])
            target = base_w[f"{name}.weight"].view_as(rows)
            for raw, gate, t in zip(rows, module.gate, target):
                assert raw.std().item() == pytest.approx(sigma, rel=0.05), name
                expected = 0.02 / math.sqrt(2 * L) if name.endswith("c_proj") else 0.02
                assert gate.item() == pytest.approx(expected / sigma, rel=1e-6), name
                assert (gate * raw).std().item() == pytest.approx(t.std().item(), rel=0.05), name
    assert wesar.lm_head.weight is wesar.transformer.wte.weight
    assert wesar.lm_head.gate is not wesar.transformer.wte.gate


def test_wesar_folds_into_a_plain_gpt():
    """Folding the gates into the weights gives a plain (nanoGPT) model with the same logits, also after
    the gates have moved apart (the tied head's gate included)."""
    _, wesar = wesar_pair(norm_position="pre")
    with torch.no_grad():
        for p in wesar.parameters():
            if p.dim() == 1 and p.numel() <= 3:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    idx = torch.randint(0, 256, (2, 64))
    plain = fold_wesar(wesar.eval()).eval()
    assert not any(n.endswith("gate") for n in plain.state_dict())
    torch.testing.assert_close(plain(idx, idx)[0], wesar(idx, idx)[0], atol=1e-5, rtol=1e-4)
    _, post = wesar_pair(norm_position="post")
    with torch.no_grad():
        post.lm_head.gate.mul_(1.7)
    torch.testing.assert_close(fold_wesar(post.eval()).eval()(idx, idx)[0], post(idx, idx)[0], atol=1e-5, rtol=1e-4)


def test_wesar_equalizes_adam_update_ratios():
    """The mechanism (wesar.md Sec. 2): after one Adam step the relative update |dW|/|W| of the effective
    weight is the same for every block matrix under WeSaR, while the plain model's small c_proj matrices
    move sqrt(2L) times more."""
    idx = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    ratios = {}
    for model in wesar_pair():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-12)
        eff = lambda m: m.effective_weight() if isinstance(m, WeSaRLinear) else m.weight
        before = {n: eff(m).detach().clone() for _, n, m in block_linears(model)[4:8]}
        model(idx, idx)[1].backward()
        opt.step()
        ratios[model.config.wesar] = {n: ((eff(m).detach() - before[n]).norm() / before[n].norm()).item()
                                      for _, n, m in block_linears(model)[4:8]}
    w = list(ratios[True].values())
    assert max(w) / min(w) < 1.05, ratios[True]
    b = ratios[False]
    assert b["mlp.c_proj"] / b["mlp.c_fc"] == pytest.approx(math.sqrt(8), rel=0.1), b


def test_wesar_gates_are_not_decayed():
    _, wesar = wesar_pair()
    decay, no_decay = wesar.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    gates = {id(p) for n, p in wesar.named_parameters() if n.endswith("gate")}
    assert gates <= {id(p) for p in no_decay["params"]} and not gates & {id(p) for p in decay["params"]}
    assert all(p.dim() == 2 for p in decay["params"])


def test_wesar_with_sdd_gates_only_embeddings_and_head():
    model = GPT(tiny(wesar=True, sdd=True))
    gated = sorted(n for n, _ in model.named_parameters() if n.endswith("gate"))
    assert gated == ["lm_head.gate", "transformer.wpe.gate", "transformer.wte.gate"]


# ----------------------------------------------------------------------------------------------------
# LIR and TVR (arXiv 2503.17500)


def test_lir_init_std_by_layer():
    """LIR: every matrix of block l (1-based) ~ N(0, (sigma/sqrt(l))^2), a plain (untruncated) normal;
    embeddings keep sigma; no extra c_proj scaling."""
    torch.manual_seed(0)
    sigma = 0.02
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=6, n_head=4, n_embd=256, lir=True, init_std=sigma))
    for i, name, m in block_linears(model):
        w = m.weight
        assert w.std().item() == pytest.approx(sigma / math.sqrt(i + 1), rel=0.03), (i, name)
        assert abs(w.mean().item()) < 0.02 * sigma
        assert (w.abs() > 3.5 * w.std()).any()  # Gaussian tails: not truncated at 2 or 3 std
    for emb in (model.transformer.wte, model.transformer.wpe):
        assert emb.weight.std().item() == pytest.approx(sigma, rel=0.03)
    assert not model.config.depth_scaled_init()


def test_tvr_rescales_to_exactly_the_target_and_nothing_else():
    torch.manual_seed(0)
    model = GPT(tiny(bias=True, n_layer=3, init_std=0.05))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    model(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16)))[1].backward()
    opt.step()
    with torch.no_grad():  # make the blocks differ: some above the target, some below
        model.transformer.h[2].mlp.c_proj.weight.mul_(0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adam_before = {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    target = 0.03
    n = target_variance_rescale(model, target)
    rescaled, untouched = 0, 0
    for i, name, m in block_linears(model):
        n_rows = 3 if name == "attn.c_attn" else 1
        prefix = f"transformer.h.{i}.{name}"
        for old, new in zip(before[prefix + ".weight"].view(n_rows, -1, 32), m.weight.view(n_rows, -1, 32)):
            if old.std() > target:
                assert new.std().item() == pytest.approx(target, abs=1e-6)
                assert new.mean().item() == pytest.approx(old.mean().item(), abs=1e-7)
                assert torch.corrcoef(torch.stack([old.flatten(), new.flatten()]))[0, 1] > 1 - 1e-6
                rescaled += 1
            else:
                assert torch.equal(old, new)
                untouched += 1
    assert n == rescaled > 0 and untouched > 0
    for name, p in model.named_parameters():
        if not (name.endswith("weight") and any(k in name for k in BLOCK_LINEARS)):
            assert torch.equal(p, before[name]), name  # embeddings, head, norms, biases
    adam_after = {k: v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}
    assert all(torch.equal(adam_before[k], adam_after[k]) for k in adam_before)
    # the threshold (the official code's 1.2): only a std above threshold x target is rescaled, to the target
    blocks = lambda: [rows for _, name, m in block_linears(model)
                      for rows in m.weight.view(3 if name == "attn.c_attn" else 1, -1, 32)]
    with torch.no_grad():
        for rows, scale in zip(blocks(), itertools.cycle((1.1, 1.3))):
            rows.mul_(scale * target / rows.float().std())  # stds 1.1 x and 1.3 x the target, in turn
    before = [rows.clone() for rows in blocks()]
    assert target_variance_rescale(model, target, threshold=1.2) == len(before) // 2
    for rows, old, scale in zip(blocks(), before, itertools.cycle((1.1, 1.3))):
        if scale == 1.1:
            assert torch.equal(rows, old)
        else:
            assert rows.std().item() == pytest.approx(target, rel=1e-5)


def test_tvr_targets_the_effective_weight_under_wesar():
    torch.manual_seed(0)
    model = GPT(tiny(wesar=True, init_std=0.1))
    target_variance_rescale(model, 0.05)
    for _, _, m in block_linears(model):
        for rows, gate in zip(m.weight.view(len(m.gate), -1, 32), m.gate):
            assert (rows * gate).std().item() <= 0.05 * (1 + 1e-5)


def test_tvr_runs_every_interval_steps(tmp_path, data_dir, monkeypatch):
    calls = []
    real = stable_gpt.target_variance_rescale
    monkeypatch.setattr(stable_gpt, "target_variance_rescale",
                        lambda model, *a: calls.append(len(calls)) or real(model, *a))
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "run", "--tvr", "--tvr-interval", "25",
                                             "--grad-accum", "2")) == 0
    assert len(calls) == 2  # after optimizer steps 25 and 50 of 60, not at step 0, not per micro-batch


# ----------------------------------------------------------------------------------------------------
# Attention: QK-norm, QK-Clip, gated attention


def outputs_of(module_path, model, idx):
    """The outputs of the submodule at module_path in every block, from one forward over idx."""
    outs = []
    hooks = [b.get_submodule(module_path).register_forward_hook(lambda m, a, out: outs.append(out.detach()))
             for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_qk_norm_gives_q_and_k_unit_scale_per_head_before_the_gain(norm):
    model = perturbed(GPT(tiny(qk_norm=True, norm=norm, init_std=0.5))).eval()
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in ("attn.q_norm", "attn.k_norm"):
        gains = [b.get_submodule(name).weight.detach().clone() for b in model.transformer.h]
        for b in model.transformer.h:
            b.get_submodule(name).weight.data.fill_(1.0)
        for out in outputs_of(name, model, idx):  # (B, T, n_head, head_size): per head, over its 8 features
            assert out.shape == (2, 16, 4, 8)
            if norm == "rmsnorm":
                assert torch.allclose(out.pow(2).mean(-1), torch.ones(2, 16, 4), atol=1e-3)
            else:
                assert torch.allclose(out.mean(-1), torch.zeros(2, 16, 4), atol=1e-5)
                assert torch.allclose(out.var(-1, unbiased=False), torch.ones(2, 16, 4), atol=1e-3)
        for b, gain in zip(model.transformer.h, gains):  # the gain then sets each feature's scale
            b.get_submodule(name).weight.data.copy_(gain)
    plain = GPT(tiny(norm=norm))
    assert all(isinstance(b.attn.q_norm, torch.nn.Identity) for b in plain.transformer.h)
    with pytest.raises(ValueError, match="SDD already normalizes q and k"):
        tiny(qk_norm=True, sdd=True)


def test_qk_norm_full_normalizes_all_heads_at_once_without_a_bias():
    """OLMo 2's QK-norm: one RMSNorm over the whole q projection (width n_embd), not one per head; no bias
    (QK-layernorm has none), even with bias=True elsewhere."""
    model = GPT(tiny(qk_norm=True, qk_norm_full=True, norm="rmsnorm", bias=True))
    attn = model.transformer.h[0].attn
    assert attn.q_norm.weight.shape == (32,) and attn.q_norm.bias is None and attn.c_attn.bias is not None
    assert GPT(tiny(qk_norm=True, bias=True)).transformer.h[0].attn.q_norm.bias is None
    seen = []
    attn.q_norm.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
    model(torch.randint(0, 40, (2, 16)))
    q_in, q_out = seen[0]
    assert q_in.shape == (2, 16, 32)  # before the split into heads
    torch.testing.assert_close(q_out, q_in * torch.rsqrt(q_in.pow(2).mean(-1, keepdim=True) + 1e-5))
    with pytest.raises(ValueError, match="qk_norm_full .* needs qk_norm=True"):
        tiny(qk_norm_full=True)


def clip_model(**kw):
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(**dict(dict(qk_clip=1.0), **kw))), scale=2.0)  # large logits to clip
    return model


def attention_inputs(model, idx):
    """Each block's attention input (after its pre-norm) on idx, in train mode (dropout 0)."""
    seen = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for b in model.transformer.h]
    model.train()(idx, idx)
    for h in hooks:
        h.remove()
    return seen


def head_logit_max(attn, x):
    """(n_head,) the largest causal logit of each head of attn on its input x (B, T, C)."""
    B, T, C = x.shape
    q, k, _ = attn.c_attn(x).split(C, dim=2)
    heads = lambda t: t.view(B, T, attn.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
    logits = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(C // attn.n_head)
    return logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kw", [dict(), dict(bias=True), dict(wesar=True)], ids=["plain", "bias", "wesar"])
def test_qk_clip_bounds_the_clipped_heads_logit_on_the_same_batch_at_tau(kw):
    """Kimi K2's QK-Clip: after qk_clip_after_step, on the same inputs, the largest logit of every head that
    exceeded tau is tau (its q and k rows scaled by sqrt(tau / max): the logit by tau / max); other heads and
    v are untouched; the recorded maxima match a direct computation and start afresh."""
    model, idx = clip_model(**kw), torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(1))
    tau, blocks = 1.0, model.transformer.h
    inputs = attention_inputs(model, idx)  # the step's forward records the maxima
    with torch.no_grad():
        before = [head_logit_max(b.attn, x) for b, x in zip(blocks, inputs)]
        for b, m in zip(blocks, before):
            torch.testing.assert_close(b.attn.max_logit, m, rtol=1e-5, atol=1e-5)
        assert any((m > tau).any() for m in before) and any((m <= tau).any() for m in before)
        w_before = [b.attn.c_attn.weight.clone() for b in blocks]
        assert int(stable_gpt.qk_clip_after_step(model)) == sum(int((m > tau).sum()) for m in before)
        assert all(torch.isneginf(b.attn.max_logit).all() for b in blocks)  # the next step records afresh
        for b, x, m0, w0 in zip(blocks, inputs, before, w_before):
            expected = torch.where(m0 > tau, torch.full_like(m0, tau), m0)
            torch.testing.assert_close(head_logit_max(b.attn, x), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(split_v(b.attn.c_attn.weight), split_v(w0))


def test_qk_clip_statistic_in_row_blocks_equals_the_whole_matrix(monkeypatch):
    """QK-Clip's per-head max logit taken in blocks of query rows (never the whole T x T matrix) is the max of the
    whole causal matrix, for a block size that divides T and one that does not, and in bf16 within its rounding."""
    torch.manual_seed(0)
    attn = GPT(tiny(qk_clip=1.0)).transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    expected = head_logit_max(attn, x).detach()
    B, T, C = x.shape
    q, k, _ = attn.c_attn(x).detach().split(C, dim=2)
    heads = lambda t: t.view(B, T, attn.n_head, -1).transpose(1, 2)
    for rows in (4, 5, 128):
        monkeypatch.setattr(type(attn), "QK_CLIP_ROWS", rows)
        attn.max_logit.fill_(-math.inf)
        attn.record_max_logit(heads(q), heads(k))
        torch.testing.assert_close(attn.max_logit, expected, rtol=1e-6, atol=1e-6)
    attn.max_logit.fill_(-math.inf)
    attn.record_max_logit(heads(q).bfloat16(), heads(k).bfloat16())  # autocast's dtype: the max within bf16's 2^-8
    torch.testing.assert_close(attn.max_logit, expected, rtol=2e-2, atol=2e-2)


def split_v(weight):
    return stable_gpt.split_rows(weight, 3)[2]


def test_qk_clip_costs_nothing_when_off_and_is_refused_where_a_norm_undoes_it():
    assert not hasattr(GPT(tiny()).transformer.h[0].attn, "max_logit")  # no buffer, no extra matmul
    assert int(stable_gpt.qk_clip_after_step(GPT(tiny()))) == 0
    for kw, message in ((dict(qk_norm=True), "qk_clip with qk_norm"), (dict(sdd=True), "qk_clip with sdd")):
        with pytest.raises(ValueError, match=message):
            tiny(qk_clip=1.0, **kw)
    assert "max_logit" not in GPT(tiny(qk_clip=1.0)).state_dict()  # a checkpoint is unchanged by it


def test_qk_clip_keeps_the_logged_attention_logits_near_tau_at_a_high_learning_rate(tmp_path, data_dir):
    """The diagnostics show QK-Clip acting: at lr 3e-2 the largest attention logit (diag.jsonl, on a fixed
    batch after each recorded step) grows past 10 x tau without it and stays near tau with it."""
    peaks = {}
    for name, extra in (("off", ()), ("clip", ("--qk-clip", "2"))):
        out = tmp_path / name
        assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "80", "--eval-interval", "80",
                                                 "--lr", "3e-2", "--warmup-iters", "0", "--diag-interval", "10",
                                                 *extra)) in (0, 1)
        peaks[name] = [max(r["attn_logit_max"]) for r in read_jsonl(out / "diag.jsonl")]
    assert max(peaks["off"]) > 10 * 2.0, peaks  # measured: 7 -> 68
    assert max(peaks["clip"]) < 2.5 * 2.0, peaks  # measured: 2.6 to 3.9 (the diag batch is not a training batch)


def test_gated_attention_multiplies_the_attention_output_by_sigmoid_of_x_w():
    """arXiv 2505.06708's G1 gate on hand-set weights: attn(x) = c_proj(y * sigmoid(x W_gate)), y the SDPA
    output of the same module without a gate."""
    torch.manual_seed(0)
    attn = stable_gpt.CausalSelfAttention(tiny(attn_gate=True)).eval()
    with torch.no_grad():
        attn.c_gate.weight.copy_(torch.linspace(-0.5, 0.5, 32 * 32).view(32, 32))
    x = torch.randn(2, 5, 32)
    gate = attn.c_gate
    attn.c_gate = None  # the same module without its gate, with c_proj an identity to read y
    proj, attn.c_proj = attn.c_proj, torch.nn.Identity()
    with torch.no_grad():
        y = attn(x)
        attn.c_gate, attn.c_proj = gate, proj
        torch.testing.assert_close(attn(x), proj(y * torch.sigmoid(x @ gate.weight.T)))


def gpt_oss_attention_reference(q, k, v, sinks):
    """A transcription of gpt-oss's attention with sinks (HF transformers' gpt_oss eager_attention_forward, causal,
    no window): the sink logit appended to each query's row of logits, a softmax, the sink's column dropped.
    q, k, v: (B, nh, T, hs); sinks: (nh,)."""
    T = q.size(2)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    combined = torch.cat([logits, sinks.view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1)
    return probs[..., :-1] @ v, probs[..., -1]


def test_attention_sink_is_gpt_oss_softmax_with_one_more_logit():
    """attend_with_sink (SDPA with one extra key) gives gpt-oss's output and gradients (q, k, v and the sinks);
    the sink takes sigmoid(s_h - log Z_i) of query i's mass; a very negative sink gives plain attention."""
    torch.manual_seed(0)
    attn = stable_gpt.CausalSelfAttention(tiny(attn_sink=True))
    with torch.no_grad():
        attn.sink.copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    q, k, v = (torch.randn(2, 4, 6, 8, requires_grad=True) for _ in range(3))
    y = attn.attend_with_sink(q, k, v, 0.0)
    ref, sink_mass = gpt_oss_attention_reference(q, k, v, attn.sink)
    torch.testing.assert_close(y, ref)
    weights = torch.randn_like(y)  # a loss that weighs every output differently
    got = torch.autograd.grad((y * weights).sum(), (q, k, v, attn.sink))
    want = torch.autograd.grad((ref * weights).sum(), (q, k, v, attn.sink))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert got[3].abs().min() > 0  # every head's sink learns
    assert stable_gpt.CausalSelfAttention(tiny(attn_sink=True)).sink.abs().max() == 0  # from 0 (x-transformers)
    lse = torch.logsumexp((q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf), dim=-1)
    torch.testing.assert_close(sink_mass, torch.sigmoid(attn.sink.view(1, 4, 1) - lse))
    with torch.no_grad():
        attn.sink.fill_(-1e4)
        torch.testing.assert_close(attn.attend_with_sink(q, k, v, 0.0),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_sink_runs_in_the_model_and_the_default_has_no_sink():
    """The model's forward goes through the sink (a sink of -1e4 gives the sinkless model's logits on the same
    weights; 2.0 changes them), and the default attention has no sink parameter."""
    torch.manual_seed(0)
    model = GPT(tiny(attn_sink=True)).eval()
    plain = GPT(tiny()).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".sink")})
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.sink.fill_(-1e4)
        torch.testing.assert_close(model(idx)[0], plain(idx)[0])
        for block in model.transformer.h:
            block.attn.sink.fill_(2.0)
        assert (model(idx)[0] - plain(idx)[0]).abs().max() > 1e-3
    assert not any(name.endswith("sink") for name, _ in plain.named_parameters())


# ----------------------------------------------------------------------------------------------------
# Hyper-connections: HC and mHC


def x_transformers_sinkhorn(t, iters):
    """x-transformers' sinkhorn(), transcribed: a softmax over dim -2, then iters x (L1-normalize dim -1, dim -2)."""
    t = t.float().softmax(dim=-2)
    for _ in range(iters):
        t = F.normalize(t, p=1, dim=-1)
        t = F.normalize(t, p=1, dim=-2)
    return t


def test_sinkhorn_projects_onto_doubly_stochastic_matrices():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 4) * 2
    m = stable_gpt.sinkhorn(logits, 20)
    torch.testing.assert_close(m, x_transformers_sinkhorn(logits, 20))
    assert (m > 0).all()
    torch.testing.assert_close(m.sum(-2), torch.ones(5, 4))  # columns exactly
    # rows to within the iterations' error, which shrinks as they go on (finite Sinkhorn is not exact: mHC-lite,
    # arXiv 2601.05732): 20 iterations leave ~1e-2 on these logits of std 2, 200 leave < 1e-5
    row_error = lambda iters: (stable_gpt.sinkhorn(logits, iters).sum(-1) - 1).abs().max().item()
    assert row_error(20) < 2e-2 and row_error(200) < 1e-5 < row_error(5)
    # the identity case: logits that favour the diagonal by far project to the identity
    torch.testing.assert_close(stable_gpt.sinkhorn(20 * torch.eye(4), 20), torch.eye(4), atol=1e-6, rtol=0)
    # a doubly stochastic input stays (softmax(log M) over columns = M when M's columns sum to 1)
    ds = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.3, 0.2, 0.5]])
    torch.testing.assert_close(stable_gpt.sinkhorn(ds.log(), 3), ds)
    # equivariant: permuting the streams permutes the result
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(stable_gpt.sinkhorn(logits[:, perm][:, :, perm], 20), m[:, perm][:, :, perm])


def hyper_connection_reference(hc, x, branch):
    """One sublayer's update, transcribed from x-transformers' HyperConnection (prepare and forward; mHC) and from
    Hyper-Connections' Algorithm 2 (arXiv 2409.19606, dynamic, tanh; HC), with the module's parameters.
    x: (B, T, n, C); branch: the sublayer f."""
    normed = F.layer_norm(x, x.shape[-1:], hc.norm.weight)
    n = x.size(2)
    if hc.constrained:
        alpha = normed @ hc.dynamic_alpha * hc.dynamic_alpha_scale + hc.static_alpha
        alpha_input, alpha_residual = alpha[..., :1].sigmoid(), alpha[..., 1:]
        alpha_residual = x_transformers_sinkhorn(alpha_residual, hc.sinkhorn_iters)
        alpha = torch.cat((alpha_input, alpha_residual), dim=-1)
        beta = (normed @ hc.dynamic_beta).sigmoid() * 2 * hc.dynamic_beta_scale + hc.static_beta
        beta = beta.sigmoid() * 2
    else:
        alpha = torch.tanh(normed @ hc.dynamic_alpha) * hc.dynamic_alpha_scale + hc.static_alpha
        beta = torch.tanh(normed @ hc.dynamic_beta) * hc.dynamic_beta_scale + hc.static_beta
    # x-transformers' einsum('... s t, ... s d -> ... t d', alpha, residuals), tokens flattened
    mix = torch.einsum("bst,bsd->btd", alpha.reshape(-1, n, n + 1), x.reshape(-1, n, x.size(-1)))
    mix = mix.view(*x.shape[:2], n + 1, -1)
    branch_input, residuals = mix[..., 0, :], mix[..., 1:, :]
    return torch.einsum("btd,bts->btsd", branch(branch_input), beta) + residuals


@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_hyper_connection_is_the_reference_update(kind):
    """Perturbed maps (dynamic parts on), a nonlinear sublayer: HyperConnection's forward + update equals the
    transcription, in value and in every parameter's gradient."""
    torch.manual_seed(0)
    hc = perturbed(stable_gpt.HyperConnection(16, 4, layer_index=5, constrained=kind == "mhc", sinkhorn_iters=7),
                   scale=0.5)
    with torch.no_grad():
        hc.dynamic_alpha.normal_(0, 0.5)
        hc.dynamic_beta.normal_(0, 0.5)
        hc.dynamic_alpha_scale.fill_(0.3)
        hc.dynamic_beta_scale.fill_(0.3)
    x = torch.randn(2, 3, 4, 16)
    branch = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
    branch_input, h_res, h_post = hc(x)
    got = hc.update(x, h_res, h_post, branch(branch_input))
    want = hyper_connection_reference(hc, x, branch)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), list(hc.parameters()))
    g_want = torch.autograd.grad(want.square().sum(), list(hc.parameters()))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    assert g_got[0].abs().max() > 0  # the per-stream norm's gain learns


def test_hyper_connections_init_per_the_paper_and_hc_starts_as_the_residual_network():
    """HC's init (arXiv 2409.19606, Sec. 2.3): H_pre one-hot on stream (2l + i) mod n, H_res the identity,
    H_post ones, so a model with HC starts as the residual network on the same weights (the streams stay copies
    and ln_f removes their sum's factor n). mHC's sigmoid and Sinkhorn move its start off that point."""
    torch.manual_seed(0)
    plain = GPT(tiny(n_layer=3)).eval()
    hc_model = GPT(tiny(n_layer=3, hyper_connections="hc")).eval()
    hc_model.load_state_dict(plain.state_dict(), strict=False)
    assert [int(b.hc_1.static_alpha[:, 0].argmax()) for b in hc_model.transformer.h] == [0, 2, 0]
    assert [int(b.hc_2.static_alpha[:, 0].argmax()) for b in hc_model.transformer.h] == [1, 3, 1]
    hc = hc_model.transformer.h[0].hc_1
    assert torch.equal(hc.static_alpha[:, 1:], torch.eye(4)) and torch.equal(hc.static_beta, torch.ones(4))
    for model in (plain, hc_model):  # ln_f's eps would tell the stream from its n copies' sum by ~1% at init
        model.transformer.ln_f.eps = 0.0
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hc_model(idx)[0], plain(idx)[0])
        mhc_model = GPT(tiny(n_layer=3, hyper_connections="mhc")).eval()
        mhc_model.load_state_dict(plain.state_dict(), strict=False)
        assert (mhc_model(idx)[0] - plain(idx)[0]).abs().max() > 1e-2


def test_hc_gains_on_known_maps_and_mhc_keeps_them_at_one_where_hc_compounds():
    """hc_gains composes H_res^T over the sublayers, two per block: H_res^T = [[2, 1], [0, 1]] gives [[4, 3], [0, 1]]
    after block 1 and [[16, 15], [0, 1]] after block 2 (largest row sums 7, 31; column sums 4, 16). In an
    8-block model with the maps perturbed alike, mHC's composite gain stays 1 at every depth while HC's grows."""
    h = torch.tensor([[2.0, 0.0], [1.0, 1.0]]).expand(1, 1, 2, 2)  # H_res^T = [[2, 1], [0, 1]]
    gains = stable_gpt.hc_gains([h, h, h, h])
    assert gains["hc_gain_forward"] == [7.0, 31.0] and gains["hc_gain_backward"] == [4.0, 16.0]
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    result = {}
    for kind in ("hc", "mhc"):
        torch.manual_seed(0)
        model = perturbed(GPT(tiny(n_layer=8, hyper_connections=kind)), scale=0.3)
        result[kind] = stable_gpt.activation_stats(model, idx, idx)
    for key in ("hc_gain_forward", "hc_gain_backward"):
        assert len(result["mhc"][key]) == 8 and max(abs(g - 1) for g in result["mhc"][key]) < 1e-3
        assert result["hc"][key][-1] > 2 * result["hc"][key][0] > 2  # compounds with depth


def test_hyper_connections_are_refused_on_a_normalized_stream_and_not_decayed():
    for position in ("post", "mix", "deepnorm"):
        with pytest.raises(ValueError, match="no such path"):
            tiny(hyper_connections="mhc", norm_position=position)
    with pytest.raises(ValueError, match="unknown hyper_connections"):
        tiny(hyper_connections="mHC")
    with pytest.raises(ValueError, match="hc_streams must be a positive integer"):
        tiny(hyper_connections="mhc", hc_streams=0)
    model = GPT(tiny(hyper_connections="mhc"))
    decayed = {id(p) for p in model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups[0]["params"]}
    hc_params = [p for m in model.modules() if isinstance(m, stable_gpt.HyperConnection) for p in m.parameters()]
    assert hc_params and not any(id(p) in decayed for p in hc_params)
    assert id(model.transformer.h[0].attn.c_attn.weight) in decayed


# ----------------------------------------------------------------------------------------------------
# muP


@pytest.mark.parametrize("width", [32, 128])
def test_mup_init_learning_rates_and_multipliers_at_two_widths(width):
    """muP as EleutherAI's nanoGPT-mup at m = width / 64 (0.5 and 2): every hidden matrix drawn with std
    0.02/sqrt(m) (c_proj 0.02/sqrt(2Lm)) and in a group of lr_scale 1/m; embeddings (the tied head) at 0.02 and
    the base rate; the logits lm_head(ln_f(x)) / m; attention logits q.k / hs."""
    m = width / 64
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=width, n_layer=2, mup=True, mup_base_width=64))
    stds = stable_gpt.weight_stds(model)
    for name, std in stds.items():
        want = 0.02 / math.sqrt(m) / (math.sqrt(4) if name.endswith(("attn_out", "mlp_out", "proj")) else 1)
        assert abs(std / want - 1) < 0.06, (name, std, want)
    assert abs(model.transformer.wpe.weight.std().item() / 0.02 - 1) < 0.06
    groups = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    hidden = [g for g in groups if "lr_scale" in g]
    assert len(hidden) == 1 and hidden[0]["lr_scale"] == 1 / m and hidden[0]["lr"] == 1e-3 / m
    assert {id(p) for p in hidden[0]["params"]} == {id(mod.weight) for _, _, mod in stable_gpt._block_linears(model)}
    assert all(g["lr"] == 1e-3 for g in groups if "lr_scale" not in g)
    # the forward: the head sees ln_f's output / m; the attention uses 1/hs
    seen = []
    model.transformer.ln_f.register_forward_hook(lambda mod, args, out: seen.append(out))
    idx = torch.randint(0, 40, (2, 16))
    with torch.no_grad():
        logits = model(idx, idx)[0]
        torch.testing.assert_close(logits, seen[0] / m @ model.lm_head.weight.T)
        attn = model.transformer.h[0].attn
        x = torch.randn(2, 16, width)
        q, k, v = (t.view(2, 16, 4, width // 4).transpose(1, 2) for t in attn.c_attn(x).split(width, dim=2))
        scores = (q @ k.transpose(-2, -1) / (width // 4)).masked_fill(~torch.ones(16, 16).tril().bool(), -math.inf)
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, width)
        torch.testing.assert_close(attn(x), attn.c_proj(y))


def test_mup_at_its_base_width_draws_the_standard_weights_and_the_loop_scales_each_groups_lr():
    """At n_embd == mup_base_width muP draws the weights the standard model draws (same seed); its first AdamW step
    through the training loop's set_learning_rate moves a hidden matrix by lr/m per entry (Adam's first step is
    lr x sign(g)) and the embeddings by lr."""
    torch.manual_seed(0)
    standard = GPT(tiny(n_embd=32))
    torch.manual_seed(0)
    at_base = GPT(tiny(n_embd=32, mup=True, mup_base_width=32))
    assert all(torch.equal(a, b) for a, b in zip(standard.state_dict().values(), at_base.state_dict().values()))
    torch.manual_seed(0)
    model = GPT(tiny(n_embd=32, mup=True, mup_base_width=128))  # m = 1/4: hidden lr x 4
    opt = model.configure_optimizers(0.0, 1.0, (0.9, 0.95), "cpu")
    train_shakespeare.set_learning_rate(opt, 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 40, (4, 16))
    model(idx, idx)[1].backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert abs(moved["transformer.h.0.mlp.c_fc.weight"] / 4e-3 - 1) < 1e-3
    assert abs(moved["transformer.wpe.weight"] / 1e-3 - 1) < 1e-3


def test_mup_with_muon_is_refused(tmp_path, data_dir, capsys):
    with pytest.raises(ValueError, match="muP with Muon"):
        GPT(tiny(mup=True)).configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", optimizer="muon")
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "run", "--mup", "--optimizer", "muon")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "muP with Muon" in err[0] and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------
# The output logits: z-loss, soft-capping


def test_z_loss_adds_exactly_coef_times_mean_log_z_squared_and_never_the_val_loss():
    coef = 0.3
    model = perturbed(GPT(tiny(z_loss=coef)))
    plain = GPT(tiny())
    plain.load_state_dict(model.state_dict())
    idx = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    logits, train_loss = model.train()(idx, idx)
    ce = F.cross_entropy(logits.view(-1, 40), idx.view(-1))
    lse = torch.logsumexp(logits.double(), dim=-1)
    assert torch.allclose(train_loss.double(), ce.double() + coef * lse.pow(2).mean(), atol=1e-5)
    assert abs(train_loss.item() - plain.train()(idx, idx)[1].item()) > 1e-3  # the term is there in training
    ignored = idx.clone()
    ignored[:, :5] = -1  # positions the cross-entropy ignores are not in the z-loss either
    assert torch.allclose(stable_gpt.z_loss_term(logits, coef, ignored).double(),
                          coef * lse[:, 5:].pow(2).mean(), atol=1e-6)
    # eval mode (estimate_loss, the val loss): the cross-entropy alone, as a model without z-loss reports
    assert model.eval()(idx, idx)[1].item() == pytest.approx(plain.eval()(idx, idx)[1].item(), abs=1e-6)


def test_forward_returns_the_z_loss_term_it_added():
    """with_z_loss: the trainer logs the z-loss apart from the cross-entropy without a second logsumexp."""
    torch.manual_seed(0)
    model = GPT(tiny(z_loss=1e-2)).train()
    idx = torch.randint(0, 40, (2, 16))
    logits, loss, z = model(idx, idx, with_z_loss=True)
    assert not z.requires_grad and z == stable_gpt.z_loss_term(logits.detach(), 1e-2, idx)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 40), idx.view(-1))
    torch.testing.assert_close(loss, ce + z)
    assert model(idx, idx, with_z_loss=True)[2] is not None and GPT(tiny())(idx, idx, with_z_loss=True)[2] is None
    assert len(model(idx, idx)) == 2  # nanoGPT's (logits, loss) stays


def test_z_loss_is_logged_apart_from_the_cross_entropy(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--z-loss", "0.01", "--max-iters", "20")) == 0
    steps = [r for r in read_log(out) if "lr" in r]
    assert all(r["z_loss"] > 0 for r in steps)
    # the logged loss is the cross-entropy: at step 1 (the model at init) ~ log(vocab), z-loss not added
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert abs(steps[0]["loss"] - math.log(vocab)) < 0.05 and steps[0]["z_loss"] == pytest.approx(
        0.01 * math.log(vocab) ** 2, rel=0.05)


def test_logit_softcap_bounds_the_logits_and_is_the_identity_well_inside():
    model = GPT(tiny(logit_softcap=3.0))
    with torch.no_grad():
        model.lm_head.weight.mul_(500)  # raw logits in the hundreds
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(idx, idx)[0]
    assert 2.9 < logits.abs().max() <= 3.0  # (tanh rounds to exactly 1 in fp32 far out)
    assert model(idx)[0].abs().max() <= 3.0  # the sampling path too
    small = torch.linspace(-0.1, 0.1, 11)
    assert torch.allclose(GPT(tiny(logit_softcap=30.0)).softcap(small), small, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Optimizers: Muon, weight decay independent of the learning rate


def test_muon_steps_the_block_matrices_as_torch_muon_and_the_rest_with_adamw():
    """--optimizer muon: every block matrix (and only those) in torch.optim.Muon with the Moonlight LR rule;
    one step of MuonWithAdamW equals torch's Muon on those and AdamW on the rest, built apart."""
    torch.manual_seed(0)
    model = GPT(tiny(attn_gate=True, wesar=True))
    twin = copy.deepcopy(model)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", optimizer="muon")
    muon_params = opt.optimizers["muon"].param_groups[0]["params"]
    assert {id(p) for p in muon_params} == {id(m.weight) for _, _, m in stable_gpt._block_linears(model)}
    assert all(p.dim() == 2 for p in muon_params) and len(muon_params) == 2 * 5  # c_attn, c_proj, c_fc, c_proj, c_gate
    assert opt.optimizers["muon"].param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    blocks = {id(m.weight) for _, _, m in stable_gpt._block_linears(twin)}
    ref_muon = torch.optim.Muon([p for p in twin.parameters() if id(p) in blocks], lr=1e-2, weight_decay=0.1,
                                adjust_lr_fn="match_rms_adamw")
    ref_adamw = twin.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")  # then drop the block matrices from it
    for group in ref_adamw.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in blocks]
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    for m, steps in ((model, [opt]), (twin, [ref_muon, ref_adamw])):
        m(idx, idx)[1].backward()
        for o in steps:
            o.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    state = opt.state_dict()
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # the momentum buffers are saved
    opt.load_state_dict(copy.deepcopy(state))
    with pytest.raises(ValueError, match="not a Muon \\+ AdamW state"):
        opt.load_state_dict(ref_adamw.state_dict())


def test_resume_refuses_another_optimizer(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "3")) == 0
    assert train_shakespeare.main(train_args(data_dir, out, "--resume", "--optimizer", "muon")) == 2
    assert "cannot resume with another --optimizer (adamw -> muon)" in capsys.readouterr().err


def test_muon_on_a_cpu_without_bf16_matmuls_says_what_it_costs(tmp_path, data_dir, capsys, monkeypatch):
    """torch.optim.Muon's Newton-Schulz runs in bf16: on a CPU without bf16 matmul instructions one note line
    says a step will cost several AdamW steps; with them, or with AdamW, no note."""
    for has_bf16, optimizer, noted in ((False, "muon", True), (True, "muon", False), (False, "adamw", False)):
        monkeypatch.setattr(train_shakespeare, "cpu_has_bf16_matmul", lambda: has_bf16)
        out = tmp_path / f"{optimizer}{has_bf16}"
        assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "1", "--eval-interval", "1",
                                                 "--optimizer", optimizer)) == 0
        assert capsys.readouterr().out.count("note: this CPU has no bf16 matmul instructions") == noted


def olmo_core_step_factor(losses, grad_norms, window=128, sigma=6):
    """A transcription of OLMo-core's SkipStepOptimizer.get_step_factor (allenai/OLMo-core,
    olmo_core/optim/skip_step_optimizer.py) on the lists it keeps (the last window + 1 values): 1 to step, 0 to skip."""
    if len(losses) < max(20, window // 2):
        return 1.0
    loss_std, loss_mean = torch.std_mean(torch.tensor(losses[:-1], dtype=torch.float64))
    loss_z = (losses[-1] - loss_mean).abs().div(loss_std)
    norm_std, norm_mean = torch.std_mean(torch.tensor(grad_norms[:-1], dtype=torch.float64))
    norm_z = (grad_norms[-1] - norm_mean).abs().div(norm_std)
    return float(bool(loss_z <= sigma and norm_z <= sigma))


def test_skip_step_is_olmo_cores_rule():
    """--skip-spikes' rule against a transcription of OLMo-core's on a synthetic series: a falling noisy loss with
    loss spikes, gradient-norm spikes, a flat stretch (0 / 0) and a window that trims; every step's decision alike,
    and some of each kind skipped."""
    rng, rule, losses, norms, skipped = random.Random(0), monitors.SkipStep(window=32), [], [], []
    for step in range(400):
        loss = 4.0 * math.exp(-step / 150) + 2.0 + rng.gauss(0, 0.02) + (3.0 if step in (50, 51, 200) else 0.0)
        norm = 1.0 + rng.gauss(0, 0.05) + (20.0 if step in (120, 300) else 0.0)
        if 340 <= step < 380:
            loss, norm = 2.5, 1.0  # a flat stretch: once the window is all equal values, 0 / 0
        losses, norms = (losses + [loss])[-33:], (norms + [norm])[-33:]
        expected = olmo_core_step_factor(losses, norms, window=32)
        assert rule.skip(loss, norm) == (expected == 0.0), step
        if expected == 0.0:
            skipped.append(step)
    # step 51's spike is not skipped: step 50's, in the window, widens its std (OLMo-core's rule does the same)
    assert {50, 120, 200, 300} <= set(skipped) and 51 not in skipped and any(s >= 372 for s in skipped), skipped
    assert rule.losses == losses and rule.grad_norms == norms  # the window it keeps, as OLMo-core's


def test_skip_spikes_skips_a_spiking_update_and_resumes_its_window(tmp_path, data_dir, monkeypatch):
    """--skip-spikes in training: a gradient-norm spike at step 80 (the reported norm x 1e4; the update itself
    unchanged) is skipped, logged, counted; a run stopped at step 60 and resumed skips the same steps, since the
    window travels in the checkpoint (rebuilt from nothing it would hold 20 values, too few to judge), and ends
    the same."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_with_a_spike_at(step):
        def clip_and_report(*args, **kw):
            calls.append(1)
            norm = clip(*args, **kw)
            return norm * 1e4 if len(calls) == step else norm
        return clip_and_report

    flags = ("--eval-interval", "20", "--skip-spikes", "--log-interval", "10", "--diag-interval", "0",
             "--lr-decay-iters", "100")  # one schedule for the whole run and both parts
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_a_spike_at(80))
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "whole", "--max-iters", "100", *flags)) == 0
    whole = read_log(tmp_path / "whole")
    skipped = [r["iter"] for r in whole if r.get("type") == "skipped"]  # 80, and any the rule finds by itself
    assert 80 in skipped and {r["reason"] for r in whole if r.get("type") == "skipped"} == {"spike"}
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["skipped_updates"] == len(skipped)
    calls.clear()
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "parts", "--max-iters", "60", *flags)) == 0
    assert len(torch.load(tmp_path / "parts" / "ckpt.pt", weights_only=True)["skip_step"]["losses"]) == 60
    calls.clear()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_a_spike_at(20))  # step 80 of the resumed run
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "parts", "--max-iters", "100", "--resume",
                                             *flags)) == 0
    parts = read_log(tmp_path / "parts")
    assert [r["iter"] for r in parts if r.get("type") == "skipped"] == skipped
    evals = lambda log: [(r["iter"], r["val_loss"]) for r in log if r.get("type") == "eval"]
    assert evals(parts) == evals(whole)


def official_zclip(norms, alpha=0.97, z_thresh=2.5, warmup=25, eps=1e-6):
    """A transcription of the official ZClip's step (bluorion-com/ZClip, zclip/zclip.py: mode "zscore", clip_option
    "adaptive_scaling", clip_factor 1, skip_update_on_spike False) on a sequence of gradient norms: each step's
    adaptive clip value, None where it does not clip (max_grad_norm, applied on top, left out)."""
    buffer, mean, var, out = [], None, None, []
    for norm in norms:
        if mean is None:
            buffer.append(norm)
            if len(buffer) >= warmup:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(None)
            continue
        std = var ** 0.5
        z = (norm - mean) / (std + eps)
        clip = mean + (z_thresh * std) / (z / z_thresh) if z > z_thresh else None
        out.append(clip)
        effective = clip if clip is not None else norm
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return out


def test_zclip_is_the_official_rule_and_clips_the_gradients_to_it(tmp_path, data_dir):
    """ZClip's clip values against a transcription of the official code on a gradient-norm series with spikes;
    Run.clip_gradients scales the gradients to min(ZClip's value, --grad-clip); its state travels in the checkpoint
    (a resumed run's EMA equals the uninterrupted run's)."""
    rng = random.Random(0)
    norms = [1.0 + 0.3 * math.exp(-k / 50) + rng.gauss(0, 0.05) + (5.0 if k in (40, 41, 90) else 0.0)
             for k in range(150)]
    rule, expected = monitors.ZClip(), official_zclip(norms)
    got = [rule.clip_value(n) for n in norms]
    assert [g is None for g in got] == [e is None for e in expected]
    assert all(g == pytest.approx(e, rel=1e-12) for g, e in zip(got, expected) if e is not None)
    assert {40, 90} <= {k for k, e in enumerate(expected) if e is not None}
    # the gradients scaled to the adaptive value, below --grad-clip, and to --grad-clip below it
    model = GPT(tiny())
    for max_norm, mean, expected_norm in ((10.0, 0.5, None), (0.1, 0.5, 0.1)):
        model(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16)))[1].backward()
        total = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        zclip = monitors.ZClip(state=dict(mean=mean * total, var=(0.01 * total) ** 2))  # the norm a far outlier
        run = types.SimpleNamespace(model=model, cfg=types.SimpleNamespace(grad_clip=max_norm), zclip=zclip)
        z = (total - mean * total) / (0.01 * total + 1e-6)
        threshold = mean * total + 2.5 * 0.01 * total / (z / 2.5)
        assert float(runs.Run.clip_gradients(run)) == pytest.approx(total)  # returns the norm before clipping
        after = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
        assert after == pytest.approx(expected_norm or threshold, rel=1e-4)
        model.zero_grad()
    flags = ("--eval-interval", "30", "--zclip", "--diag-interval", "0", "--lr-decay-iters", "60")
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "whole", "--max-iters", "60", *flags)) == 0
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "parts", "--max-iters", "30", *flags)) == 0
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "parts", "--max-iters", "60", "--resume",
                                             *flags)) == 0
    state = lambda d: torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["zclip"]
    assert state("parts")["mean"] is not None and state("parts") == state("whole")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_independent_weight_decay_does_not_scale_with_the_peak_lr(optimizer, tmp_path, data_dir):
    """Wortsman et al.'s independent decay (arXiv 2309.14322): with a zero gradient (no Adam/Muon step) one step
    at lr_t multiplies a decayed weight by 1 - (lr_t / lr) wd, whatever the peak lr; PyTorch's own decay is
    1 - lr_t wd, 100x more at a 100x higher peak. --independent-wd passes wd / lr as the groups' decay; this
    checks that both optimizers then decay by lr_t x (wd / lr), and that the flag reaches the optimizer."""
    wd = 0.1
    for peak in (1e-3, 1e-1):
        # (the decay the groups are given, what one step at lr_t = peak / 4 multiplies a decayed matrix by):
        # --independent-wd's wd / peak, then PyTorch's coupled wd
        for given, expected in ((wd / peak, 1 - 0.25 * wd), (wd, 1 - 0.25 * peak * wd)):
            torch.manual_seed(0)
            model = GPT(tiny())
            opt = model.configure_optimizers(given, peak, (0.9, 0.95), "cpu", optimizer=optimizer)
            for group in opt.param_groups:  # as the training loop sets the step's learning rate
                group["lr"] = 0.25 * peak
            block = model.transformer.h[0]
            matrix, gain = block.attn.c_attn.weight, block.ln_1.weight  # decayed (Muon's, with muon); not decayed
            matrix_before, gain_before = matrix.detach().clone(), gain.detach().clone()
            for p in model.parameters():  # a zero gradient: no Adam or Muon update, only the decay acts
                p.grad = torch.zeros_like(p)
            opt.step()
            torch.testing.assert_close(matrix.detach(), matrix_before * expected, rtol=1e-6, atol=0)
            assert torch.equal(gain.detach(), gain_before)
    if optimizer == "muon":
        return
    out = tmp_path / "run"  # the training script's flag reaches the optimizer (the checkpoint's groups)
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2", "--eval-interval", "2",
                                             "--independent-wd", "--weight-decay", "1e-4", "--lr", "1e-2")) == 0
    groups = torch.load(out / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] == pytest.approx(1e-4 / 1e-2)


def test_independent_decay_defaults_to_wortsmans_1e_4_on_a_fresh_run_only(tmp_path, data_dir):
    """--independent-wd alone would decay by the coupled default 0.1 per step at the peak: it takes Wortsman's 1e-4
    unless --weight-decay is given; a resumed run keeps the decay it was started with."""
    resolve = train_shakespeare.resolve
    assert resolve({"independent_wd": True}).weight_decay == 1e-4 == train_shakespeare.INDEPENDENT_WD
    assert resolve({"independent_wd": True, "weight_decay": 1e-3}).weight_decay == 1e-3
    assert resolve({}).weight_decay == 0.1  # nanoGPT's coupled decay, without the flag
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2", "--eval-interval", "2",
                                             "--independent-wd", "--weight-decay", "3e-3")) == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert train_shakespeare.resume_settings({}, ckpt).weight_decay == 3e-3


# ----------------------------------------------------------------------------------------------------
# The config's rules: what is refused, what acts differently


@pytest.mark.parametrize("kw, message", [
    (dict(lns=True, norm_position="post"), "lns scales the output of a \\*pre\\*-norm"),
    (dict(lns=True, norm_position="deepnorm"), "lns scales"),
    (dict(lir=True, norm_position="deepnorm"), "lir and deepnorm"),
    (dict(sdd=True, scaled_init=True), "SDD moves the 1/sqrt\\(2L\\)"),
    (dict(lir=True, scaled_init=True), "LIR replaces it"),
    (dict(wesar_sigma=0.0), "wesar_sigma must be a finite number > 0"),
])
def test_conflicting_flags_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        tiny(**kw)


def perturbed(model, seed=1, scale=0.05):
    """model with every parameter moved away from its init (gains off 1, gates off their init, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 and p.std() > 0 else 1))
    return model


def test_combination_notes_name_what_acts_differently():
    assert stable_gpt.combination_notes(tiny()) == [] and stable_gpt.combination_notes(tiny(lns=True, lir=True, tvr=True, wesar=True)) == []
    notes = stable_gpt.combination_notes(tiny(sdd=True, lns=True, wesar=True, lir=True, tvr=True))
    assert [n.split(":")[0] for n in notes] == ["lns under sdd", "lir under sdd", "tvr under sdd", "wesar under sdd"]
    assert all("effective learning rate" in n for n in notes[1:3])


# ----------------------------------------------------------------------------------------------------
# Data


def test_prepare_char_round_trip_and_split(tmp_path, text_file):
    meta = prepare_data.prepare(text_file, tmp_path, "char")
    text = text_file.read_text()
    assert meta["vocab_size"] == len(set(text)) and json.loads((tmp_path / "meta.json").read_text()) == meta
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    assert len(train) == int(len(text) * 0.9) and len(train) + len(val) == len(text)
    codec = prepare_data.Codec(meta)
    assert codec.decode(np.concatenate([train, val]).tolist()) == text
    with pytest.raises(prepare_data.DataError, match="not in the .*vocabulary: 'QZ'"):
        codec.encode("the cat Z Q")


def test_prepare_gpt2_round_trip(tmp_path, text_file):
    try:
        meta = prepare_data.prepare(text_file, tmp_path, "gpt2")
    except prepare_data.DataError as e:
        pytest.skip(f"GPT-2 BPE not loadable here: {e}")
    assert meta["vocab_size"] == 50257
    ids = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert len(np.fromfile(tmp_path / "train.bin", dtype=np.uint16)) == int(len(ids) * 0.9)
    assert prepare_data.Codec(meta).decode(ids.tolist()) == text_file.read_text()


def test_samples_print_as_each_token_is_drawn(tmp_path, capsys):
    """Sampling streams: the pieces come one per token and join to the sample's text; a character whose BPE
    bytes arrive over two tokens waits for the second (no replacement character is ever printed)."""
    try:
        bpe = prepare_data.Codec(prepare_data.make_meta("", "gpt2"))
    except prepare_data.DataError as e:
        pytest.skip(f"GPT-2 BPE not loadable here: {e}")
    text = "naïve 日本語 ok"
    ids = bpe.encode(text)
    pieces = list(bpe.decode_as_drawn(ids[:1], ids[1:]))
    assert "".join(pieces) == text and len(pieces) == len(ids) and not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # 日本語's bytes span tokens: a piece that waited
    codec = prepare_data.Codec(prepare_data.make_meta("abc\nd", "char"))
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=codec.vocab_size))
    torch.manual_seed(0)
    whole = codec.decode(model.eval().generate(torch.tensor([codec.prompt_ids("ab")]), 12)[0].tolist())
    torch.manual_seed(0)
    train_shakespeare.print_samples(model, codec, train_shakespeare.Sampling(prompt="ab", max_new_tokens=12,
                                                                             temperature=1.0, top_k=0), "cpu")
    assert capsys.readouterr().out == whole + "\n" + "-" * 60 + "\n"


def test_prepare_data_errors(tmp_path):
    with pytest.raises(prepare_data.DataError, match="input text not found.*--input"):
        prepare_data.find_shakespeare(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(prepare_data.DataError, match="is empty"):
        prepare_data.prepare(tmp_path / "empty.txt", tmp_path / "out")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(prepare_data.DataError, match="not UTF-8"):
        prepare_data.prepare(tmp_path / "latin1.txt", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# Training end to end


def test_training_lowers_loss_and_writes_outputs(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "150", "--eval-interval", "50")) == 0
    summary = json.loads((out / "summary.json").read_text())
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert summary["final_val_loss"] < 0.6 * math.log(vocab)  # ln(vocab) is a uniform guess
    assert summary["iters"] == 150 and not summary["diverged"] and summary["tokens_per_s"] > 0
    assert {"config", "best_val_loss", "wall_s"} <= set(summary)
    log = read_log(out)
    evals = [r for r in log if r.get("type") == "eval"]
    assert [r["iter"] for r in evals] == [0, 50, 100, 150]
    times = [r["time_s"] for r in evals]  # the time to reach each loss, in the log as on screen
    assert times == sorted(times) and 0 < times[-1] <= summary["wall_s"] + 0.1
    assert {"iter", "loss", "lr", "grad_norm", "ms"} <= set(log[1])
    assert (out / "ckpt.pt").is_file() and (out / "best.pt").is_file()
    printed = capsys.readouterr().out
    assert "ms/iter" in printed and "tok/s" in printed and "ETA" in printed and "--- sample ---" in printed


@pytest.fixture(scope="module")
def gpt2_data_dir(tmp_path_factory, text_file):
    return prepared(tmp_path_factory, text_file, "gpt2")


def gpt2_args(data_dir, out_dir, *extra):
    """train_args without the model shape, which --init-from takes from GPT-2's weights."""
    args = train_args(data_dir, out_dir, "--init-from", "gpt2", *extra)
    for flag in ("--n-layer", "--n-head", "--n-embd"):
        i = args.index(flag)
        del args[i:i + 2]
    return args


def test_init_from_gpt2_without_transformers_is_one_line(tmp_path, gpt2_data_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    assert train_shakespeare.main(gpt2_args(gpt2_data_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from gpt2: ") and err.count("\n") == 1, err
    assert "pip install transformers" in err
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_init_from_gpt2_offline_is_one_line(tmp_path, gpt2_data_dir, capsys, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is optional (.ci/run installs it in its own step)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: when an earlier test imported it, say it there too,
    # or the loader tries the (absent) network with retries for ~20 s before giving up the same way
    if (hub_constants := sys.modules.get("huggingface_hub.constants")) is not None:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert train_shakespeare.main(gpt2_args(gpt2_data_dir, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --init-from gpt2: ") and err.count("\n") == 1, err
    assert "could not load GPT-2's weights" in err
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_init_from_gpt2_starts_from_its_weights(tmp_path, gpt2_data_dir, monkeypatch, capsys):
    """--init-from with the download replaced by a small random GPT-2 (no network here): the run takes its
    shape, bias and unpadded vocabulary, its weights, and resumes; flags that change the model are refused."""
    transformers = pytest.importorskip("transformers", reason="transformers is optional (.ci/run installs it)")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=16,
                                                               n_layer=2, n_head=2))
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", lambda name: hf)
    monkeypatch.setitem(stable_gpt.GPT2_SIZES, "gpt2", dict(n_layer=2, n_head=2, n_embd=16))
    out = tmp_path / "run"
    args = gpt2_args(gpt2_data_dir, out, "--lr", "1e-12", "--max-iters", "4",
                      "--eval-interval", "4", "--eval-iters", "1", "--batch-size", "2")
    assert train_shakespeare.main(args) == 0
    ckpt = train_shakespeare.load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_args"]["vocab_size"] == 50257 and ckpt["model_args"]["n_embd"] == 16
    assert ckpt["model_args"]["bias"] is True and ckpt["model_args"]["block_size"] == 32  # cropped
    torch.testing.assert_close(ckpt["model"]["transformer.h.1.mlp.c_fc.weight"],
                               hf.transformer.h[1].mlp.c_fc.weight.detach().t(), atol=1e-6, rtol=0)
    assert train_shakespeare.main(args[:args.index("--max-iters")] + ["--max-iters", "6", "--resume"]) == 0
    capsys.readouterr()
    assert train_shakespeare.main(gpt2_args(gpt2_data_dir, tmp_path / "r2", "--sdd")) == 2
    assert "cannot be combined with --sdd" in capsys.readouterr().err


def test_a_text_without_newlines_trains_and_samples(tmp_path, capsys):
    """The default prompt is a newline; where the vocabulary has none, its first token (a run that trained
    must not end in an error at the sample)."""
    text = tmp_path / "one_line.txt"
    text.write_text(synthetic_text(20_000).replace("\n", " "))
    assert train_shakespeare.main(train_args(text, tmp_path / "run", "--max-iters", "10")) == 0
    assert "--- sample ---" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [("--tvr", "--tvr-interval", "5", "--tvr-target", "0.02"),
                                   ("--optimizer", "muon", "--qk-clip", "0.3", "--attn-gate")], ids=["tvr", "muon"])
def test_resume_continues_exactly(tmp_path, data_dir, flags):
    """Stop at iter 37 (odd, not an eval step, of a 60-iter schedule) and resume: the next losses equal an
    uninterrupted run's, bit for bit, dropout and TVR (or Muon's state and QK-Clip) included."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ("--dropout", "0.1", *flags)
    assert train_shakespeare.main(train_args(data_dir, full, *common)) == 0
    assert train_shakespeare.main(train_args(data_dir, part, *common, "--max-iters", "37",
                                             "--lr-decay-iters", "60")) == 0
    assert train_shakespeare.main(train_args(data_dir, part, "--resume", "--max-iters", "60")) == 0
    losses = lambda out: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in read_log(out)]
    assert losses(part) == losses(full)
    assert len([r for r in read_log(part) if r["iter"] > 37]) == 25  # 23 steps, evals at 40 and 60


def test_resume_refuses_a_different_model(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "5")) == 0
    assert train_shakespeare.main(train_args(data_dir, out, "--resume", "--n-embd", "64")) == 2
    assert "cannot resume with a different model: n_embd 32 -> 64" in capsys.readouterr().err
    # settings that would leave the checkpoint's optimizer state unfit, or seem to change a resumed run: one line
    for flags, message in ((["--preset", "shakespeare-char"], "another --preset (cpu -> shakespeare-char)"),
                           (["--olmo-decay"], "another --olmo-decay (False -> True)"),
                           (["--olmo2"], "another --olmo2 (False -> True)"),
                           (["--no-sdd-official-decay"], "another --sdd-official-decay (True -> False)")):
        assert train_shakespeare.main(train_args(data_dir, out, "--resume", *flags)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_sample_from_checkpoint(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "5")) == 0
    capsys.readouterr()
    assert train_shakespeare.main(["--sample", "--out-dir", str(out), "--prompt", "the cat",
                                   "--max-new-tokens", "12", "--num-samples", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("the cat") == 2
    assert train_shakespeare.main(["--sample", "--out-dir", str(out), "--prompt", "the caT@"]) == 2
    assert "characters not in the" in capsys.readouterr().err
    assert train_shakespeare.main(["--sample", "--out-dir", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Composition: every flag acts, in every combination the config accepts


FLAG_SETS = [dict(sdd=True), dict(lns=True), dict(wesar=True), dict(lir=True), dict(tvr=True),
             dict(norm_position="post", sdd=True), dict(norm_position="mix"), dict(norm_position="deepnorm"),
             dict(norm="rmsnorm"), ALL_FLAGS, dict(ALL_FLAGS, norm="rmsnorm", norm_position="mix"),
             dict(attn_sink=True, hyper_connections="mhc"), dict(hyper_connections="hc", norm_position="peri")]


@pytest.mark.parametrize("kw", FLAG_SETS, ids=lambda kw: "+".join(f"{k}={v}" for k, v in kw.items()))
def test_every_flag_keeps_causality_and_round_trips_checkpoints(kw):
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=3, **kw)).eval()
    idx = torch.randint(0, 40, (2, 16))
    base, _ = model(idx, idx)
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 40
    assert torch.equal(model(idx2, idx2)[0][:, :7], base[:, :7])
    again = GPT(tiny(n_layer=3, **kw)).eval()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(idx, idx)[0], base)


# How each discrete GPTConfig field shows that it acts: "function" (same weights, different output), "init" (the
# init statistics of the matrices in use), "step" (the weights after an optimizer step). The matrix below is
# read off the dataclass: a new bool or choice field fails test_every_config_field_is_in_the_matrix until it
# is classified here, so no flag can join the config without a test that it does something.
FLAG_EFFECT = {"bias": "function", "norm": "function", "norm_position": "function", "sdd": "function",
               "lns": "function", "wesar": "function", "lir": "init", "scaled_init": "init", "tvr": "step",
               "qk_norm": "function", "z_loss": "step", "logit_softcap": "function", "qk_norm_full": "function",
               "qk_clip": "step", "attn_gate": "function", "attn_sink": "function", "hyper_connections": "function",
               "mup": "function"}
MATRIX_OFF = {"norm": "layernorm", "norm_position": "pre", "scaled_init": False, "z_loss": 0.0,
              "logit_softcap": 0.0, "qk_clip": 0.0, "hyper_connections": "off"}  # else False
# The float fields that switch a technique on (0: off), with the value the matrix tries; every other float
# field is a setting of a technique (a std, a fraction) and listed in SETTINGS, so that a new float field must
# be classified too.
FLOAT_FLAGS = {"z_loss": (0.0, 0.5), "logit_softcap": (0.0, 0.2), "qk_clip": (0.0, 1e-7)}
SETTINGS = {"dropout", "mix_fraction", "init_std", "wesar_sigma", "tvr_target", "tvr_threshold", "norm_eps"}


def discrete_fields():
    """{field: the values the matrix tries} for every bool, Optional[bool], choice and on/off float field of
    GPTConfig."""
    choices = {"norm": stable_gpt.NORMS, "norm_position": stable_gpt.NORM_POSITIONS,
               "hyper_connections": stable_gpt.HYPER_CONNECTIONS}
    out = {}
    for f in fields(GPTConfig):
        if f.type is bool:
            out[f.name] = (False, True)
        elif f.type == Optional[bool]:
            out[f.name] = (None, False, True)
        elif f.type is str:
            out[f.name] = choices[f.name]  # a KeyError here: a new choice field, add its values
        elif f.type is float:
            assert f.name in SETTINGS or f.name in FLOAT_FLAGS, f"classify the float field {f.name}"
            if f.name in FLOAT_FLAGS:
                out[f.name] = FLOAT_FLAGS[f.name]
    return out


# pruned to run in seconds: these fields keep one value, except in their own test (the full product is ~25,000)
MATRIX_FIXED = {"bias": False, "scaled_init": None, "z_loss": 0.0, "logit_softcap": 0.0, "qk_clip": 0.0,
                "qk_norm_full": False, "attn_gate": False, "attn_sink": False, "hyper_connections": "off", "mup": False}


def accepted_configs(vary=()):
    """Every combination of the discrete fields that GPTConfig accepts (the rest refuse with a reason), the
    MATRIX_FIXED fields at their value unless named in vary."""
    space = {k: v if k in vary or k not in MATRIX_FIXED else (MATRIX_FIXED[k],) for k, v in discrete_fields().items()}
    accepted = []
    for values in itertools.product(*space.values()):
        kw = dict(zip(space, values))
        try:
            GPTConfig(**MATRIX_BASE, **kw)
        except ValueError:
            continue
        accepted.append(kw)
    return accepted


# 4 layers so that Mix-LN has a Post-LN block (floor(0.25 * 4) = 1) and LNS/LIR a layer index above 1;
# tvr_target below the init std so that TVR bites after one step
MATRIX_BASE = dict(block_size=8, vocab_size=11, n_layer=4, n_head=2, n_embd=16, tvr_interval=1, tvr_target=0.01)


def matrix_model(kw, seed=0):
    """A model of the matrix, its RMSNorms with eps 0: at this tiny width the eps alone would move a
    scale-invariant function by ~1e-3 and hide a flag that does nothing (as LNS under SDD once did). Its DyTs
    bend (alpha 2): this tiny model's activations at init sit on tanh's straight part, where DyT is a gain."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**MATRIX_BASE, **kw))
    for m in model.modules():
        if isinstance(m, (RMSNorm, SDDNorm)):
            m.eps = 0.0
        if isinstance(m, stable_gpt.DyT):
            m.alpha.data.fill_(2.0)
    return model


def config_field_reads(source, fields):
    """{field: {definition}}: the functions and methods ("Class.method") of source that read config.<field> (through
    a name config, cfg or c, or any .config)."""
    import ast

    reads = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.FunctionDef):
                for n in ast.walk(child):
                    if isinstance(n, ast.Attribute) and n.attr in fields and (
                            isinstance(n.value, ast.Name) and n.value.id in ("config", "cfg", "c")
                            or isinstance(n.value, ast.Attribute) and n.value.attr == "config"):
                        reads.setdefault(n.attr, set()).add(prefix + child.name)

    visit(ast.parse(source), "")
    return reads


def test_every_mutant_of_the_mutation_pass_is_still_in_the_code():
    """tools.mutants' list (the techniques' formulas it breaks on purpose) stays true to the code: each mutant's
    code is in its file (its first occurrence is the one mutated), its mutant differs, and its tests (-k) select
    at least one test."""
    from tools import mutants

    names = [n for n in globals() if n.startswith("test_")]
    for path, what, tests, code, mutant in mutants.MUTANTS:
        assert code in (Path(mutants.ROOT) / path).read_text(), what
        assert mutant != code, what
        words = [w for w in tests.replace("(", " ").replace(")", " ").split() if w not in ("or", "and", "not")]
        assert any(w in n for w in words for n in names), what


def test_the_code_map_names_every_place_that_reads_a_flag():
    """stable_gpt.CODE_MAP is the contributor's map of each technique's code: every definition that reads a
    technique's config field is named on its line (a class naming all its methods), every place named reads
    it, and every field but nanoGPT's own has a line."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert set(stable_gpt.CODE_MAP) == fields - set(stable_gpt.NANOGPT_FIELDS)
    reads = config_field_reads(Path(stable_gpt.__file__).read_text(), fields)
    rules = ("check_config", "combination_notes")
    for field, places in stable_gpt.CODE_MAP.items():
        found = {d for d in reads.get(field, ()) if not d.startswith("GPTConfig.") and d not in rules}
        unnamed = {d for d in found if d not in places and d.split(".")[0] not in places}
        assert not unnamed, f"{field} is read in {sorted(unnamed)}: add them to CODE_MAP['{field}']"
        stale = {p for p in places if not any(d == p or d.startswith(p + ".") for d in found)}
        assert not stale, f"CODE_MAP['{field}'] names {sorted(stale)}, which do not read it"
    # the check sees a new reader: a function reading config.lns that the map does not name
    extra = config_field_reads("def f(config):\n    return config.lns\n", fields)
    assert extra == {"lns": {"f"}} and "f" not in stable_gpt.CODE_MAP["lns"]


def test_every_config_field_is_in_the_matrix():
    assert set(discrete_fields()) == set(FLAG_EFFECT)
    assert len(accepted_configs()) > 100 and len(accepted_configs(vary={"bias", "qk_norm"})) > 300  # not vacuous


def relative_change(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def one_thread():
    """Thousands of tiny forwards: one thread is several times faster than two (no pool wake-ups)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MATRIX_IDX = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))


def config_key(kw):
    return tuple(sorted(kw.items()))


# Each configuration of the matrix is built, perturbed, run and stepped once for all the fields that switch
# off into it or out of it (the results depend on the configuration alone): 4,400 models for the 4,152
# comparisons instead of two each. The caches hold results, and one model per configuration that only
# logits_on_weights_of uses.
@functools.cache
@torch.no_grad()
def perturbed_weights_and_logits(key):
    """(state dict of the configuration's model perturbed from init, its logits on MATRIX_IDX)."""
    model = perturbed(matrix_model(dict(key))).eval()
    return {k: v.clone() for k, v in model.state_dict().items()}, model(MATRIX_IDX, MATRIX_IDX)[0]


@functools.cache
def init_stds(key):
    return stable_gpt.weight_stds(matrix_model(dict(key)))


@functools.cache
def params_after_one_step(key):
    """The parameters after one AdamW step followed by the training loop's TVR and QK-Clip calls."""
    model = matrix_model(dict(key))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()(MATRIX_IDX, MATRIX_IDX)[1].backward()
    opt.step()
    stable_gpt.tvr_after_step(model, 1)
    stable_gpt.qk_clip_after_step(model)
    return [p.detach() for p in model.parameters()]


@functools.cache
def model_and_its_init(key):
    """A model of the configuration and its state dict at init: logits_on_weights_of loads other weights
    into it and restores the init before each use, so that one model serves every comparison."""
    model = matrix_model(dict(key)).eval()
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def logits_on_weights_of(kw_on, kw_off):
    """(logits of the perturbed kw_on model, logits of the kw_off model given those weights, loaded
    non-strictly: the tensors kw_off lacks or shapes otherwise stay at its init)."""
    weights, logits_on = perturbed_weights_and_logits(config_key(kw_on))
    model_off, init = model_and_its_init(config_key(kw_off))
    model_off.load_state_dict(init)
    model_off.load_state_dict({k: v for k, v in weights.items() if k in init and init[k].shape == v.shape},
                              strict=False)  # qk_norm_full's norms are wider
    return logits_on, model_off(MATRIX_IDX, MATRIX_IDX)[0]


@pytest.mark.parametrize("field", list(FLAG_EFFECT))
def test_each_flag_acts_in_every_accepted_combination(field, one_thread):
    """For every accepted combination where `field` is on, switching it off (keeping everything else) must
    change what the field claims to change. Structural flags: the output on the same weights (perturbed away
    from init) changes by more than 1e-4 of its largest value (the no-op of LNS under SDD before the fix
    measured 1e-7). Init flags: the std of some block matrix in use at init changes by more than 5%. TVR: some
    parameter tensor after one step changes by more than 1e-3 of its norm."""
    off_value = MATRIX_OFF.get(field, False)
    checked = 0
    for kw in accepted_configs(vary={field}):
        if kw[field] in (off_value, None):  # None (auto) resolves to True or False, both of which are checked
            continue
        kw_off = dict(kw, **{field: off_value})
        try:
            GPTConfig(**MATRIX_BASE, **kw_off)
        except ValueError:
            continue  # e.g. lns with post: the version without the flag is not a config
        name = f"{field}={kw[field]} in {kw}"
        if FLAG_EFFECT[field] == "function":
            on, off = logits_on_weights_of(kw, kw_off)
            assert relative_change(on, off) > 1e-4, name
        elif FLAG_EFFECT[field] == "init":
            on, off = init_stds(config_key(kw)), init_stds(config_key(kw_off))
            assert max(abs(on[k] / off[k] - 1) for k in on) > 0.05, name
        else:
            on, off = params_after_one_step(config_key(kw)), params_after_one_step(config_key(kw_off))
            assert max(((a - b).norm() / b.norm()).item() for a, b in zip(on, off)) > 1e-3, name
        checked += 1
    assert checked >= 20, checked


def test_sdd_embedding_norm_acts_in_every_accepted_combination(one_thread):
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(0))
    for kw in accepted_configs():
        if kw["sdd"]:
            model = perturbed(matrix_model(kw)).eval()
            with torch.no_grad():
                with_norm = model(idx, idx)[0]
                model.transformer.emb_norm = torch.nn.Identity()
                assert relative_change(model(idx, idx)[0], with_norm) > 1e-3, kw


FLAG_ARGS = [["--sdd"], ["--lns"], ["--wesar"], ["--lir"], ["--tvr", "--tvr-interval", "10", "--tvr-target", "0.03"],
             ["--qk-norm"], ["--z-loss", "1e-3"], ["--logit-softcap", "5"], ["--norm-position", "peri", "--lns"],
             ["--norm-position", "post", "--sdd"], ["--norm-position", "mix"], ["--norm-position", "deepnorm"],
             ["--sdd", "--lns", "--wesar", "--lir", "--tvr", "--tvr-interval", "10"]]


@pytest.mark.parametrize("flags", FLAG_ARGS, ids=" ".join)
def test_training_with_each_flag_lowers_the_loss(tmp_path, data_dir, flags, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "100", "--eval-interval", "100",
                                             *flags)) == 0
    summary = json.loads((out / "summary.json").read_text())
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert summary["final_val_loss"] < 0.65 * math.log(vocab), summary["final_val_loss"]
    names = [f.lstrip("-") for f in flags if f.lstrip("-") in ("sdd", "lns", "wesar", "lir", "tvr")]
    printed = capsys.readouterr().out
    assert all(n in summary["techniques"] and n in printed for n in names)
    for note in stable_gpt.combination_notes(tiny(**{n: True for n in names})):  # e.g. "lir under sdd: ..."
        assert f"note: {note}" in printed
    # the checkpoint holds the technique's parameters and rebuilds the same model
    model = runs.model_from_checkpoint(train_shakespeare.load_checkpoint(out / "ckpt.pt"))
    assert model.config.techniques() == summary["techniques"]


NEW_FLAG_ARGS = [["--optimizer", "muon"], ["--optimizer", "muon", "--qk-clip", "2"], ["--attn-gate"], ["--olmo2"],
                 ["--norm", "dyt", "--lr", "1e-2"], ["--norm-position", "reorder"], ["--optimizer", "muon", "--sdd", "--lns"],
                 ["--optimizer", "muon", "--wesar", "--tvr"], ["--attn-sink"], ["--hyper-connections", "mhc"],
                 ["--hyper-connections", "hc", "--optimizer", "muon"], ["--mup", "--mup-base-width", "16"]]


@pytest.mark.parametrize("flags", NEW_FLAG_ARGS, ids=" ".join)
def test_training_with_each_new_flag_lowers_the_loss(tmp_path, data_dir, flags):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "80", "--eval-interval", "80",
                                             "--diag-interval", "40", *flags)) == 0
    summary = json.loads((out / "summary.json").read_text())
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert summary["final_val_loss"] < 0.75 * math.log(vocab), summary["final_val_loss"]
    assert len(read_jsonl(out / "diag.jsonl")) == 2  # the diagnostics read every new module too
    if "--hyper-connections" in flags:  # the residual path's gain per block, and its panel on depth.png
        last = read_jsonl(out / "diag.jsonl")[-1]
        assert len(last["hc_gain_forward"]) == len(last["variance"])
        if "mhc" in flags:  # H_res^T's rows sum to 1 exactly (Sinkhorn ends on H_res's columns), so the product's
            assert max(last["hc_gain_forward"]) < 1 + 1e-5 and max(last["hc_gain_backward"]) < 1.1
        from tools import plots
        assert out / "depth.png" in plots.plot_run(out)


# ----------------------------------------------------------------------------------------------------
# Diagnostics, spikes, plots


def test_angular_distance_known_values():
    a = torch.randn(3, 5, 16)
    b = torch.randn(3, 5, 16)
    b = b - (b * a).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True) * a  # orthogonal to a, token by token
    assert stable_gpt.angular_distance(a, 2.5 * a) == pytest.approx(0.0, abs=1e-3)  # arccos near 1 is steep
    assert stable_gpt.angular_distance(a, b) == pytest.approx(0.5, abs=1e-5)
    assert stable_gpt.angular_distance(a, -a) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= stable_gpt.angular_distance(a, torch.randn(3, 5, 16)) <= 1.0


def test_kurtosis_known_values():
    g = torch.Generator().manual_seed(0)
    assert stable_gpt.kurtosis(torch.randn(400_000, generator=g)) == pytest.approx(3.0, abs=0.05)
    assert stable_gpt.kurtosis(torch.rand(400_000, generator=g)) == pytest.approx(1.8, abs=0.02)  # uniform: 9/5


def test_layer_importance():
    """No removal gives exactly the full loss; a block that computes the identity has importance 0."""
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=3)).eval()
    idx, targets = torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16))
    assert stable_gpt.loss_without_blocks(model, idx, targets) == model(idx, targets)[1].item()
    with torch.no_grad():  # Pre-LN block 1 without bias: zero output projections make it the identity
        model.transformer.h[1].attn.c_proj.weight.zero_()
        model.transformer.h[1].mlp.c_proj.weight.zero_()
    importance = stable_gpt.layer_importance(model, idx, targets)
    assert importance[1] == pytest.approx(0.0, abs=1e-6) and abs(importance[0]) > 1e-4
    assert len(model.transformer.h) == 3  # restored


def test_update_ratio_of_a_known_step():
    model = GPT(tiny(n_layer=2))
    before = stable_gpt.matrix_snapshot(model)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight.mul_(1.1)
        model.transformer.h[0].attn.c_attn.weight[32:64].mul_(0.7)  # the k rows only
    ratios = stable_gpt.update_ratios(before, model)
    assert ratios["1.fc"] == pytest.approx(0.1, rel=1e-5) and ratios["0.k"] == pytest.approx(0.3, rel=1e-5)
    assert all(v == 0 for k, v in ratios.items() if k not in ("1.fc", "0.k"))
    assert len(ratios) == 2 * 6


def test_activation_stats_and_weight_stds():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=3)).train()
    stats = stable_gpt.activation_stats(model, torch.randint(0, 40, (2, 16)))
    assert all(len(v) == 3 for v in stats.values()) and model.training  # training mode restored
    assert all(v > 0 for v in stats["variance"]) and all(0 < d < 1 for d in stats["angular_distance"])
    stds = stable_gpt.weight_stds(model)
    assert stds["0.q"] == pytest.approx(model.transformer.h[0].attn.c_attn.weight[:32].std().item())


def test_spike_detector_on_a_synthetic_curve():
    g = torch.Generator().manual_seed(0)
    curve = (2.0 * torch.exp(-torch.arange(600) / 150) + 1.5 + 0.03 * torch.randn(600, generator=g)).tolist()
    for step in (200, 350, 351, 500):
        curve[step] *= 1.6
    detector = monitors.SpikeDetector(factor=1.2, window=50)
    found = [i for i, loss in enumerate(curve) if detector.update(loss) is not None]
    assert found == [200, 350, 351, 500]
    assert monitors.SpikeDetector(1.2, 50).update(100.0) is None  # no verdict on an empty window


def test_a_log_panel_shows_at_least_4x_so_a_flat_gain_reads_flat(tmp_path, monkeypatch):
    """mHC's gain is 1 to float rounding (1 +- 1e-7): matplotlib would stretch that over the whole panel, so a log
    panel spans at least 4x; a range wider than that is left as drawn."""
    figures = {}
    monkeypatch.setattr(plots, "save", lambda fig, p, *a, **k: figures.setdefault(Path(p).name, fig) and Path(p))
    snaps = [dict(iter=i, flat=[1.0000001, 1.0000002, 1.0000002, 1.0000003], steep=[1.0, 3.0, 9.0, 27.0])
             for i in (50, 100)]
    panels = [(key, key, "log", [(key, "o-", "")]) for key in ("flat", "steep")]
    plots.plot_snapshots_by_block(snaps, ["C0", "C1"], panels, tmp_path / "gain.png", width=8)
    (flat_low, flat_high), (steep_low, steep_high) = (ax.get_ylim() for ax in figures["gain.png"].axes)
    assert flat_high / flat_low == pytest.approx(4) and flat_low < 1 < flat_high
    assert steep_low < 1 and 27 < steep_high < 40  # matplotlib's own margins


def test_diagnostics_and_plots_from_training(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--diag-interval", "20", "--plot")) == 0
    diag = read_jsonl(out / "diag.jsonl")
    assert [r["iter"] for r in diag] == [20, 40, 60]
    for key in ("variance", "angular_distance", "layer_importance", "max_abs", "kurtosis", "mlp_in_kurtosis"):
        assert len(diag[-1][key]) == 2, key
    assert set(diag[-1]["update_ratio"]) == set(diag[-1]["grad_norm"]) == set(diag[-1]["weight_std"])
    for name in ("loss.png", "depth.png", "updates.png", "activations.png", "weight_std.png", "logits.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert len(diag[-1]["attn_logit_max"]) == 2 and diag[-1]["logit_lse_std"] > 0
    assert plots.main(["--logits", str(tmp_path / "twins.png"), str(out), str(out)]) == 0
    assert (tmp_path / "twins.png").read_bytes()[:4] == b"\x89PNG"
    with contextlib.chdir(tmp_path):  # a bare file name: into the first run's folder, not the working folder
        assert plots.main(["--logits", "bare.png", str(out)]) == 0
    assert (out / "bare.png").is_file() and not (tmp_path / "bare.png").exists()
    # a run killed mid-write leaves a partial last line: the plots skip it, as --resume does
    for name in ("log.jsonl", "diag.jsonl"):
        with (out / name).open("a") as f:
            f.write('{"iter": 61, "loss": 1.2')
    (out / "loss.png").unlink()
    assert plots.main([str(out)]) == 0 and (out / "loss.png").is_file()
    assert plots.read_jsonl(out / "log.jsonl")[-1]["iter"] == 60
    summary = json.loads((out / "summary.json").read_text())
    assert "spikes" in summary and summary["diag_s"] > 0


def test_plots_read_at_a_glance(tmp_path, data_dir, monkeypatch):
    """Plain tick numbers on log axes, a legend in every panel (the MLP-input series in it), no loss panel repeated
    in a run's logits.png, and a colour of its own for each of a sweep's configurations."""
    figures, save = {}, plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path, *a, **k: figures.setdefault(Path(path).name, fig) and
                        save(fig, path, *a, **k))
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--diag-interval", "20", "--max-iters", "40")) == 0
    plots.plot_run(out)
    for name in ("depth.png", "updates.png", "activations.png", "weight_std.png", "logits.png"):
        for ax in figures[name].axes:
            assert ax.get_legend() is not None, name
            if ax.get_yscale() == "log":
                labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)]
                assert any(labels) and not any("times" in t or "^" in t for t in labels), (name, labels)
    assert any("MLP in" in t.get_text() for t in figures["activations.png"].axes[0].get_legend().get_texts())
    assert [ax.get_title() for ax in figures["logits.png"].axes] == ["Largest attention logit over blocks",
                                                                     "log Z of the output logits (mean +- std)"]
    run = dict(counted_loss=2.0, failure_mode="trains")
    failed = dict(counted_loss=4.0, failure_mode="collapsed")
    configs = {f"config{i}": dict(runs={1e-3: [run], 1e-2: [run, failed]}, mean_loss={1e-3: 2.0, 1e-2: 3.0},
                                  mean_loss_ci95={1e-3: [1.9, 2.1], 1e-2: None}, lr_sensitivity=0.05,
                                  lr_sensitivity_ci95=[0.01, 0.09], unstable=0.05, unstable_ci95=None,
                                  best_lr=1e-3 * (1 + i), best_lr_at_edge=i % 2 == 0, best_loss=2.0)
               for i in range(13)}
    results = dict(sizes={"2x32": dict(params=1e5, configs=configs), "4x32": dict(params=2e5, configs=configs)},
                   lrs=[1e-3, 1e-2])
    plots.plot_stability_map(results, tmp_path)
    plots.plot_lr_sensitivity(results, tmp_path)
    panels = figures["stability_map.png"].axes
    assert len(panels) == 2 * 3  # a row per size, 12 configurations beside the reference in panels of 4
    for ax in panels:  # the reference + 4, five colours apart in each panel, each one's collapsed run marked
        assert len(ax.containers) == 5 and len({plt_colour(bars) for bars in ax.containers}) == 5
        marks = [line for line in ax.get_lines() if line.get_marker() == plots.MODE_MARKERS["collapsed"]]
        assert len(marks) == 5 and all(list(m.get_ydata()) == [4.0] for m in marks)
    sensitivity, unstable, best_lr, legend = figures["lr_sensitivity.png"].axes
    for ax in (sensitivity, unstable):  # the sensitivity and its unstable part
        lines = ax.containers
        assert len(lines) == 13 and list(lines[0].lines[0].get_xdata()) == [1e5, 2e5]
        assert len({plt_colour(bars) for bars in lines}) == 13  # every configuration its own colour
    curves = [line for line in best_lr.get_lines() if len(line.get_xdata()) == 2]  # each one's best lr by size
    assert len(curves) == 13 and [list(c.get_ydata()) for c in curves[:2]] == [[1e-3, 1e-3], [2e-3, 2e-3]]
    points = [line for line in best_lr.get_lines() if len(line.get_xdata()) == 1]
    assert sum(p.get_markerfacecolor() == "none" for p in points) == 2 * 7  # hollow: at an end of the grid
    assert len(legend.get_legend().get_texts()) == 13 and not legend.axison
    plots.plot_lr_transfer(results, tmp_path)  # a panel per configuration, a curve per size, its best lr starred
    transfer = [ax for ax in figures["lr_transfer.png"].axes if ax.axison]
    assert [ax.get_title() for ax in transfer] == list(configs)
    for ax in transfer:
        assert [list(bars.lines[0].get_xdata()) for bars in ax.containers] == [[1e-3, 1e-2]] * 2
        assert len({plt_colour(bars) for bars in ax.containers}) == 2
        c = configs[ax.get_title()]
        stars = [m for m in ax.get_lines() if m.get_marker() == "*"]
        assert [(list(m.get_xdata()), list(m.get_ydata())) for m in stars] == [([c["best_lr"]], [2.0])] * 2
        assert all((str(m.get_markerfacecolor()) == "none") == c["best_lr_at_edge"] for m in stars)
    assert plots.plot_lr_transfer(dict(results, sizes={"2x32": results["sizes"]["2x32"]}), tmp_path) == []


def plt_colour(bars):
    import matplotlib.colors
    return tuple(matplotlib.colors.to_rgba(bars.lines[0].get_color()))


def test_diagnostics_record_gradient_norms_before_clipping(tmp_path, data_dir):
    """With the global gradient norm clipped to 1e-4, the recorded block gradient norms (before clipping, as
    OLMo's logs and SDD's Fig. 7) add up to far more than 1e-4."""
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--diag-interval", "2", "--max-iters", "2",
                                             "--grad-clip", "1e-4")) == 0
    norms = read_jsonl(out / "diag.jsonl")[0]["grad_norm"].values()
    assert math.sqrt(sum(n * n for n in norms)) > 1e-2


def test_diagnostics_do_not_change_training(tmp_path, data_dir):
    for interval in ("0", "7"):
        assert train_shakespeare.main(train_args(data_dir, tmp_path / interval, "--diag-interval", interval,
                                                 "--dropout", "0.1", "--max-iters", "30")) == 0
    losses = lambda out: [r.get("loss") for r in read_log(out) if r.get("type") != "spike"]
    assert losses(tmp_path / "0") == losses(tmp_path / "7")


def test_attention_logit_max_on_a_known_case():
    q, k = torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4)  # (B, T, n_head, head_size)
    q[:, :, :, 0], k[:, :, :, 0] = -1.0, 1.0  # every logit -1/sqrt(4) = -0.5: signed, the max is -0.5
    assert stable_gpt.attention_logit_max(q, k) == pytest.approx(-0.5)
    q[0, 2, 1, 0], k[0, 1, 1, 0] = 3.0, 4.0  # head 1, query 2 . key 1 = 12: / sqrt(4) = 6
    assert stable_gpt.attention_logit_max(q, k) == pytest.approx(6.0)
    q[0, 0, 0, 3], k[0, 2, 0, 3] = 10.0, 10.0  # query 0 . key 2 = 100, but a future key: masked
    assert stable_gpt.attention_logit_max(q, k) == pytest.approx(6.0)


def test_activation_stats_attention_logits_and_log_z_on_known_cases():
    model = GPT(tiny(qk_norm=True, norm="rmsnorm"))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: log Z = log(vocab) at every position, spread 0
    idx = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    stats = stable_gpt.activation_stats(model, idx, idx)
    assert stats["logit_lse_mean"] == pytest.approx(math.log(40), abs=1e-5) and stats["logit_lse_std"] < 1e-5
    # QK-norm with unit gains: |q.k| <= |q| |k| = head_size, so the logit is at most sqrt(head_size)
    assert all(0 < v <= math.sqrt(8) + 1e-4 for v in stats["attn_logit_max"]) and len(stats["attn_logit_max"]) == 2
    with torch.no_grad():
        model.transformer.h[-1].attn.q_norm.weight.fill_(2.0)  # doubles every logit of the last block
    assert stable_gpt.activation_stats(model, idx, idx)["attn_logit_max"] == pytest.approx(
        [stats["attn_logit_max"][0], 2 * stats["attn_logit_max"][1]], rel=1e-4)
    assert "logit_lse_mean" not in stable_gpt.activation_stats(model, idx)  # without targets: last position only


def olmo_core_spike_scores(losses, grad_norms, window_size=128, rolling_window=10_000, threshold_std=6.0):
    """A transcription of OLMo-core's StabilityMonitorCallback.pre_log_metrics/_is_spike (olmo_core/train/
    callbacks/stability_monitor.py): plain lists, histories checked before the value joins them. Returns the
    spiking step indices, the total score and the rolling score (None where OLMo-core records none)."""
    def is_spike(value, history):
        if len(history) < window_size:
            return False
        mean = sum(history) / len(history)
        std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
        return False if std < 1e-10 else value > mean + threshold_std * std

    loss_history, grad_history, spike_history, spikes, total = [], [], [], [], 0
    for step, (loss, grad_norm) in enumerate(zip(losses, grad_norms)):
        loss_spike = is_spike(loss, loss_history)
        loss_history = (loss_history + [loss])[-window_size:]
        grad_spike = is_spike(grad_norm, grad_history)
        grad_history = (grad_history + [grad_norm])[-window_size:]
        spike_history = (spike_history + [loss_spike or grad_spike])[-rolling_window:]
        total += 1
        if loss_spike or grad_spike:
            spikes.append(step)
    rolling = sum(spike_history) / rolling_window if len(spike_history) >= rolling_window else None
    return spikes, (len(spikes) / total if total >= window_size else None), rolling


def test_olmo_spike_score_is_olmo_cores_rule():
    g = torch.Generator().manual_seed(0)
    n = 3000
    losses = (2.0 + 0.01 * torch.randn(n, generator=g)).tolist()
    grad_norms = (1.0 + 0.05 * torch.randn(n, generator=g)).abs().tolist()
    losses[50] = 9.0  # before a full window of 128 steps: never flagged
    losses[300] = 2.2  # 20 std above the mean: a loss spike
    losses[350] = 2.03  # 3 std: not one
    grad_norms[1000] = 5.0  # a gradient-norm spike with an ordinary loss: OLMo-core counts it
    losses[2000], grad_norms[2000] = 2.3, 6.0  # both at once: one spiking step
    score = monitors.OLMoSpikeScore(rolling_window=500)
    found = [i for i in range(n) if score.update(i, losses[i], grad_norms[i])]
    spikes, total, rolling = olmo_core_spike_scores(losses, grad_norms, rolling_window=500)
    assert found == spikes and {300, 1000, 2000} <= set(found) and 50 not in found and 350 not in found
    assert score.score == pytest.approx(total) and score.score == len(found) / n  # a fraction of all steps
    assert score.rolling_score == pytest.approx(rolling)
    # the paper's variant (Sec. 3.2): 7 std over the last 1,000 values
    paper = monitors.OLMoSpikeScore(threshold_std=7, window_size=1000)
    assert [i for i in range(n) if paper.update(i, losses[i], grad_norms[i])] == \
        olmo_core_spike_scores(losses, grad_norms, window_size=1000, threshold_std=7)[0]
    # a flat history flags nothing, however small the std's threshold: OLMo-core's 1e-10 floor
    flat = monitors.OLMoSpikeScore(window_size=4)
    assert not any(flat.update(i, 2.0, 1.0) for i in range(4)) and not flat.update(4, 2.0 + 1e-9, 1.0)
    assert flat.score == 0.0 and flat.rolling_score is None  # rolling: only once 10,000 steps are seen
    # fewer steps than one window: OLMo-core records no score
    assert monitors.OLMoSpikeScore().score is None
    # what a checkpoint stores: the scores continue
    half = monitors.OLMoSpikeScore(rolling_window=500)
    for i in range(1500):
        half.update(i, losses[i], grad_norms[i])
    again = monitors.OLMoSpikeScore.from_state(half.state())
    assert [i for i in range(1500, n) if again.update(i, losses[i], grad_norms[i])] == [i for i in found if i >= 1500]
    assert again.score == score.score and again.rolling_score == score.rolling_score
    assert monitors.OLMoSpikeScore.from_state({"sigmas": 6, "recent": [1.0]}).steps == 0  # an older state


def test_summary_reports_the_olmo_spike_score(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "140", "--eval-interval", "140")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["olmo_spike_score"] is not None and summary["olmo_spikes"] == len(summary["olmo_spike_iters"])
    assert summary["olmo_spike_score"] == summary["olmo_spikes"] / 140  # a fraction of every step trained
    assert summary["olmo_spike_score_rolling"] is None  # 140 steps < OLMo-core's rolling window of 10,000


# ----------------------------------------------------------------------------------------------------
# Speed: compile, bf16, memory, DDP, the benchmark


def test_ddp_two_cpu_processes(tmp_path, data_dir):
    """torchrun with 2 processes on CPU (gloo): the replicas stay identical (TVR, QK-Clip, whose ranks agree on each
    head's max logit in one all-reduce, --skip-spikes, which judges the loss averaged over ranks, and ZClip
    included, and the model-side stabilizers of 2025-26: mHC's maps, the sink, muP's per-group rates) and the loss
    falls."""
    out = tmp_path / "ddp"
    flags = ["--eval-interval", "30", "--grad-accum", "2", "--tvr", "--tvr-interval", "10", "--tvr-target", "0.02",
             "--qk-clip", "2", "--skip-spikes", "--zclip", "--diag-interval", "10", "--dropout", "0.1",
             "--hyper-connections", "mhc", "--attn-sink", "--mup", "--mup-base-width", "64"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train_shakespeare.py", *train_args(data_dir, out, "--max-iters", "30", *flags)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replica_max_diff"] == 0.0
    evals = [r["val_loss"] for r in read_log(out) if r.get("type") == "eval"]
    assert evals[-1] < evals[0] - 0.5
    assert "2 processes" in proc.stdout and proc.stdout.count("--- sample ---") == 1  # rank 0 alone prints
    # each rank evaluates half of the eval batches: the first evaluation equals one process's, bit for bit
    alone = subprocess.run([sys.executable, "train_shakespeare.py", *train_args(data_dir, tmp_path / "alone",
                                                                                 "--max-iters", "1", *flags)],
                           cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    assert alone.returncode == 0, alone.stderr[-3000:]
    first = [next(r for r in read_log(d) if r.get("type") == "eval") for d in (out, tmp_path / "alone")]
    assert (first[0]["train_loss"], first[0]["val_loss"]) == (first[1]["train_loss"], first[1]["val_loss"])


def test_any_grad_accum_runs_on_two_processes(tmp_path, data_dir):
    """--grad-accum 1 (the CPU preset's) on 2 processes: one micro-batch per process, said at start-up and in
    the summary; a bad input is one line from rank 0 alone."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "train_shakespeare.py"]
    out = tmp_path / "ddp"
    proc = subprocess.run(torchrun + train_args(data_dir, out, "--max-iters", "4", "--eval-interval", "4",
                                                "--grad-accum", "1"),
                          cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "note: --grad-accum 1 on 2 processes: 1 micro-batch(es) per process, 2 per step" in proc.stdout
    assert json.loads((out / "summary.json").read_text())["tokens_per_step"] == 2 * 8 * 32
    proc = subprocess.run(torchrun + train_args(data_dir, tmp_path / "bad", "--beta2", "1.5"),
                          cwd=Path(__file__).parent, capture_output=True, text=True, env=env)
    assert proc.stderr.count("error: --beta2 must be in [0, 1)") == 1


EVERY_FLAG = [{}, dict(sdd=True), dict(lns=True), dict(wesar=True), dict(norm="rmsnorm"), dict(norm_position="mix"),
              dict(norm_position="deepnorm"), ALL_FLAGS, dict(qk_norm=True), dict(norm_position="peri"),
              dict(z_loss=1e-4), dict(logit_softcap=30.0), ALL_PRACTITIONER_FIXES, dict(attn_gate=True),
              dict(qk_clip=1.0), dict(norm="dyt"), dict(norm_position="reorder"),
              {k: v for k, v in train_shakespeare.OLMO2.items() if k != "olmo_decay"}, dict(attn_sink=True),
              dict(hyper_connections="mhc"), dict(hyper_connections="hc", norm_position="peri"),
              dict(hyper_connections="mhc", norm_position="reorder", attn_sink=True, qk_norm=True), dict(mup=True),
              dict(mup=True, attn_sink=True, qk_clip=1.0)]


def flag_ids(kw):
    return "+".join(kw) or "baseline"


@pytest.mark.parametrize("kw", EVERY_FLAG, ids=flag_ids)
def test_every_flag_compiles_without_graph_breaks(kw):
    """torch.compile sees one graph for every flag (checked with dynamo's tracer; no code is generated)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = GPT(tiny(**kw))
    idx = torch.randint(0, 40, (2, 16))
    explained = torch._dynamo.explain(model)(idx, idx)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def skip_without_compile():
    """The tests of compiled code need torch.compile to work here (a C++ compiler on CPU); else they skip, saying
    why (the fallback itself is tested with the compiler hidden)."""
    runs.why_compile_fails.cache_clear()
    if reason := runs.why_compile_fails("cpu"):
        pytest.skip(f"torch.compile does not work on this machine: {reason}")


def test_compile_is_the_default_and_falls_back_to_eager_with_one_note(tmp_path, data_dir, capsys, monkeypatch):
    """Without --compile/--no-compile the run is compiled where compile works; where it does not (no C++
    compiler on PATH, a compiler that fails) it trains eager after one note line; --compile there is an error."""
    skip_without_compile()
    def args(name):
        return [a for a in train_args(data_dir, tmp_path / name, "--max-iters", "2", "--eval-interval", "2")
                if a != "--no-compile"]

    assert train_shakespeare.main(args("default")) == 0
    out = capsys.readouterr().out
    assert "(float32, compiled)" in out and "note: torch.compile" not in out
    for name, break_it, reason in (
            ("no_compiler", lambda m: m.setattr(runs.shutil, "which", lambda name: None), "no C++ compiler on PATH"),
            ("broken", lambda m: m.setattr(torch, "compile", lambda fn: (_ for _ in ()).throw(
                RuntimeError("C++ compile error\ncc1plus: fatal"))), "RuntimeError: C++ compile error")):
        with monkeypatch.context() as m:
            break_it(m)
            runs.why_compile_fails.cache_clear()  # (the probe's answer is kept per process)
            assert train_shakespeare.main(args(name)) == 0
            out = capsys.readouterr().out
            assert out.count("note: torch.compile") == 1 and "(float32)" in out, out
            assert f"note: torch.compile does not work on this machine ({reason}); training eager" in out
            assert train_shakespeare.main(args(name + "_asked") + ["--compile"]) == 2
            assert f"--compile: torch.compile does not work on this machine ({reason})" in capsys.readouterr().err
    runs.why_compile_fails.cache_clear()


# every flag in one of five compiled models (each compile costs seconds): the paper's stabilizers together, the
# practitioners' fixes together, the placements that mix Pre- and Post-LN blocks, OLMo 2, DyT under DeepNorm
COMPILE_FAMILIES = {"papers": dict(ALL_FLAGS, tvr_interval=1),
                    "fixes": dict(ALL_PRACTITIONER_FIXES, tvr_interval=1),
                    "mix+gate+clip": dict(norm_position="mix", mix_fraction=0.5, attn_gate=True, qk_clip=1.0),
                    "olmo2": {k: v for k, v in train_shakespeare.OLMO2.items() if k != "olmo_decay"},
                    "deepnorm+dyt": dict(norm_position="deepnorm", norm="dyt")}


@pytest.mark.parametrize("family", COMPILE_FAMILIES)
def test_each_flag_family_trains_the_same_compiled_as_eager(family):
    """torch.compile (inductor, as the training script runs it by default) changes how the step computes, not
    what: four AdamW steps with TVR and QK-Clip after each give the eager losses to float tolerance."""
    import torch._dynamo

    skip_without_compile()

    idx = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))

    def losses(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = GPT(tiny(**COMPILE_FAMILIES[family]))
        optimizer = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
        forward = torch.compile(model) if compiled else model
        out = []
        for step in range(1, 5):
            _, loss = forward(idx, idx)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stable_gpt.tvr_after_step(model, step)
            stable_gpt.qk_clip_after_step(model)
            out.append(loss.item())
        return out

    eager, compiled = losses(False), losses(True)
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", EVERY_FLAG, ids=flag_ids)
def test_every_flag_trains_under_bf16_autocast(kw):
    """The GPU path's mixed precision (bf16 autocast, fp32 weights), run on CPU: every flag's loss stays within
    bf16's error of the fp32 loss, and every gradient is finite, fp32 and the same to within bf16's error."""
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.0, **kw)).train()
    idx = torch.randint(0, 40, (4, 16))
    loss32 = model(idx, idx)[1]
    loss32.backward()
    grads32 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
        # CPU autocast leaves rms_norm's fp32 gain beside a bf16 input (CUDA autocast runs both in fp32); PyTorch
        # then computes it unfused, in fp32, and says so once
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16  # autocast did act on the head's matmul
    assert loss.dtype == torch.float32 and abs(loss.item() - loss32.item()) < 0.02 * loss32.item()
    loss.backward()
    for (name, p), g32 in zip(model.named_parameters(), grads32):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        assert (p.grad - g32).norm() <= 0.1 * g32.norm() + 1e-6, name  # bf16 keeps 8 bits of mantissa


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(tiny(sdd=True, dropout=0.0))
    idx = torch.randint(0, 40, (2, 16))
    model(idx, idx)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.grad_checkpointing = True
    model(idx, idx)[1].backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7)


def test_mfu_formula():
    """nanoGPT's estimate_mfu(fwdbwd_per_iter, dt): PaLM's 6N + 12 L H Q T FLOPs per token, times block_size
    tokens per sequence, over the peak (A100 bf16 by default, as nanoGPT)."""
    model = GPT(tiny())
    c = model.config
    flops = 6 * model.get_num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.block_size
    assert model.estimate_mfu(100, 0.5, peak_flops=1e12) == pytest.approx(flops * c.block_size * 100 / 0.5 / 1e12)
    assert model.estimate_mfu(100, 0.5) == pytest.approx(flops * c.block_size * 100 / 0.5 / 312e12)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")
def test_keep_freed_memory_stops_the_page_faults_of_each_step():
    """After keep_freed_memory(), a training step with 0.5-2 MB activations reuses freed memory instead of
    faulting fresh pages in (~500 per step here with glibc's defaults, ~8,000 at the CPU preset's size). In a
    fresh process, so that the setting starts from glibc's defaults."""
    code = """if True:
        import resource, sys, torch
        from tools import runs
        from stable_gpt import GPT, GPTConfig
        torch.manual_seed(0)
        assert runs.keep_freed_memory()
        model = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=2, n_head=4, n_embd=128))
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
        x = torch.randint(0, 65, (16, 64))
        def steps(n):
            for _ in range(n):
                model(x, x)[1].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        steps(12)
        per_step = []
        for _ in range(9):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            steps(4)
            per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4)
        print(sorted(per_step)[4])  # the median window: the heap still grows once in a while (32-192)
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 50  # minor page faults per step


def test_bench_times_every_config_and_an_outside_nanogpt_model(capsys):
    """bench.py prints one row per configuration, and times a nanoGPT-style model.py given by path (here this
    project's own stable_gpt.py, which has nanoGPT's GPT/GPTConfig interface) in the same process."""
    bench.main(["--flags", "baseline", "sdd", "all", "--rounds", "1", "--steps", "1", "--no-memory", "--no-compile",
                "--nanogpt", str(Path(__file__).parent / "stable_gpt.py")])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[2:]}
    assert list(rows) == ["nanogpt", "baseline", "sdd", "all"] and "compiled" not in out[0]
    for name, row in rows.items():
        assert float(row[1]) > 0 and int(row[2].replace(",", "")) > 0 and float(row[3]) > 0
    assert rows["baseline"][3] == "1.00"
    # the 2025-26 flags: the model ones, and the update rules the Runner applies as the training loop does
    bench.main(["--flags", "baseline", "mhc", "zclip", "skip-spikes", "--rounds", "1", "--steps", "1", "--no-memory",
                "--no-compile"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == ["baseline", "mhc", "zclip", "skip-spikes"]
    assert bench.build_model(bench.SHAPES["cpu-preset"], "zclip").config == GPTConfig(
        bias=False, **{k: v for k, v in bench.SHAPES["cpu-preset"].items() if k != "batch_size"})  # no model flag
    zclip = bench.Runner(GPT(tiny()), 2, torch.device("cpu"), update="zclip")
    skip = bench.Runner(GPT(tiny()), 2, torch.device("cpu"), update="skip_spikes")
    zclip.time(26)
    skip.time(3)
    assert zclip.zclip.mean is not None and len(skip.skip_step.losses) == 3  # each saw every step's norm
    bench.main(["--measure-peak", "sdd", "--no-compile"])  # what the peak-memory subprocess runs
    assert 50 < float(capsys.readouterr().out.split()[-1]) < 10_000  # MiB
    bench.main(["--flags", "baseline", "--rounds", "1", "--steps", "1", "--no-memory"])  # compiled by default
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("note: ")]
    compiled = runs.why_compile_fails("cpu") is None  # (else eager, after a note)
    assert ("compiled" in out[0]) == compiled and ("compile s" in out[1]) == compiled
    assert out[2].split()[0] == "baseline"
    with pytest.raises(SystemExit, match="no such file"):
        bench.main(["--nanogpt", "no/such/model.py"])


def race_log(kind, evals, every=1, step_s=0.1, eval_s=0.5, save_s=0.05, start_s=0.3, last=10):
    """A synthetic time-stamped log as tools.race reads it: steps of step_s, each evaluation eval_s and the
    checkpoint after it save_s; nanoGPT evaluates before the step of its iter, this project after that step's
    line. evals: {iter: val}; every: steps per progress line."""
    t, lines = start_s, [(start_s, f"step 0: train loss 4.0, val loss {evals[0]}" if kind == "nanogpt" else
                          f"eval       0: train 4.0000, val {evals[0]:.4f} (best) | 0 s")]
    for it in range(1 if kind == "ours" else 0, last + 1):
        if kind == "nanogpt" and it in evals and it > 0:
            t += eval_s
            lines.append((t, f"step {it}: train loss 3.0000, val loss {evals[it]:.4f}"))
            t += save_s
        t += step_s
        if it % every == 0:
            lines.append((t, f"iter {it}: loss 2.0, time 100.00ms" if kind == "nanogpt" else
                          f"iter {it:>6}/{last} | loss 2.0000 | lr 1e-3 | 100.0 ms/iter"))
        if kind == "ours" and it in evals:
            t += eval_s
            lines.append((t, f"eval  {it:>6}: train 3.0000, val {evals[it]:.4f} (best) | 1 s"))
            t += save_s
    return lines


@pytest.mark.parametrize("kind,every", [("nanogpt", 1), ("ours", 2)])
def test_race_takes_out_every_evaluation_after_the_first(kind, every):
    """tools.race's time to a loss: from process start, steps and the first evaluation in, every later
    evaluation and the checkpoint after it out, whichever order the program prints them in."""
    from tools import race

    lines = race_log(kind, {0: 4.0, 4: 2.5, 8: 1.9}, every=every)
    evals, per_step = race.evaluations(lines, race.NANOGPT_LINES if kind == "nanogpt" else race.OUR_LINES)
    assert per_step == pytest.approx(0.1)
    assert [(it, val) for it, val, *_ in evals] == [(0, 4.0), (4, 2.5), (8, 1.9)]
    for _, _, _, own, cost in evals[1:]:
        assert own == pytest.approx(0.5) and cost == pytest.approx(0.55)
    for target, (seconds, it) in ((2.5, (0.3 + 4 * 0.1, 4)), (2.0, (0.3 + 8 * 0.1, 8)), (4.0, (0.3, 0))):
        assert race.time_to(target, evals) == (pytest.approx(seconds), it)
    assert race.time_to(1.0, evals) == (None, None)


# ----------------------------------------------------------------------------------------------------
# Never lose a run: bad input, divergence, interruption


import signal  # noqa: E402
import time  # noqa: E402


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "20")) == 0
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def bad_texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("the cat sees the moon.\n" * 2)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 100)
    (d / "other.txt").write_text("".join(chr(65 + i % 26) for i in range(5000)))
    return d


BAD_TRAINING_INPUT = [
    (["--data", "/no/such/file.txt"], "input text not found: /no/such/file.txt (pass --data PATH"),
    (["--data", "{bad}/empty.txt"], "empty.txt is empty"),
    (["--data", "{bad}/short.txt"], "fewer than one block of 32 + 1; use a longer text or a smaller --block-size"),
    (["--data", "{bad}/latin1.txt"], "is not UTF-8 text (byte 3 is 0xe9)"),
    (["--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--max-iters", "-5"], "--max-iters must be a positive integer, got -5"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lns", "--norm-position", "post"], "lns scales the output of a *pre*-norm"),
    (["--lir", "--norm-position", "deepnorm"], "lir and deepnorm both define the block init"),
    (["--qk-norm", "--sdd"], "qk_norm with sdd: SDD already normalizes q and k per head"),
    (["--norm-position", "peri", "--sdd"], "SDD already normalizes every branch output"),
    (["--z-loss", "-1"], "z_loss must be a finite number >= 0 (0: off), got -1.0"),
    (["--logit-softcap", "nan"], "logit_softcap must be a finite number >= 0 (0: off), got nan"),
    (["--block-size", "100000"], "fewer than one block of 100000 + 1"),
    (["--beta1", "-1"], "--beta1 must be in [0, 1), got -1.0"),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5"),
    (["--beta2", "nan"], "--beta2 must be in [0, 1), got nan"),
    (["--min-lr=-1e-4"], "--min-lr must be a finite number >= 0, got -0.0001"),
    (["--min-lr", "nan"], "--min-lr must be a finite number >= 0, got nan"),
    (["--min-lr", "1"], "--min-lr (1.0) must not exceed --lr (0.003)"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0, got -5.0"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0 (0: off), got -1.0"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0 (0: off), got nan"),
    (["--init-std", "inf"], "init_std must be a finite number > 0, got inf"),
    (["--temperature", "0"], "--temperature must be a finite number >= 0.001, got 0.0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0.001, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0.001, got nan"),
    (["--temperature", "1e-45"], "--temperature must be a finite number >= 0.001, got 1e-45"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2^32), got 99999999999999999999"),
    (["--lr-decay-iters", "-5"], "--lr-decay-iters must be a positive integer, got -5"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters must be a positive integer, got 0"),
    (["--device", "meta"], "unknown device 'meta'"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0: all tokens), got -1"),
    (["--num-samples", "0"], "--num-samples must be a positive integer, got 0"),
    (["--num-samples", "-1"], "--num-samples must be a positive integer, got -1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be a positive integer, got -5"),
    (["--n-layer", "100000000000"], "this run needs at least"),  # a bound checked before anything is allocated
    (["--n-embd", "1099511627776", "--n-head", "1"], "this run needs at least"),
    (["--batch-size", "1000000000000"], "lower --n-layer, --n-embd, --batch-size, --block-size or --eval-iters"),
    (["--eval-iters", "1000000000000"], "this run needs at least"),
    (["--out-dir", ""], "--out-dir is empty"),
    (["--out-dir", "  "], "--out-dir is empty"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAINING_INPUT, ids=[m[:30] for _, m in BAD_TRAINING_INPUT])
def test_bad_training_input_is_one_clear_line_and_writes_nothing(finished_run, bad_texts, data_dir, capsys,
                                                                  extra, message):
    before = snapshot(finished_run)
    extra = [e.format(bad=bad_texts) for e in extra]
    assert train_shakespeare.main(train_args(data_dir, finished_run, "--overwrite", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert snapshot(finished_run) == before


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "train.bin").write_bytes((d / "train.bin").read_bytes() + b"x"), "has an odd number of bytes"),
    (lambda d: (d / "val.bin").write_bytes(b""), "val.bin holds 0 uint16 tokens, meta.json records"),
    (lambda d: np.fromfile(d / "train.bin", dtype=np.uint16).astype(np.uint32).tofile(d / "train.bin"),
     "written with another dtype (uint32, int64?)"),
    (lambda d: (d / "meta.json").write_text(json.dumps(dict(m := json.loads((d / "meta.json").read_text()),
                                                            chars="a" * m["vocab_size"]))), "repeats characters"),
    (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is not valid JSON"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "meta.json lacks tokenizer and vocab_size"),
    (lambda d: (d / "meta.json").write_text(json.dumps(dict(json.loads((d / "meta.json").read_text()), chars="ab"))),
     "meta.json lists 2 characters for a vocabulary of"),
])
def test_damaged_token_files_are_one_clear_line(tmp_path, data_dir, capsys, damage, message):
    broken = tmp_path / "data"
    broken.mkdir()
    for f in data_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    damage(broken)
    assert train_shakespeare.main(train_args(broken, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_damaged_cached_meta_json_is_tokenized_again(tmp_path, text_file, capsys):
    """The cache of --data texts is this project's own: garbage or [] in its meta.json means prepare it again."""
    for garbage in ("{not json", "[]"):
        meta_path = prepare_data.ensure_prepared(text_file) / "meta.json"
        meta_path.write_text(garbage)
        assert prepare_data.ensure_prepared(text_file) == meta_path.parent
        assert prepare_data.load_meta(meta_path.parent)["tokenizer"] == "char"
        assert "tokenizing" in capsys.readouterr().out


def test_the_memory_bound_passes_every_preset_on_its_machine_and_refuses_past_it(monkeypatch):
    """check_the_run_fits is a lower bound: every preset passes on the machine it is meant for (the CPU presets
    on 8 GiB, GPT-2 sizes on one 80 GB GPU), and the same run is refused on a device below its bound."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    for name, device, gib in (("cpu", cpu, 8), ("shakespeare-char", cpu, 8), ("gpt2-124m", cuda, 80),
                              ("gpt2-1.5b", cuda, 80)):
        cfg = train_shakespeare.resolve({"preset": name})
        vocab = 50304 if cfg.tokenizer == "gpt2" else 65
        monkeypatch.setattr(runs, "device_memory_bytes", lambda d, g=gib: g * 2**30)
        runs.check_the_run_fits(cfg, vocab, device)
        monkeypatch.setattr(runs, "device_memory_bytes", lambda d: 2**20)  # 1 MiB
        with pytest.raises(runs.TrainError, match=f"and the {device.type} has 0 GiB"):
            runs.check_the_run_fits(cfg, vocab, device)


def test_a_run_shorter_than_its_warmup_says_so(tmp_path, data_dir, capsys):
    """--max-iters at or below --warmup-iters: the learning rate never reaches --lr; one note line says so and
    what the peak is (the linear warmup at the last step); no note otherwise."""
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "short", "--max-iters", "4", "--eval-interval",
                                             "4", "--warmup-iters", "7", "--lr", "1e-2")) == 0
    assert "note: --warmup-iters 7 >= --max-iters 4: the learning rate never reaches --lr 0.01 (its peak: 0.005)" \
        in capsys.readouterr().out
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "long", "--max-iters", "8", "--eval-interval",
                                             "8", "--warmup-iters", "7")) == 0
    assert "--warmup-iters" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--n-layer", "x"], ["--norm", "huge"], ["--no-such-flag"], ["--lr"]],
                         ids=["type", "choice", "unknown", "missing"])
def test_a_bad_flag_is_one_line_pointing_to_help(argv, capsys):
    """argparse's own errors (a wrong type, an invalid choice, an unknown flag) are one line too, as every other
    input error, with where the flags are listed instead of the full usage; exit code 2."""
    from tools import bench, gpu_check

    for main in (train_shakespeare.main, bench.main, gpu_check.main):
        with pytest.raises(SystemExit) as exit_:
            main(argv if main is train_shakespeare.main else ["--no-such-flag"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "--help lists every flag" in err and "usage:" not in err


def test_a_run_that_appears_while_another_starts_is_not_cleared(tmp_path, data_dir, finished_run, capsys,
                                                                 monkeypatch):
    """The fresh-start check runs again under the folder's lock: a run that another process finished in the folder
    while this one prepared its data and built its model is refused in one line (exit 2), not cleared; with
    --overwrite it is replaced, as asked."""
    out = tmp_path / "race"
    real_build = train_shakespeare.build_model

    def build_while_another_run_finishes(*args):  # the other process, between the first check and the lock
        if not out.exists():
            shutil.copytree(finished_run, out)
        return real_build(*args)

    monkeypatch.setattr(train_shakespeare, "build_model", build_while_another_run_finishes)
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2", "--eval-interval", "2")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} already holds a run") and err.count("\n") == 1, err
    assert snapshot(out) == snapshot(finished_run)  # the other run's files, untouched
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2", "--eval-interval", "2",
                                             "--overwrite")) == 0
    assert json.loads((out / "summary.json").read_text())["iters"] == 2


def test_a_tokenizer_sampling_cannot_use_is_refused_before_the_run_folder_is_touched(tmp_path, data_dir,
                                                                                       finished_run, capsys):
    """A --data folder whose meta.json names a tokenizer this project cannot decode is refused in one line before
    any training, also with --overwrite: the run already in --out-dir stays as it was."""
    bad = tmp_path / "bad_data"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps(dict(meta, tokenizer="sentencepiece")))
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    assert train_shakespeare.main(train_args(bad, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "unknown tokenizer 'sentencepiece'" in err and err.count("\n") == 1, err
    assert snapshot(out) == before


def test_more_bad_input_is_one_line_and_writes_nothing(tmp_path, data_dir, finished_run, capsys, monkeypatch):
    """The rest of the adversarial cases: each one line on stderr, exit code 2, nothing written."""
    def one_line(code, message):
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err

    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    for name, changed in (("extra_key", dict(ckpt, model_args=dict(ckpt["model_args"], frobnicate=1))),
                          ("missing_tensor", dict(ckpt, model={k: v for k, v in ckpt["model"].items()
                                                               if not k.endswith("ln_f.weight")}))):
        (tmp_path / name).mkdir()
        torch.save(changed, tmp_path / name / "ckpt.pt")
        one_line(train_shakespeare.main(["--sample", "--out-dir", str(tmp_path / name)]),
                 "does not hold a model this stable_gpt.py can build")
    long_name = tmp_path / ("x" * 300)
    one_line(train_shakespeare.main(train_args(data_dir, long_name)), "cannot use --out-dir")
    one_line(train_shakespeare.main(train_args(data_dir, long_name, "--resume")), "cannot read")
    monkeypatch.setattr(runs.shutil, "which", lambda name: None)  # a machine without a C++ compiler
    runs.why_compile_fails.cache_clear()  # (the probe's answer is kept per process)
    one_line(train_shakespeare.main(train_args(data_dir, tmp_path / "c", "--compile")), "no C++ compiler on PATH")
    assert not (tmp_path / "c").exists()  # so that the suggested --no-compile rerun starts cleanly
    monkeypatch.undo()
    runs.why_compile_fails.cache_clear()
    for env, message in (({"RANK": "0"}, "RANK is set but not LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
                         ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "but not MASTER_ADDR, MASTER_PORT"),
                         ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                           "MASTER_PORT": "29500"}, "RANK 2 is not below WORLD_SIZE 2")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            one_line(train_shakespeare.main(train_args(data_dir, tmp_path / "ddp")), message)
    assert not (tmp_path / "ddp").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--input", str(prepare_data.load_meta(data_dir)["source"]), "--out-dir", str(a_file)])
    one_line(e.value.code, f"cannot write the token files into {a_file}")
    # a read-only data folder (root writes anyway, so the permission is mocked): one line naming the way out
    text = tmp_path / "new_text.txt"
    text.write_text("a new text to tokenize\n" * 200)
    with monkeypatch.context() as m:
        m.setattr(prepare_data.os, "access", lambda path, mode: mode != os.W_OK)
        one_line(train_shakespeare.main(train_args(text, tmp_path / "ro")), "set STABLE_GPT_CACHE to a writable")
    assert not (tmp_path / "ro").exists()
    for argv, message in ((["--rounds", "0"], "must be a positive integer, got 0"),
                          (["--steps", "0"], "must be a positive integer, got 0")):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="defines no GPT and GPTConfig of its own"):
        bench.main(["--nanogpt", str(Path(__file__).parent / "train_shakespeare.py")])
    bad_devices = (["--device", "foo"], "unknown device 'foo'"), (["--device", "cuda"], "CUDA is not available")
    for argv, message in bad_devices[:None if not torch.cuda.is_available() else 1]:
        with pytest.raises(SystemExit) as e:
            bench.main(argv + ["--no-memory"])
        one_line(e.value.code, message)
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "no_diag", "--max-iters", "2", "--diag-interval",
                                             "0")) == 0
    capsys.readouterr()
    one_line(plots.main(["--logits", str(tmp_path / "logits.png"), str(tmp_path / "no_diag")]),
             "recorded no attention logits")
    assert not (tmp_path / "logits.png").exists()
    one_line(plots.main(["--logits", str(tmp_path / "nowhere" / "x.png"), str(finished_run)]), "no folder")
    from tools import race

    for command, argv, message in ((plots, ["--logits", str(tmp_path / "x.txt"), str(finished_run)], "give a .png file"),
                                   (plots, ["--frob"], "unrecognized arguments: --frob"),
                                   (race, ["--target", "x"], "invalid float value")):
        with pytest.raises(SystemExit) as e:
            command.main(argv)
        one_line(e.value.code, message)


def test_a_damaged_checkpoint_is_one_line_on_resume_and_sample(tmp_path, data_dir, finished_run, capsys):
    """Checkpoints a weights-only load accepts but whose contents are wrong (edited by hand, or damaged): each
    --resume and --sample is one line, exit 2, naming what is wrong; nothing is written."""
    ckpt = torch.load(finished_run / "ckpt.pt", weights_only=True)
    cases = {"config": (dict(ckpt, config=None), "config is NoneType"),
             "iter": (dict(ckpt, iter_num="5"), "iter_num is str"),
             "optimizer": ({k: v for k, v in ckpt.items() if k != "optimizer"}, "no optimizer"),
             "meta": (dict(ckpt, meta={"tokenizer": "char"}), "meta has no vocab_size"),
             "nan": (dict(ckpt, model={k: v * math.nan for k, v in ckpt["model"].items()}), "non-finite values"),
             "shape": (dict(ckpt, model={k: v[:, :3] if v.dim() == 2 else v for k, v in ckpt["model"].items()}),
                       "Error(s) in loading state_dict")}
    for name, (changed, message) in cases.items():
        folder = tmp_path / name
        shutil.copytree(finished_run, folder)
        torch.save(changed, folder / "ckpt.pt")
        before = snapshot(folder)
        for mode in ("--resume", "--sample"):
            if mode == "--sample" and name in ("iter", "optimizer"):
                continue  # sampling needs neither
            code = train_shakespeare.main(train_args(data_dir, folder, "--max-iters", "999", mode))
            err = capsys.readouterr().err
            assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert snapshot(folder) == before, name


def test_a_full_disk_while_logging_stops_in_one_line_and_the_run_resumes(tmp_path, data_dir, capsys, monkeypatch):
    """A log line that cannot be written (ENOSPC, or a file-size limit's EFBIG) stops the run with one line; the
    last checkpoint stays whole, and once there is room --resume finishes the run."""
    import errno

    out, appended = tmp_path / "run", []
    real_append = runs.JsonlLog.append

    def append_until_full(log, line):
        appended.append(line)
        if len(appended) > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_append(log, line)

    monkeypatch.setattr(runs.JsonlLog, "append", append_until_full)
    args = train_args(data_dir, out, "--max-iters", "40", "--eval-interval", "10")
    assert train_shakespeare.main(args) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err and err.count("\n") == 1, err
    saved = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert 0 < saved < 40 and not (out / "summary.json").exists()
    monkeypatch.setattr(runs.JsonlLog, "append", real_append)
    assert train_shakespeare.main(args + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["iters"] == 40


def test_ctrl_c_while_the_training_script_starts_or_prepare_data_runs_is_one_line(tmp_path, text_file):
    """SIGINT while torch is still loading (before main's own handler) and in prepare_data.py: one line, exit 130,
    no traceback, nothing written."""
    script = Path(__file__).parent
    # the script run as __main__, a SIGINT arriving as it imports torch
    code = ("import builtins, os, runpy, signal, sys; sys.argv = ['train_shakespeare.py']; real = builtins.__import__; "
            "builtins.__import__ = lambda name, *a, **k: (name == 'torch' and os.kill(os.getpid(), signal.SIGINT), "
            "real(name, *a, **k))[1]; runpy.run_path('train_shakespeare.py', run_name='__main__')")
    starting = subprocess.run([sys.executable, "-c", code], cwd=script, capture_output=True, text=True, timeout=120)
    assert starting.returncode == 130, starting.stderr
    assert starting.stderr.strip() == "interrupted while starting; nothing was written", starting.stderr
    # (Python's own Ctrl-C handler, as in a terminal: a suite run in the background inherits SIGINT ignored)
    code = ("import os, signal, sys, prepare_data; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "prepare_data.prepare = lambda *a: os.kill(os.getpid(), signal.SIGINT) or __import__('time').sleep(5); "
            f"sys.argv = ['prepare_data.py', '--input', {str(text_file)!r}, '--out-dir', {str(tmp_path / 'p')!r}]; "
            "prepare_data.main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=script, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "prepare_data: interrupted; nothing was written", \
        proc.stderr
    assert not (tmp_path / "p").exists()


def test_prepare_data_input_writes_the_folder_that_data_reuses(tmp_path, text_file, capsys):
    prepare_data.main(["--input", str(text_file)])
    capsys.readouterr()
    assert prepare_data.ensure_prepared(str(text_file)) == prepare_data.cache_dir(text_file, "char")
    assert "tokenizing" not in capsys.readouterr().out  # reused, not tokenized again


def test_processes_preparing_one_text_at_once(tmp_path):
    """Four processes tokenize the same new text at the same moment, three times over: all succeed, and the
    folder is whole (with one shared temporary name, about one round in four crashed here)."""
    text = tmp_path / "big.txt"
    text.write_text(synthetic_text(2_000_000))
    code = ("import sys, prepare_data; prepare_data.CACHE = __import__('pathlib').Path(sys.argv[2]); "
            "print(prepare_data.ensure_prepared(sys.argv[1]))")
    for round_ in range(3):
        cache = tmp_path / f"cache{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", code, str(text), str(cache)], cwd=Path(__file__).parent,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outs = [p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        folder = Path(outs[0][0].strip().splitlines()[-1])
        meta = prepare_data.load_meta(folder)
        assert (folder / "train.bin").stat().st_size == 2 * meta["train_tokens"] and not list(folder.glob("*.part"))


def test_unwritable_out_dirs_are_one_line(tmp_path, data_dir, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o500)
    cases = [a_file, a_file / "below"] + ([read_only / "run"] if os.geteuid() != 0 else [])  # root may write anyway
    for out in cases:
        assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2")) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot write into --out-dir {out}") and err.count("\n") == 1, err


def test_a_sweeps_runs_of_one_configuration_reuse_its_compiled_code(tmp_path, data_dir, monkeypatch):
    """A sweep compiles by default; each run starts dynamo afresh (no recompile limit across runs), and the runs
    of one configuration at other seeds and learning rates find its graphs in inductor's cache: no graph is
    compiled twice (at most the first run compiles)."""
    from torch._dynamo.utils import counters

    skip_without_compile()

    per_run, real_train = [], sweep.train

    def counting_train(*args, **kw):
        counters.clear()
        result = real_train(*args, **kw)
        per_run.append(dict(counters["inductor"]))
        return result

    monkeypatch.setattr(sweep, "train", counting_train)
    argv = [a for a in train_args(data_dir, tmp_path / "s", "--max-iters", "2", "--eval-interval", "2",
                                  "--diag-interval", "0") if a != "--no-compile"]
    del argv[argv.index("--lr"):argv.index("--lr") + 2]  # (the sweep sets it)
    assert sweep.main(argv + ["--compare", "baseline", "--seeds", "2", "--lrs", "1e-3", "1e-2"]) == 0
    assert len(per_run) == 4
    for run in per_run[1:]:  # the train and eval graphs (forward, backward) from the cache
        assert run.get("fxgraph_cache_hit", 0) >= 3 and run.get("fxgraph_cache_miss", 0) == 0, per_run


def test_a_sweep_does_not_reuse_a_run_made_on_another_text(tmp_path, text_file, capsys, monkeypatch):
    """A finished run is reused only when --data still holds the text it was trained on (the checksum its summary
    keeps): after the text changed, the sweep refuses in one line instead of reporting the old losses."""
    monkeypatch.setattr(prepare_data, "CACHE", tmp_path / "cache")
    text = tmp_path / "text.txt"
    text.write_text(text_file.read_text())
    argv = [a for a in train_args(text, tmp_path / "cmp", "--max-iters", "2", "--eval-interval", "2",
                                  "--diag-interval", "0")] + ["--compare", "baseline"]
    assert sweep.main(argv) == 0
    assert sweep.main(argv) == 0 and "done already" in capsys.readouterr().out
    text.write_text(text_file.read_text()[::-1])  # another text (the same characters) under the same path
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert "holds a run on another text than --data's now" in err and err.count("\n") == 1, err


def test_a_sweep_reuses_a_run_only_with_the_settings_asked_for(tmp_path, data_dir, capsys, monkeypatch):
    """A finished run is reused only when its settings are the ones asked for (else one line says what differs);
    configurations get one folder each (the exponent's sign kept), and two that would share one are refused."""
    out = tmp_path / "cmp"
    argv = lambda iters: train_args(data_dir, out, "--max-iters", iters, "--eval-interval", "2", "--diag-interval",
                                    "0") + ["--compare", "--z-loss 1e-4", "--z-loss 1e+4"]
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    assert sweep.main(argv("4")) == 0
    assert len(resets) == 2  # each run compiles afresh (no recompile limit across a sweep's runs)
    for slug, coef in (("z-loss-1e-4", 1e-4), ("z-loss-1e+4", 1e4)):
        assert json.loads((out / slug / "seed1337" / "summary.json").read_text())["config"]["z_loss"] == coef
    capsys.readouterr()
    assert sweep.main(argv("6")) == 2
    err = capsys.readouterr().err
    assert "holds a run of other settings (max_iters 4 -> 6, lr_decay_iters 4 -> 6)" in err and err.count("\n") == 1
    for configs, message in ((["--lns", "--lns "], "would share one run folder"),
                             (['--lns "x'], "No closing quotation")):
        assert sweep.main(train_args(data_dir, tmp_path / "bad") + ["--compare", *configs]) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists()


def test_compare_checks_every_configuration_before_training(tmp_path, data_dir, capsys):
    for bad, message in (('--frob', "unknown flag(s) --frob"), ("--lns --norm-position post", "lns scales"),
                         ("--n-head 5", "must be divisible by n_head"),
                         (f"--data {tmp_path / 'no_such_text.txt'}", "no_such_text.txt")):
        argv = train_args(data_dir, tmp_path / "cmp") + ["--compare", "baseline", bad]
        assert sweep.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.startswith("error: --compare configuration"), err
        assert not (tmp_path / "cmp").exists()  # the baseline did not train first


def test_bad_choices_are_listed(finished_run, capsys):
    before = snapshot(finished_run)
    for flag, value, listed in (("--preset", "huge", "'cpu'"), ("--norm-position", "sandwich", "'deepnorm'")):
        with pytest.raises(SystemExit) as e:
            train_shakespeare.main([flag, value, "--out-dir", str(finished_run)])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"invalid choice: '{value}'" in err and listed in err
    assert snapshot(finished_run) == before


def test_existing_run_is_not_overwritten_by_accident(finished_run, data_dir, capsys):
    before = snapshot(finished_run)
    assert train_shakespeare.main(train_args(data_dir, finished_run)) == 2
    assert "already holds a run; --resume to continue it, --overwrite" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_gpu_device_and_dtype_choice_under_torchrun_and_alone(monkeypatch):
    """With CUDA mocked: under torchrun each process takes the GPU of its LOCAL_RANK (--device cuda or auto), a
    fixed cuda:N is refused there; alone, cuda:1 becomes the current GPU (its RNG is what a checkpoint saves).
    bf16 only where the GPU has it, not emulated (V100, T4: fp16 with a GradScaler)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(runs.dist, "init_process_group", lambda backend, **kw: chosen.append(backend))
    monkeypatch.setattr(runs, "join_peers", lambda *a: None)
    assert runs.setup_process("cuda:1").device == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    assert runs.setup_process("cuda").device == torch.device("cuda", 0)
    for k, v in dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    chosen.clear()
    for name in ("cuda", "auto"):
        proc = runs.setup_process(name)
        assert (proc.rank, proc.world, proc.device, proc.ddp) == (3, 4, torch.device("cuda", 1), True)
    assert chosen == [torch.device("cuda", 1), "nccl"] * 2
    with pytest.raises(runs.TrainError, match="the GPU of its LOCAL_RANK; use --device cuda, not --device cuda:0"):
        runs.setup_process("cuda:0")
    for emulated_only, dtype in ((False, torch.bfloat16), (True, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, e=emulated_only: including_emulation or not e)
        assert runs.pick_dtype("auto", torch.device("cuda", 0)) == dtype


def test_the_step_time_leaves_out_the_first_step(monkeypatch):
    """The first step of a run holds torch.compile's minutes: the first lap's ms/iter (and MFU) leave it out."""
    now = [100.0]
    monkeypatch.setattr(monitors.time, "time", lambda: now[0])
    timer = monitors.StepTimer(0)
    for it, seconds in enumerate([30.0] + [0.5] * 9, start=1):  # a 30 s compile, then 0.5 s steps
        now[0] += seconds
        timer.step_done(it)
    assert timer.lap(10) == (0.5, 0.5)
    now[0] += 5.0
    timer.step_done(20)
    assert timer.lap(20) == (0.5, 0.5)  # later laps: every step counts


def test_mfu_peaks_by_gpu_name(monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12),
                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA B200", 2.25e15), ("NVIDIA H800", 989e12),
                       ("NVIDIA A800-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
                       ("NVIDIA L4", 121e12), ("NVIDIA GB200", 2.5e15), ("NVIDIA L400X", None), ("Some GPU", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert runs.gpu_peak_flops(cuda) == peak, name


@pytest.mark.parametrize("rank", ["0", "1"])
def test_stale_torchrun_variables_end_in_one_line(rank, monkeypatch):
    """RANK/WORLD_SIZE/MASTER_* left in a shell from an earlier torchrun, no peers: rank 0 (which hosts the
    store) and any other rank (which looks for it) give up after PEER_WAIT_S with one line, not 30 minutes."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stale = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for k, v in stale.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setattr(runs, "PEER_WAIT_S", 1)
    with pytest.raises(runs.TrainError, match=f"no peers after 1 s \\(RANK={rank}, WORLD_SIZE=2.*unset RANK"):
        runs.setup_process("cpu")
    for name, value, message in (("RANK", "abc", "must be whole numbers"), ("MASTER_PORT", "99999", "is not a port")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(runs.TrainError, match=message):
                runs.setup_process("cpu")
    if rank == "1":  # a Ctrl-C or SIGTERM while waiting ends the wait at once
        with pytest.raises(runs.TrainError, match="stopped by a signal while waiting for the other processes"):
            runs.setup_process("cpu", stopped=lambda: True)
        # something that is not a store listens on the port (another server, a live job's port): still bounded,
        # and a signal still ends the wait at once
        with socket.socket() as server:
            server.bind(("127.0.0.1", 0))
            server.listen()
            monkeypatch.setenv("MASTER_PORT", str(server.getsockname()[1]))
            started = time.monotonic()
            with pytest.raises(runs.TrainError, match="no peers after 1 s|cannot join the process group"):
                runs.setup_process("cpu")
            assert time.monotonic() - started < 15
            with pytest.raises(runs.TrainError, match="stopped by a signal"):
                runs.setup_process("cpu", stopped=lambda: True)


def test_gpu_check_dry_run_runs_both_parts_and_writes_their_verdicts(tmp_path, text_file, capsys):
    """python -m tools.gpu_check --dry-run: both parts' code paths at toy size on CPU (the real training loop in
    every configuration, the isolated step, the profiler, the shakespeare-char run), each check with its verdict
    ("n/a" on CPU) and the JSON; the data a GPU machine needs, prepared by --prepare, checked first in one line."""
    from tools import gpu_check

    data = tmp_path / "device_data"
    assert gpu_check.main(["--prepare", "--text", str(text_file), "--data-dir", str(data)]) == 0
    assert {p.name for p in data.iterdir()} == {"char", "gpt2", "tiktoken_cache"}
    argv = ["--dry-run", "--data-dir", str(data), "--out-dir", str(tmp_path / "run")]
    assert gpu_check.main(argv) == 0
    out = capsys.readouterr().out
    speed = json.loads((tmp_path / "run" / "gpu_check_speed.json").read_text())
    assert set(speed["configs"]) == set(gpu_check.CONFIGS) and speed["isolated"]["attention_kernel"]
    assert all(c["graph_breaks"] == 0 and c["tokens_per_s"] > 0 for c in speed["configs"].values())
    if runs.why_compile_fails("cpu") is None:  # compiled as on a GPU: the train step's graph and the eval's
        assert all(c["graphs"] == 2 for c in speed["configs"].values()), speed["configs"]
    assert set(speed["graphs_by_flag_set"]) == set(gpu_check.FLAG_SETS)
    assert all(c["verdict"] == "n/a (dry run)" for c in speed["checks"].values()) and len(speed["checks"]) == 7
    shakespeare = json.loads((tmp_path / "run" / "gpu_check_shakespeare.json").read_text())
    assert shakespeare["best_val_loss"] > 0 and "best val loss (nanoGPT: 1.4697)" in shakespeare["checks"]
    assert out.count("n/a (dry run)") == 9 and "--- gpu_check: speed ---" in out
    for name in gpu_check.CONFIGS:  # each configuration through the real loop, at the preset's accumulation
        summary = json.loads((tmp_path / "run" / "speed" / name / "summary.json").read_text())
        assert summary["iters"] == gpu_check.STEPS and summary["config"]["grad_accum"] == 2
    # the third part, only when asked: every stabilizer through the loop, each against the baseline
    assert not (tmp_path / "run" / "stabilizers").exists()
    assert gpu_check.main(argv + ["--part", "stabilizers"]) == 0
    stabilizers = json.loads((tmp_path / "run" / "gpu_check_stabilizers.json").read_text())
    assert set(stabilizers["configs"]) == set(gpu_check.STABILIZERS)
    assert all(c["graph_breaks"] == 0 and c["tokens_per_s"] > 0 for c in stabilizers["configs"].values())
    assert len(stabilizers["checks"]) == len(gpu_check.STABILIZERS)  # one ratio each but the baseline, + breaks
    assert json.loads((tmp_path / "run" / "stabilizers" / "mhc" / "summary.json").read_text())["config"][
        "hyper_connections"] == "mhc"
    capsys.readouterr()
    # runs already in --out-dir: refused at once (no check run), replaced only with --overwrite
    before = snapshot(tmp_path / "run")
    assert gpu_check.main(argv + ["--part", "shakespeare"]) == 2
    out, err = capsys.readouterr()
    assert "already holds a run" in err and "gpu_check:" not in out and snapshot(tmp_path / "run") == before
    # a folder that is not the check's own (the repository's docs/, say): refused before anything runs
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("mine")
    assert gpu_check.main(["--dry-run", "--data-dir", str(data), "--out-dir", str(tmp_path / "docs")]) == 2
    assert "holds other files (README.md)" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["README.md"]
    # the device data missing: one line naming --prepare, before anything runs
    shutil.rmtree(data / "gpt2")
    assert gpu_check.main(["--dry-run", "--part", "speed", "--data-dir", str(data), "--out-dir", str(tmp_path / "r2")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "--prepare" in err and err.count("\n") == 1 and not out, err
    assert not (tmp_path / "r2").exists()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(monkeypatch):
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    alone = runs.Process(0, 1, torch.device("cpu"), ddp=False)
    assert runs.nonfinite_part(1.0, 1.0, scaler, alone) is None
    assert runs.nonfinite_part(float("nan"), 1.0, scaler, alone) == "loss"
    assert runs.nonfinite_part(1.0, float("inf"), scaler, alone) == "gradient norm"
    assert runs.nonfinite_part(1.0, float("inf"), torch.amp.GradScaler("cpu", enabled=True), alone) is None  # fp16
    monkeypatch.setattr(runs, "any_rank", lambda flag, proc: True)  # another rank's loss was NaN
    assert runs.nonfinite_part(1.0, 1.0, scaler, runs.Process(0, 2, torch.device("cpu"), ddp=True)) == \
        "loss (on another rank)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(finished_run, data_dir, capsys):
    before = snapshot(finished_run)
    assert train_shakespeare.main(train_args(data_dir, finished_run, "--overwrite", "--device", "cuda")) == 2
    assert "--device cuda, but CUDA is not available here" in capsys.readouterr().err
    assert snapshot(finished_run) == before


def test_bad_sampling_and_resume_input(finished_run, bad_texts, data_dir, tmp_path, capsys):
    before = snapshot(finished_run)
    assert train_shakespeare.main(["--sample", "--out-dir", str(finished_run), "--prompt", "the cat sees Q&Z"]) == 2
    assert "characters not in the" in capsys.readouterr().err  # names them: '&QZ'
    assert train_shakespeare.main(["--sample", "--out-dir", str(finished_run), "--prompt", "QZ"]) == 2
    assert "'QZ'" in capsys.readouterr().err
    assert train_shakespeare.main(train_args(bad_texts / "other.txt", finished_run, "--resume")) == 2
    assert "the checkpoint was trained on another vocabulary and text than --data's (" \
        in capsys.readouterr().err
    reversed_text = tmp_path / "reversed.txt"  # the same characters, another text
    reversed_text.write_text("".join(reversed(prepare_data.read_text(prepare_data.load_meta(data_dir)["source"]))))
    prepare_data.prepare(reversed_text, tmp_path / "reversed")
    assert train_shakespeare.main(train_args(tmp_path / "reversed", finished_run, "--resume")) == 2
    assert "the checkpoint was trained on another text than --data's" in capsys.readouterr().err
    assert train_shakespeare.main(train_args(data_dir, finished_run, "--resume", "--seed", "99")) == 2
    assert "cannot resume with another --seed (1337 -> 99)" in capsys.readouterr().err
    assert train_shakespeare.main(train_args(data_dir, finished_run, "--resume", "--block-size", "64")) == 2
    assert "cannot resume with a different model: block_size 32 -> 64" in capsys.readouterr().err
    assert snapshot(finished_run) == before
    # a truncated checkpoint, and a file that is not a checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ckpt.pt").write_bytes((finished_run / "ckpt.pt").read_bytes()[:5000])
    assert train_shakespeare.main(["--sample", "--out-dir", str(broken)]) == 2
    assert "it is truncated or not a stable-gpt checkpoint" in capsys.readouterr().err
    torch.save([1, 2, 3], broken / "ckpt.pt")
    assert train_shakespeare.main(train_args(data_dir, broken, "--resume")) == 2
    assert "is not a stable-gpt checkpoint" in capsys.readouterr().err


class _WritesAFile:
    """A pickle payload that, if unpickled by plain pickle, creates the file at self.path."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_crafted_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    run, victim = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    torch.save({"model": {}, "model_args": {}, "config": {}, "meta": _WritesAFile(victim)}, run / "ckpt.pt")
    for mode in ("--sample", "--resume"):
        assert train_shakespeare.main(["--out-dir", str(run), mode, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: refused to load {run / 'ckpt.pt'}") and err.count("\n") == 1, err
    assert not victim.exists()


def test_best_checkpoint_is_a_link_that_keeps_its_state(tmp_path):
    runs.save_checkpoint(tmp_path / "ckpt.pt", {"iter_num": 1})
    runs.link_checkpoint(tmp_path / "ckpt.pt", tmp_path / "best.pt")
    assert os.path.samefile(tmp_path / "best.pt", tmp_path / "ckpt.pt")
    runs.save_checkpoint(tmp_path / "ckpt.pt", {"iter_num": 2})  # a later, worse state
    assert torch.load(tmp_path / "best.pt")["iter_num"] == 1 and torch.load(tmp_path / "ckpt.pt")["iter_num"] == 2


def test_atomic_checkpoint_survives_a_crash_mid_write(finished_run, monkeypatch, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes((finished_run / "ckpt.pt").read_bytes())
    good = ckpt.read_bytes()

    def crashing_save(obj, f):  # writes half a file, then the machine "dies"
        Path(f).write_bytes(b"partial" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(runs.TrainError, match="disk full.*the previous checkpoint there is kept"):
        runs.save_checkpoint(ckpt, {"model": {}})
    assert ckpt.read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()
    assert train_shakespeare.load_checkpoint(ckpt)["iter_num"] == 20


def test_divergence_is_caught_at_its_step_and_keeps_the_checkpoint(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    # eval (and checkpoint) at iter 0, then a learning rate that blows the weights up
    assert train_shakespeare.main(train_args(data_dir, out, "--lr", "1e9", "--warmup-iters", "0",
                                             "--grad-clip", "0", "--eval-interval", "1000")) == 1
    summary = json.loads((out / "summary.json").read_text())
    steps = [r for r in read_log(out) if "loss" in r]
    assert summary["diverged"] and summary["diverged_at"] == len(steps) + 1  # the first non-finite step
    assert all(math.isfinite(r["loss"]) for r in steps) and summary["diverged_at"] <= 5
    printed = capsys.readouterr().out
    assert f"iter {summary['diverged_at']}: non-finite" in printed and "(iter 0)" in printed
    assert f"diverged at iter {summary['diverged_at']}: best val" in printed and "done:" not in printed
    ckpt = train_shakespeare.load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 0
    model = runs.model_from_checkpoint(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def nan_loss_at(monkeypatch, bad):
    """Make the training loss NaN at the training forwards whose 1-based count satisfies bad(count)."""
    real_forward, calls = GPT.forward, []

    def forward(self, idx, targets=None, with_z_loss=False):
        logits, loss, z = real_forward(self, idx, targets, with_z_loss=True)
        if targets is not None and self.training:
            calls.append(1)
            loss = loss * float("nan") if bad(len(calls)) else loss
        return (logits, loss, z) if with_z_loss else (logits, loss)

    monkeypatch.setattr(GPT, "forward", forward)


def test_a_divergence_found_at_the_next_log_step_stops_at_its_step_unsaved(tmp_path, data_dir, monkeypatch, capsys):
    """The steps' losses reach the host every --log-interval steps (no sync per step): a NaN at step 3, seen at
    step 5's evaluation, still stops the run as diverged at step 3, before step 5's checkpoint is written."""
    nan_loss_at(monkeypatch, lambda count: count == 3)
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--log-interval", "10", "--eval-interval", "5")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged_at"] == 3 and summary["iters"] == 2
    assert train_shakespeare.load_checkpoint(out / "ckpt.pt")["iter_num"] == 0
    assert "iter 3: non-finite loss (loss nan" in capsys.readouterr().out


def test_every_batch_is_checked_against_the_vocabulary(tmp_path):
    path = tmp_path / "train.bin"
    np.array([1, 2, 3, 9, 4, 5, 6, 7] * 4, dtype=np.uint16).tofile(path)
    batches = runs.Batches(path, 4, 2, torch.device("cpu"), 0, vocab_size=10)
    x, y = batches.next()
    assert x.shape == y.shape == (2, 4) and x.is_contiguous() and torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(runs.TrainError, match="holds token id 9, outside the vocabulary of 9"):
        runs.Batches(path, 4, 2, torch.device("cpu"), 0, vocab_size=9).next()


def test_skip_nonfinite_skips_one_bad_update(tmp_path, data_dir, monkeypatch):
    nan_loss_at(monkeypatch, lambda count: count == 10)
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--skip-nonfinite")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_updates"] == 1 and not summary["diverged"] and summary["iters"] == 60
    assert [r["iter"] for r in read_log(out) if r.get("type") == "skipped"] == [10]
    model = runs.model_from_checkpoint(train_shakespeare.load_checkpoint(out / "ckpt.pt"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_nonfinite_stops_when_every_update_is_skipped(tmp_path, data_dir, monkeypatch, capsys):
    """From step 10 on every loss is NaN: --skip-nonfinite skips 10 in a row, then reports a divergence."""
    nan_loss_at(monkeypatch, lambda count: count >= 10)
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--skip-nonfinite")) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] and summary["diverged_at"] == 20 and summary["skipped_updates"] == 10
    assert "10 updates in a row skipped before it; stopping without saving" in capsys.readouterr().out


def test_a_run_folder_in_use_is_refused_with_the_holder(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    out.mkdir()
    lock = runs.RunLock(out)  # another run holds the folder
    try:
        assert train_shakespeare.main(train_args(data_dir, out)) == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (process {os.getpid()})" in err and err.count("\n") == 1
        assert not (out / "ckpt.pt").exists()
    finally:
        lock.release()
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "2")) == 0  # free again


def test_overwrite_clears_the_old_run_and_a_finished_run_is_not_resumed(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "4", "--plot")) == 0
    assert (out / "loss.png").exists()
    assert os.path.samefile(out / "best.pt", out / "ckpt.pt")  # the last eval was the best: one file, two names
    assert plots.main([str(out)]) == 0 and plots.main([str(tmp_path / "nothing")]) == 2
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "4", "--resume")) == 2
    assert f"is finished (4 of 4 iters); raise --max-iters to train on, or plot it with: python -m tools.plots {out}" \
        in capsys.readouterr().err
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "4", "--overwrite")) == 0
    assert not list(out.glob("*.png"))  # the old run's plots are gone with it


def test_a_fresh_run_writes_only_into_a_new_empty_or_own_folder(tmp_path, data_dir, capsys):
    """Never destroy a user's files: a folder holding anything a run does not write is refused, --overwrite or
    not; a run's folder (its .lock) only with --overwrite, which removes the run's own files and nothing else."""
    def refused(folder, *extra):
        assert train_shakespeare.main(train_args(data_dir, folder, "--max-iters", "2", *extra)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return err

    figures = tmp_path / "docs"
    figures.mkdir()
    (figures / "map.png").write_bytes(b"\x89PNG")
    (figures / "notes.md").write_text("mine")
    for extra in ((), ("--overwrite",)):
        assert "holds files that no stable-gpt run writes (map.png, notes.md)" in refused(figures, *extra)
    assert snapshot(figures) == {"map.png": b"\x89PNG", "notes.md": b"mine"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    for extra in ((), ("--overwrite",)):
        assert "holds summary.json but no stable-gpt run" in refused(foreign, *extra)
    assert snapshot(foreign) == {"summary.json": b"{}"}
    run = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, run, "--max-iters", "2")) == 0
    (run / "ckpt.pt").unlink()  # a broken ckpt.pt removed by hand: best.pt and the logs are still the run's
    before = snapshot(run)
    assert "already holds a run; --resume to continue it, --overwrite" in refused(run)
    (run / "mine.txt").write_text("keep")
    assert "(mine.txt)" in refused(run, "--overwrite")
    assert snapshot(run) == dict(before, **{"mine.txt": b"keep"})
    (run / "mine.txt").unlink()
    assert train_shakespeare.main(train_args(data_dir, run, "--max-iters", "2", "--overwrite")) == 0


def training_subprocess(data_dir, out, eval_interval, logged):
    """A long one-thread training run in its own process, returned once its log.jsonl holds more than `logged`
    records (or it has ended)."""
    args = train_args(data_dir, out, "--max-iters", "100000", "--lr-decay-iters", "100000", "--eval-interval",
                      str(eval_interval))
    proc = subprocess.Popen([sys.executable, "train_shakespeare.py", *args], cwd=Path(__file__).parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    while proc.poll() is None and not ((out / "log.jsonl").is_file() and len(read_log(out)) > logged):
        time.sleep(0.1)
    return proc


def test_a_second_signal_stops_at_once_with_one_line_and_the_summary(tmp_path, data_dir):
    """Two Ctrl-C's 50 ms apart: no traceback, exit code 130, summary.json written (atomically), the last
    checkpoint whole and named."""
    out = tmp_path / "run"
    proc = training_subprocess(data_dir, out, eval_interval=7, logged=20)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate()
    assert proc.returncode == 130 and "Traceback" not in stdout, stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    ckpt = train_shakespeare.load_checkpoint(out / "ckpt.pt")
    assert summary["interrupted_at"] >= ckpt["iter_num"] > 0
    assert f"{out / 'ckpt.pt'} (iter {ckpt['iter_num']})" in stdout or f"wrote {out / 'ckpt.pt'}" in stdout
    assert not list(out.glob("*.tmp"))


def test_stop_at_once_mid_step_keeps_the_last_checkpoint_and_writes_the_summary(tmp_path, data_dir, monkeypatch,
                                                                                 capsys):
    """A second Ctrl-C raises KeyboardInterrupt in the middle of a step (here: of step 13, from the gradient clip):
    the run stops there with one line naming the last checkpoint (iter 10), summary.json says where it stopped,
    exit code 130, and --resume continues from the checkpoint."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def clip_then_interrupted(*args, **kw):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt  # what StopRequest's handler raises on a second signal
        return clip(*args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_then_interrupted)
    out = tmp_path / "my run"  # a space: the printed resume command quotes it
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "20", "--eval-interval", "5")) == 130
    assert f"stopped at once at iter 12 (a second signal); the last checkpoint: {out / 'ckpt.pt'} (iter 10)" \
        in (printed := capsys.readouterr().out)
    assert f"--resume --out-dir '{out}'" in printed
    assert json.loads((out / "summary.json").read_text())["interrupted_at"] == 12
    assert train_shakespeare.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10
    # stopped at once before any checkpoint (a second Ctrl-C during the first evaluation): nothing to resume, so the
    # advice is a fresh start with --overwrite, not a --resume that would fail
    before_any = types.SimpleNamespace(iter_num=0, last_saved=None, out_dir=out, interrupted_at=None)
    runs.Run.stopped_at_once(before_any)
    printed = capsys.readouterr().out
    assert "nothing to resume" in printed and "--overwrite" in printed and "--resume" not in printed
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "20", "--eval-interval", "5",
                                             "--resume")) == 0


def test_output_piped_into_head_does_not_end_the_run(tmp_path, data_dir):
    out = tmp_path / "run"
    args = " ".join(shlex.quote(a) for a in train_args(data_dir, out, "--max-iters", "30", "--log-interval", "1"))
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", f"{shlex.quote(sys.executable)} train_shakespeare.py {args} "
                           "| head -2"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.count("\n") == 2 and "Error" not in proc.stderr, proc.stderr
    assert json.loads((out / "summary.json").read_text())["iters"] == 30  # trained to the end


def test_default_out_dir_is_named_after_the_data(text_file):
    ts = train_shakespeare
    parse = lambda *argv: ts.resolve(ts.settings_given(ts.build_parser().parse_args(argv)))
    assert parse().out_dir == str(Path("out") / "cpu")
    assert parse("--sdd", "--lns").out_dir == str(Path("out") / "cpu-sdd-lns")
    assert parse("--sdd", "--norm-position", "post", "--z-loss", "1e-4").out_dir == str(Path("out") / "cpu-sdd-zloss0.0001-post")
    assert parse("--data", str(text_file)).out_dir == str(Path("out") / f"cpu-{text_file.stem}")
    assert parse("--data", str(text_file), "--tokenizer", "gpt2").out_dir.endswith(f"-{text_file.stem}-bpe")


def test_logs_are_json_without_nan_and_survive_a_partial_line(tmp_path):
    log = runs.JsonlLog(tmp_path / "log.jsonl")
    log.write(iter=1, loss=float("nan"), grad_norm=float("inf"), nested={"a": [1.0, float("-inf")]})
    log.write(iter=2, loss=1.5)
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"iter": 3, "lo')  # a crash mid-write
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0]) == \
        {"iter": 1, "loss": None, "grad_norm": None, "nested": {"a": [1.0, None]}}
    runs.JsonlLog(tmp_path / "log.jsonl", resume_iter=5)  # resuming drops the partial line only
    assert [r["iter"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]


def test_ctrl_c_while_the_data_is_prepared_stops_at_once_and_writes_nothing(tmp_path, data_dir, capsys,
                                                                           monkeypatch):
    """A signal before the run folder is opened (a long text being tokenized) ends the run at once: one line,
    exit 130, no run folder; in a sweep, the same, the runs already finished kept."""
    real_load = prepare_data.load_prepared
    interrupt_now = lambda: True  # when the data preparation gets its Ctrl-C

    def load_and_get_a_ctrl_c(*args, **kw):
        if interrupt_now():
            signal.raise_signal(signal.SIGINT)
            pytest.fail("the signal did not stop the run")
        return real_load(*args, **kw)

    monkeypatch.setattr(prepare_data, "load_prepared", load_and_get_a_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)  # (SIG_IGN where the suite runs in the background)
    assert train_shakespeare.main(train_args(data_dir, tmp_path / "run")) == 130
    assert capsys.readouterr().err == "interrupted\n" and not (tmp_path / "run").exists()
    # the sweep: its second run's data preparation, once the first run has finished
    interrupt_now = lambda: (tmp_path / "cmp" / "baseline" / "seed1337" / "summary.json").is_file()
    argv = train_args(data_dir, tmp_path / "cmp", "--max-iters", "2", "--eval-interval", "2", "--diag-interval", "0")
    assert sweep.main(argv + ["--compare", "baseline", "--lns"]) == 130
    assert "interrupted; run the same command again" in capsys.readouterr().err
    assert (tmp_path / "cmp" / "baseline" / "seed1337" / "summary.json").is_file()
    assert not (tmp_path / "cmp" / "lns").exists()
    assert signal.getsignal(signal.SIGINT) == handler_before  # the handlers given back


def test_sigint_writes_a_resumable_checkpoint(tmp_path, data_dir):
    """Ctrl-C in the middle of training: the step finishes, a checkpoint is written, the command to resume is
    printed, exit code 130; resuming gives the same losses as a run that was never interrupted."""
    out = tmp_path / "run"
    proc = training_subprocess(data_dir, out, eval_interval=1000, logged=30)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate()
    assert proc.returncode == 130, stdout[-2000:]
    assert "Resume with:" in stdout and f"--resume --out-dir {out}" in stdout
    stopped = train_shakespeare.load_checkpoint(out / "ckpt.pt")["iter_num"]
    assert stopped > 30 and json.loads((out / "summary.json").read_text())["interrupted_at"] == stopped
    end = str(stopped + 15)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess: bit-exact needs the same reduction order
    try:
        assert train_shakespeare.main(train_args(data_dir, out, "--resume", "--max-iters", end)) == 0
        ref = tmp_path / "ref"
        assert train_shakespeare.main(train_args(data_dir, ref, "--max-iters", end, "--lr-decay-iters", "100000",
                                                 "--eval-interval", "1000")) == 0
    finally:
        torch.set_num_threads(threads)
    losses = lambda o: [(r["iter"], r.get("loss")) for r in read_log(o) if r.get("type") != "eval"]
    assert losses(out) == losses(ref)


# ----------------------------------------------------------------------------------------------------
# The compare runner and the learning-rate sweep: the stability map's numbers


def test_each_comparison_gets_its_own_default_folder():
    assert sweep.default_root(["baseline", "--lns"], None) == Path("out/compare/baseline_lns")
    assert sweep.default_root(["baseline", "--sdd --lns"], None) != sweep.default_root(["baseline", "--lns"], None)
    assert sweep.default_root(["baseline"], [1e-3]) == Path("out/lr_sweep")  # sweeps of one protocol add up


def test_compare_runner_end_to_end(tmp_path, data_dir, capsys):
    out = tmp_path / "cmp"
    argv = train_args(data_dir, out, "--max-iters", "30", "--eval-interval", "15", "--diag-interval", "15") + \
        ["--compare", "baseline", "--lns --n-layer 3", "--seeds", "2"]
    assert sweep.main(argv) == 0
    assert train_shakespeare.main(argv) == 2  # the training script points to the tool
    assert "python -m tools.sweep" in capsys.readouterr().err
    table = (out / "compare.md").read_text().splitlines()
    assert table[0].startswith("| config | seeds | best val | final val | diverged | spikes | tokens/s")
    assert table[2].startswith("| baseline | 2 | ") and table[3].startswith("| --lns --n-layer 3 | 2 | ")
    assert "+-" in table[2] and table[2].endswith("| 1.00 |")
    for seed in (1337, 1338):
        run = json.loads((out / "lns-n-layer-3" / f"seed{seed}" / "summary.json").read_text())
        assert run["config"]["seed"] == seed and run["model_args"]["n_layer"] == 3 and run["model_args"]["lns"]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a failure and its fix, seeds with intervals: each folder's seed*/ runs, one arm each
    assert plots.main(["--arms", str(tmp_path / "arms.png"), str(out / "baseline"), str(out / "lns-n-layer-3")]) == 0
    assert (tmp_path / "arms.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.main(["--arms", str(tmp_path / "x.png"), str(tmp_path)]) == 2 and not (tmp_path / "x.png").exists()
    capsys.readouterr()
    assert sweep.main(argv) == 0  # again: nothing is redone
    assert capsys.readouterr().out.count("done already") == 4
    # a run that was interrupted is not done: it is resumed from its checkpoint
    path = out / "baseline" / "seed1338" / "summary.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), interrupted_at=17)))
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("done already") == 3 and "resuming at iter 30" in printed
    path.write_text('{"config": ')  # a damaged summary.json: one line naming the way out
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{path} is damaged" in err and err.count("\n") == 1


def test_sweeps_into_one_folder_add_up_their_sizes(tmp_path, monkeypatch):
    """A second sweep into the same --out-dir (the largest size, fewer configurations) joins the first one's
    runs in runs.csv; the map orders the sizes by parameters and draws the configurations each size has."""
    def rows(size, params, names):
        return [dict(fake_row(tmp_path / size / n, size=size, config=n, final=2.0, diverged=False), params=params)
                for n in names]
    merged = stability.merge_rows(rows("4x64", 2e5, ["baseline", "--sdd", "--lns"]) +
                                  rows("8x128", 1.6e6, ["baseline", "--lns"]), rows("4x128", 8e5, ["baseline", "--sdd"]))
    results = stability.map_results(merged)
    assert list(results["sizes"]) == ["4x64", "4x128", "8x128"]
    figures = {}
    monkeypatch.setattr(plots, "save", lambda fig, p, *a, **k: figures.setdefault(Path(p).name, fig) and Path(p))
    plots.plot_stability_map(results, tmp_path)
    assert [len(ax.containers) for ax in figures["stability_map.png"].axes] == [3, 2, 2]
    legend = figures["stability_map.png"].axes[-1].get_legend()  # under the largest size, which ran no --sdd
    assert [t.get_text() for t in legend.get_texts()] == ["baseline", "--sdd", "--lns"]


def test_lr_sensitivity_on_a_known_table():
    # Wortsman et al.: mean over the grid of min(loss, loss at init) minus the best; the caller caps at init
    assert stability.lr_sensitivity({1e-3: 3.0, 3e-3: 2.0, 1e-2: 2.5, 3e-2: 4.1}) == pytest.approx(0.9)
    assert stability.lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}) == 0.0


def fake_run(folder, final, diverged, init=4.0, seed=1, diag=(), vocab=65):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(dict(
        final_val_loss=final, best_val_loss=final, diverged=diverged, config=dict(seed=seed), iters=10, text_sha1="ab",
        tokens_per_step=64, techniques="pre-layernorm", model_args=dict(vocab_size=vocab))))
    (folder / "log.jsonl").write_text(json.dumps(dict(iter=0, type="eval", train_loss=init, val_loss=init)) + "\n")
    (folder / "diag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diag))
    return folder


def fake_row(folder, size="4x32", config="x", lr=1e-3, **kw):
    return stability.run_row(fake_run(folder, **kw), size, config, lr, unigram=3.3, params=1000)


def test_a_run_counts_at_its_loss_at_init_where_it_diverged_and_gets_its_failure_mode(tmp_path):
    """Wortsman's capped loss, and the failure mode from the run's own diagnostics: the largest attention
    logit of any record and block, log Z's largest drift from ln(vocab), the unigram loss for a collapse."""
    nan_run = fake_row(tmp_path / "a", final=2.0, diverged=True)
    assert nan_run["counted_loss"] == 4.0 and nan_run["failure_mode"] == "diverged"
    assert fake_row(tmp_path / "b", final=None, diverged=True)["counted_loss"] == 4.0
    above = fake_row(tmp_path / "c", final=5.5, diverged=False)  # finite but worse than at init: capped
    assert above["counted_loss"] == 4.0 and not above["diverged"] and above["failure_mode"] == "collapsed"
    assert fake_row(tmp_path / "d", final=3.26, diverged=False)["failure_mode"] == "collapsed"  # 3.3 - 0.05
    assert fake_row(tmp_path / "e", final=3.24, diverged=False)["failure_mode"] == "trains"
    ln65 = math.log(65)
    runaway = fake_row(tmp_path / "f", final=2.5, diverged=False,
                       diag=[dict(attn_logit_max=[3.0, 150.0], logit_lse_mean=ln65 + 1),
                             dict(attn_logit_max=[2.0, 40.0], logit_lse_mean=ln65 + 2)])
    assert runaway["failure_mode"] == "attention logits" and runaway["attn_logit_max"] == 150.0
    assert runaway["log_z"] == pytest.approx(ln65 + 2) and runaway["log_z_drift"] == pytest.approx(2.0)
    assert runaway["hc_gain_max"] is None  # no hyper-connections: no gain recorded
    compounding = fake_row(tmp_path / "hc", final=2.5, diverged=False,  # HC's gain: the largest of any record, block
                           diag=[dict(hc_gain_forward=[1.5, 30.0], hc_gain_backward=[2.0, 90.0]),
                                 dict(hc_gain_forward=[1.2, 7.0], hc_gain_backward=[1.0, 8.0])])
    assert compounding["hc_gain_max"] == 30.0 and compounding["failure_mode"] == "trains"
    drift = fake_row(tmp_path / "g", final=2.5, diverged=False,
                     diag=[dict(attn_logit_max=[99.0], logit_lse_mean=ln65 - 10.5), dict(attn_logit_max=[9.0],
                                                                                        logit_lse_mean=ln65)])
    assert drift["failure_mode"] == "output logits" and drift["log_z_drift"] == pytest.approx(10.5)
    assert fake_row(tmp_path / "h", final=2.5, diverged=False, diag=[dict(attn_logit_max=[99.0], logit_lse_mean=ln65
                                                                          + 9.9)])["failure_mode"] == "trains"


def test_the_unigram_loss_of_a_known_split(tmp_path):
    # train: 3 x token 0, 1 x token 1 (vocab 3, add-one: 4/7, 2/7, 1/7); val: one of each of 0 and 2
    np.array([0, 0, 0, 1], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([0, 2], dtype=np.uint16).tofile(tmp_path / "val.bin")
    assert stability.unigram_loss(tmp_path, 3) == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)


def test_students_t_against_its_tables():
    for df, t975 in ((1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (19, 2.093), (60, 2.000)):
        assert stability.t_quantile(0.975, df) == pytest.approx(t975, abs=1e-3)
        assert stability.t_two_sided_p(t975, df) == pytest.approx(0.05, abs=1e-4)
    assert stability.t_quantile(0.995, 2) == pytest.approx(9.925, abs=1e-3)
    for t in (0.5, 2.0, 17.3, 100.0):  # df 2 in closed form: P(|T| >= t) = 1 - t / sqrt(2 + t^2)
        assert stability.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert stability.t_two_sided_p(0.0, 3) == pytest.approx(1.0) and stability.t_two_sided_p(math.inf, 3) == 0.0
    assert stability.mean_interval([1.0, 2.0, 3.0]) == pytest.approx([2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)],
                                                                       abs=1e-3)
    assert stability.mean_interval([2.0]) is None


def test_paired_test_uses_the_per_seed_differences_and_holm_adjusts():
    # the seeds move both alike (+-0.3), the difference is 0.01 at every seed: paired, p ~ 0
    a, b = [2.0, 2.3, 1.7], [2.01, 2.31, 1.71]
    test = stability.paired_test(a, b)
    assert test["diff"] == pytest.approx(-0.01) and test["p"] < 1e-6 and test["ci95"] == pytest.approx([-0.01, -0.01])
    test = stability.paired_test([2.0, 2.3, 1.7], [2.1, 2.2, 1.8])  # differences -0.1, 0.1, -0.1
    assert test["p"] == pytest.approx(stability.t_two_sided_p((-0.1 / 3) / (statistics.stdev([-0.1, 0.1, -0.1]) /
                                                                            math.sqrt(3)), 2))
    # Holm (1979): p sorted 0.01, 0.02, 0.03, 0.5 over m = 4 -> 0.04, 0.06, 0.06 (running max), 0.5
    assert stability.holm([0.03, 0.5, 0.01, 0.02]) == pytest.approx([0.06, 0.5, 0.04, 0.06])


def test_curve_stats_per_seed_values_average_to_the_mean_curves():
    """Each seed's sensitivity, its slow and unstable parts and its best loss, taken at the configuration's best
    learning rate, average exactly to the mean curve's (Wortsman's sensitivity of the mean curve), and the two
    parts add up to the sensitivity."""
    losses = {1e-3: [3.0, 2.6, 2.9], 1e-2: [2.0, 2.4, 2.1], 3e-2: [2.2, 2.1, 2.3], 1e-1: [3.5, 2.5, 3.3]}
    c = stability.curve_stats(losses)
    mean = {lr: statistics.fmean(v) for lr, v in losses.items()}
    assert c["best_lr"] == 1e-2 and c["lr_sensitivity"] == pytest.approx(stability.lr_sensitivity(mean))
    assert c["slow"] == pytest.approx((mean[1e-3] - mean[1e-2]) / 4)
    assert c["unstable"] == pytest.approx((mean[3e-2] + mean[1e-1] - 2 * mean[1e-2]) / 4)
    assert c["slow"] + c["unstable"] == pytest.approx(c["lr_sensitivity"])
    for key in ("best_loss", "lr_sensitivity", "slow", "unstable"):
        assert statistics.fmean(c["per_seed"][key]) == pytest.approx(c[key])
    assert c["per_seed"]["best_loss"] == [2.0, 2.4, 2.1]  # at the mean curve's best lr, not each seed's own


# the 4x64 baseline's seed-to-seed noise in the first map (its 95% half widths over 3 seeds / 4.303 * sqrt(3)),
# at 1e-3 ... 1e-1, and a U-shaped true curve with its optimum inside
SIM_TRUTH = {1e-3: 2.90, 3e-3: 2.45, 1e-2: 2.30, 3e-2: 2.55, 1e-1: 3.00}
SIM_SD = {1e-3: 0.006, 3e-3: 0.017, 1e-2: 0.021, 3e-2: 0.067, 1e-1: 0.060}


def simulated_losses(rng, n_seeds, seed_effects, truth=SIM_TRUTH):
    """{lr: [loss per seed]}: the truth, plus each seed's effect (shared across configurations: the pairing),
    plus each run's own noise."""
    return {lr: [mu + seed_effects[i] + rng.gauss(0, SIM_SD[lr]) for i in range(n_seeds)] for lr, mu in truth.items()}


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_the_intervals_cover_the_truth_and_a_null_difference_is_rarely_called(n_seeds):
    """By simulation, with the project's functions: curves with a known truth and the first map's noise. A
    nominal 95% interval (Student's t over per-seed values) covers the true sensitivity, its unstable part and the
    true best loss at least 93% of the time; between two configurations with the same true curve, the paired
    test calls a difference (p <= 0.05) at most ~5% of the time; and over a map of 30 such null comparisons,
    Holm's correction keeps the chance of any false verdict at most ~5% (without it: ~79%)."""
    rng, reps = random.Random(7), 1500
    truth = stability.curve_stats({lr: [mu] for lr, mu in SIM_TRUTH.items()})
    covered = dict(lr_sensitivity=0, unstable=0, best_loss=0)
    called = 0
    for _ in range(reps):
        effects = [rng.gauss(0, 0.01) for _ in range(n_seeds)]
        a = stability.curve_stats(simulated_losses(rng, n_seeds, effects))
        b = stability.curve_stats(simulated_losses(rng, n_seeds, effects))
        for key in covered:
            low, high = stability.mean_interval(a["per_seed"][key])
            covered[key] += low <= truth[key] <= high
        called += stability.paired_test(a["per_seed"]["lr_sensitivity"], b["per_seed"]["lr_sensitivity"])["p"] <= 0.05
    assert all(hits / reps >= 0.93 for hits in covered.values()), covered
    assert called / reps <= 0.06, called / reps
    maps_with_a_false_verdict = 0  # Holm's bound is 5%; 1,000 maps estimate it to +-0.7% (one standard error)
    for _ in range(1000):
        p = [stability.paired_test(*[[rng.gauss(0, 1) for _ in range(n_seeds)] for _ in range(2)])["p"]
             for _ in range(30)]
        maps_with_a_false_verdict += min(stability.holm(p)) <= 0.05
    assert maps_with_a_false_verdict / 1000 <= 0.07


def test_map_verdicts_are_paired_and_holm_corrected(tmp_path):
    """Three seeds: "far" is 0.5 worse at every learning rate with the reference's seed effects (its best loss
    higher, its sensitivity not resolved: same shape); "near" 0.001 worse with the seed effects shuffled (nothing
    resolved); "steep" fails above the best lr (its unstable part higher). The table reads the same from a runs.csv
    written and read back."""
    rows = []
    for name, shift, top in (("ref", 0.0, 3.0), ("far", 0.5, 3.5), ("near", 0.001, 3.001), ("steep", 0.0, 3.9)):
        for i, d in enumerate((0.012, -0.01, 0.0) if name == "near" else (-0.01, 0.0, 0.012)):
            for lr, loss in ((1e-3, 2.5 + shift), (1e-2, 2.0 + shift), (1e-1, top)):
                rows.append(fake_row(tmp_path / name / f"{lr:g}" / str(i), config=name, lr=lr, final=loss + d,
                                     diverged=False, seed=i, init=5.0))
    results = stability.map_results(rows)
    configs = results["sizes"]["4x32"]["configs"]
    assert configs["ref"]["vs_reference"] is None and results["tests"] == 9
    renamed = [dict(r, config="baseline" if r["config"] == "ref" else r["config"]) for r in rows[9:] + rows[:9]]  # the reference last
    assert list(stability.map_results(renamed)["sizes"]["4x32"]["configs"])[0] == "baseline"  # the reference
    verdicts = {n: {k: t["verdict"] for k, t in configs[n]["vs_reference"].items()} for n in ("far", "near", "steep")}
    assert verdicts["far"] == dict(best_loss="higher", lr_sensitivity="not resolved", unstable="not resolved")
    assert set(verdicts["near"].values()) == {"not resolved"}
    assert verdicts["steep"] == dict(best_loss="not resolved", lr_sensitivity="higher", unstable="higher")
    table = stability.map_tables(results)
    path = tmp_path / "runs.csv"
    stability.write_runs_csv(path, rows)
    assert stability.map_tables(stability.map_results(stability.read_runs_csv(path))) == table
    line = next(line for line in table.splitlines() if line.startswith("| steep | ") and "p_Holm" in line)
    assert line.startswith("| steep | not resolved (+0.000") and "| higher (+0.300" in line


def test_the_map_command_regenerates_its_tables_and_figures_from_a_csv(tmp_path, capsys):
    rows = [fake_row(tmp_path / f"{c}{lr:g}{i}", config=c, lr=lr, final=2.0 + (lr > 1e-2) * (1 + i / 10), seed=i,
                     diverged=c == "b" and lr > 1e-2 and i == 0) for c in ("a", "b") for lr in (1e-3, 1e-2, 1e-1)
            for i in range(2)]
    stability.write_runs_csv(tmp_path / "runs.csv", rows)
    assert stability.main([str(tmp_path / "runs.csv"), "--out-dir", str(tmp_path / "map")]) == 0
    table = (tmp_path / "map" / "tables.md").read_text()
    assert table == stability.map_tables(stability.map_results(rows))
    # at 1e-1 seed 0 diverged (counted at init, 4.0), seed 1 ended at 3.1: mean 3.55 +- 12.706 * 0.9 / sqrt(2)
    assert "| b | pre-layernorm | 2.000 +- 0.000 | 2.000 +- 0.000 | 3.550 +- 5.718 \u2020 |" in table
    assert "| b | 5 | 1 | 0 | 0 | 0 |" in table
    for png in ("stability_map.png", "lr_sensitivity.png"):
        assert (tmp_path / "map" / png).read_bytes()[:4] == b"\x89PNG"
    assert stability.main([str(tmp_path / "none.csv"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_runs_of_a_second_sweep_join_the_first_ones_csv(tmp_path):
    first = [fake_row(tmp_path / "a", size="4x64", config="baseline", final=2.0, diverged=False),
             fake_row(tmp_path / "b", size="4x64", config="--sdd", final=2.1, diverged=False)]
    again = fake_row(tmp_path / "c", size="4x64", config="--sdd", final=2.2, diverged=False)
    larger = fake_row(tmp_path / "d", size="4x128", config="baseline", final=1.9, diverged=False)
    merged = stability.merge_rows(first, [again, larger])
    assert [(r["size"], r["config"], r["final_val_loss"]) for r in merged] == [  # the rerun in its place, new after
        ("4x64", "baseline", 2.0), ("4x64", "--sdd", 2.2), ("4x128", "baseline", 1.9)]
    longer = dict(larger, protocol=larger["protocol"].replace("10 x 64", "20 x 64"))  # another number of steps
    with pytest.raises(stability.ProtocolError, match="another protocol"):
        stability.merge_rows(first, [longer])


def test_sizes_set_each_runs_shape_and_are_checked(tmp_path, data_dir, capsys):
    assert sweep.size_flags("4x64", 32) == ["--n-layer", "4", "--n-embd", "64", "--n-head", "2"]
    assert sweep.size_flags("4x48x3", 32)[-1] == "3"
    with pytest.raises(runs.TrainError, match="not a multiple of the head size 32"):
        sweep.size_flags("4x48", 32)
    args = without_lr(train_args(data_dir, tmp_path / "x", "--max-iters", "4", "--eval-interval", "4",
                                 "--diag-interval", "0"))
    for bad, message in ((["--sizes", "2x32"], "--sizes is for the learning-rate sweep"),
                         (["--lrs", "1e-3", "--sizes", "2x32"], "sets each run's shape; drop --n-layer --n-head --n-embd"),
                         (["--lrs", "1e-3", "--sizes", "two"], "--sizes needs one or more model sizes")):
        assert sweep.main(args + bad) == 2
        assert message in capsys.readouterr().err, bad
    out = tmp_path / "sized"  # two sizes, the preset's head size (32): 1x32 has 1 head, 2x64 has 2
    i = args.index("--n-layer")
    argv = args[:i] + args[i + 6:] + ["--out-dir", str(out), "--lrs", "1e-3", "1e-2", "--sizes", "1x32", "2x64",
                                      "--seeds", "2"]
    assert sweep.main(argv) == 0
    result = stability.map_results(stability.read_runs_csv(out / "runs.csv"))
    assert list(result["sizes"]) == ["1x32", "2x64"]
    small, large = (result["sizes"][k] for k in ("1x32", "2x64"))
    assert small["params"] < large["params"]
    saved = json.loads((out / "2x64" / "baseline" / "lr0.01" / "seed1338" / "summary.json").read_text())["config"]
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"]) == (2, 64, 2)
    assert set(large["configs"]["baseline"]["mean_loss_ci95"]) == {1e-3, 1e-2}
    assert (out / "lr_transfer.png").read_bytes()[:4] == b"\x89PNG"  # two sizes: the transfer plot too
    # a size added later with other settings is not tabled beside them: one line, its runs kept
    other = [w if w != "4" else "6" for w in argv[:argv.index("--sizes")]] + ["--sizes", "3x32", "--seeds", "1"]
    capsys.readouterr()
    assert sweep.main(other) == 2
    err = capsys.readouterr().err
    assert "holds runs of another protocol (4 x 256 tokens" in err and err.count("\n") == 1, err
    assert (out / "3x32" / "baseline" / "lr0.01" / "seed1337" / "summary.json").is_file()


def without_lr(args):
    i = args.index("--lr")
    return args[:i] + args[i + 2:]


def test_lr_sweep_end_to_end_and_resumable(tmp_path, data_dir, capsys):
    out = tmp_path / "result"
    argv = without_lr(train_args(data_dir, out, "--max-iters", "20", "--eval-interval", "10", "--diag-interval", "0",
                                 "--log-interval", "10")) + \
        ["--compare", "baseline", "--norm-position post", "--lrs", "1e-3", "3e-2", "--seeds", "2"]
    assert sweep.main(argv) == 0
    rows = stability.read_runs_csv(out / "runs.csv")
    assert len(rows) == 8 and {r["size"] for r in rows} == {"2x32"}  # no --sizes: the flags' one size
    result = stability.map_results(rows)
    [(label, size)] = result["sizes"].items()
    assert label == "2x32" and result["lrs"] == [1e-3, 3e-2]
    assert list(size["configs"]) == ["baseline", "--norm-position post"]
    post = size["configs"]["--norm-position post"]
    assert post["model"] == "post-layernorm" and [r["seed"] for r in post["runs"][3e-2]] == [1337, 1338]
    run = json.loads((out / "norm-position-post" / "lr0.03" / "seed1338" / "summary.json").read_text())
    assert post["params"] == GPT(GPTConfig(**run["model_args"])).get_num_params()  # counted on the meta device
    row = next(r for r in rows if (r["config"], r["lr"], r["seed"]) == ("--norm-position post", 0.03, 1338))
    assert row["final_val_loss"] == pytest.approx(run["final_val_loss"], abs=1e-6) and row["steps"] == 20
    assert row["tokens"] == 20 * run["tokens_per_step"] and row["failure_mode"] in stability.MODES
    vocab = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    assert row["unigram_loss"] == pytest.approx(stability.unigram_loss(data_dir, vocab), abs=1e-5)
    low, high = post["lr_sensitivity_ci95"]
    assert low <= post["lr_sensitivity"] <= high
    assert run["config"]["lr"] == 0.03 and run["config"]["min_lr"] == pytest.approx(0.003)  # the preset's ratio
    table = (out / "tables.md").read_text().splitlines()
    assert table[0].startswith("### 2x32 (") and table[2].startswith(
        "| config | model | lr 0.001 | lr 0.03 | best lr | best loss [95%] | LR sensitivity [95%] |")
    for png in ("stability_map.png", "lr_sensitivity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert sweep.main(argv) == 0  # again: nothing is redone
    assert capsys.readouterr().out.count("done already") == 8
    # an interrupted run is resumed; the table is written again
    path = out / "baseline" / "lr0.001" / "seed1337" / "summary.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), interrupted_at=5)))
    assert sweep.main(argv) == 0
    assert capsys.readouterr().out.count("done already") == 7


def test_a_sweep_runs_in_parallel_as_in_turn_and_ctrl_c_stops_every_worker(tmp_path, data_dir):
    """--jobs 2: the same runs (the same losses, up to the threads' summation order) as one at a time, and a
    Ctrl-C to the sweep stops the workers' runs at a step with their checkpoints; no other run starts."""
    flags = lambda out, iters: without_lr(train_args(data_dir, out, "--max-iters", iters, "--eval-interval", "10",
                                                     "--diag-interval", "10", "--log-interval", "10"))
    plan = ["--compare", "baseline", "--qk-norm", "--lrs", "1e-3", "1e-2"]
    assert sweep.main(flags(tmp_path / "par", "20") + plan + ["--jobs", "2"]) == 0
    assert sweep.main(flags(tmp_path / "one", "20") + plan) == 0
    key = lambda r: (r["config"], r["lr"], r["seed"])
    parallel, serial = ({key(r): r for r in stability.read_runs_csv(tmp_path / d / "runs.csv")} for d in ("par", "one"))
    assert parallel.keys() == serial.keys() and len(parallel) == 4
    for k in parallel:
        assert parallel[k]["final_val_loss"] == pytest.approx(serial[k]["final_val_loss"], rel=1e-3), k
    out = tmp_path / "stop"
    # 40 seeds: the runs left in the queue outgrow a pipe's buffer, which once held the stopped sweep at its exit
    cmd = [sys.executable, "-m", "tools.sweep", *flags(out, "100000"), *plan, "--seeds", "40", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = [out / "worker0.log", out / "worker1.log"]
    deadline = time.monotonic() + 600  # both workers training (a loaded machine compiles slowly: no tight bound)
    while not all(p.is_file() and "iter " in p.read_text() for p in logs):
        assert time.monotonic() < deadline and proc.poll() is None, "the workers never both started training"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted; run the same command again" in printed, printed
    summaries = [json.loads(p.read_text()) for p in out.glob("*/*/seed*/summary.json")]
    assert len(summaries) == 2 and all(0 < s["interrupted_at"] < 100000 for s in summaries)
    assert len(list(out.glob("*/*/seed*/ckpt.pt"))) == 2


def test_a_sweep_worker_waits_for_runs_still_on_their_way(tmp_path, data_dir):
    """A worker ends at its end mark, not at a queue read empty: a resumed sweep's queue opens with hundreds of
    finished runs that the workers skip faster than the queue's pipe delivers the rest, and a worker that took
    "empty" for "done" left a 2-job sweep running on one. Here the queue is empty for a second, then a run comes."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    todo, done = ctx.Queue(), ctx.Queue()
    log = tmp_path / "worker0.log"
    worker = ctx.Process(target=sweep.parallel_worker, args=(todo, done, 1, log), daemon=True)
    worker.start()
    deadline = time.monotonic() + 300
    while not log.is_file():  # the worker opens its log just before it reads the queue
        assert time.monotonic() < deadline and worker.is_alive(), "the worker never started"
        time.sleep(0.05)
    time.sleep(1.0)
    assert worker.is_alive(), "the worker ended on an empty queue with runs still to come"
    args = train_args(data_dir, tmp_path / "run", "--max-iters", "4", "--eval-interval", "2", "--diag-interval", "0")
    todo.put((args, "baseline", 1337, tmp_path / "run", "[1/1]"))
    todo.put(None)
    assert [done.get(timeout=300)[0] for _ in range(2)] == ["start", "end"]
    worker.join(timeout=60)
    assert worker.exitcode == 0 and json.loads((tmp_path / "run" / "summary.json").read_text())["iters"] == 4


def test_the_gpu_map_dry_run_runs_its_whole_protocol_on_cpu(tmp_path, gpt2_data_dir, capsys):
    """tools.gpu_map --dry-run: every configuration, size and learning rate of the GPU protocol at toy sizes, two
    workers, BPE; the map's CSV and tables come out as on a GPU. Without --dry-run and CUDA: exit 2, one line."""
    from tools import gpu_map

    out = tmp_path / "gpu_map"
    assert gpu_map.main(["--data", str(gpt2_data_dir), "--out-dir", str(out), "--dry-run"]) == 0
    rows = stability.read_runs_csv(out / "runs.csv")
    p = gpu_map.PROTOCOL
    assert len(rows) == len(p["configs"]) * len(gpu_map.DRY_RUN["sizes"]) * len(gpu_map.DRY_RUN["lrs"])
    assert [c for c in dict.fromkeys(r["config"] for r in rows)] == p["configs"]
    assert {r["steps"] for r in rows} == {4} and all(r["tokens"] == 4 * 2 * 16 for r in rows)
    run = json.loads(next(out.glob("2x32x1/sdd/lr0.1/seed*/summary.json")).read_text())
    assert run["model_args"]["vocab_size"] == 50304 and run["config"]["tokenizer"] == "gpt2"
    assert (out / "tables.md").read_text().startswith("### 1x16x1")
    if not torch.cuda.is_available():
        assert gpu_map.main(["--data", str(gpt2_data_dir), "--out-dir", str(tmp_path / "x")]) == 2
        assert "no CUDA GPU here" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_lr_sweep_alone_and_its_bad_inputs(tmp_path, data_dir, capsys):
    out = tmp_path / "one"
    args = without_lr(train_args(data_dir, out, "--max-iters", "10", "--eval-interval", "10", "--diag-interval", "0"))
    assert sweep.main(args + ["--sdd", "--lrs", "1e-3", "1e-2"]) == 0  # the command line's config
    assert {r["model"] for r in stability.read_runs_csv(out / "runs.csv")} == {"pre-layernorm + sdd"}
    for bad, message in ((["--lrs"], "--lrs needs one or more learning rates > 0"),
                         (["--lrs", "0", "1e-3"], "--lrs needs one or more learning rates > 0"),
                         (["--lrs", "1e-3", "--lr", "1e-2"], "--lrs sets the peak learning rate of every run"),
                         (["--lrs", "1e-3", "--compare", "--lr 1e-2"], "drop --lr from '--lr 1e-2'"),
                         (["--lr=1e-2", "--lrs", "1e-3"], "--lrs sets the peak learning rate of every run"),
                         (["--lrs", "1e-3", "--min-lr", "5e-3"], "--min-lr (0.005) must not exceed --lr (0.001)")):
        assert sweep.main(args + ["--out-dir", str(tmp_path / "bad")] + bad) == 2
        assert message in capsys.readouterr().err, bad
        assert not (tmp_path / "bad").exists()
