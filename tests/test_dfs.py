"""DFS over the KV cache against brute force: on a random Phi-3 with a 6-token vocabulary, every
completion of up to 4 tokens is scored by teacher forcing (one full forward each, no cache),
and the search must return exactly those at or above the threshold."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax.infer.dfs import dfs_per_task, stack_size
from arc_jax.model.lora import LoraConfig, init_lora, stack_lora
from arc_jax.model.phi3 import Phi3, Phi3Config
from arc_jax.train import ttft

VOCAB, EOS, PAD, N = 6, 1, 0, 4
LENGTHS = np.array([[5, 3, 7], [7, 2, 6]])  # [G, B] prompt lengths
WIDTH = 8


@pytest.fixture(scope="module")
def tiny():
    config = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, original_max_position_embeddings=64,
                        bos_token_id=2, eos_token_id=EOS, pad_token_id=PAD)
    model = Phi3(config)
    lora_config = LoraConfig(rank=2, alpha=4.0)

    @jax.jit
    def make(key):
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        # larger weights, so next-token distributions are peaked and depend on the prefix
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        params = jax.tree.unflatten(tree, [
            x if x.ndim == 1 else 0.3 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys, strict=True)])
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 1.5
        adapters = []
        for g in range(LENGTHS.shape[0]):
            lora = init_lora(jax.random.fold_in(key, 10 + g), params, lora_config)
            lora = jax.tree.map(lambda x, g=g: x + 0.3 * jax.random.normal(
                jax.random.fold_in(key, 20 + g), x.shape), lora)
            adapters.append(lora)
        return params, adapters

    params, adapters = make(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, VOCAB, size=(*LENGTHS.shape, WIDTH))
    prompts = np.where(np.arange(WIDTH) < LENGTHS[..., None], prompts, PAD).astype(np.int32)
    return model, params, lora_config, adapters, prompts


@functools.cache
def _forward(model, lora_config):
    return jax.jit(lambda p, lo, x: jax.nn.log_softmax(
        model.apply({"params": p}, x, lora=lo, lora_config=lora_config)))


def brute_force(model, params, lora, lora_config, prompt, length):
    """({completion: log-probability}, {prefix: log-probability}) of every eos-ended sequence
    of <= N tokens and of every eos-free prefix of < N tokens, each scored by a full forward
    pass of prompt + completion (teacher forcing)."""
    others = [t for t in range(VOCAB) if t != EOS]
    completions = [(*body, EOS) for n in range(N) for body in itertools.product(others, repeat=n)]
    ids = np.full((len(completions), WIDTH + N), PAD, np.int32)
    ids[:, :length] = prompt[:length]
    for r, c in enumerate(completions):
        ids[r, length:length + len(c)] = c
    logp = np.asarray(_forward(model, lora_config)(params, lora, ids))
    out, prefixes = {}, {}
    for r, c in enumerate(completions):
        partial = np.cumsum([logp[r, length - 1 + j, tok] for j, tok in enumerate(c)])
        out[c] = float(partial[-1])
        for d in range(1, len(c)):
            prefixes[c[:d]] = float(partial[d - 1])
    return out, prefixes


def found_sets(found):
    """[G][B] -> {completion: log-probability} of a `Found`."""
    g, b = found.n_found.shape
    return [[{tuple(found.tokens[i, j, k, : found.lengths[i, j, k]].tolist()):
              float(found.logprobs[i, j, k]) for k in range(found.n_found[i, j])}
             for j in range(b)] for i in range(g)]


def run_dfs(tiny, min_prob, **kw):
    model, params, lora_config, adapters, prompts = tiny
    return jax.device_get(dfs_per_task(
        model, params, stack_lora(adapters), prompts, LENGTHS, min_prob=min_prob,
        max_new_tokens=N, eos_token_id=EOS, pad_token_id=PAD, lora_config=lora_config, **kw))


@pytest.fixture(scope="module")
def exact(tiny):
    model, params, lora_config, adapters, prompts = tiny
    return {(i, j): brute_force(model, params, adapters[i], lora_config, prompts[i, j],
                                LENGTHS[i, j]) for i, j in np.ndindex(*LENGTHS.shape)}


@pytest.mark.parametrize("min_prob", [0.1, 0.02, 0.005])
def test_dfs_returns_exactly_the_completions_above_the_threshold(tiny, exact, min_prob):
    found = run_dfs(tiny, min_prob, max_candidates=64)
    got = found_sets(found)
    n_above = 0
    for i, j in np.ndindex(*LENGTHS.shape):
        completions, prefixes = exact[i, j]
        want = {c: lp for c, lp in completions.items() if lp >= np.log(min_prob)}
        # no sequence sits so close to the threshold that rounding could decide
        margins = [abs(lp - np.log(min_prob)) for lp in [*completions.values(),
                                                          *prefixes.values()]]
        assert min(margins) > 1e-3, (i, j, min(margins))
        assert set(got[i][j]) == set(want), (i, j)
        for c, lp in want.items():
            assert got[i][j][c] == pytest.approx(lp, abs=1e-4)
        assert found.exhausted[i, j]
        # each prefix above the threshold that can still end within N tokens is expanded
        # exactly once, and nothing else is
        expandable = [p for p, lp in prefixes.items() if lp >= np.log(min_prob)
                      and len(p) <= N - 1]
        assert found.steps[i, j] == len(expandable), (i, j)
        n_above += len(want)
    assert n_above >= 4  # the test is not about empty sets
    assert found.n_found.sum() == n_above


def test_caps_give_a_subset_and_say_so(tiny, exact):
    full = found_sets(run_dfs(tiny, 0.005, max_candidates=64))
    assert max(len(full[i][j]) for i, j in np.ndindex(*LENGTHS.shape)) > 2
    capped = run_dfs(tiny, 0.005, max_candidates=2)
    few = run_dfs(tiny, 0.005, max_candidates=64, max_steps=2)
    for i, j in np.ndindex(*LENGTHS.shape):
        for result in (capped, few):
            got = found_sets(result)[i][j]
            assert set(got) <= set(full[i][j])
        assert capped.n_found[i, j] == min(2, len(full[i][j]))
        if len(full[i][j]) > 2:
            assert not capped.exhausted[i, j]
        assert few.steps[i, j] <= 2


def test_sharded_over_devices_equals_one_device(tiny):
    model, params, lora_config, adapters, prompts = tiny
    lengths = np.concatenate([LENGTHS, LENGTHS[::-1]])
    prompts4 = np.concatenate([prompts, prompts[::-1]])
    lora = stack_lora(adapters + adapters[::-1])
    kw = dict(min_prob=0.02, max_candidates=16, max_new_tokens=N, eos_token_id=EOS,
              pad_token_id=PAD, lora_config=lora_config)
    one = jax.device_get(dfs_per_task(model, params, lora, prompts4, lengths, **kw))
    four = jax.device_get(dfs_per_task(model, params, lora, prompts4, lengths,
                                       mesh=ttft.device_mesh(ttft.TASKS), **kw))
    np.testing.assert_array_equal(one.tokens, four.tokens)
    np.testing.assert_allclose(one.logprobs, four.logprobs, atol=1e-5)


def test_stack_size():
    assert stack_size(0.1) == 11 and stack_size(1.0) == 2 and stack_size(0.3) == 4
    with pytest.raises(ValueError, match="min_prob"):
        stack_size(0.0)


# --- grid-constrained search -----------------------------------------------------------------
# A 16-token vocabulary that spells grids: 0 pad, 1 end, 2..11 the digits, 12 newline, 13 x,
# 14 space, 15 unused; numbers are spelled with the digits.
G_VOCAB, G_END = 16, 1


def grid_vocab():
    from arc_jax.data.tokenizer import PIECES, TokenVocab

    digits = np.arange(2, 12, dtype=np.int32)
    spelled = [[int(digits[int(c)]) for c in str(n)] for n in range(31)]
    numbers = np.full((31, 2), -1, np.int32)
    for n, ids in enumerate(spelled):
        numbers[n, : len(ids)] = ids
    pieces = np.full((len(PIECES), 1), -1, np.int32)
    pieces[PIECES.index("answer_suffix"), 0] = G_END
    piece_lens = np.zeros(len(PIECES), np.int32)
    piece_lens[PIECES.index("answer_suffix")] = 1
    return TokenVocab(digits=digits, newline=np.int32(12), numbers=numbers,
                      number_lens=np.asarray([len(s) for s in spelled], np.int32),
                      x=np.int32(13), space=np.int32(14), pieces=pieces, piece_lens=piece_lens,
                      pad=np.int32(PAD), end=np.int32(G_END))


@pytest.fixture(scope="module")
def grid_tiny():
    config = Phi3Config(vocab_size=G_VOCAB, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, original_max_position_embeddings=64,
                        bos_token_id=2, eos_token_id=G_END, pad_token_id=PAD)
    model = Phi3(config)
    key = jax.random.key(5)
    params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    params = jax.tree.unflatten(tree, [x if x.ndim == 1 else 0.3 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys, strict=True)])
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 4.0
    lengths = np.array([[5, 3], [7, 6]])
    prompts = np.random.default_rng(1).integers(2, G_VOCAB, size=(*lengths.shape, WIDTH))
    prompts = np.where(np.arange(WIDTH) < lengths[..., None], prompts, PAD).astype(np.int32)
    return model, params, prompts, lengths


def constrained_brute_force(model, params, grammar, prompt, length, min_prob, n):
    """{completion: constrained log-probability} of every well-formed grid of <= n tokens at
    or above `min_prob`, by expanding every prefix above it level by level, each level scored by
    full forward passes (no cache) and renormalised over the automaton's allowed tokens."""
    from arc_jax.infer import grammar as gm

    forward = _forward(model, None)
    allowed = jax.jit(lambda s: gm.allowed(grammar, s, G_VOCAB))
    level = [((), 0.0, gm.start(grammar, ()))]
    done = {}
    for depth in range(n):
        if not level:
            break
        ids = np.full((len(level), WIDTH + n), PAD, np.int32)
        ids[:, :length] = prompt[:length]
        for r, (path, _, _) in enumerate(level):
            ids[r, length:length + depth] = path
        logp = np.asarray(forward(params, None, ids))[:, length - 1 + depth]
        states = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, _, s in level])
        masked = np.asarray(gm.mask_log_probs(jnp.asarray(logp), allowed(states)))
        nxt = []
        for r, (path, lp, state) in enumerate(level):
            for tok in np.flatnonzero(masked[r] > -np.inf):
                child = lp + float(masked[r, tok])
                if child < np.log(min_prob):
                    continue
                if tok == G_END:
                    done[(*path, int(tok))] = child
                elif depth + 2 <= n:
                    nxt.append(((*path, int(tok)), child,
                                gm.advance(grammar, state, jnp.int32(tok))))
        level = nxt
    return done


