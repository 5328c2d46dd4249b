"""
Turn a UTF-8 text into nanoGPT-format token files: train.bin / val.bin (uint16 token ids, the first 90% of
the text is train, the last 10% val) and meta.json (tokenizer, vocab size, and for char level the vocabulary).

    python prepare_data.py                                 # tiny Shakespeare, char level -> data/shakespeare_char/
    python prepare_data.py --tokenizer gpt2                # GPT-2 BPE                     -> data/shakespeare_gpt2/
    python prepare_data.py --input my.txt                  # -> the folder train_shakespeare.py --data my.txt reuses
    python prepare_data.py --input my.txt --out-dir data/my_char

Tiny Shakespeare is found at --input, else data/shakespeare/input.txt, else ../shared/data/tinyshakespeare/input.txt
beside the repository, and only then downloaded from the char-rnn repository (if there is a network).
train_shakespeare.py calls these functions itself, so running this script by hand is optional.
"""

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

from tools.oneline import OneLineParser

ROOT = Path(__file__).resolve().parent
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_LOCAL = ROOT / "data" / "shakespeare" / "input.txt"
# token files of texts given with --data, one folder per text and tokenizer (STABLE_GPT_CACHE moves it)
CACHE = Path(os.environ.get("STABLE_GPT_CACHE", ROOT / "data" / "cache"))
SHARED = ROOT.parent / "shared"  # a sibling folder some set-ups provide (the text and an offline BPE cache)
TOKENIZERS = ("char", "gpt2")


class DataError(ValueError):
    """A problem with the user's data, reported as one clear line."""


def find_shakespeare(input_path=None, download=True, flag="--input"):
    """Path of the tiny Shakespeare text (or of --input): the first of --input, data/shakespeare/input.txt,
    ../shared/data/tinyshakespeare/input.txt; else download it to data/shakespeare/input.txt. `flag` is the
    option the error messages tell the user to pass."""
    if input_path is not None:
        path = Path(input_path)
        if not path.is_file():
            raise DataError(f"input text not found: {path} (pass {flag} PATH to an existing UTF-8 text file)")
        return path
    for path in (SHAKESPEARE_LOCAL, SHARED / "data" / "tinyshakespeare" / "input.txt"):
        if path.is_file():
            return path
    if download:
        try:
            print(f"downloading tiny Shakespeare from {SHAKESPEARE_URL}")
            SHAKESPEARE_LOCAL.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                data = r.read()
            tmp = SHAKESPEARE_LOCAL.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, SHAKESPEARE_LOCAL)
            return SHAKESPEARE_LOCAL
        except OSError as e:
            reason = e
    else:
        reason = "download disabled"
    raise DataError(f"tiny Shakespeare not found locally and could not be downloaded ({reason}); "
                    f"pass {flag} PATH to a text file, or put it at {SHAKESPEARE_LOCAL}")


def read_text(path):
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}); "
                        "convert it, e.g. iconv -f latin1 -t utf-8") from None
    if not text:
        raise DataError(f"{path} is empty")
    return text


