"""
Hand-made mutants of each technique's math: a wrong constant, a dropped term, a swapped input. Each is applied to
a scratch copy of the repository (never to this tree), the tests named after its technique run there (-k), and
the mutant counts as killed when one of them fails. A mutant that survives marks a formula no test holds.

    python -m tools.mutants            # every mutant, ~3 minutes on 2 cores
    python -m tools.mutants 3 17       # some of them, by number
"""

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = [  # (file, what the mutant does, the tests that should fail it (-k), the code, the mutant)
    ('stable_gpt.py', 'RMSNorm drops its gain', 'rmsnorm or norm_eps or norm_class',
     'y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)',
     'y = F.rms_norm(x, self.weight.shape, None, self.eps)'),
    ('stable_gpt.py', 'SDDNorm drops its gain', 'sdd',
     'return F.rms_norm(x, self.weight.shape, self.weight, self.eps)',
     'return F.rms_norm(x, self.weight.shape, None, self.eps)'),
    ('stable_gpt.py', 'DyT without alpha', 'dyt',
     'y = torch.tanh(self.alpha * x) * self.weight',
     'y = torch.tanh(x) * self.weight'),
    ('stable_gpt.py', "DyT's alphas swapped", 'dyt',
     'DYT_ALPHA_ATTN, DYT_ALPHA_OTHER = 0.8, 0.2',
     'DYT_ALPHA_ATTN, DYT_ALPHA_OTHER = 0.2, 0.8'),
    ('stable_gpt.py', "SDD's attention output gain starts at 1", 'sdd',
     'self.out_norm = SDDNorm(config.n_embd, gain=config.scale_for_depth(1.0)) if sdd else nn.Identity()',
     'self.out_norm = SDDNorm(config.n_embd, gain=1.0) if sdd else nn.Identity()'),
    ('stable_gpt.py', 'SDD without the context norm', 'sdd',
     'self.context_norm = SDDNorm(config.n_embd) if sdd else nn.Identity()',
     'self.context_norm = nn.Identity()'),
    ('stable_gpt.py', 'SDD without the up-projection norm', 'sdd',
     'self.fc_norm = SDDNorm(4 * config.n_embd) if sdd else nn.Identity()',
     'self.fc_norm = nn.Identity()'),
    ('stable_gpt.py', 'LNS off by one layer', 'lns',
     'lns_scale = 1 / math.sqrt(layer_idx + 1) if',
     'lns_scale = 1 / math.sqrt(layer_idx + 2) if'),
    ('stable_gpt.py', 'LNS under SDD dropped', 'lns',
     'self.lns_branch_scale = lns_scale if config.sdd else None',
     'self.lns_branch_scale = None'),
    ('stable_gpt.py', 'DeepNorm alpha exponent', 'deepnorm',
     '(2 * config.n_layer) ** 0.25 if config.norm_position',
     '(2 * config.n_layer) ** 0.5 if config.norm_position'),
    ('stable_gpt.py', 'DeepNorm beta sign', 'deepnorm',
     'beta = (8 * c.n_layer) ** -0.25',
     'beta = (8 * c.n_layer) ** 0.25'),
    ('stable_gpt.py', 'Mix-LN rounds up', 'mix',
     'return layer_idx < math.floor(self.mix_fraction * self.n_layer + 1e-9)',
     'return layer_idx < math.ceil(self.mix_fraction * self.n_layer + 1e-9)'),
    ('stable_gpt.py', 'Peri-LN without the attention output norm', 'peri',
     'self.attn_out_norm = make_norm(config, config.n_embd) if peri else nn.Identity()',
     'self.attn_out_norm = nn.Identity()'),
    ('stable_gpt.py', 'reorder becomes Pre-LN in the attention', 'reorder or olmo2',
     'x = self._residual(self.hc_1, x, lambda h: self.ln_1(self.attn(h)))',
     'x = self._residual(self.hc_1, x, lambda h: self.attn(self.ln_1(h)))'),
    ('stable_gpt.py', 'LIR 1/l instead of 1/sqrt(l)', 'lir',
     'return [c.init_std * mup / math.sqrt(layer)] * len(kinds)',
     'return [c.init_std * mup / layer] * len(kinds)'),
    ('stable_gpt.py', 'TVR drops the mean', 'tvr',
     'rows.copy_((w - mean) * (target / std) + mean)',
     'rows.copy_(w * (target / std))'),
    ('stable_gpt.py', 'TVR ignores its threshold', 'tvr',
     'if std > threshold * target:',
     'if std > target:'),
    ('stable_gpt.py', 'WeSaR gates not divided by sigma', 'wesar',
     'module.gate.copy_(torch.tensor(stds) / self.config.wesar_sigma)',
     'module.gate.copy_(torch.tensor(stds))'),
    ('stable_gpt.py', 'WeSaR gates decayed', 'wesar',
     '            if id(p) in never_decayed:\n                return False',
     '            if id(p) in never_decayed:\n                return True'),
    ('stable_gpt.py', 'QK-norm forgets k', 'qk_norm',
     'q, k = self.q_norm(q.view(B, T, self.n_head, hs)), self.k_norm(k.view(B, T, self.n_head, hs))',
     'q, k = self.q_norm(q.view(B, T, self.n_head, hs)), k.view(B, T, self.n_head, hs)'),
    ('stable_gpt.py', 'full QK-norm forgets k', 'qk_norm',
     'q, k = self.q_norm(q), self.k_norm(k)',
     'q, k = self.q_norm(q), k'),
    ('stable_gpt.py', 'QK-Clip scales q and k by gamma, not sqrt', 'qk_clip',
     'row_scale = gamma.sqrt().repeat_interleave',
     'row_scale = gamma.repeat_interleave'),
    ('stable_gpt.py', "QK-Clip's logit without 1/sqrt(d)", 'qk_clip',
     'block_max = logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)).float() * scale',
     'block_max = logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3)).float()'),
    ('stable_gpt.py', 'gate computed from the context, not the input', 'gate',
     'y = y * torch.sigmoid(self.c_gate(x))',
     'y = y * torch.sigmoid(self.c_gate(y))'),
    ('stable_gpt.py', 'z-loss |log Z| not log^2 Z', 'z_loss',
     'z2 = log_z(logits).square()',
     'z2 = log_z(logits).abs()'),
    ('stable_gpt.py', 'z-loss in the val loss too', 'z_loss',
     'if self.training and self.config.z_loss > 0:',
     'if self.config.z_loss > 0:'),
    ('stable_gpt.py', 'soft-cap without its C', 'softcap',
     'return c * torch.tanh(logits / c) if c > 0 else logits',
     'return torch.tanh(logits / c) if c > 0 else logits'),
    ('stable_gpt.py', "Muon's learning-rate rule", 'muon',
     'weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)',
     'weight_decay=weight_decay, adjust_lr_fn="original"), adamw)'),
    ('stable_gpt.py', "nanoGPT's groups decay the gains", 'optimizer_groups or decay',
     'return id(p) not in embeddings if olmo_groups else p.dim() >= 2',
     'return id(p) not in embeddings if olmo_groups else p.dim() >= 1'),
    ('stable_gpt.py', "Post-LN's attention add outside the norm", 'post or mix or deepnorm',
     'x = self.ln_1(self._times(x, self.deepnorm_alpha) + self.attn(x))',
     'x = self.ln_1(self._times(x, self.deepnorm_alpha)) + self.attn(x)'),
    ('train_shakespeare.py', "OLMo 2's eps", 'olmo2',
     'z_loss=1e-5, norm="rmsnorm", norm_eps=1e-6',
     'z_loss=1e-5, norm="rmsnorm", norm_eps=1e-5'),
    ('train_shakespeare.py', 'independent decay coupled again', 'independent',
     'weight_decay = cfg.weight_decay / cfg.lr if cfg.independent_wd else cfg.weight_decay',
     'weight_decay = cfg.weight_decay'),
    ('tools/stability.py', 'the pairing broken', 'paired or map_verdicts or cover_the_truth',
     '    d = [x - y for x, y in zip(a, b)]',
     '    d = [x - y for x, y in zip(a, reversed(b))]'),
    ('tools/stability.py', 'unstable part not averaged', 'curve_stats or map_verdicts',
     '        per_seed["unstable"].append(sum(gap[lr] for lr in lrs if lr > best) / len(lrs))',
     '        per_seed["unstable"].append(sum(gap[lr] for lr in lrs if lr > best))'),
    ('tools/stability.py', 'sensitivity as a range', 'sensitivity or curve_stats',
     '    return statistics.fmean(values) - min(values)',
     '    return max(values) - min(values)'),
    ('tools/stability.py', 'collapse margin sign', 'failure_mode or counts_at',
     'final_val_loss >= unigram_loss - COLLAPSE_NATS',
     'final_val_loss >= unigram_loss + COLLAPSE_NATS'),
    ('stable_gpt.py', "QK-Clip's blocks miss the keys before their rows", 'qk_clip',
     'causal = torch.ones(stop - start, stop, dtype=torch.bool, device=q.device).tril(diagonal=start)',
     'causal = torch.ones(stop - start, stop, dtype=torch.bool, device=q.device).tril()'),
    ('tools/monitors.py', "skip-step's window one short", 'skip_step or skip_spikes',
     'del values[:-(self.window + 1)]',
     'del values[:-self.window]'),
    ('tools/monitors.py', "skip-step's z-score on every value, the latest included", 'skip_step or skip_spikes',
     '        previous = values[:-1]',
     '        previous = values'),
    ('tools/monitors.py', "ZClip without its adaptive scaling", 'zclip',
     'clip = self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None',
     'clip = self.mean + self.z_thresh * std if z > self.z_thresh else None'),
    ('tools/monitors.py', "ZClip's EMA takes the unclipped norm", 'zclip',
     '        passed = norm if clip is None else clip',
     '        passed = norm'),
    ('stable_gpt.py', "Muon's weight decay dropped", 'independent or muon',
     'weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"), adamw)',
     'weight_decay=0.0, adjust_lr_fn="match_rms_adamw"), adamw)'),
    ('stable_gpt.py', 'the sink logit not divided by the attention scale', 'sink',
     'self.sink.to(k.dtype) / self.attn_scale',
     'self.sink.to(k.dtype)'),
    ('stable_gpt.py', 'Sinkhorn normalizes the rows only', 'sinkhorn or hyper',
     'm = m / m.sum(dim=-2, keepdim=True)  # columns',
     'm = m  # columns'),
    ('stable_gpt.py', "mHC's H_post without its factor 2", 'hyper',
     'h_post = 2 * torch.sigmoid(beta)',
     'h_post = torch.sigmoid(beta)'),
    ('stable_gpt.py', "HC's dynamic H_pre and H_res without tanh", 'hyper',
     'alpha = torch.tanh(dynamic_alpha) * self.dynamic_alpha_scale + self.static_alpha',
     'alpha = dynamic_alpha * self.dynamic_alpha_scale + self.static_alpha'),
    ('stable_gpt.py', 'H_res applied untransposed', 'hyper',
     'torch.einsum("btsk,btsc->btkc", h_res, x.float())',
     'torch.einsum("btks,btsc->btkc", h_res, x.float())'),
    ('stable_gpt.py', 'every sublayer reads stream 0 at init', 'hyper',
     'h_pre[layer_index % n] = 1.0',
     'h_pre[0] = 1.0'),
    ('stable_gpt.py', "hc_gains' backward gain from the rows", 'hc_gains',
     'backward.append(composite.abs().sum(-2).amax().item())',
     'backward.append(composite.abs().sum(-1).amax().item())'),
    ('stable_gpt.py', "muP's attention scale 1/sqrt(hs)", 'mup',
     'self.attn_scale = 1 / head_size if config.mup else 1 / math.sqrt(head_size)',
     'self.attn_scale = 1 / math.sqrt(head_size)'),
    ('stable_gpt.py', "muP's output multiplier m instead of 1/m", 'mup',
     'x = x * (1 / self.config.mup_width_mult())',
     'x = x * self.config.mup_width_mult()'),
    ('stable_gpt.py', "muP's hidden learning rate x m instead of / m", 'mup',
     'scale = 1 / self.config.mup_width_mult()',
     'scale = self.config.mup_width_mult()'),
    ('stable_gpt.py', "muP's hidden init std x sqrt(m) instead of / sqrt(m)", 'mup',
     'mup = 1 / math.sqrt(c.mup_width_mult()) if c.mup else 1.0',
     'mup = math.sqrt(c.mup_width_mult()) if c.mup else 1.0'),
    ('train_shakespeare.py', "the loop ignores a group's lr_scale", 'mup',
     'group["lr"] = lr * group.get("lr_scale", 1.0)',
     'group["lr"] = lr'),
]