# the smallest grids: "d\n<end>" (3 tokens) in minimal, "1 d\n<end>" (5) in numbered
@pytest.mark.parametrize("fmt_name,n,min_prob", [("minimal", 10, 0.005),
                                                  ("numbered", 10, 0.005)])
def test_constrained_dfs_returns_exactly_the_well_formed_grids_above_the_threshold(
        grid_tiny, fmt_name, n, min_prob):
    from arc_jax.data.formats import get_grid_format
    from arc_jax.infer import grammar as gm

    model, params, prompts, lengths = grid_tiny
    grammar = gm.grid_grammar(grid_vocab(), get_grid_format(fmt_name))
    found = jax.device_get(dfs_per_task(
        model, params, None, prompts, lengths, min_prob=min_prob, max_candidates=64,
        max_new_tokens=n, eos_token_id=G_END, pad_token_id=PAD, grammar=grammar))
    got = found_sets(found)
    n_above = 0
    for i, j in np.ndindex(*lengths.shape):
        want = constrained_brute_force(model, params, grammar, prompts[i, j], lengths[i, j],
                                       min_prob, n)
        assert set(got[i][j]) == set(want), (i, j, got[i][j], want)
        for c, lp in want.items():
            assert got[i][j][c] == pytest.approx(lp, abs=1e-4)
        assert found.exhausted[i, j]
        n_above += len(want)
    assert n_above >= 4
