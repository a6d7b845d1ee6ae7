"""The shipped model (`arc_jax/assets/arc_phi3_small`): it loads in arc_jax and in transformers with
the same logits, its tokenizer passes the on-device encoding check on every evaluation task, it is
trained (far below a random model's loss on held-out training tasks), and its card matches it."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from encode_check import assert_device_equals_tokenizer, identity

from arc_jax.data.arrays import pad_tasks
from arc_jax.data.encode import check_device_encoding
from arc_jax.data.formats import GRID_FORMATS
from arc_jax.data.pipeline import PipelineConfig, eval_batch
from arc_jax.data.pools import holdout_ids
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import load_tokenizer
from arc_jax.infer.inference import test_length as episode_length_of_test
from arc_jax.model.convert import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "arc_jax", "assets", "arc_phi3_small")


@pytest.fixture(scope="module")
def shipped():
    model, params = load_pretrained(SHIPPED)
    return model, params, load_tokenizer(SHIPPED)


@pytest.fixture(scope="module")
def summary():
    with open(os.path.join(SHIPPED, "training_summary.json")) as f:
        return json.load(f)


def _heldout_rows(tokenizer, fmt_name="shape_numbered", n_tasks=4, seq_len=1024):
    """Test episodes (all train pairs as context, identity view) of the first `n_tasks` held-out
    training tasks whose episode fits `seq_len`: the encoded batch `[n_tasks, seq_len]`."""
    training = load_tasks("kaggle2024/training")
    vocab = check_device_encoding(tokenizer, GRID_FORMATS[fmt_name])
    cfg = PipelineConfig(grid_format=fmt_name)
    tasks = [training[i] for i in holdout_ids("every:8", training)
             if episode_length_of_test(vocab, cfg.fmt, training[i], 0, answer=True) <= seq_len][:n_tasks]
    assert len(tasks) == n_tasks
    return eval_batch(pad_tasks(tasks), jnp.arange(n_tasks), jnp.zeros(n_tasks, jnp.int32),
                      identity(n_tasks), vocab=vocab, cfg=cfg, seq_len=seq_len)


def test_files_and_size():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md",
                 "training_curves.png", "training_summary.json"):
        assert os.path.exists(os.path.join(SHIPPED, name)), name
    total = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED))
    assert total <= 25e6


def test_card_matches_the_weights(shipped, summary):
    model, params, tokenizer = shipped
    assert summary["model"]["parameters"] == sum(np.size(x) for x in jax.tree.leaves(params))
    assert summary["model"]["num_hidden_layers"] == model.config.num_hidden_layers
    assert model.config.vocab_size >= len(tokenizer)
    card = open(os.path.join(SHIPPED, "README.md")).read()
    assert f"{summary['model']['parameters']:,}" in card
    assert f"{summary['training']['tokens']:,} real tokens" in card
    heldout_data = summary["data"]["holdout"]["ids"]
    assert heldout_data == list(holdout_ids("every:8", load_tasks("kaggle2024/training")))


@pytest.mark.parametrize("fmt_name", ["shape_numbered", "minimal"])
def test_device_encoding_equals_the_shipped_tokenizer_on_every_evaluation_task(shipped, fmt_name):
    tokenizer = shipped[2]
    tasks = list(load_tasks("kaggle2024/evaluation").values())
    vocab = check_device_encoding(tokenizer, GRID_FORMATS[fmt_name])
    assert assert_device_equals_tokenizer(tokenizer, vocab, fmt_name, tasks) == 419


def test_transformers_loads_it_with_arc_jax_logits(shipped):
    model, params, tokenizer = shipped
    batch = _heldout_rows(tokenizer, n_tasks=2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        SHIPPED, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert isinstance(hf, transformers.Phi3ForCausalLM)
    for row in range(2):
        n = int(batch.length[row])
        ids = np.asarray(batch.tokens[row, :n])[None]
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids),
                                      jnp.arange(n)[None], jnp.ones((1, n), bool)))
        with torch.no_grad():
            theirs = hf(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(ours[0, :, :len(tokenizer)], theirs[0, :, :len(tokenizer)],
                                   atol=2e-3, rtol=2e-3)


def test_it_is_trained_on_held_out_training_tasks(shipped):
    """The answer-token NLL on held-out training tasks (never trained on) is under half a random
    model's (ln of the 47 ids, about 3.85 nats)."""
    model, params, tokenizer = shipped
    batch = _heldout_rows(tokenizer)
    logits = model.apply({"params": params}, batch.tokens, batch.positions, batch.attention_mask)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.tokens[:, 1:, None], axis=-1)[..., 0]
    answer = batch.loss_mask[:, 1:]
    mean_nll = float(jnp.sum(nll * answer) / jnp.sum(answer))
    assert mean_nll < 0.5 * math.log(len(tokenizer)), mean_nll
