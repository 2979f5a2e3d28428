"""Batched generation: left padding against batch-1 runs and transformers' generate, the decoder against the
model's forward, stop strings and stop tokens, seeds, and each sampling step against transformers' processors."""

import math

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.infer.decoder import Decoder
from minicpm.infer.generate import generate, generate_batch, generate_text, stream_text
from minicpm.infer.sampling import Sampling, penalize_repetition, warp
from minicpm.infer.text import TextStream
from minicpm.infer.tokenizer import TextCodec
from minicpm.interop.llama import export_llama
from minicpm.model.config import ModelConfig
from minicpm.model.build import build_model

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf  # noqa: E402


VOCAB = 300
PROMPTS = [[7, 100, 42, 9, 250, 3, 3, 18, 77], [1, 2], [55, 66, 77, 88, 99]]


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, max_position_embeddings=128)
    model = build_model(config, seed=0).requires_grad_(False)
    with torch.no_grad():  # norm gains away from 1, so that a misplaced norm would show
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def llama(model, tmp_path_factory):
    out = export_llama(model, tmp_path_factory.mktemp("llama"))
    return transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()


def greedy(model, prompts, n=24, **options):
    return [c.ids for c in generate_batch(model, prompts, max_new_tokens=n, temperature=0, **options)]


def left_padded(prompts, pad=0):
    longest = max(map(len, prompts))
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("pack", [False, True])
def test_decoder_logits_equal_the_models_forward_for_padded_rows(model, pack):
    prompts = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 5)]
    ids, _ = left_padded([p[:-4] for p in prompts])
    decoder = Decoder(model, [0, 7], max_len=12, pack=pack)
    logits = [decoder.prefill(ids)]
    for t in range(4):
        logits.append(decoder.step(torch.tensor([prompts[0][8 + t], prompts[1][1 + t]])))
    for row, prompt in enumerate(prompts):
        reference = model(torch.tensor([prompt]))[0, -5:]
        ours = torch.stack([step[row] for step in logits])
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_padded_rows_generate_what_they_generate_alone(model, pack):
    batched = greedy(model, PROMPTS, pack=pack)
    alone = [list(generate(model, p, max_new_tokens=24, temperature=0)) for p in PROMPTS]
    assert batched == alone
    assert all(len(row) == 24 for row in batched)


def test_greedy_batch_equals_transformers_generate_on_the_folded_llama(model, llama):
    ids, mask = left_padded(PROMPTS)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert greedy(model, PROMPTS) == out[:, ids.shape[1]:].tolist()


def test_repetition_penalty_in_the_loop_equals_transformers(model, llama):
    prompts = [[5, 5, 9, 12, 40], [200, 3, 3, 3, 3]]  # one length: transformers would also penalise pad tokens
    ids, mask = left_padded(prompts)
    out = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         repetition_penalty=3.0, pad_token_id=0, eos_token_id=None)
    assert greedy(model, prompts, n=20, repetition_penalty=3.0) == out[:, ids.shape[1]:].tolist()
    assert greedy(model, prompts, n=20, repetition_penalty=3.0) != greedy(model, prompts, n=20)


@pytest.mark.parametrize("penalty", [0.6, 1.3])
def test_repetition_penalty_matches_transformers_processor(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (3, 30), generator=g)  # repeats included
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    assert torch.equal(penalize_repetition(logits, seen, penalty), expected)


WARPS = [dict(top_k=1), dict(top_k=7), dict(top_k=1000), dict(top_p=0.1), dict(top_p=0.6), dict(top_p=0.95),
         dict(min_p=0.05), dict(min_p=0.3), dict(temperature=0.7), dict(temperature=1.8, top_k=20, top_p=0.8,
                                                                        min_p=0.02)]


@pytest.mark.parametrize("setting", WARPS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_logit_warpers_match_transformers(setting):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(len(str(setting)))) * 2
    chain = []
    if "temperature" in setting:
        chain.append(hf.TemperatureLogitsWarper(setting["temperature"]))
    if "top_k" in setting:
        chain.append(hf.TopKLogitsWarper(setting["top_k"]))
    if "top_p" in setting:
        chain.append(hf.TopPLogitsWarper(setting["top_p"]))
    if "min_p" in setting:
        chain.append(hf.MinPLogitsWarper(setting["min_p"]))
    expected = hf.LogitsProcessorList(chain)(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    ours = warp(logits, Sampling(**setting))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert torch.allclose(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)])
    if setting == dict(top_k=7):
        assert (~torch.isinf(ours)).sum(-1).tolist() == [7] * 6


