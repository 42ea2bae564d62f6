"""The o200k_harmony tokenizer: o200k_base (199998 ranks) + gpt-oss's special tokens 199998..201087.

Ranks come from tiktoken's normal download/cache of o200k_base, or from a local `.tiktoken` file
named by the environment variable GPTOSS_TIKTOKEN_FILE (or the `path` argument), whose sha256 is
checked. Nothing is fetched when a local file is given.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os

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


class TokenizerError(RuntimeError):
    pass


def _ranks_from_file(path: str) -> dict[bytes, int]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read the tokenizer file {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise TokenizerError(f"{path} is not o200k_base.tiktoken: sha256 {digest}, expected {O200K_BASE_SHA256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def get_tokenizer(path: str | None = None):
    """The o200k_harmony `tiktoken.Encoding`. `path` (or $GPTOSS_TIKTOKEN_FILE) is a local
    o200k_base.tiktoken; without one, tiktoken downloads/caches o200k_base as usual."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerError("the tokenizer needs tiktoken: pip install tiktoken") from None
    path = path or os.environ.get("GPTOSS_TIKTOKEN_FILE")
    if path:
        ranks = _ranks_from_file(path)
    else:
        try:
            ranks = tiktoken.get_encoding("o200k_base")._mergeable_ranks
        except Exception as e:  # network or cache failure
            raise TokenizerError(
                f"could not get o200k_base through tiktoken ({e}); set GPTOSS_TIKTOKEN_FILE to a local "
                "o200k_base.tiktoken") from None
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
