"""Tiny random transformers Phi-3 models for parity tests."""
import numpy as np
import torch
import transformers

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    original_max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
CONFIGS = {
    "plain": {},
    # head_dim 16, rotary dim 8 -> 4 factors; sequences > 16 use the long factors.
    "gqa_longrope": dict(
        num_key_value_heads=2,
        original_max_position_embeddings=16,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            partial_rotary_factor=0.5,
            short_factor=[1.0, 1.3, 1.7, 2.5],
            long_factor=[2.0, 3.5, 6.0, 11.0],
        ),
    ),
    "tied": dict(tie_word_embeddings=True),
    "sliding": dict(sliding_window=5, num_key_value_heads=1),
}


def tiny_model(name: str, seed: int = 0) -> transformers.Phi3ForCausalLM:
    """Random fp32 Phi-3 with weights large enough that logits are O(1) and norms are not 1."""
    torch.manual_seed(seed)
    config = transformers.Phi3Config(**{**BASE, **CONFIGS[name]})
    model = transformers.Phi3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model


def logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
            attention_mask=None if mask is None else torch.from_numpy(np.asarray(mask, np.int64)),
        )
    return out.logits.numpy()


def generate(model, ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
    ids = torch.from_numpy(np.asarray(ids, np.int64))
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.pad_token_id,
        )
    new = out[:, ids.shape[1]:].numpy()
    pad = np.full((new.shape[0], max_new_tokens - new.shape[1]), model.config.pad_token_id)
    return np.concatenate([new, pad], axis=1)