def copy_of_the_repository(where):
    """The four top-level files and tools/ (no data, no runs) in a scratch folder."""
    for name in ("stable_gpt.py", "train_shakespeare.py", "prepare_data.py", "test_stable_gpt.py"):
        shutil.copy(ROOT / name, where / name)
    shutil.copytree(ROOT / "tools", where / "tools", ignore=shutil.ignore_patterns("__pycache__"))


def run_tests(where, tests):
    """pytest -k tests in the copy: (exit code, the first test that FAILED: an assertion, not an error)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", tests,
                          "test_stable_gpt.py"], cwd=where, capture_output=True, text=True)
    failed = next((line.split(" ")[1] for line in run.stdout.splitlines() if line.startswith("FAILED")), None)
    return run.returncode, failed


def try_mutant(where, path, code, mutant, tests, passing):
    """"killed" (a test of the technique failed), "SURVIVED", "not found" (the code is no longer in the file:
    update the list), "tests fail without it" (the selection is broken: a kill would prove nothing), or the
    pytest exit of an error (no test ran to a verdict); and the first failing test. passing: {tests: bool}, each
    selection's result on the unmutated copy, filled on first use."""
    file = where / path
    source = file.read_text()
    if code not in source:
        return "not found", None
    if tests not in passing:
        passing[tests] = run_tests(where, tests)[0] == 0
    if not passing[tests]:
        return "tests fail without it", None
    file.write_text(source.replace(code, mutant, 1))
    try:
        code_, failed = run_tests(where, tests)
    finally:
        file.write_text(source)
    if code_ == 0:
        return "SURVIVED", None
    return ("killed", failed) if code_ == 1 and failed else (f"pytest exit {code_} without a failed test", None)


def main(argv=None):
    chosen = {int(a) for a in (sys.argv[1:] if argv is None else argv)}
    killed = tried = 0
    passing = {}
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        copy_of_the_repository(where)
        for k, (path, what, tests, code, mutant) in enumerate(MUTANTS):
            if chosen and k not in chosen:
                continue
            started = time.time()
            state, failed = try_mutant(where, path, code, mutant, tests, passing)
            tried, killed = tried + 1, killed + (state == "killed")
            print(f"{k:2d} {what}: {state} ({failed or '-'}; -k {tests!r}; {time.time() - started:.0f} s)", flush=True)
    print(f"killed {killed} of {tried}")
    return 0 if killed == tried else 1


if __name__ == "__main__":
    sys.exit(main())
