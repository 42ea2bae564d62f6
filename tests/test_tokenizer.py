"""o200k_harmony from a local o200k_base file (nothing is fetched)."""

import pytest

from gptoss_ext import tokenizer as tok


def test_specials_and_vocab(tokenizer_file):
    enc = tok.get_tokenizer()
    assert enc.n_vocab == 201088
    expect = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002, "<|constrain|>": 200003,
              "<|channel|>": 200005, "<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008,
              "<|call|>": 200012, "<|reserved_200013|>": 200013, "<|reserved_201087|>": 201087}
    for name, i in expect.items():
        assert enc.encode(name, allowed_special="all") == [i]
        assert enc.decode([i]) == name
    assert len(tok.special_tokens()) == 201088 - 199998


def test_roundtrip_and_known_ids(tokenizer_file):
    text = "Hello world! <|start|>user<|message|>héllo 世界 🙂\n\n  code()"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Hello") == [13225]
    assert tok.encode("<|start|>", allow_special=False) != [200006]


def test_stream_decoder_keeps_multibyte_characters_whole(tokenizer_file):
    text = "世界 ok 🙂 é"
    ids = tok.encode(text)
    d = tok.StreamDecoder()
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_wrong_file_is_rejected(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGVsbG8= 0\n")
    with pytest.raises(tok.TokenizerError, match="sha256"):
        tok.get_tokenizer(str(bad))
    with pytest.raises(tok.TokenizerError, match="cannot read"):
        tok.get_tokenizer(str(tmp_path / "missing.tiktoken"))
