"""Cached decoding equals a no-cache loop and transformers; sampling, eos, stacked adapters."""
import functools
import logging

import hf_phi3
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.data.formats import answer_text, get_grid_format
from arc_jax.data.tasks import Pair, Task
from arc_jax.data.tokenizer import load_tokenizer, token_vocab
from arc_jax.infer.generate import generate, generate_per_task, max_answer_tokens, prompts_that_fit
from arc_jax.infer.inference import answer_token_cap
from arc_jax.model.convert import load_pretrained
from arc_jax.model.lora import LoraConfig, init_lora_stack, unstack_lora

PAD = 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (transformers model, Phi3, params): a tiny HF model loaded by arc_jax."""
    root = tmp_path_factory.mktemp("hf")

    @functools.cache
    def make(name):
        hf = hf_phi3.tiny_model(name)
        hf.save_pretrained(root / name)
        model, params = load_pretrained(str(root / name))
        return hf, model, params

    return make


@functools.cache
def _forward(model):
    """Jitted no-cache logits `[B, W, vocab]` for right-padded ids with positions 0 on padding,
    so LongRoPE switches by the longest row, as in a (padded) transformers batch."""
    def run(params, ids, lengths, lora=None, lora_config=None):
        mask = jnp.arange(ids.shape[1])[None] < lengths[:, None]
        pos = jnp.where(mask, jnp.arange(ids.shape[1])[None], 0)
        return model.apply({"params": params}, ids, pos, mask, lora=lora, lora_config=lora_config)

    return jax.jit(run)


def _prompts(seed, lengths, width):
    ids = np.random.default_rng(seed).integers(3, 128, size=(len(lengths), width))
    return np.where(np.arange(width)[None] < np.asarray(lengths)[:, None], ids, PAD)


def _no_cache_greedy(model, params, prompts, lengths, n, eos=()):
    """Greedy by a full forward per step; returns tokens and their log-probs `[B, n]`."""
    b, t = prompts.shape
    seq = np.full((b, t + n), PAD)
    seq[:, :t] = prompts
    cur, done = np.array(lengths), np.zeros(b, bool)
    tokens, logprobs = np.full((b, n), PAD), np.zeros((b, n), np.float32)
    for i in range(n):
        logits = _forward(model)(params, seq, cur)[np.arange(b), cur - 1]
        logp = np.asarray(jax.nn.log_softmax(logits))
        tok = logp.argmax(-1)
        tokens[:, i] = np.where(done, PAD, tok)
        logprobs[:, i] = np.where(done, 0.0, logp[np.arange(b), tok])
        seq[np.arange(b), cur] = tokens[:, i]
        done |= np.isin(tokens[:, i], eos)
        cur = cur + 1
    return tokens, logprobs


def _teacher_forced(model, params, prompts, lengths, tokens, lora=None, lora_config=None):
    """Logits `[B, n, vocab]` that predicted each of `tokens [B, n]` after its prompt."""
    b, t = prompts.shape
    n = tokens.shape[1]
    seq = np.full((b, t + n), PAD)
    seq[:, :t] = prompts
    rows, steps = np.arange(b)[:, None], np.arange(n)[None]
    idx = np.asarray(lengths)[:, None] + steps
    seq[rows, idx] = tokens
    logits = _forward(model)(params, seq, np.asarray(lengths) + n, lora, lora_config)
    return np.asarray(logits)[rows, idx - 1]


@pytest.mark.parametrize("name,lengths,width,n", [
    ("plain", [9, 4, 6], 11, 7),
    # Bucket wider than original_max_position_embeddings=16, longest prompt shorter: short
    # factors until the longest row reaches position 16 (step 3), then the cache is recomputed.
    ("gqa_longrope", [14, 9, 5], 18, 8),
])
def test_cache_matches_no_cache_loop(pair, name, lengths, width, n):
    _, model, params = pair(name)
    prompts = _prompts(1, lengths, width)
    out = generate(model, params, prompts, np.array(lengths), max_new_tokens=n,
                   eos_token_id=None, pad_token_id=PAD)
    tokens, logprobs = _no_cache_greedy(model, params, prompts, np.array(lengths), n)
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4)
    np.testing.assert_array_equal(out.lengths, n)
    assert not out.finished.any()


def test_matches_transformers_generate(pair):
    """Crosses original_max_position_embeddings while decoding; stops rows at eos like HF."""
    hf, model, params = pair("gqa_longrope")
    prompts = _prompts(4, [10] * 3, 10)
    out = generate(model, params, prompts, np.full(3, 10), max_new_tokens=12,
                   eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
    np.testing.assert_array_equal(out.tokens, hf_phi3.generate(hf, prompts, 12))


def test_sampling(pair):
    _, model, params = pair("plain")
    lengths = np.array([8, 5, 3, 8])
    prompts = _prompts(2, lengths, 8)
    sample = functools.partial(generate, model, params, prompts, lengths, max_new_tokens=10,
                               eos_token_id=None, pad_token_id=PAD)
    a, b = sample(key=jax.random.key(0), temperature=1.0), sample(key=jax.random.key(0),
                                                                   temperature=1.0)
    c = sample(key=jax.random.key(1), temperature=1.0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    # Log-probs are of the untempered model: the teacher-forced log_softmax at each sampled token.
    logits = _teacher_forced(model, params, prompts, lengths, np.asarray(a.tokens))
    want = np.take_along_axis(jax.nn.log_softmax(logits), np.asarray(a.tokens)[..., None], -1)
    np.testing.assert_allclose(a.logprobs, want[..., 0], atol=1e-4)
    # top_k=1 is greedy whatever the temperature; top_k=3 only draws from the 3 likeliest.
    greedy = sample()
    top1 = sample(key=jax.random.key(2), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-5)
    top3 = sample(key=jax.random.key(3), temperature=5.0, top_k=3)
    logits = _teacher_forced(model, params, prompts, lengths, np.asarray(top3.tokens))
    chosen = np.take_along_axis(logits, np.asarray(top3.tokens)[..., None], -1)
    assert ((logits > chosen).sum(-1) < 3).all()
    with pytest.raises(ValueError, match="PRNG key"):
        sample(temperature=1.0)


def test_eos_stops_row_and_pads(pair):
    _, model, params = pair("plain")
    lengths, n = np.array([9, 4, 6]), 7  # the shapes of the plain no-cache test: one program
    prompts = _prompts(1, lengths, 11)
    run = functools.partial(generate, model, params, prompts, lengths, max_new_tokens=n,
                            pad_token_id=PAD)
    free = run(eos_token_id=None)
    eos = int(free.tokens[0, 2])  # row 0 stops at step 2 or earlier
    out = run(eos_token_id=np.int32(eos))
    tokens, logprobs = _no_cache_greedy(model, params, prompts, lengths, n, (eos,))
    np.testing.assert_array_equal(out.tokens, tokens)
    np.testing.assert_allclose(out.logprobs, logprobs, atol=1e-4)
    assert out.finished[0]
    for row in range(3):
        stops = np.flatnonzero(free.tokens[row] == eos)
        k = int(stops[0]) + 1 if stops.size else n
        assert out.lengths[row] == k and out.finished[row] == bool(stops.size)
        np.testing.assert_array_equal(out.tokens[row, :k], free.tokens[row, :k])
        assert (out.tokens[row, k:] == PAD).all() and (out.logprobs[row, k:] == 0).all()


def test_per_task_adapters_equal_separate_runs(pair):
    """Two tasks' adapters over one base; their groups cross the LongRoPE switch at different
    steps (3 and 6)."""
    _, model, params = pair("gqa_longrope")
    lora_config = LoraConfig(rank=4, alpha=8.0)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: init_lora_stack(jax.random.key(0), params, lora_config, 2))
    stack = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), shapes)
    lengths = np.array([[14, 9], [6, 11]])
    prompts = np.stack([_prompts(5, lengths[0], 14), _prompts(6, lengths[1], 14)])
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=PAD, lora_config=lora_config)
    for sampling in ({}, dict(key=jax.random.key(7), temperature=1.0)):
        out = generate_per_task(model, params, stack, prompts, lengths, **kw, **sampling)
        keys = jax.random.split(sampling["key"], 2) if sampling else [None, None]
        for g in range(2):
            one = generate(model, params, prompts[g], lengths[g], lora=unstack_lora(stack, g),
                           **kw, **{**sampling, "key": keys[g]})
            np.testing.assert_array_equal(out.tokens[g], one.tokens)
            np.testing.assert_allclose(out.logprobs[g], one.logprobs, atol=1e-5)
    # The adapters matter: group 0 under a zero adapter (the base) differs.
    zero = jax.tree.map(jnp.zeros_like, unstack_lora(stack, 0))
    base = generate(model, params, prompts[0], lengths[0], lora=zero, **kw)
    assert (np.asarray(base.logprobs) != np.asarray(out.logprobs[0])).any()


def test_group_caps_cut_each_group_of_an_uncapped_decode(pair):
    """Group g's rows stop after `max_new_per_group[g]` tokens: a prefix of the uncapped decode,
    not finished unless eos came first; an eos before the cap still stops the row."""
    _, model, params = pair("plain")
    lengths = np.array([[9, 4], [6, 8], [5, 7]])
    prompts = np.stack([_prompts(s, lengths[s], 11) for s in range(3)])
    kw = dict(max_new_tokens=7, pad_token_id=PAD, lora_config=None)
    free = generate_per_task(model, params, None, prompts, lengths, eos_token_id=None, **kw)
    eos = int(free.tokens[2, 0, 1])  # group 2, row 0 stops at step 1 or earlier
    full = generate_per_task(model, params, None, prompts, lengths, eos_token_id=eos, **kw)
    caps = np.array([3, 7, 5])
    cut = generate_per_task(model, params, None, prompts, lengths, eos_token_id=eos,
                            max_new_per_group=caps, **kw)
    for g in range(3):
        for row in range(2):
            k = min(int(full.lengths[g, row]), caps[g])
            assert cut.lengths[g, row] == k
            assert cut.finished[g, row] == (bool(full.finished[g, row])
                                            and full.lengths[g, row] <= caps[g])
            np.testing.assert_array_equal(cut.tokens[g, row, :k], full.tokens[g, row, :k])
            np.testing.assert_allclose(cut.logprobs[g, row, :k], full.logprobs[g, row, :k],
                                       atol=1e-5)
            assert (cut.tokens[g, row, k:] == PAD).all() and (cut.logprobs[g, row, k:] == 0).all()
    assert cut.finished[2, 0] and not cut.finished[0].any()


def test_answer_token_cap_covers_same_fixed_and_scaled_outputs():
    """The cap is the answer length of the grid the rule allows (checked by encoding it), in
    the longer orientation: outputs of the input's size, of a fixed size, or 3x the input."""
    tokenizer = load_tokenizer()
    vocab = token_vocab(tokenizer)
    fmt = get_grid_format("shape_numbered")

    def answer_len(h, w):
        ids = tokenizer(answer_text(np.zeros((h, w), np.uint8), fmt), add_special_tokens=False)
        return len(ids["input_ids"])

    def task(pairs, test_shape):
        grid = lambda shape: np.zeros(shape, np.uint8)
        return Task("t", tuple(Pair(grid(i), grid(o)) for i, o in pairs),
                    (Pair(grid(test_shape), None),), "memory")

    same = task([((3, 4), (3, 4)), ((5, 2), (5, 2))], (7, 6))
    assert answer_token_cap(vocab, fmt, same, 0) == max(answer_len(7, 6), answer_len(6, 7))
    fixed = task([((9, 9), (2, 3)), ((4, 12), (2, 3))], (20, 20))
    # 2 x 3 fits; the ratio rule allows more: 20 * max(2/9, 2/4) = 10 rows, 20 * 3/9 -> 7 columns
    assert answer_token_cap(vocab, fmt, fixed, 0) == max(answer_len(10, 7), answer_len(7, 10))
    small = task([((9, 9), (2, 3)), ((12, 12), (2, 3))], (6, 6))  # the tallest output sets it
    assert answer_token_cap(vocab, fmt, small, 0) == max(answer_len(2, 3), answer_len(3, 2))
    scaled = task([((2, 2), (6, 6)), ((3, 1), (9, 3))], (4, 3))
    assert answer_token_cap(vocab, fmt, scaled, 0) == max(answer_len(12, 9), answer_len(9, 12))
    huge = task([((3, 3), (9, 9))], (20, 25))  # 60 x 75 clipped to 30 x 30
    assert answer_token_cap(vocab, fmt, huge, 0) == max_answer_tokens(vocab, fmt)


def test_prompts_that_fit(pair, caplog):
    _, model, _ = pair("plain")  # max_position_embeddings 64
    ids = ["a/0/0", "b/0/1", "c/1/0"]
    with caplog.at_level(logging.WARNING):
        keep = prompts_that_fit([10, 60, 56], 8, model.config, ids=ids)
    np.testing.assert_array_equal(keep, [True, False, True])
    assert "b/0/1 (60 tokens)" in caplog.text and "a/0/0" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        keep = prompts_that_fit([10, 50], 8, model.config, cache_len=57)
    np.testing.assert_array_equal(keep, [True, False])
    assert "row 1 (50 tokens)" in caplog.text
    caplog.clear()
    assert prompts_that_fit([10], 8, model.config).all() and not caplog.text


@pytest.mark.parametrize("fmt", ["minimal", "shape_numbered"])
def test_max_answer_tokens(fmt):
    tokenizer = load_tokenizer()
    vocab = token_vocab(tokenizer)
    text = answer_text(np.full((30, 30), 7), get_grid_format(fmt))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert max_answer_tokens(vocab, fmt) == len(ids) and ids[-1] == int(vocab.end)
