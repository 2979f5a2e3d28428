"""Generation: the KV cache against recomputation, sampling, streaming text, the byte-level tokenizer."""

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.infer.generate import TextStream, generate, sample_next, stream_text
from minicpm.data.tokenizer import EOS_ID, SPECIAL_TOKENS, byte_level_tokenizer
from minicpm.infer.tokenizer import TextCodec, load_codec
from minicpm.model.config import ModelConfig
from minicpm.model.build import build_model



@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, max_position_embeddings=128)
    return build_model(config, seed=0).requires_grad_(False)


@pytest.mark.parametrize("prompt", [[5], [1, 17, 42, 99, 250, 3, 3, 3]])
def test_greedy_with_kv_cache_equals_recomputation(model, prompt):
    cached = list(generate(model, prompt, max_new_tokens=40, temperature=0, use_cache=True))
    recomputed = list(generate(model, prompt, max_new_tokens=40, temperature=0, use_cache=False))
    assert len(cached) == 40 and cached == recomputed


def test_sampling_with_a_seed_is_reproducible_and_seeds_differ(model):
    run = lambda seed: list(generate(model, [1, 2, 3], max_new_tokens=20, seed=seed))  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)
    assert list(generate(model, [1, 2, 3], max_new_tokens=20, seed=7, use_cache=False)) == run(7)


def test_generation_stops_after_eos(model):
    first = next(generate(model, [4, 5], max_new_tokens=5, temperature=0))
    assert list(generate(model, [4, 5], max_new_tokens=5, temperature=0, eos_id=first)) == [first]


def test_bad_prompts_are_one_line_errors(model):
    with pytest.raises(MiniCPMError, match="empty"):
        list(generate(model, [], max_new_tokens=1))
    with pytest.raises(MiniCPMError, match="outside the model's vocabulary"):
        list(generate(model, [300], max_new_tokens=1))


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, top_p=0.5, generator=g) for _ in range(50)} == {1}
    assert {sample_next(logits, top_p=0.85, generator=g) for _ in range(200)} == {1, 2}
    assert sample_next(logits, temperature=0) == 1


def test_text_stream_never_prints_half_a_character(tmp_path):
    (tmp_path / "tokenizer.json").write_text(byte_level_tokenizer().to_str())
    codec = load_codec(tmp_path)
    assert codec.eos_id == EOS_ID and codec.vocab_size == len(SPECIAL_TOKENS) + 256
    text = "aé世🙂z"
    ids = codec.encode(text)
    assert len(ids) == len(text.encode())  # one token a byte: characters span several tokens
    stream = TextStream(codec.decode)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stream_text_stops_at_the_tokenizers_eos(model):
    first = next(generate(model, [3 + ord("a")], max_new_tokens=1, temperature=0))
    codec = TextCodec(encode=lambda s: [3 + b for b in s.encode()], decode=lambda ids: "".join(map(str, ids)),
                      vocab_size=259, eos_id=first)
    assert list(stream_text(model, codec, "a", max_new_tokens=5, temperature=0)) == []
