"""Every RoPE scaling against transformers' own initialisation and rotary module, below and beyond the original
length; the cos/sin cache; and the Llama export keeping rope_scaling with per-token NLL equal to transformers'."""

import inspect
import json
import random

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.interop.llama import export_llama
from minicpm.model.config import ModelConfig
from minicpm.model.rope import RotaryCache, inv_frequencies, ntk_theta, rope_cos_sin
from minicpm.model.build import build_model

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402


HEAD_DIM, THETA, ORIGINAL = 64, 10000.0, 64  # sequences of 32 and 200 tokens sit below and beyond ORIGINAL
_factors = random.Random(0)
SHORT = [1 + _factors.random() for _ in range(HEAD_DIM // 2)]
LONG = [1 + 10 * _factors.random() for _ in range(HEAD_DIM // 2)]

# name: (max_position_embeddings, rope_scaling)
CASES = {
    "default": (ORIGINAL, None),
    "linear": (ORIGINAL, {"rope_type": "linear", "factor": 2.5}),
    "dynamic": (ORIGINAL, {"rope_type": "dynamic", "factor": 4.0}),
    "dynamic-v4-key": (ORIGINAL, {"type": "dynamic", "factor": 2.0}),
    "yarn": (4 * ORIGINAL, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "yarn-attention-factor": (4 * ORIGINAL, {"rope_type": "yarn", "factor": 3.0, "attention_factor": 1.3,
                                             "beta_fast": 16, "beta_slow": 2,
                                             "original_max_position_embeddings": ORIGINAL}),
    "yarn-mscale-untruncated": (4 * ORIGINAL, {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707,
                                               "mscale_all_dim": 1.0, "truncate": False,
                                               "original_max_position_embeddings": ORIGINAL}),
    "yarn-no-original": (ORIGINAL, {"rope_type": "yarn", "factor": 8.0}),
    "longrope": (4 * ORIGINAL, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                "original_max_position_embeddings": ORIGINAL}),
    "longrope-factor": (ORIGINAL, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                   "factor": 8.0}),
    "llama3": (4 * ORIGINAL, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
}


def hf_config(max_position_embeddings: int, scaling: dict | None, theta: float = THETA):
    return transformers.LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, num_key_value_heads=4,
                                    head_dim=HEAD_DIM, max_position_embeddings=max_position_embeddings,
                                    rope_theta=theta, rope_scaling=dict(scaling) if scaling else None)


def our_config(max_position_embeddings: int, scaling: dict | None, **overrides) -> ModelConfig:
    fields = dict(vocab_size=11, hidden_size=4 * HEAD_DIM, intermediate_size=8, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_position_embeddings,
                  rope_theta=THETA, rope_scaling=scaling)
    fields.update(overrides)
    return ModelConfig(**fields)


def hf_init(config, seq_len: int):
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)


def hf_cos_sin(config, length: int):
    """What transformers' Llama uses for a sequence of `length` tokens (a fresh module: its dynamic update keeps
    state across calls)."""
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.arange(length)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize("seq_len", [32, 200])
@pytest.mark.parametrize("name", list(CASES))
def test_every_type_equals_transformers_below_and_beyond_the_original_length(name, seq_len):
    max_positions, scaling = CASES[name]
    reference = hf_config(max_positions, scaling)
    ref_inv_freq, ref_factor = hf_init(reference, seq_len)
    inv_freq, factor = inv_frequencies(HEAD_DIM, THETA, scaling, max_position_embeddings=max_positions,
                                       seq_len=seq_len)
    torch.testing.assert_close(inv_freq, ref_inv_freq, rtol=1e-6, atol=0)
    assert factor == pytest.approx(ref_factor, rel=1e-12)
    cos, sin = RotaryCache().cos_sin(our_config(max_positions, scaling), 0, seq_len)
    ref_cos, ref_sin = hf_cos_sin(reference, seq_len)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_static_ntk_is_transformers_default_rope_with_the_ntk_aware_base():
    inv_freq, factor = inv_frequencies(HEAD_DIM, THETA, {"type": "ntk", "factor": 4.0})
    reference, _ = hf_init(hf_config(ORIGINAL, None, theta=THETA * 4.0 ** (HEAD_DIM / (HEAD_DIM - 2))), 200)
    torch.testing.assert_close(inv_freq, reference, rtol=1e-6, atol=0)
    assert factor == 1.0 and ntk_theta(1e6, 4.0, 64) == pytest.approx(4.183e6, rel=1e-3)  # family.md §2.1


def test_su_is_longrope():
    scaling = {"type": "su", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 32}
    for seq_len in (16, 100):
        ours = inv_frequencies(HEAD_DIM, THETA, scaling, max_position_embeddings=128, seq_len=seq_len)
        reference = hf_init(hf_config(128, dict(scaling, type="longrope")), seq_len)
        torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=0)
        assert ours[1] == pytest.approx(reference[1])


def test_dynamic_changes_nothing_up_to_max_position_embeddings_and_grows_beyond():
    plain, _ = inv_frequencies(HEAD_DIM, THETA, None)
    dynamic = {"rope_type": "dynamic", "factor": 4.0}
    at = lambda n: inv_frequencies(HEAD_DIM, THETA, dynamic, max_position_embeddings=ORIGINAL, seq_len=n)[0]  # noqa
    assert torch.equal(at(1), plain) and torch.equal(at(ORIGINAL), plain)
    assert (at(ORIGINAL + 1)[1:] < plain[1:]).all() and (at(1000)[1:] < at(200)[1:]).all()
    assert at(200)[0] == plain[0] == 1.0  # the fastest dimension never changes


def test_config_reads_rope_fields_as_transformers_writes_them():
    v5 = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, intermediate_size=8, vocab_size=11,
                                  num_hidden_layers=1, max_position_embeddings=256, rope_theta=5e5,
                                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                "original_max_position_embeddings": 64}).to_dict()
    assert "rope_scaling" not in v5 or v5["rope_scaling"] is None  # v5 writes rope_parameters only
    config = ModelConfig.from_hf_dict(v5)
    assert config.rope_theta == 5e5 and config.rope_scaling["rope_type"] == "yarn"
    assert config.rope_scaling["original_max_position_embeddings"] == 64
    # Phi-3 style: original_max_position_embeddings beside rope_scaling wins over the scaling's own key
    phi3 = dict(vocab_size=11, hidden_size=256, num_attention_heads=4, intermediate_size=8, num_hidden_layers=1,
                max_position_embeddings=256, original_max_position_embeddings=32,
                rope_scaling={"type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                              "original_max_position_embeddings": 64})
    assert ModelConfig.from_hf_dict(phi3).rope_scaling["original_max_position_embeddings"] == 32


@pytest.mark.parametrize("scaling, match", [
    ({"type": "linear"}, "needs 'factor'"),
    ({"type": "yarn", "factor": 0.5}, "factor 0.5 for type yarn: expected a number >= 1"),
    ({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}, "set max_position_embeddings"),
    ({"type": "longrope", "short_factor": [1.0] * 3, "long_factor": LONG}, "short_factor .* list of 32 numbers"),
    ({"type": "llama3", "factor": 8.0}, "needs 'low_freq_factor'"),
    ({"type": "yarn", "factor": 2.0, "beta_fast": "fast"}, "beta_fast 'fast' .* expected a number"),
    ("yarn", "rope_scaling must be null or an object"),
])
def test_bad_rope_scaling_is_a_one_line_error(scaling, match):
    with pytest.raises(MiniCPMError, match=match):
        our_config(ORIGINAL, scaling)


# ---------------------------------------------------------------- the cache

def test_cos_sin_are_cached_per_length_device_and_dtype():
    cache, config = RotaryCache(), our_config(ORIGINAL, {"rope_type": "yarn", "factor": 4.0})
    cos, sin = cache.cos_sin(config, 0, 100)
    again = cache.cos_sin(config, 0, 100)
    assert again[0] is cos and again[1] is sin
    shorter, _ = cache.cos_sin(config, 10, 50)  # rows of the same table, not a recomputation
    assert shorter.data_ptr() == cos[10:].data_ptr() and shorter.shape[0] == 40
    doubled, _ = cache.cos_sin(config, 0, 100, dtype=torch.float64)
    assert doubled.dtype == torch.float64 and torch.equal(doubled, cos.double())
    config.rope_theta = 500.0  # the model's config changed: the old tables are dropped
    fresh, _ = cache.cos_sin(config, 0, 100)
    assert not torch.equal(fresh, cos)
    torch.testing.assert_close(fresh, rope_cos_sin(torch.arange(100), HEAD_DIM, 500.0, config.rope_scaling,
                                                   max_position_embeddings=ORIGINAL)[0], rtol=0, atol=0)


def test_dynamic_cache_recomputes_once_the_length_passes_the_original():
    cache, config = RotaryCache(), our_config(ORIGINAL, {"rope_type": "dynamic", "factor": 4.0})
    below, _ = cache.cos_sin(config, 0, ORIGINAL)
    assert cache.cos_sin(config, 0, 50)[0].data_ptr() == below.data_ptr()  # one table up to L0
    beyond, _ = cache.cos_sin(config, 0, 100)
    expected = rope_cos_sin(torch.arange(100), HEAD_DIM, THETA, config.rope_scaling,
                            max_position_embeddings=ORIGINAL)[0]
    assert torch.equal(beyond, expected) and not torch.equal(beyond[:ORIGINAL], below)
    assert cache.cos_sin(config, 0, 100)[0] is beyond
    longer, _ = cache.cos_sin(config, 0, 120)
    assert not torch.equal(longer[:100], beyond)
    step, _ = cache.cos_sin(config, 100, 101)  # one decoding step: the frequencies of a 101-token sequence
    torch.testing.assert_close(step[0], cache.cos_sin(config, 0, 101)[0][100], rtol=0, atol=0)
    assert cache.cos_sin(config, 0, ORIGINAL)[0] is below  # back to L0 or less: the original table again


def test_longrope_cache_switches_to_the_long_factors_beyond_the_original():
    config = our_config(4 * ORIGINAL, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                                       "original_max_position_embeddings": ORIGINAL})
    cache = RotaryCache()
    short, _ = cache.cos_sin(config, 0, ORIGINAL)
    long, _ = cache.cos_sin(config, 0, ORIGINAL + 1)
    assert not torch.equal(long[:ORIGINAL], short)
    assert cache.cos_sin(config, 0, ORIGINAL)[0] is short


def test_tables_made_in_inference_mode_serve_a_training_step():
    model = build_model(our_config(ORIGINAL, {"rope_type": "linear", "factor": 2.0}, hidden_size=64,
                                   dim_model_base=16), seed=0)
    ids = torch.randint(0, 11, (1, 20))
    with torch.inference_mode():
        model(ids)
    model(ids).sum().backward()  # would raise on an inference tensor saved for backward
    assert model.model.embed_tokens.weight.grad is not None


# ---------------------------------------------------------------- the Llama export

EXPORT_CASES = {
    "yarn": (256, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "dynamic": (64, {"rope_type": "dynamic", "factor": 4.0}),
    "longrope": (256, {"rope_type": "longrope", "short_factor": SHORT[:8], "long_factor": LONG[:8],
                       "original_max_position_embeddings": 64}),
    "llama3": (256, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}),
    "linear": (64, {"type": "linear", "factor": 4.0}),
}


def tiny_model(max_positions: int, scaling: dict):
    config = ModelConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, dim_model_base=16,
                         max_position_embeddings=max_positions, rope_scaling=scaling, tie_word_embeddings=False)
    model = build_model(config, seed=0)
    with torch.no_grad():  # gains away from 1; sharper attention and logits, so that a small RoPE error shows
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight", "lm_head.weight")):
                p.mul_(4)
    return model


