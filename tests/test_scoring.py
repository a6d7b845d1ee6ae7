"""Scoring candidates: the batched PoE pass against one teacher-forced forward per (view,
candidate); the augmentation undone before deduplication and scoring; count_logprob and poe
ranking by hand; cached results of one strategy never read by another."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import tiny

from arc_jax import run
from arc_jax.data import augment
from arc_jax.data.arrays import pad_tasks
from arc_jax.data.formats import answer_text, get_grid_format
from arc_jax.data.pipeline import eval_batch
from arc_jax.data.tasks import Pair
from arc_jax.infer.evaluate import Candidate, evaluate, grid_key, parse_candidate, rank
from arc_jax.infer.generate import max_answer_tokens
from arc_jax.infer.inference import (
    SCORE_VIEWS,
    EvalSettings,
    GroupCache,
    distinct_grids,
    evaluate_tasks,
    stream_key,
    view_augmentations,
)
from arc_jax.infer.scoring import answer_ids, score_answers
from arc_jax.model.lora import LoraConfig, init_lora, stack_lora
from arc_jax.model.phi3 import Phi3, Phi3Config
from arc_jax.train import ttft
from arc_jax.train.step import masked_nll


def _perturbed(seed, params, config, scale=0.2):
    """A random adapter (`a` and `b` non-zero, so it changes the outputs)."""
    shapes = jax.eval_shape(lambda: init_lora(jax.random.key(0), params, config))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: scale * rng.standard_normal(x.shape, np.float32), shapes)


def test_batched_scores_equal_one_forward_per_view_and_candidate():
    vocab = 16
    config = Phi3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, original_max_position_embeddings=64,
                        eos_token_id=1, pad_token_id=0)
    model = Phi3(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, params)  # peaked logits
    lora_config = LoraConfig(rank=2, alpha=4.0)
    g_n, k_n, c_n, width, a_n = 4, 3, 4, 12, 6
    adapters = [_perturbed(5 + g, params, lora_config) for g in range(g_n)]
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, width + 1, (g_n, k_n))
    prompts = np.where(np.arange(width) < lengths[..., None],
                       rng.integers(2, vocab, (g_n, k_n, width)), 0)
    answer_lengths = rng.integers(1, a_n + 1, (g_n, k_n, c_n))
    answers = np.where(np.arange(a_n) < answer_lengths[..., None],
                       rng.integers(0, vocab, (g_n, k_n, c_n, a_n)), 0)
    n_scored = 3  # the last candidate slot is padding
    got = np.asarray(score_answers(model, params, stack_lora(adapters), prompts, lengths,
                                   answers, answer_lengths, n_answers=n_scored,
                                   lora_config=lora_config))

    forward = jax.jit(lambda lo, ids: jax.nn.log_softmax(
        model.apply({"params": params}, ids, lora=lo, lora_config=lora_config)))
    want = np.zeros((g_n, k_n, c_n))
    for g, k, c in np.ndindex(g_n, k_n, n_scored):
        n, m = lengths[g, k], answer_lengths[g, k, c]
        ids = np.zeros((1, width + a_n), np.int32)
        ids[0, :n] = prompts[g, k, :n]
        ids[0, n:n + m] = answers[g, k, c, :m]
        logp = np.asarray(forward(adapters[g], ids))[0]
        want[g, k, c] = sum(logp[n - 1 + j, answers[g, k, c, j]] for j in range(m))
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    assert np.all(got[:, :, n_scored:] == 0)
    # what PoE sums: per group and candidate, over the views
    np.testing.assert_allclose(got.sum(1), want.sum(1), atol=1e-3)
    # the groups sharded over 4 devices: the same scores
    sharded = score_answers(model, params, stack_lora(adapters), prompts, lengths, answers,
                            answer_lengths, n_answers=n_scored, lora_config=lora_config,
                            mesh=ttft.device_mesh(ttft.TASKS))
    np.testing.assert_allclose(np.asarray(sharded), got, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    config = tiny("baseline")
    setup = run.load_setup(config, str(tmp_path_factory.mktemp("scoring")))
    tasks = run.load_task_list(config.data.eval, "", 0, config.data.task_ids)
    return setup, tasks


def _augmented_candidates(grid, augs, fmt, logprob=-0.5):
    """Candidates whose texts spell `grid` as seen under each augmentation of `augs`."""
    return [Candidate(a, answer_text(augment.apply_augmentation_np(a, grid), fmt), logprob)
            for a in augs]


def test_poe_undoes_augmentations_then_scores_each_distinct_grid(tiny_setup, tmp_path):
    setup, tasks = tiny_setup
    fmt, vocab = setup.pipeline.fmt, setup.vocab
    rng = np.random.default_rng(3)
    random_aug = lambda: augment.Augmentation(int(rng.integers(8)), rng.permutation(10))
    task = tasks[0]
    target = task.test[0].output
    other = (target + 1) % 10
    cands = (_augmented_candidates(target, [random_aug() for _ in range(3)], fmt)
             + _augmented_candidates(other, [random_aug()], fmt)
             + [Candidate(random_aug(), "not a grid", -1.0)])
    assert len({c.text for c in cands}) == 5  # the texts all differ ...
    grids = distinct_grids(cands, fmt)
    assert [grid_key(g) for g in grids] == [grid_key(target), grid_key(other)]  # ... 2 grids

    # Decoded candidates come from the resume cache, so only scoring runs.
    settings = EvalSettings(n_augmentations=2, max_new_tokens=16, scoring="poe", score_views=3)
    max_new = settings.max_new_tokens or max_answer_tokens(vocab, fmt)
    extra = {"views": settings.n_augmentations, "max_new": max_new}
    decoded = GroupCache(str(tmp_path), settings.cache_settings("decode") | extra)
    for t in tasks:
        for q in range(len(t.test)):
            group = cands if t is task and q == 0 else []
            decoded.put("decode", t.task_id, q, {"candidates": [
                {"dihedral": int(c.augmentation.dihedral),
                 "colors": np.asarray(c.augmentation.colors).tolist(), "text": c.text,
                 "logprob": c.mean_logprob} for c in group]})
            decoded.put("val", t.task_id, q, {"sum": 1.0, "count": 1.0})
    adapters = {i: _perturbed(i, setup.params, setup.lora, 0.05)
                for i in range(len(tasks))}
    key, seeds = setup.stream(run.EVAL), [run.task_seed(t.task_id) for t in tasks]
    out = evaluate_tasks(setup.model, setup.params, setup.tokenizer, vocab, setup.pipeline,
                         tasks, pad_tasks(tasks), adapters, setup.lora, settings, key, seeds,
                         setup.max_loss_tokens, cache_dir=str(tmp_path))
    assert set(out.poe_scores) == {(task.task_id, 0)}
    scores = out.poe_scores[(task.task_id, 0)]
    assert set(scores) == {grid_key(target), grid_key(other)}

    # Reference: each scoring view on its own, the grid as the test output of a copy of the
    # task, encoded by the pipeline and scored by the val-loss code (teacher forcing).
    views = view_augmentations(stream_key(key, SCORE_VIEWS, seeds[0], 0), 1, 3)
    nll = jax.jit(functools.partial(masked_nll, setup.model, setup.params, adapters[0],
                                    setup.lora, max_loss_tokens=setup.max_loss_tokens))
    encode = jax.jit(functools.partial(eval_batch, vocab=vocab, cfg=setup.pipeline, seq_len=512))
    for grid in (target, other):
        copy = dataclasses.replace(task, test=(Pair(task.test[0].input, grid),))
        total = 0.0
        for v in range(3):
            aug = jax.tree.map(lambda x, v=v: x[0, v], views)
            row = encode(pad_tasks([copy]), jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32),
                         jax.tree.map(lambda x: x[None], aug))
            seen = augment.apply_augmentation_np(jax.device_get(aug), grid)
            answer = np.asarray(row.tokens[0, row.prompt_length[0]:row.length[0]])
            assert answer.tolist() == answer_ids(vocab, fmt, seen)
            s, count = nll(batch=row)
            assert count == len(answer)
            total -= float(s)
        assert scores[grid_key(grid)] == pytest.approx(total, abs=1e-3)

    # ranked by those scores; the count is over the deduplicated grid's findings
    result = evaluate({t.task_id: t for t in tasks}, out.candidates, fmt, scoring="poe",
                      poe_scores=out.poe_scores).tests[task.task_id][0]
    best = max(scores, key=scores.get)
    assert grid_key(result.ranked[0].grid) == best
    counts = {grid_key(v.grid): v.count for v in result.ranked}
    assert counts == {grid_key(target): 3, grid_key(other): 1}


def _prediction(grid, logprob):
    """A parsed candidate spelling `grid` (identity view): whole log-prob `logprob` over 10
    tokens."""
    fmt = get_grid_format("shape_numbered")
    aug = augment.identity_augmentation()
    text = answer_text(np.asarray(grid, np.uint8), fmt)
    return parse_candidate(Candidate(aug, text, logprob / 10, logprob), fmt)


def test_count_logprob_and_poe_rank_by_hand():
    a, b, c = [[1]], [[2]], [[3, 3]]
    preds = [_prediction(a, -3.0), _prediction(a, -2.0), _prediction(b, -0.1),
             _prediction(c, -0.4), _prediction(a, -2.5)]
    # vote: a (3), then b and c (1 each) by mean per-token log-prob: b (-0.01) before c (-0.04)
    assert [v.grid.tolist() for v in rank(preds, "vote")] == [a, b, c]
    # count + mean log-prob: a 3 - 2.5 = 0.5, b 1 - 0.1 = 0.9, c 1 - 0.4 = 0.6
    ranked = rank(preds, "count_logprob")
    assert [v.grid.tolist() for v in ranked] == [b, c, a]
    assert [v.score for v in ranked] == pytest.approx([0.9, 0.6, 0.5])
    # poe: the given sums; an unscored grid comes last
    poe = {grid_key(np.asarray(a, np.uint8)): -7.0, grid_key(np.asarray(c, np.uint8)): -1.5}
    assert [v.grid.tolist() for v in rank(preds, "poe", poe)] == [c, a, b]
    with pytest.raises(ValueError, match="scoring"):
        rank(preds, "best")


def test_cached_results_of_one_strategy_are_not_read_by_another(tmp_path):
    vote = EvalSettings()
    # a vote decode keeps the key it had before DFS existed
    assert vote.cache_settings("decode") == {"n_augmentations": 8, "temperature": 0.0,
                                             "top_k": 0, "max_new_tokens": 0}
    dfs = EvalSettings(strategy="dfs")
    GroupCache(str(tmp_path), vote.cache_settings("decode")).put("decode", "t", 0, {"x": 1})
    assert GroupCache(str(tmp_path), dfs.cache_settings("decode")).get("decode", "t", 0) is None
    assert GroupCache(str(tmp_path), vote.cache_settings("decode")).get(
        "decode", "t", 0) == {"x": 1}
    loose = EvalSettings(strategy="dfs", dfs_min_prob=0.05)
    assert loose.cache_settings("decode") != dfs.cache_settings("decode")
    poe = EvalSettings(strategy="dfs", scoring="poe")
    assert poe.cache_settings("decode") == dfs.cache_settings("decode")  # decoding is shared
    assert poe.cache_settings("poe") != EvalSettings(strategy="dfs", scoring="poe",
                                                     score_views=4).cache_settings("poe")
