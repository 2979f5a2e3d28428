"""Tokenizers: training, special ids, byte coverage, loading (tokenizer.json, transformers, SentencePiece), hashing."""

import json

import pytest
from tokenizers import Tokenizer

from minicpm.data.tokenizer import (BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, SPECIAL_TOKENS, UNK_ID,
                                    byte_level_tokenizer, load_tokenizer, save_tokenizer, tokenizer_hash,
                                    train_tokenizer, vocab_size)
from minicpm.errors import MiniCPMError

CORPUS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "The quick brown fox jumps over the lazy dog. 1234567890 naïve café 日本語 😀\n",
    "\tindented with tabs\n\t\tand more tabs\n" * 3,
] * 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(CORPUS):
        (corpus / f"{i:03d}.txt").write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("tok")
    return corpus, train_tokenizer([str(corpus)], 400, out)


def test_special_tokens_have_the_official_minicpm_ids(trained):
    tok = load_tokenizer(trained[1])
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (UNK_ID, BOS_ID, EOS_ID) \
        == (0, 1, 2)
    assert tok.token_to_id("<|im_start|>") == IM_START_ID and tok.token_to_id("<|im_end|>") == IM_END_ID
    assert [tok.id_to_token(i) for i in range(len(SPECIAL_TOKENS))] == list(SPECIAL_TOKENS)
    assert 300 < vocab_size(tok) <= 400


def test_tricky_text_round_trips_and_digits_split_and_whitespace_runs_stay_whole(trained):
    tok = load_tokenizer(trained[1])
    tok.encode_special_tokens = True
    for text in ["x = 1234\n\n\n\tif y:\n\t\treturn '😀 日本語 naïve'\n", "   \t \r\n", "</s><s> literal", "\x00\x7f"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    digits = tok.encode("x = 98765").tokens
    assert [t for t in digits if t.isdigit()] == list("98765")
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("a\n        b")]
    assert len([p for p in pieces if set(p) == {"Ġ"}]) == 1  # the indentation is one pre-token


def test_training_is_deterministic(trained, tmp_path):
    again = train_tokenizer([str(trained[0])], 400, tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(trained[1])
    assert again.read_bytes() == trained[1].read_bytes()


def test_transformers_loads_the_directory_with_the_same_ids(trained):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(trained[1].parent))
    tok = load_tokenizer(trained[1])
    text = "def add(a, b):\n    return a + b  # 42"
    assert hf(text)["input_ids"] == tok.encode(text).ids
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)


def test_byte_level_tokenizer_encodes_every_byte_one_token_each():
    tok = byte_level_tokenizer()
    assert vocab_size(tok) == len(SPECIAL_TOKENS) + 256
    every_byte = bytes(range(256)).decode("latin-1")  # 256 characters, not 256 bytes
    raw = "".join(chr(b) for b in range(128))  # ASCII: one byte each
    assert tok.encode(raw).ids == [len(SPECIAL_TOKENS) + b for b in range(128)]
    assert tok.decode(tok.encode(every_byte).ids) == every_byte
    assert tok.token_to_id("</s>") == EOS_ID


def test_hash_ignores_formatting_and_tells_tokenizers_apart(trained, tmp_path):
    tok = load_tokenizer(trained[1])
    compact = tmp_path / "compact.json"
    compact.write_text(tok.to_str(pretty=False))
    assert tokenizer_hash(compact) == tokenizer_hash(trained[1]) == tokenizer_hash(trained[1].parent)
    assert tokenizer_hash(byte_level_tokenizer()) != tokenizer_hash(tok)
    saved = save_tokenizer(byte_level_tokenizer(), tmp_path / "bytes")
    assert tokenizer_hash(saved) == tokenizer_hash(byte_level_tokenizer())


def test_bad_tokenizer_paths_and_sizes_are_one_line_errors(tmp_path):
    with pytest.raises(MiniCPMError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(MiniCPMError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(MiniCPMError, match=r"junk\.json: not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(MiniCPMError, match="--vocab-size 100: must be at least 272"):
        train_tokenizer(["stdlib"], 100, tmp_path / "small")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(MiniCPMError, match="empty corpus"):
        train_tokenizer([str(tmp_path / "blank.txt")], 300, tmp_path / "out")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_model_encodes_like_sentencepiece(tmp_path, model_type):
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS[:3] * 10), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, hard_vocab_limit=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = load_tokenizer(tmp_path / "sp.model")
    assert (tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (1, 2)
    for text in ["def add(a, b): return a + b", "The quick brown fox 123", "naïve café 😀 Ω", "Hello  world"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.encode(text).ids == [1] + sp.encode(text), text  # <s> first, as LlamaTokenizer's default
        assert tok.decode(tok.encode(text).ids) == sp.decode(sp.encode(text))
    assert tokenizer_hash(tmp_path / "sp.model") == tokenizer_hash(tok)


def test_trained_tokenizer_json_is_plain_tokenizers_format(trained):
    spec = json.loads(trained[1].read_text())
    assert spec["model"]["type"] == "BPE"
    assert isinstance(Tokenizer.from_file(str(trained[1])), Tokenizer)