def _gpt2_encoding():
    """GPT-2's BPE (r50k_base is the same 50,257-token vocabulary as tiktoken's "gpt2"). tiktoken downloads
    it on first use; offline it needs TIKTOKEN_CACHE_DIR pointing at a cache that holds it."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")
    try:
        import tiktoken

        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # ImportError, or a network error wrapped by tiktoken/requests
        raise DataError(f"cannot load the GPT-2 BPE (tiktoken r50k_base): {type(e).__name__}: {e}. "
                        "Install tiktoken and, offline, set TIKTOKEN_CACHE_DIR to a folder holding its cached "
                        "file; or use --tokenizer char") from None


class Codec:
    """encode(str) -> list[int] and decode(list[int]) -> str, built from a meta.json dict."""

    def __init__(self, meta):
        self.meta = meta
        self.name = meta["tokenizer"]
        self.vocab_size = meta["vocab_size"]
        if self.name == "char":
            self.chars = meta["chars"]
            self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        elif self.name == "gpt2":
            self.enc = _gpt2_encoding()
        else:
            raise DataError(f"unknown tokenizer {self.name!r} in meta.json; valid: {', '.join(TOKENIZERS)}")

    def encode(self, text):
        if self.name == "gpt2":
            return self.enc.encode_ordinary(text)
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise DataError(f"characters not in the {len(self.chars)}-character vocabulary: "
                            f"{''.join(unknown)!r}; use only characters of the training text")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        if self.name == "gpt2":
            return self.enc.decode(list(ids))
        return "".join(self.chars[i] for i in ids)

    def prompt_ids(self, prompt=None):
        """The ids of a sample's prompt; None: a newline, or the vocabulary's first token where it has none."""
        if prompt is None:
            return self.encode("\n") if self.name == "gpt2" or "\n" in self.chars else [0]
        if not (ids := self.encode(prompt)):
            raise DataError("the prompt is empty after tokenization; give at least one character")
        return ids

    def decode_as_drawn(self, prompt, tokens):
        """Yield the text of prompt (ids) + tokens (an iterable of ids) piece by piece as the tokens come: a
        character whose BPE bytes are not all drawn yet waits for the rest."""
        ids, shown = list(prompt), ""
        for token in tokens:
            ids.append(token)
            text = self.decode(ids).rstrip("\ufffd")
            yield text[len(shown):]
            shown = text
        yield self.decode(ids)[len(shown):]  # what waited, if anything


def make_meta(text, tokenizer):
    if tokenizer == "char":
        chars = "".join(sorted(set(text)))
        if len(chars) > 65535:
            raise DataError(f"the text has {len(chars)} distinct characters; uint16 token files hold at most 65535")
        return {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    if tokenizer == "gpt2":
        return {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": _gpt2_encoding().n_vocab}
    raise DataError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(TOKENIZERS)}")


def prepare(text_path, out_dir, tokenizer="char"):
    """Tokenize text_path into out_dir/{train.bin, val.bin, meta.json}. Returns the meta dict."""
    text = read_text(text_path)
    meta = make_meta(text, tokenizer)
    ids = np.array(Codec(meta).encode(text), dtype=np.uint16)
    n_train = int(len(ids) * 0.9)
    meta.update(source=str(text_path), text_sha1=hashlib.sha1(text.encode()).hexdigest(),
                train_tokens=n_train, val_tokens=len(ids) - n_train)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(13, "no permission to write")
    except OSError as e:  # a read-only folder, a file in the way
        raise DataError(f"cannot write the token files into {out_dir} ({e.strerror or e}); prepare_data.py --out-dir "
                        "elsewhere, or set STABLE_GPT_CACHE to a writable folder for the cache of --data texts"
                        ) from None
    # meta.json is written last: a folder with a meta.json is complete. Each file is written under a name of
    # this process's own and renamed into place atomically, so two processes preparing the same text at once
    # (two runs, or torchrun's ranks) each rename a complete file, and the last one wins.
    part = f"{os.getpid()}.part"
    try:
        for name, arr in (("train.bin", ids[:n_train]), ("val.bin", ids[n_train:])):
            arr.tofile(out_dir / f"{name}.{part}")
            os.replace(out_dir / f"{name}.{part}", out_dir / name)
        (out_dir / f"meta.json.{part}").write_text(json.dumps(meta))
        os.replace(out_dir / f"meta.json.{part}", out_dir / "meta.json")
    finally:  # a Ctrl-C or a full disk leaves no partial file behind (a folder without meta.json is not used)
        for name in ("train.bin", "val.bin", "meta.json"):
            (out_dir / f"{name}.{part}").unlink(missing_ok=True)
    return meta


def load_meta(data_dir):
    """meta.json of a prepared folder. A folder with only train.bin/val.bin (nanoGPT's BPE scripts write no
    meta) is taken as GPT-2 BPE."""
    data_dir = Path(data_dir)
    if (data_dir / "meta.json").is_file():
        try:
            meta = json.loads((data_dir / "meta.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{data_dir / 'meta.json'} is not valid JSON ({e}); prepare the folder again") from None
        if not isinstance(meta, dict) or not {"tokenizer", "vocab_size"} <= set(meta):
            raise DataError(f"{data_dir / 'meta.json'} lacks tokenizer and vocab_size; prepare the folder again")
        if meta["tokenizer"] == "char" and len(meta.get("chars", "")) != meta["vocab_size"]:
            raise DataError(f"{data_dir / 'meta.json'} lists {len(meta.get('chars', ''))} characters for a vocabulary "
                            f"of {meta['vocab_size']}; prepare the folder again")
        if meta["tokenizer"] == "char" and len(set(meta["chars"])) != len(meta["chars"]):
            raise DataError(f"{data_dir / 'meta.json'}'s vocabulary repeats characters (two ids would decode alike); "
                            "prepare the folder again")
        return meta
    if (data_dir / "train.bin").is_file() and (data_dir / "val.bin").is_file():
        return {"tokenizer": "gpt2", "encoding": "r50k_base", "vocab_size": 50257}
    raise DataError(f"{data_dir} is not a prepared data folder (no meta.json, train.bin and val.bin); "
                    "run prepare_data.py --input TEXT --out-dir DIR, or pass a text file")


def cache_dir(text_path, tokenizer):
    """Where the tokens of a text given by path are kept (and found again by train_shakespeare.py --data)."""
    key = hashlib.sha1(str(Path(text_path).resolve()).encode()).hexdigest()[:8]
    return CACHE / f"{Path(text_path).stem}-{key}-{tokenizer}"


def ensure_prepared(data=None, tokenizer="char"):
    """The prepared folder for `data` (a text file, a prepared folder, or None for tiny Shakespeare),
    tokenizing on first use and reusing the cache while the text is unchanged."""
    if data is not None and Path(data).is_dir():
        return Path(data)
    if data is None:
        out_dir = ROOT / "data" / f"shakespeare_{tokenizer}"
        try:
            text_path = find_shakespeare(None, flag="--data")
        except DataError:
            if (out_dir / "meta.json").is_file():  # prepared earlier, and the text has gone since
                return out_dir
            raise
    else:
        text_path = find_shakespeare(data, flag="--data")
        out_dir = cache_dir(text_path, tokenizer)
    try:  # this project's own cache: a damaged meta.json is simply tokenized again
        meta = load_meta(out_dir) if (out_dir / "meta.json").is_file() else {}
    except DataError:
        meta = {}
    if meta.get("text_sha1") == hashlib.sha1(read_text(text_path).encode()).hexdigest():
        return out_dir
    print(f"tokenizing {text_path} ({tokenizer}) -> {out_dir}")
    prepare(text_path, out_dir, tokenizer)
    return out_dir


def load_prepared(data=None, tokenizer="char", block_size=1):
    """(data_dir, meta) for a run: ensure_prepared's folder, with its token files checked against the
    vocabulary and the context length (each split must hold more than one block)."""
    data_dir = ensure_prepared(data, tokenizer)
    meta = load_meta(data_dir)
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"{path} is missing")
        size = path.stat().st_size
        if size % 2:
            raise DataError(f"{path} has an odd number of bytes: not a file of uint16 token ids")
        if meta.get(f"{split}_tokens") not in (None, size // 2):  # prepare() records the counts it wrote
            raise DataError(f"{path} holds {size // 2} uint16 tokens, meta.json records {meta[f'{split}_tokens']}: "
                            "written with another dtype (uint32, int64?) or damaged; prepare the folder again")
        if size <= 2 * (block_size + 1):
            raise DataError(f"the {split} split has {size // 2} tokens, fewer than one block of "
                            f"{block_size} + 1; use a longer text or a smaller --block-size")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        if len(data) < 200_000_000 and int(data.max()) >= meta["vocab_size"]:  # a full scan, small data only
            raise DataError(f"{path} holds token id {int(data.max())}, outside the vocabulary of {meta['vocab_size']}")
    return data_dir, meta


def main(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="UTF-8 text file (default: tiny Shakespeare, found or downloaded)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="char", help="char level or GPT-2 BPE (tiktoken)")
    p.add_argument("--out-dir", help="output folder (default: data/shakespeare_<tokenizer> for tiny Shakespeare; "
                   "for --input, the cache folder that train_shakespeare.py --data reuses)")
    args = p.parse_args(argv)
    try:
        text_path = find_shakespeare(args.input)
        out_dir = args.out_dir or (ROOT / "data" / f"shakespeare_{args.tokenizer}" if args.input is None
                                   else cache_dir(text_path, args.tokenizer))
        meta = prepare(text_path, out_dir, args.tokenizer)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # prepare() has removed its partial files
        print("prepare_data: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
    print(f"{text_path} -> {out_dir}: vocab {meta['vocab_size']}, "
          f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens")


if __name__ == "__main__":
    main()
