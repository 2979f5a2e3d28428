"""The decoder against DESIGN §3 written out independently, presets, caching and the official key names."""

import math

import pytest
import torch

from minicpm.errors import MiniCPMError
from minicpm.model.config import PRESETS, ModelConfig, preset
from minicpm.model.rope import inv_frequencies
from minicpm.model.transformer import MiniCPM
from minicpm.model.build import build_model



def small_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, dim_model_base=16, max_position_embeddings=64)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, seed: int = 0) -> MiniCPM:
    model = build_model(config, seed=seed)
    with torch.no_grad():  # gains away from 1 so that a misplaced norm weight shows
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def reference_logits(model: MiniCPM, ids: torch.Tensor) -> torch.Tensor:
    """DESIGN §3 spelled out: plain loops, explicit softmax attention, RoPE as complex rotation."""
    cfg, sd = model.config, model.state_dict()
    W = lambda k: sd[k].double()  # noqa: E731
    L, H, KV, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = ids.shape[1]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    def rotate(x):  # (T, heads, hd), pairs (j, j + hd/2) as one complex number
        freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        z = torch.complex(x[..., : hd // 2], x[..., hd // 2:])
        z = z * torch.polar(torch.ones(T, hd // 2, dtype=torch.float64),
                            torch.arange(T, dtype=torch.float64)[:, None] * freqs)[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    out = []
    for row in ids:
        h = cfg.scale_emb * W("model.embed_tokens.weight")[row]
        for i in range(L):
            p = f"model.layers.{i}."
            x = rms(h, W(p + "input_layernorm.weight"))
            q = rotate((x @ W(p + "self_attn.q_proj.weight").T).view(T, H, hd))
            k = rotate((x @ W(p + "self_attn.k_proj.weight").T).view(T, KV, hd))
            v = (x @ W(p + "self_attn.v_proj.weight").T).view(T, KV, hd)
            heads = []
            for head in range(H):
                kv = head // (H // KV)
                scores = q[:, head] @ k[:, kv].T / math.sqrt(hd)
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
                heads.append(torch.softmax(scores, -1) @ v[:, kv])
            h = h + cfg.scale_depth / math.sqrt(L) * (torch.cat(heads, -1) @ W(p + "self_attn.o_proj.weight").T)
            x = rms(h, W(p + "post_attention_layernorm.weight"))
            gate, up = x @ W(p + "mlp.gate_proj.weight").T, x @ W(p + "mlp.up_proj.weight").T
            h = h + cfg.scale_depth / math.sqrt(L) * ((torch.nn.functional.silu(gate) * up)
                                                       @ W(p + "mlp.down_proj.weight").T)
        head = W("model.embed_tokens.weight") if cfg.tie_word_embeddings else W("lm_head.weight")
        out.append(rms(h, W("model.norm.weight")) / (cfg.hidden_size / cfg.dim_model_base) @ head.T)
    return torch.stack(out)


@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_design_formulas(tied):
    model = random_model(small_config(tie_word_embeddings=tied))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = model(ids)
    assert ours.dtype == torch.float32 and ours.shape == (2, 12, 97)
    torch.testing.assert_close(ours.double(), reference_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_hidden_states_times_head_weight_are_the_logits():
    model = random_model(small_config())
    ids = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(model.hidden_states(ids) @ model.head_weight.T, model(ids))


def test_state_dict_keys_are_the_official_hf_names():
    model = MiniCPM(small_config(num_hidden_layers=1, tie_word_embeddings=False))
    assert sorted(model.state_dict()) == sorted([
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        *(f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkvo"),
        *(f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down"))])
    assert "lm_head.weight" not in MiniCPM(small_config(tie_word_embeddings=True)).state_dict()


def test_kv_cache_in_chunks_equals_one_full_forward():
    model = random_model(small_config())
    ids = torch.randint(0, 97, (2, 20))
    cache = model.new_cache(2, 20)
    chunks = [model(ids[:, :7], cache=cache, start_pos=0), model(ids[:, 7:8], cache=cache, start_pos=7),
              model(ids[:, 8:], cache=cache, start_pos=8)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), model(ids), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_gives_fp32_logits_close_to_fp32():
    model = random_model(small_config())
    ids = torch.randint(0, 97, (1, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(ids)
    assert low.dtype == torch.float32
    assert (low - model(ids)).abs().max() < 0.05 * model(ids).abs().max()


@pytest.mark.parametrize("name, non_embedding, total", [
    ("minicpm-1.2b", 1_247_442_432, 1_247_442_432 + 73_440 * 1536),
    ("minicpm-2.4b", 2_442_057_984, 2_442_057_984 + 122_753 * 2304),
])
def test_paper_parameter_counts_and_the_meta_built_model_agree(name, non_embedding, total):
    config = preset(name)
    assert config.non_embedding_params() == non_embedding
    with torch.device("meta"):
        model = MiniCPM(config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == config.total_params() == total


def test_every_preset_builds_and_its_counts_match_the_module():
    for name, config in PRESETS.items():
        with torch.device("meta"):
            model = MiniCPM(config)
        assert sum(p.numel() for p in model.parameters()) == config.total_params(), name


def test_config_round_trips_through_hf_json(tmp_path):
    config = small_config(rope_scaling={"type": "yarn", "factor": 4.0}, tie_word_embeddings=False)
    config.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path / "config.json") == config


def test_bad_config_values_are_one_line_errors(tmp_path):
    with pytest.raises(MiniCPMError, match="num_key_value_heads"):
        small_config(num_key_value_heads=3)
    with pytest.raises(MiniCPMError, match="rope_scaling type 'alibi'"):
        small_config(rope_scaling={"type": "alibi"})
    (tmp_path / "config.json").write_text('{"hidden_size": 64,')
    with pytest.raises(MiniCPMError, match="config.json: not valid JSON"):
        ModelConfig.load(tmp_path / "config.json")


def test_rope_scalings_change_frequencies_as_defined():
    plain, _ = inv_frequencies(64, 10000.0, None)
    linear, _ = inv_frequencies(64, 10000.0, {"type": "linear", "factor": 4.0})
    torch.testing.assert_close(linear, plain / 4)
    ntk, _ = inv_frequencies(64, 10000.0, {"type": "ntk", "factor": 4.0})
    torch.testing.assert_close(ntk, inv_frequencies(64, 10000.0 * 4.0 ** (64 / 62), None)[0])
    yarn, factor = inv_frequencies(64, 10000.0, {"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 4096})
    assert yarn[0] == plain[0] and torch.isclose(yarn[-1], plain[-1] / 4)  # fast dims kept, slow ones interpolated
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
