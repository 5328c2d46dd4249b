"""Tests for stable-gpt: tiny models on a synthetic text the tests write themselves (no Shakespeare needed).

    python -m pytest -q
"""

import json
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import prepare_data
import train_shakespeare
from stable_gpt import GPT, GPTConfig, LayerNorm, RMSNorm

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


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "synthetic.txt"
    path.write_text(synthetic_text())
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("data")
    prepare_data.prepare(text_file, out, "char")
    return out


def train_args(data_dir, out_dir, *extra):
    """Command-line arguments for a tiny training run on the synthetic data."""
    return ["--data", str(data_dir), "--out-dir", str(out_dir), "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-iters", "60", "--eval-interval", "20",
            "--eval-iters", "4", "--log-interval", "1", "--lr", "3e-3", "--warmup-iters", "5",
            "--max-new-tokens", "20", "--device", "cpu", *extra]


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# The model


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


def test_rmsnorm_cpu_backward_matches_autograd():
    """The hand-written CPU backward of RMSNorm gives the gradients of F.rms_norm."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 16, requires_grad=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    g = torch.randn(4, 6, 16)
    (norm(x) * g).sum().backward()
    gx, gw = x.grad.clone(), norm.weight.grad.clone()
    x.grad = None
    w = norm.weight.detach().clone().requires_grad_()
    (F.rms_norm(x, (16,), w, 1e-5) * g).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


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
    assert {"iter", "loss", "lr", "grad_norm", "ms"} <= set(log[1])
    assert (out / "ckpt.pt").is_file() and (out / "best.pt").is_file()
    printed = capsys.readouterr().out
    assert "ms/iter" in printed and "tok/s" in printed and "ETA" in printed and "--- sample ---" in printed


def test_resume_continues_exactly(tmp_path, data_dir):
    """Stop at iter 40 (of a 60-iter schedule) and resume: the next losses equal an uninterrupted run's, bit for bit."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_shakespeare.main(train_args(data_dir, full, "--dropout", "0.1")) == 0
    assert train_shakespeare.main(train_args(data_dir, part, "--dropout", "0.1", "--max-iters", "40",
                                             "--lr-decay-iters", "60")) == 0
    assert train_shakespeare.main(train_args(data_dir, part, "--resume", "--max-iters", "60")) == 0
    losses = lambda out: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in read_log(out)]
    assert losses(part) == losses(full)
    assert len([r for r in read_log(part) if r["iter"] > 40]) == 21  # 20 steps and the final eval


def test_resume_refuses_a_different_model(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    assert train_shakespeare.main(train_args(data_dir, out, "--max-iters", "5")) == 0
    assert train_shakespeare.main(train_args(data_dir, out, "--resume", "--n-embd", "64")) == 2
    assert "cannot resume with a different model: n_embd 32 -> 64" in capsys.readouterr().err


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


@pytest.mark.parametrize("extra, message", [
    (["--data", "/no/such/file.txt"], "input text not found"),
    (["--n-embd", "30", "--n-head", "4"], "divisible by n_head"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--block-size", "100000"], "fewer than one block"),
])
def test_training_script_bad_input(tmp_path, data_dir, capsys, extra, message):
    args = train_args(data_dir, tmp_path / "run", *extra)
    assert train_shakespeare.main(args) == 2
    assert message in capsys.readouterr().err
