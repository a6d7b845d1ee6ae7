"""The grid automaton against the format itself: every encoded grid is accepted token by token
(and the format's forced tokens are the only ones allowed), and every random walk through it
decodes to text that `parse_answer` reads as a grid, with the shipped ARC tokenizer and with the
published Phi-3 tokenizer (multi-token numbers)."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.data.formats import GRID_FORMATS, get_grid_format, parse_answer
from arc_jax.data.tokenizer import load_tokenizer, token_vocab
from arc_jax.infer import grammar as gm
from arc_jax.infer.scoring import answer_ids

PHI3 = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "phi-3-mini-4k-instruct"
SHAPES = [(1, 1), (3, 7), (12, 1), (30, 30), (10, 11), (2, 30)]


@functools.cache
def vocab_of(which: str):
    tokenizer = load_tokenizer(None if which == "arc" else PHI3)
    return tokenizer, token_vocab(tokenizer)


def tokenizers():
    names = ["arc"]
    if PHI3.exists():
        names.append("phi3")
    return names


@functools.cache
def _programs(vocab_size: int):
    allowed = jax.jit(lambda g, s: gm.allowed(g, s, vocab_size))
    return allowed, jax.jit(gm.advance)


def walk_allowed(grammar, tokens, vocab_size):
    """The allowed masks `[n, V]` before each of `tokens` and the state after all of them."""
    allowed, advance = _programs(vocab_size)
    state = gm.start(grammar, (1,))
    masks = []
    for tok in tokens:
        masks.append(np.asarray(allowed(grammar, state))[0])
        state = advance(grammar, state, jnp.asarray([tok]))
    return np.stack(masks), state


@pytest.mark.parametrize("which", tokenizers())
@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_every_encoded_grid_is_accepted_and_forced_tokens_are_forced(which, fmt_name):
    tokenizer, vocab = vocab_of(which)
    fmt = get_grid_format(fmt_name)
    grammar = gm.grid_grammar(vocab, fmt)
    rng = np.random.default_rng(0)
    digits = set(np.asarray(vocab.digits).tolist())
    for shape in SHAPES:
        grid = rng.integers(0, 10, size=shape)
        ids = answer_ids(vocab, fmt, grid)
        masks, state = walk_allowed(grammar, ids, len(tokenizer))
        assert all(masks[n, tok] for n, tok in enumerate(ids)), (shape, fmt_name)
        assert int(state.phase[0]) == gm.DONE
        choices = masks.sum(-1)
        only_colours = np.all(masks[:, sorted(digits)], -1) & (choices == len(digits))
        h, w = shape
        header = int(vocab.number_lens[h] + vocab.number_lens[w]) + 2  # "{h}x{w}\n"
        if fmt.shape_header:  # the shape is known: each cell is a colour, the rest is forced
            assert only_colours.sum() == h * w, (shape, fmt_name)
            assert (choices == 1).sum() >= len(ids) - h * w - header, (shape, fmt_name)
        else:  # the first row sets the width; after it each cell is a colour
            assert only_colours.sum() >= (h - 1) * (w - 1), (shape, fmt_name)


@pytest.mark.parametrize("which", tokenizers())
@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_random_walks_spell_well_formed_grids(which, fmt_name):
    tokenizer, vocab = vocab_of(which)
    fmt = get_grid_format(fmt_name)
    grammar = gm.grid_grammar(vocab, fmt)
    vocab_size = len(tokenizer)
    allowed, advance = _programs(vocab_size)
    walks = 12
    key = jax.random.key(1)
    state = gm.start(grammar, (walks,))
    # logits that favour ending rows and grids early keep the walks short
    bias = jnp.zeros(vocab_size).at[jnp.asarray(vocab.newline)].set(2.0)
    bias = bias.at[jnp.asarray(vocab.end)].set(3.0)
    tokens = []
    for n in range(2000):
        mask = allowed(grammar, state)
        logits = jax.random.normal(jax.random.fold_in(key, n), (walks, vocab_size)) + bias
        tok = jax.random.categorical(jax.random.fold_in(key, 10_000 + n),
                                     jnp.where(mask, logits, -jnp.inf))
        done = state.phase == gm.DONE
        tokens.append(np.where(done, -1, np.asarray(tok)))
        state = advance(grammar, state, tok)
        if bool(jnp.all(state.phase == gm.DONE)):
            break
    assert bool(jnp.all(state.phase == gm.DONE))
    tokens = np.stack(tokens, 1)
    for row in tokens:
        text = tokenizer.decode([int(t) for t in row if t >= 0])
        parsed = parse_answer(text, fmt)
        assert parsed.ok, (fmt_name, text, parsed.error)
        # and it is spelled exactly as the encoder spells that grid
        assert [int(t) for t in row if t >= 0] == answer_ids(vocab, fmt, parsed.grid)


@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_shape_bounds_hold_and_admit_every_grid_within_them(fmt_name):
    tokenizer, vocab = vocab_of("arc")
    fmt = get_grid_format(fmt_name)
    grammar = gm.grid_grammar(vocab, fmt)
    allowed, advance = _programs(len(tokenizer))
    bounds = np.asarray([[1, 1], [2, 7], [7, 2], [12, 30], [30, 3], [5, 5]], np.int32)
    # every grid within its bound is accepted
    rng = np.random.default_rng(2)
    for max_h, max_w in bounds:
        for shape in {(max_h, max_w), (1, max_w), (max_h, 1), (1, 1)}:
            ids = answer_ids(vocab, fmt, rng.integers(0, 10, size=shape))
            state = gm.start(grammar, (1,), np.asarray([[max_h, max_w]]))
            for tok in ids:
                assert bool(allowed(grammar, state)[0, tok]), (fmt_name, shape, max_h, max_w)
                state = advance(grammar, state, jnp.asarray([tok]))
            assert int(state.phase[0]) == gm.DONE
    # and random walks never leave it
    key = jax.random.key(4)
    state = gm.start(grammar, (len(bounds),), bounds)
    walks = [[] for _ in bounds]
    bias = jnp.zeros(len(tokenizer)).at[jnp.asarray(vocab.digits)].set(2.0)  # long rows
    for n in range(2000):
        mask = allowed(grammar, state)
        logits = jax.random.normal(jax.random.fold_in(key, n), mask.shape) + bias
        tok = jax.random.categorical(jax.random.fold_in(key, 100_000 + n),
                                     jnp.where(mask, logits, -jnp.inf))
        for r, t in enumerate(np.asarray(tok)):
            if int(state.phase[r]) != gm.DONE:
                walks[r].append(int(t))
        state = advance(grammar, state, tok)
        if bool(jnp.all(state.phase == gm.DONE)):
            break
    for (max_h, max_w), ids in zip(bounds, walks, strict=True):
        parsed = parse_answer(tokenizer.decode(ids), fmt)
        assert parsed.ok, parsed.error
        assert parsed.grid.shape[0] <= max_h and parsed.grid.shape[1] <= max_w


def test_masked_log_probs_renormalise_over_the_allowed_tokens():
    logp = jax.nn.log_softmax(jax.random.normal(jax.random.key(0), (3, 9)))
    mask = jnp.zeros((3, 9), bool).at[:, 2:5].set(True)
    out = np.asarray(gm.mask_log_probs(logp, mask))
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.isneginf(out[:, :2])) and np.all(np.isneginf(out[:, 5:]))
    np.testing.assert_allclose(out[:, 2] - out[:, 3], np.asarray(logp[:, 2] - logp[:, 3]),
                               rtol=1e-5)


SHIPPED = Path(__file__).resolve().parents[1] / "arc_jax" / "assets" / "arc_phi3_small"


@pytest.fixture(scope="module")
def shipped_prompts():
    """The shipped model and right-padded prompts `[2, T]` of two held-out training tasks."""
    from arc_jax.data.formats import prompt_text
    from arc_jax.data.tasks import load_tasks
    from arc_jax.model.convert import load_pretrained

    model, params = load_pretrained(str(SHIPPED))
    tokenizer = load_tokenizer(str(SHIPPED))
    tasks = load_tasks("kaggle2024/training")
    fmt = get_grid_format("shape_numbered")
    rows = []
    for task_id in ("d23f8c26", "a416b8f3"):  # held out (every:8), small outputs
        task = tasks[task_id]
        text = prompt_text([(p.input, p.output) for p in task.train], task.test[0].input, fmt)
        rows.append(tokenizer(text)["input_ids"])
    width = max(map(len, rows))
    prompts = np.zeros((len(rows), width), np.int32)
    for r, ids in enumerate(rows):
        prompts[r, : len(ids)] = ids
    return model, params, tokenizer, prompts, np.asarray([len(r) for r in rows]), fmt


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_decode_is_the_masked_teacher_forced_choice(shipped_prompts, temperature):
    from arc_jax.infer.generate import generate, max_answer_tokens

    model, params, tokenizer, prompts, lengths, fmt = shipped_prompts
    vocab = token_vocab(tokenizer)
    grammar = gm.grid_grammar(vocab, fmt)
    n = max_answer_tokens(vocab, fmt)
    out = jax.device_get(generate(
        model, params, prompts, lengths, max_new_tokens=n, eos_token_id=int(vocab.end),
        pad_token_id=int(vocab.pad), key=jax.random.key(3), temperature=temperature,
        grammar=grammar))
    assert out.finished.all()
    width = prompts.shape[1] + int(out.lengths.max())
    seq = np.zeros((len(prompts), width), np.int32)
    seq[:, : prompts.shape[1]] = prompts
    for r in range(len(prompts)):
        seq[r, lengths[r]: lengths[r] + out.lengths[r]] = out.tokens[r, : out.lengths[r]]
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, seq)
    for r in range(len(prompts)):
        gen = out.tokens[r, : out.lengths[r]]
        text = tokenizer.decode(gen.tolist())
        assert parse_answer(text, fmt).ok, text
        masks, state = walk_allowed(grammar, gen.tolist(), logits.shape[-1])
        assert int(state.phase[0]) == gm.DONE
        step = np.asarray(logits[r, lengths[r] - 1: lengths[r] - 1 + len(gen)], np.float32)
        want = np.asarray(gm.mask_log_probs(jax.nn.log_softmax(step), masks))
        np.testing.assert_allclose(out.logprobs[r, : len(gen)], want[np.arange(len(gen)), gen],
                                   atol=2e-4)
        if temperature == 0:
            np.testing.assert_array_equal(gen, np.argmax(np.where(masks, step, -np.inf), -1))
