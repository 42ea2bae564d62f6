"""The o200k_harmony tokenizer: o200k_base (199998 ranks) + gpt-oss's special tokens 199998..201087.

The o200k_base ranks ship inside the package (gptoss_ext/data/o200k_base.tiktoken.xz, the same
bytes as tiktoken's o200k_base.tiktoken, sha256 checked at load), so nothing is ever downloaded.
Overrides, in order: the `path` argument, then the environment variable GPTOSS_TIKTOKEN_FILE: a
local `.tiktoken` file (sha256 checked), or the word `tiktoken` for tiktoken's own download/cache.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import lzma
import os
from pathlib import Path

O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_BASE_RANKS = 199998
VOCAB_SIZE = 201088

# The pre-tokenisation pattern of o200k_base (the same one tiktoken uses).
O200K_PAT_STR = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

_NAMED = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
}


def special_tokens() -> dict[str, int]:
    """name -> id for every id in 199998..201087 (unnamed ones are <|reserved_N|>)."""
    return {_NAMED.get(i, f"<|reserved_{i}|>"): i for i in range(O200K_BASE_RANKS, VOCAB_SIZE)}


def special_tokens_by_id() -> dict[int, str]:
    """id -> name of the special tokens (the inverse of special_tokens)."""
    return {i: n for n, i in special_tokens().items()}


class TokenizerError(RuntimeError):
    pass


EMBEDDED_RANKS = Path(__file__).resolve().parent / "data" / "o200k_base.tiktoken.xz"


def _ranks_from_bytes(data: bytes, path: str) -> dict[bytes, int]:
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerError(f"{path} is not o200k_base.tiktoken: sha256 {digest}, expected {O200K_BASE_SHA256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _ranks_from_file(path: str) -> dict[bytes, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read the tokenizer file {path}: {e.strerror}") from None
    return _ranks_from_bytes(data, path)


def _embedded_ranks() -> dict[bytes, int]:
    try:
        data = lzma.decompress(EMBEDDED_RANKS.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise TokenizerError(f"the package's o200k_base ranks ({EMBEDDED_RANKS}) cannot be read ({e}): reinstall "
                             "gptoss-ext, or set GPTOSS_TIKTOKEN_FILE to a local o200k_base.tiktoken") from None
    return _ranks_from_bytes(data, str(EMBEDDED_RANKS))


def source(path: str | None = None) -> str:
    """Where the ranks come from: a file path, 'tiktoken', or 'embedded'."""
    return path or os.environ.get("GPTOSS_TIKTOKEN_FILE") or "embedded"


def get_tokenizer(path: str | None = None):
    """The o200k_harmony `tiktoken.Encoding`, from the package's own o200k_base ranks unless `path`
    (or $GPTOSS_TIKTOKEN_FILE) names a local o200k_base.tiktoken, or 'tiktoken' for tiktoken's own
    download/cache of o200k_base. Read once a source (`get_tokenizer()` and `get_tokenizer(None)`
    are the same one: a second read cost a second)."""
    return _tokenizer(source(path))


@functools.lru_cache(maxsize=4)
def _tokenizer(where: str):
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("the tokenizer needs tiktoken: pip install tiktoken") from None
    if where == "embedded":
        ranks = _embedded_ranks()
    elif where == "tiktoken":
        try:
            ranks = tiktoken.get_encoding("o200k_base")._mergeable_ranks
        except Exception as e:  # network or cache failure
            raise TokenizerError(
                f"could not get o200k_base through tiktoken ({e}); unset GPTOSS_TIKTOKEN_FILE to use the "
                "package's own copy") from None
    else:
        ranks = _ranks_from_file(where)
    if len(ranks) != O200K_BASE_RANKS:
        raise TokenizerError(f"o200k_base should have {O200K_BASE_RANKS} ranks, found {len(ranks)}")
    return tiktoken.Encoding(name="o200k_harmony", pat_str=O200K_PAT_STR, mergeable_ranks=ranks,
                             special_tokens=special_tokens())


def encode(text: str, allow_special: bool = True, path: str | None = None) -> list[int]:
    """Text -> ids; special-token strings in the text become their ids when allow_special."""
    enc = get_tokenizer(path)
    return enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())


def decode(tokens, path: str | None = None) -> str:
    return get_tokenizer(path).decode(list(tokens))


class StreamDecoder:
    """Turns a stream of ids into text pieces without splitting multi-byte UTF-8 characters."""

    def __init__(self, path: str | None = None):
        self._enc = get_tokenizer(path)
        self._pending = b""

    def push(self, token: int) -> str:
        self._pending += self._enc.decode_single_token_bytes(token)
        try:
            text = self._pending.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.reason == "unexpected end of data" and len(self._pending) - e.start < 4:
                # The last character is incomplete: emit what precedes it, keep the rest.
                text, self._pending = self._pending[:e.start].decode("utf-8", errors="replace"), self._pending[e.start:]
                return text
            text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text

    def flush(self) -> str:
        text = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        return text


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE vocabularies (GPT-2's, used by the
    Hugging Face tokenizer.json of gpt-oss)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def compare_hf_tokenizer(folder) -> tuple[bool, str] | None:
    """Whether a checkpoint folder's own tokenizer.json (Hugging Face) agrees with o200k_harmony:
    every o200k_base rank and every named special token at the same id. None when the folder (or its
    parent, for an original/ subfolder) has no tokenizer.json; else (agrees, a one-line account)."""
    import json

    folder = Path(folder)
    path = next((p for p in (folder / "tokenizer.json", folder.parent / "tokenizer.json") if p.is_file()), None)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        vocab = data["model"]["vocab"]
        added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"{path} cannot be read as a tokenizer.json ({e})"
    b2u = _bytes_to_unicode()
    ranks = get_tokenizer()._mergeable_ranks
    wrong = sum(1 for tok, rank in ranks.items() if vocab.get("".join(b2u[b] for b in tok)) != rank)
    specials = {name: i for i, name in _NAMED.items()}
    bad_special = sorted(n for n, i in specials.items() if n in added and added[n] != i)
    missing_special = sorted(n for n in specials if n not in added and n not in vocab)
    if wrong or bad_special or missing_special:
        parts = [f"{wrong} of {len(ranks)} o200k_base ranks differ" if wrong else "",
                 f"special tokens at other ids: {', '.join(bad_special)}" if bad_special else "",
                 f"special tokens missing: {', '.join(missing_special)}" if missing_special else ""]
        return False, f"{path} disagrees with o200k_harmony: " + "; ".join(p for p in parts if p)
    return True, f"{path} agrees with o200k_harmony ({len(ranks)} ranks, {len(specials)} named special tokens)"