def test_top_k_one_samples_the_greedy_token(model):
    assert greedy(model, PROMPTS, n=8) == [c.ids for c in generate_batch(model, PROMPTS, max_new_tokens=8, top_k=1,
                                                                         seed=3)]


def test_seeded_rows_sample_in_a_batch_as_they_do_alone(model):
    options = dict(max_new_tokens=16, temperature=1.3, top_p=0.9)
    seeds = [11, 12, 13]
    batched = [c.ids for c in generate_batch(model, PROMPTS, seed=seeds, **options)]
    alone = [generate_batch(model, [p], seed=[s], **options)[0].ids for p, s in zip(PROMPTS, seeds)]
    assert batched == alone
    assert batched[1] != greedy(model, [PROMPTS[1]], n=16)[0]
    one = torch.Generator().manual_seed(5)
    again = torch.Generator().manual_seed(5)
    assert ([c.ids for c in generate_batch(model, PROMPTS, generator=one, **options)] ==
            [c.ids for c in generate_batch(model, PROMPTS, generator=again, **options)])


def two_letter_codec():
    """Every token is two letters, so that a stop string can begin or end inside a token."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return TextCodec(encode=lambda text: [letters.index(c) for c in text],
                     decode=lambda ids: "".join(letters[i % 26] + letters[(i // 26) % 26] for i in ids),
                     vocab_size=VOCAB, eos_id=None)


def test_stop_strings_cut_each_row_where_the_first_one_begins(model):
    codec = two_letter_codec()
    prompts = ["abc", "hello", "zz"]
    options = dict(max_new_tokens=12, seed=[1, 2, 3])  # sampled, so that the text does not repeat itself
    full = generate_text(model, codec, prompts, **options)
    assert all(len(text) == 24 for text in full)
    # row 0 stops at a string that begins in the middle of its 3rd token; row 1 at one found late; row 2 never
    stops = [full[0][5:9], full[1][18:22], "never"]
    texts = generate_text(model, codec, prompts, stop=stops, **options)
    for text, whole in zip(texts, full):
        cut = min([i for i in (whole.find(s) for s in stops) if i >= 0], default=len(whole))
        assert text == whole[:cut]
    assert texts[0] == full[0][:5]
    done = generate_batch(model, [codec.encode(p) for p in prompts], stop=stops, decode=codec.decode, **options)
    assert [c.finish for c in done] == ["stop" if any(s in whole for s in stops) else "length" for whole in full]
    assert len(done[0].ids) == 5  # the token that completed the stop string is kept, the text cut before it


def test_streamed_text_holds_back_what_may_begin_a_stop_string(model):
    codec = two_letter_codec()
    whole = generate_text(model, codec, ["hello"], max_new_tokens=12, seed=4)[0]
    stop = whole[9:13]
    pieces = list(stream_text(model, codec, "hello", max_new_tokens=12, seed=4, stop=[stop]))
    assert "".join(pieces) == whole[:whole.find(stop)] and len(pieces) > 1
    stream = TextStream(lambda ids: "".join(ids), ["END"])
    assert [stream.push(c) for c in "abEN"] == ["a", "b", "", ""]
    assert [stream.push(c) for c in "Xy"] == ["ENX", "y"]
    assert [stream.push(c) for c in "zEND"] == ["z", "", "", ""] and stream.stopped and stream.text == "abENXyz"


def test_a_stop_token_ends_its_row_and_the_others_go_on(model):
    rows = greedy(model, PROMPTS, n=10)
    eos = rows[0][3]
    done = generate_batch(model, PROMPTS, max_new_tokens=10, temperature=0, stop_token_ids=[eos])
    for c, row in zip(done, rows):
        if eos in row:
            assert c.finish == "eos" and c.ids == row[:row.index(eos)]
        else:
            assert c.finish == "length" and c.ids == row


@pytest.mark.parametrize("setting, message", [
    (dict(temperature=-0.5), "temperature -0.5"),
    (dict(temperature=math.inf), "temperature inf"),
    (dict(temperature=math.nan), "temperature nan"),
    (dict(top_p=0.0), "top_p 0.0"),
    (dict(top_p=1.5), "top_p 1.5"),
    (dict(top_k=-1), "top_k -1"),
    (dict(min_p=1.0), "min_p 1.0"),
    (dict(min_p=-0.1), "min_p -0.1"),
    (dict(repetition_penalty=0.0), "repetition_penalty 0.0"),
    (dict(repetition_penalty=-1.0), "repetition_penalty -1.0"),
    (dict(max_new_tokens=0), "max_new_tokens 0"),
    (dict(prompts=[]), "prompt batch is empty"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, VOCAB]]), f"token id {VOCAB}"),
    (dict(seed=[1, 2]), "2 seeds for 3 prompts"),
    (dict(stop=["x"]), "stop strings need a decode function"),
])
def test_bad_settings_are_one_line_errors(model, setting, message):
    options = dict(prompts=PROMPTS, max_new_tokens=4)
    options.update(setting)
    with pytest.raises(MiniCPMError, match=message.replace("[", r"\[")) as error:
        generate_batch(model, options.pop("prompts"), **options)
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_compiled_decode_step_generates_what_the_eager_one_does(model):
    pytest.importorskip("torch._inductor")
    assert greedy(model, PROMPTS, n=6, compile=True) == greedy(model, PROMPTS, n=6, compile=False)


def decode_greedily(model, prompts, n, **options):
    """The Decoder's own greedy loop: (tokens (B, n), the decoder)."""
    longest = max(map(len, prompts))
    pads = [longest - len(p) for p in prompts]
    decoder = Decoder(model, pads, longest + n, **options)
    tokens = [decoder.prefill(left_padded(prompts)[0]).argmax(-1)]
    for _ in range(n - 1):
        tokens.append(decoder.step(tokens[-1]).argmax(-1))
    return torch.stack(tokens, 1), decoder


