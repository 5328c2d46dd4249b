"""
Settings as command-line flags: what turns train_shakespeare.py's Settings dataclass (each setting defined once,
with its default, help and allowed range) into argparse flags, range checks and the default --out-dir name.
"""

import argparse
import math
import typing
from dataclasses import field, fields
from pathlib import Path

from stable_gpt import GPT2_SIZES, GPTConfig
from tools.oneline import OneLineParser  # noqa: F401 (the commands import it from here)
from tools.runs import TrainError

POSITIVE = (lambda v: isinstance(v, int) and v > 0, "a positive integer")
AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
FINITE_POSITIVE = (lambda v: 0 < v < math.inf, "a finite number > 0")  # NaN fails every comparison: refused too
FINITE_AT_LEAST_0 = (lambda v: 0 <= v < math.inf, "a finite number >= 0")


def setting(default, help, check=None, choices=None, out_dir=False, aliases=()):
    """A Settings field. check: (predicate, what it requires); out_dir: the setting names the default --out-dir."""
    return field(default=default, metadata=dict(help=help, check=check, choices=choices, out_dir=out_dir,
                                                aliases=aliases))


def model_setting(name, help, **kw):
    """A setting that is a GPTConfig field, with GPTConfig's default (GPTConfig checks its range)."""
    return setting(GPTConfig.__dataclass_fields__[name].default, help, **kw)


def add_flags(parser, settings_class, groups, shown_defaults, group=None):
    """One flag per field of settings_class (--n-layer for n_layer), a new argument group at each field named in
    groups ({first field: title}); shown_defaults: values the help gives as "the preset's" default. Defaults are
    not filled in (the parser's argument_default is SUPPRESS): what was given is known."""
    for f in fields(settings_class):
        group = parser.add_argument_group(groups[f.name]) if f.name in groups else group or parser
        kind = next((t for t in typing.get_args(f.type) if t is not type(None)), f.type)  # Optional[int] -> int
        preset_value = f" (default: the preset's; cpu: {shown_defaults[f.name]})" if f.name in shown_defaults else \
            f" (default: {f.default})" if f.default is not None else ""
        kw = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(type=kind)
        group.add_argument(f"--{f.name.replace('_', '-')}", *f.metadata["aliases"], dest=f.name,
                           choices=f.metadata["choices"], help=f.metadata["help"] + preset_value, **kw)


def check_ranges(settings):
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.metadata["check"] and value is not None and not f.metadata["check"][0](value):
            raise TrainError(f"--{f.name.replace('_', '-')} must be {f.metadata['check'][1]}, got {value}")


def default_out_dir(cfg):
    """out/<preset>[-<flags>][-<data>][-bpe], e.g. out/cpu-sdd-lns, or out/cpu-my for --data my.txt. The flags are
    the settings marked out_dir, in field order, where not at their default: a string as its value (post), a
    switch as its name (sdd, qknorm), a number as name and value (zloss0.0001)."""
    parts = [cfg.preset]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata["out_dir"] and value and value != f.default:
            name = f.name.replace("_", "")
            parts.append(value if isinstance(value, str) else name if value is True else f"{name}{value:g}")
    parts += [Path(cfg.data).stem] if cfg.data else []
    return str(Path("out") / "-".join(parts + (["bpe"] if cfg.tokenizer != "char" and not cfg.init_from else [])))


def saved_settings(given, ckpt, settings_class):
    """The base settings of a resumed run: the checkpoint's (defaults for settings added since), once the flags
    given that cannot change on resume are refused: the model's, the seed, the optimizer."""
    saved, model_keys = ckpt["config"], {f.name for f in fields(GPTConfig)}
    if changed := {k: (saved.get(k), v) for k, v in given.items() if k in model_keys and saved.get(k) != v}:
        raise TrainError("cannot resume with a different model: " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    defaults = {f.name: f.default for f in fields(settings_class)}
    groups = "it changes the optimizer's parameter groups, so the checkpoint's optimizer state would not fit"
    for key, why in (("seed", "it sets the evaluation batches, so the losses would not compare"),
                     ("optimizer", "the checkpoint holds the other one's state"),
                     ("preset", "a resumed run keeps its checkpoint's settings, which a preset would not change"),
                     ("olmo2", groups), ("olmo_decay", groups), ("sdd_official_decay", groups)):
        old = saved.get(key, defaults[key])  # a checkpoint from before a setting existed ran its default
        if given.get(key, old) != old:
            flag = key.replace("_", "-")
            raise TrainError(f"cannot resume with another --{flag} ({old} -> {given[key]}): {why}; drop --{flag}")
    return dict(defaults, **{k: v for k, v in saved.items() if k in defaults})


def gpt2_architecture(init_from, given, settings_class):
    """The settings that --init-from takes from GPT-2's weights (shape, biases, plain Pre-LN, GPT-2 BPE); a flag
    given that would change them is refused."""
    defaults = {f.name: f.default for f in fields(settings_class)}
    fixed = dict(bias=True, norm="layernorm", norm_position="pre", sdd=False, lns=False, wesar=False, lir=False,
                 init_std=defaults["init_std"], scaled_init=None, qk_norm=False, qk_norm_full=False, attn_gate=False,
                 logit_softcap=0.0,
                 mix_fraction=defaults["mix_fraction"], **GPT2_SIZES[init_from])
    if changed := [k for k in fixed if k in given and given[k] != fixed[k]]:
        raise TrainError(f"--init-from {init_from} loads GPT-2's architecture and weights; it cannot be combined "
                         f"with --{', --'.join(k.replace('_', '-') for k in changed)}")
    if given.get("tokenizer", "gpt2") != "gpt2":
        raise TrainError(f"--init-from {init_from} needs --tokenizer gpt2 (GPT-2's vocabulary)")
    return dict(fixed, tokenizer="gpt2")
