"""o200k_harmony from the package's embedded o200k_base (or a local file; nothing is fetched)."""

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


def test_embedded_ranks_are_the_default_and_equal_a_local_file(tokenizer_file, monkeypatch):
    monkeypatch.delenv("GPTOSS_TIKTOKEN_FILE", raising=False)
    assert tok.source() == "embedded"
    embedded = tok._embedded_ranks()
    assert embedded == tok._ranks_from_file(tokenizer_file)        # the same bytes, sha256 checked
    assert tok.get_tokenizer().n_vocab == tok.VOCAB_SIZE


def test_env_override_names_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTOSS_TIKTOKEN_FILE", str(tmp_path / "nope.tiktoken"))
    assert tok.source() == str(tmp_path / "nope.tiktoken")
    with pytest.raises(tok.TokenizerError, match="cannot read the tokenizer file"):
        tok.get_tokenizer()                  # (the cache is by source: the env var is read each call)


def _hf_tokenizer_json(path, ranks, shift_one=False, drop_special=None):
    """A Hugging Face tokenizer.json of these ranks (byte-level BPE vocabulary and the specials)."""
    import json

    b2u = tok._bytes_to_unicode()
    vocab = {"".join(b2u[b] for b in t): r for t, r in ranks.items()}
    if shift_one:
        first = next(iter(vocab))
        vocab[first] += 1
    added = [{"id": i, "content": n, "special": True} for n, i in tok.special_tokens().items() if n != drop_special]
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}))


def test_checkpoint_tokenizer_json_agreement(tmp_path):
    ranks = tok.get_tokenizer()._mergeable_ranks
    assert tok.compare_hf_tokenizer(tmp_path) is None                       # no tokenizer.json: nothing to say
    _hf_tokenizer_json(tmp_path / "tokenizer.json", ranks)
    ok, msg = tok.compare_hf_tokenizer(tmp_path / "original")              # the parent folder's file counts
    assert ok and "agrees" in msg
    _hf_tokenizer_json(tmp_path / "tokenizer.json", ranks, shift_one=True, drop_special="<|call|>")
    ok, msg = tok.compare_hf_tokenizer(tmp_path)
    assert not ok and "1 of 199998 o200k_base ranks differ" in msg and "<|call|>" in msg


def test_the_vocabulary_is_read_once_however_it_is_asked_for():
    from gptoss_ext import tokenizer as tok

    assert tok.get_tokenizer() is tok.get_tokenizer(None) is tok.get_tokenizer(tok.source())
    assert tok.StreamDecoder()._enc is tok.get_tokenizer()