def per_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_llama_export_keeps_rope_scaling_and_transformers_gives_our_per_token_nll(tmp_path, name):
    max_positions, scaling = EXPORT_CASES[name]
    model = tiny_model(max_positions, scaling)
    export_llama(model, tmp_path / "llama")
    written = json.loads((tmp_path / "llama" / "config.json").read_text())
    kind = scaling.get("rope_type", scaling.get("type"))
    assert written["rope_theta"] == model.config.rope_theta  # no folding into the base
    assert written["rope_scaling"]["rope_type"] == written["rope_parameters"]["rope_type"] == kind
    assert {k: v for k, v in scaling.items() if k != "type"}.items() <= written["rope_scaling"].items()
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    ids = torch.randint(0, 101, (1, 200), generator=torch.Generator().manual_seed(1))  # beyond the original 64
    with torch.no_grad():
        ours, theirs = per_token_nll(model(ids), ids), per_token_nll(llama(ids).logits, ids)
    assert (ours - theirs).abs().max().item() < 1e-4
    # the scaling mattered: the same weights with plain RoPE give other losses
    plain = tiny_model(max_positions, None)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (per_token_nll(plain(ids), ids) - ours).abs().max().item() > 1e-2


def test_dynamic_decoding_token_by_token_matches_transformers(tmp_path):
    """Beyond L0 each step's frequencies are those of the sequence so far; cached keys keep their old rotation."""
    model = tiny_model(64, {"rope_type": "dynamic", "factor": 4.0}).requires_grad_(False)
    export_llama(model, tmp_path / "llama")
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    ids = torch.randint(0, 101, (1, 80), generator=torch.Generator().manual_seed(2))
    cache, past = model.new_cache(1, 80), transformers.DynamicCache(config=llama.config)
    # the keyword is `cache` from transformers 5.2x, `past_key_values` before; the cache object fills in place
    keyword = "cache" if "cache" in inspect.signature(llama.forward).parameters else "past_key_values"
    with torch.no_grad():
        ours = [model(ids[:, :60], cache=cache)[:, -1]]
        theirs = [llama(ids[:, :60], use_cache=True, **{keyword: past}).logits[:, -1]]
        for t in range(60, 80):
            ours.append(model(ids[:, t:t + 1], cache=cache, start_pos=t)[:, -1])
            theirs.append(llama(ids[:, t:t + 1], use_cache=True, **{keyword: past}).logits[:, -1])
    torch.testing.assert_close(torch.stack(ours), torch.stack(theirs), rtol=0, atol=1e-4)