def test_auto_compile_decodes_eagerly_where_compiling_would_not_pay(model):
    tokens, decoder = decode_greedily(model, PROMPTS, 12)
    assert decoder.compile_choice is not None and not decoder.compile_choice.compile
    assert decoder.compile_choice.reason.startswith("eager (auto:")
    assert torch.equal(tokens, decode_greedily(model, PROMPTS, 12, compile=False)[0])


@pytest.mark.slow
def test_auto_compile_switches_to_the_static_compiled_step_where_it_pays(model, monkeypatch):
    # a fake device cost: compiling free and twice as fast, so that the rule compiles after its timed steps
    from minicpm.infer import decoder as decoding
    from minicpm.model.compiling import CompileCosts

    pytest.importorskip("torch._inductor")
    monkeypatch.setitem(decoding.DECODE_COMPILE_COSTS, "cpu", CompileCosts(0.0, 0.0, speedup=2.0))
    tokens, decoder = decode_greedily(model, PROMPTS, 12)
    assert decoder.compile_choice.compile
    assert torch.equal(tokens, decode_greedily(model, PROMPTS, 12, compile=False)[0])


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "short_factor": [1.0 + i / 8 for i in range(8)],
     "long_factor": [2.0 + i / 4 for i in range(8)], "original_max_position_embeddings": 8},
], ids=["dynamic", "longrope"])
def test_rows_cross_the_original_length_as_they_would_alone(rope_scaling):
    # frequencies that change with a sequence's length (dynamic NTK past L0, longrope's long factors) follow each
    # row's own length, so that rows crossing L0 at different steps still compute their batch-1 logits
    config = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16, max_position_embeddings=8,
                         rope_scaling=rope_scaling)
    model = build_model(config, seed=1).requires_grad_(False)
    prompts = [[7, 100, 42, 9, 250, 3, 18], [1, 2], [55, 66, 77, 88]]
    steps = torch.randint(0, VOCAB, (8, 3), generator=torch.Generator().manual_seed(0))
    ids, _ = left_padded(prompts)
    batch = Decoder(model, [7 - len(p) for p in prompts], max_len=15)
    batched = torch.stack([batch.prefill(ids)] + [batch.step(tokens) for tokens in steps], dim=1)
    for row, prompt in enumerate(prompts):
        alone = Decoder(model, [0], max_len=15)
        logits = [alone.prefill(torch.tensor([prompt]))] + [alone.step(tokens[row:row + 1]) for tokens in steps]
        assert torch.allclose(batched[row], torch.cat(logits), atol=1e-5, rtol=1e-5)
