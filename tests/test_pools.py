"""Training pools: evaluation-overlap exclusion, held-out tasks, RE-ARC loading, pool episodes,
weighted source mixing, and a tiny finetune run on a pool source."""

import functools
import importlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arc_jax import run, settings
from arc_jax.data.augment import Augmentation, apply_augmentation_np
from arc_jax.data.encode import check_device_encoding
from arc_jax.data.formats import PromptTemplate, parse_answer, text_to_grid
from arc_jax.data.pipeline import (
    PipelineConfig,
    pool_fixed_length,
    pool_pair_length,
    pool_train_batch,
    split_pool,
)
from arc_jax.data.pools import (
    Exclusion,
    holdout_ids,
    pack_pools,
    parse_sources,
    pool_grids,
    task_pool,
)
from arc_jax.data.sample import sample_pool_episode
from arc_jax.data.tasks import Pair, PairError, Task, TaskError, load_tasks
from arc_jax.data.tokenizer import load_tokenizer
from arc_jax.model.convert import load_pretrained
from arc_jax.train import finetune

RE_ARC = Path(__file__).parents[2] / "shared" / "data" / "re_arc"
# RE-ARC tasks with small pairs (two fit 512 tokens); 007bbfb7 is held out by the default rule.
SMALL_RE_ARC = ("995c5fa3", "662c240a", "3eda0437", "007bbfb7")
TEMPLATE = PromptTemplate()
IDENTITY = np.arange(10, dtype=np.int32)


def _re_arc_dir(tmp_path, ids=SMALL_RE_ARC) -> str:
    if not (RE_ARC / "tasks").is_dir():
        pytest.skip(f"RE-ARC data not found at {RE_ARC}/tasks (see ../shared/data/re_arc)")
    out = tmp_path / "re_arc_tasks"
    out.mkdir()
    for task_id in ids:
        shutil.copy(RE_ARC / "tasks" / f"{task_id}.json", out / f"{task_id}.json")
    return str(out)


def _grid(*rows) -> np.ndarray:
    return np.asarray(rows, np.uint8)


def _task(task_id, *pairs, test=()) -> Task:
    return Task(task_id, tuple(Pair(a, b) for a, b in pairs),
                tuple(Pair(a, b) for a, b in test), "test")


@pytest.fixture(scope="module")
def vocab():
    return check_device_encoding(load_tokenizer(), PipelineConfig().fmt)


# ---------------------------------------------------------------------------------------------
# Exclusion and held-out tasks.


def test_exclusion_removes_evaluation_ids_and_dihedral_equal_pairs():
    a = _grid([1, 2, 3], [4, 5, 6])
    b = _grid([7, 0], [8, 9])
    c, d = _grid([3, 3], [3, 1]), _grid([6])
    evaluation = _task("e1", (a, b), test=[(c, d)])
    rot = lambda g, k: apply_augmentation_np(Augmentation(k, IDENTITY), g)
    training = {
        "e1": _task("e1", (d, d), (c, c)),  # an evaluation id: out whatever its pairs
        "t1": _task(
            "t1",
            (rot(a, 1), rot(b, 1)),  # the evaluation train pair, rotated: out
            (c.T, d.T),  # the evaluation test pair, transposed: out
            (a, c),  # only the input matches an evaluation grid: kept
            (c, b),  # only the output matches: kept
            (rot(a, 1), rot(b, 2)),  # each grid matches, under different transforms: kept
            test=[(rot(a, 6), rot(b, 6))],  # a test pair, flipped: out
        ),
        "t2": _task("t2", (a, b)),  # every pair out: the task goes
    }
    pools, report = Exclusion({"evaluation": [evaluation]}).apply(training)
    assert sorted(pools) == ["t1"]
    kept = [(p.input.tolist(), p.output.tolist()) for p in pools["t1"]]
    assert kept == [(a.tolist(), c.tolist()), (c.tolist(), b.tolist()),
                    (rot(a, 1).tolist(), rot(b, 2).tolist())]
    assert report["excluded_ids"] == {"evaluation": ["e1"]}
    assert report["pairs_of_excluded_ids"] == 2
    assert report["excluded_pairs"] == {"evaluation": 4}
    assert report["pairs_excluded_per_task"] == {"t1": 3, "t2": 1}
    assert report["emptied"] == ["t2"]
    assert (report["kept_tasks"], report["kept_pairs"]) == (1, 3)


def test_every_pair_of_all_eight_transforms_is_caught():
    a, b = _grid([1, 2, 3], [4, 5, 6]), _grid([1, 0], [0, 0], [2, 2])
    exclusion = Exclusion({"evaluation": [_task("e", (a, b))]})
    for k in range(8):
        aug = Augmentation(k, IDENTITY)
        pair = (apply_augmentation_np(aug, a), apply_augmentation_np(aug, b))
        pools, _ = exclusion.apply({"t": _task("t", pair, (b, a))})
        assert len(pools["t"]) == 1, k


def test_no_evaluation_data_enters_the_bundled_training_pools():
    """kaggle2024/training and arcagi2/training against kaggle2024/evaluation (and the held-out
    tasks): no evaluation id, and no pair equal to an evaluation pair under a dihedral
    transform, checked with the device augmentation's numpy twin."""
    evaluation = load_tasks("kaggle2024/evaluation")
    training = load_tasks("kaggle2024/training")
    held = holdout_ids("every:8", training)
    exclusion = Exclusion({"evaluation": evaluation.values(),
                           "holdout": [training[i] for i in held]})
    forbidden = set()
    for task in [*evaluation.values(), *(training[i] for i in held)]:
        for pair in task_pool(task):
            for k in range(8):
                aug = Augmentation(k, IDENTITY)
                forbidden.add((apply_augmentation_np(aug, pair.input).tobytes(),
                               apply_augmentation_np(aug, pair.input).shape,
                               apply_augmentation_np(aug, pair.output).tobytes(),
                               apply_augmentation_np(aug, pair.output).shape))
    reports = {}
    for name in ("kaggle2024/training", "arcagi2/training"):
        pools, reports[name] = exclusion.apply(load_tasks(name))
        assert not set(pools) & (set(evaluation) | set(held))
        for pairs in pools.values():
            for p in pairs:
                assert (p.input.tobytes(), p.input.shape, p.output.tobytes(),
                        p.output.shape) not in forbidden
    k24, a2 = reports["kaggle2024/training"], reports["arcagi2/training"]
    assert k24["excluded_ids"] == {"holdout": list(held)}
    # 40853293 (training) is 070dd51e (evaluation) up to a dihedral transform: all 3 pairs.
    assert k24["excluded_pairs"] == {"evaluation": 3} and k24["emptied"] == ["40853293"]
    assert len(a2["excluded_ids"]["evaluation"]) == 376  # ARC-AGI-1 evaluation tasks in it
    assert exclusion.duplicates(training) == {"40853293": "evaluation_duplicate"}


def test_copies_of_evaluation_tasks_leave_every_source(tmp_path, vocab):
    """40853293 copies evaluation task 070dd51e: its RE-ARC pool goes too, though no generated
    pair equals an evaluation pair."""
    config = importlib.import_module("configs.train_base_model").get_config()
    config.data.train = _re_arc_dir(tmp_path, ("40853293", SMALL_RE_ARC[0]))
    data = finetune.load_training_data(config, vocab, PipelineConfig().fmt)
    source = data.report["sources"][config.data.train]
    assert source["excluded_ids"] == {"evaluation_duplicate": ["40853293"]}
    assert source["excluded_pairs"] == {}
    assert data.report["duplicates_of_protected_tasks"] == {"40853293": "evaluation_duplicate"}
    assert {sp.task_id for sp in data.subpools} == {SMALL_RE_ARC[0]}


def test_holdout_rules():
    ids = [f"{i:08x}" for i in range(20)]
    assert holdout_ids("every:8", ids) == (ids[0], ids[8], ids[16])
    assert holdout_ids("every:8:3", reversed(ids)) == (ids[3], ids[11], ids[19])
    assert holdout_ids("b, a", ids) == ("a", "b")
    assert holdout_ids("none", ids) == holdout_ids("", ids) == ()
    default = holdout_ids("every:8")
    assert len(default) == 50 and default[:3] == ("007bbfb7", "06df4c85", "0dfd9992")


# ---------------------------------------------------------------------------------------------
# Config checks.


@pytest.mark.parametrize("key,value,message", [
    ("data.train", (("kaggle2024/training", 0.0),), "config.data.train"),
    ("data.train", (("kaggle2024/training", 1.0, 2),), "config.data.train"),
    ("data.train", ("kaggle2024/training", "kaggle2024/training"), "listed twice"),
    ("data.train", "/no/such/re_arc/tasks", "RE-ARC"),
    ("data.holdout", "every:0", "config.data.holdout"),
    ("data.subset", "every:4:4", "config.data.subset"),
    ("data.context_pairs", (3, 2), "config.data.context_pairs"),
])
def test_bad_training_data_keys_are_named(key, value, message):
    config = importlib.import_module("configs.train_base_model").get_config()
    config.data.train = "kaggle2024/training"
    section, leaf = key.split(".")
    config[section][leaf] = value
    with pytest.raises(settings.ConfigError, match=message):
        settings.check(config)


def test_sources_parse_from_a_name_or_weighted_pairs():
    assert parse_sources("kaggle2024/training") == (("kaggle2024/training", 1.0),)
    assert parse_sources([("a", 1), "b", ["c", 2.5]]) == (("a", 1.0), ("b", 1.0), ("c", 2.5))


# ---------------------------------------------------------------------------------------------
# RE-ARC pools.


def test_re_arc_pools_load_with_bad_pairs_and_files_reported(tmp_path):
    path = _re_arc_dir(tmp_path, SMALL_RE_ARC[:2])
    first = json.loads(Path(path, f"{SMALL_RE_ARC[0]}.json").read_text())
    raw = json.loads(Path(path, f"{SMALL_RE_ARC[1]}.json").read_text())
    raw[3]["output"] = [[1, 2], [3]]
    del raw[5]["input"]
    Path(path, f"{SMALL_RE_ARC[1]}.json").write_text(json.dumps(raw))
    Path(path, "empty.json").write_text("[]")
    Path(path, "broken.json").write_text("[{")
    report: list[TaskError] = []
    tasks = load_tasks(path, report=report)
    assert sorted(tasks) == sorted(SMALL_RE_ARC[:2])
    whole, damaged = tasks[SMALL_RE_ARC[0]], tasks[SMALL_RE_ARC[1]]
    assert len(whole.train) == len(first) and whole.test == ()
    assert whole.train[0].input.tolist() == first[0]["input"]
    assert all(p.input.dtype == np.uint8 for p in whole.train)
    assert len(damaged.train) == len(raw) - 2
    pair_errors = sorted((e.task_id, e.where) for e in report if isinstance(e, PairError))
    assert pair_errors == [(SMALL_RE_ARC[1], "pairs[3].output"),
                           (SMALL_RE_ARC[1], "pairs[5].input")]
    assert sorted(e.task_id for e in report if not isinstance(e, PairError)) == ["broken", "empty"]
    with pytest.raises(TaskError, match="pairs"):
        load_tasks(path, strict=True)


def test_metadata_counts_match_the_shipped_pools():
    if not (RE_ARC / "metadata.json").is_file():
        pytest.skip(f"RE-ARC data not found at {RE_ARC}")
    meta = json.loads((RE_ARC / "metadata.json").read_text())
    for task_id in SMALL_RE_ARC:
        pairs = json.loads((RE_ARC / "tasks" / f"{task_id}.json").read_text())
        assert len(pairs) == meta[task_id]["examples"]


def test_packed_pools_round_trip_on_device():
    rng = np.random.default_rng(0)
    pools = [[Pair(rng.integers(0, 10, rng.integers(1, 31, 2)).astype(np.uint8),
                   rng.integers(0, 10, rng.integers(1, 31, 2)).astype(np.uint8))
              for _ in range(n)] for n in (3, 1, 5)]
    arrays = pack_pools(pools, [[7] * len(p) for p in pools])
    assert arrays.cells.dtype == np.uint8
    assert arrays.cells.size == sum(p.input.size + p.output.size for ps in pools for p in ps)
    assert arrays.start.tolist() == [0, 3, 4] and arrays.count.tolist() == [3, 1, 5]
    grids, shapes = jax.jit(pool_grids)(arrays, jnp.arange(9))
    for n, pair in enumerate(p for ps in pools for p in ps):
        for k, g in enumerate((pair.input, pair.output)):
            h, w = g.shape
            assert tuple(shapes[n, k]) == (h, w)
            np.testing.assert_array_equal(grids[n, k, :h, :w], g)
            assert not np.asarray(grids[n, k]).sum() - g.sum()


def test_split_pool_keeps_small_pools_whole_and_fits_its_buckets():
    buckets, fixed = (512, 1024, 2048), 20
    whole, dropped = split_pool([50, 60, 400, 70], fixed, buckets, max_context=4)
    assert whole == [(1024, [0, 1, 3, 2])] and dropped == []  # 20 + 580 tokens at most
    lengths = list(np.random.default_rng(1).integers(20, 1200, 200))
    groups, dropped = split_pool(lengths, fixed, buckets, max_context=3)
    assert dropped == [i for i, n in enumerate(lengths) if fixed + 2 * n > 2048]
    assert sorted(i for _, m in groups for i in m) == sorted(set(range(200)) - set(dropped))
    assert len(groups) > 1 and all(len(m) >= 4 for _, m in groups)
    for bucket, members in groups:
        top = sorted((lengths[i] for i in members), reverse=True)
        assert fixed + top[0] + top[1] <= bucket  # any two pairs fit
        smaller = [b for b in buckets if b < bucket]
        assert not smaller or fixed + sum(top[:4]) > smaller[-1]  # and no smaller bucket holds 4


def test_pool_episodes_are_distinct_pairs_that_fit_the_budget():
    lengths = jnp.asarray([30, 50, 10, 80, 20, 60, 40, 0, 0, 0], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 500)

    def draw(budget, lo, hi):
        sample = lambda k: sample_pool_episode(k, jnp.int32(7), lengths, budget, min_context=lo,
                                               max_context=hi, n_candidates=20)
        return jax.device_get(jax.jit(jax.vmap(sample))(keys))

    roomy = draw(10_000, 2, 4)
    assert set(roomy.n_context.tolist()) == {2, 3, 4}
    tight = draw(150, 1, 6)
    for ep, budget in [(e, 10_000) for e in zip(*roomy, strict=True)] + [
            (e, 150) for e in zip(*tight, strict=True)]:
        context, n, target = ep
        used = [int(target), *context[:n].tolist()]
        assert len(set(used)) == len(used) and max(used) < 7
        assert np.all(context[n:] == 0) and n >= 1
        assert sum(int(lengths[i]) for i in used) <= budget
    assert set(np.asarray(tight.target).tolist()) == set(range(7))


def _decode_row(tokenizer, fmt, tokens, length):
    """Row tokens -> ([(input, output), ...] context, (query input, answer output))."""
    text = tokenizer.decode(tokens[:length].tolist())
    body = text.split(TEMPLATE.prefix, 1)[1]
    user, answer = body.split(TEMPLATE.query_suffix)
    grids = []
    for chunk in user.split(TEMPLATE.input_label)[1:]:
        for part in chunk.split(TEMPLATE.output_label):
            parsed = text_to_grid(part, fmt)
            assert parsed.ok, parsed.error
            grids.append(parsed.grid)
    target = (grids[-1], parse_answer(answer, fmt).grid)
    return list(zip(grids[:-1:2], grids[1:-1:2], strict=True)), target


def _pool_pairs(pools, s) -> list[tuple[list, list]]:
    """The pairs of sub-pool `s`, unpacked on the host."""
    out = []
    for n in range(int(pools.start[s]), int(pools.start[s] + pools.count[s])):
        grids = []
        for k in (0, 1):
            (h, w), offset = pools.shapes[n, k], pools.offsets[n, k]
            grids.append(pools.cells[offset:offset + h * w].reshape(h, w).tolist())
        out.append(tuple(grids))
    return out


@pytest.fixture(scope="module")
def re_arc_data(tmp_path_factory, vocab):
    config = importlib.import_module("configs.train_base_model").get_config()
    config.data.train = _re_arc_dir(tmp_path_factory.mktemp("re_arc"))
    config.data.buckets = (512, 1024)
    return config, finetune.load_training_data(config, vocab, PipelineConfig().fmt)


@pytest.mark.parametrize("augmented", [False, True])
def test_re_arc_episodes_come_from_one_pool_and_fit_the_bucket(re_arc_data, vocab, augmented):
    config, data = re_arc_data
    config.augment.geometric = config.augment.color_swap = augmented
    config.data.loss_on = "target"  # the answer alone, so the mask is checked exactly
    cfg = settings.pipeline_config(config)
    source = data.report["sources"][config.data.train]
    assert source["excluded_ids"] == {"holdout": ["007bbfb7"]}
    assert {sp.task_id for sp in data.subpools} == set(SMALL_RE_ARC[:3])
    tokenizer = load_tokenizer()
    lo, hi = config.data.context_pairs
    buckets = data.bucket_members()
    assert sorted(buckets) == [512, 1024]
    for bucket, members in buckets.items():
        if augmented and bucket != 512:
            continue  # one compilation: the tightest bucket
        subpools = np.repeat(members, 2)[:8]
        batch = jax.device_get(jax.jit(functools.partial(
            pool_train_batch, vocab=vocab, cfg=cfg, seq_len=bucket,
            max_pool=int(data.pools.count.max()), context_pairs=(lo, hi)))(
                jax.random.key(bucket), data.pools, jnp.asarray(subpools)))
        assert batch.fits.all() and (batch.length <= bucket).all()
        positions = np.arange(bucket)[None]
        answer = (positions >= batch.prompt_length[:, None]) & batch.attention_mask
        np.testing.assert_array_equal(batch.loss_mask, answer)  # loss on the target only
        for row, s in enumerate(subpools):
            pool = _pool_pairs(data.pools, s)
            context, target = _decode_row(tokenizer, cfg.fmt, batch.tokens[row],
                                          batch.length[row])
            assert min(hi, len(pool) - 1) >= len(context) == batch.n_context[row] >= 1
            assert len(context) >= min(lo, len(pool) - 1) or bucket == max(config.data.buckets)
            pairs = [tuple(g.tolist() for g in p) for p in [*context, target]]
            if not augmented:
                assert all(p in pool for p in pairs)
                assert len(set(map(repr, pairs))) == len(pairs)
            ids = batch.tokens[row][batch.loss_mask[row]]
            assert parse_answer(tokenizer.decode(ids.tolist()), cfg.fmt).grid.tolist() == \
                target[1].tolist()


def test_pair_lengths_bound_the_encoded_episode(vocab):
    fmt = PipelineConfig().fmt
    fixed = pool_fixed_length(vocab)
    shapes = [((3, 7), (7, 3)), ((30, 1), (2, 30)), ((5, 5), (10, 10))]
    lengths = [pool_pair_length(vocab, fmt, a, b) for a, b in shapes]
    from arc_jax.data.pipeline import episode_length
    for swap in (False, True):
        s = [(a[::-1], b[::-1]) if swap else (a, b) for a, b in shapes]
        assert episode_length(vocab, fmt, s[:2], *s[2]) <= fixed + sum(lengths)
    assert max(episode_length(vocab, fmt, [(a[::-1], b[::-1]) for a, b in shapes[:2]],
                              shapes[2][0], shapes[2][1]),
               episode_length(vocab, fmt, shapes[:2], *shapes[2])) <= fixed + sum(lengths)


# ---------------------------------------------------------------------------------------------
# Weighted sources and a tiny run.


def _write_pool_source(path: Path, colour: int, n_tasks: int, n_pairs: int) -> str:
    path.mkdir()
    for t in range(n_tasks):
        pairs = [{"input": [[colour] * (1 + i % 3)], "output": [[colour]] * (1 + i % 2)}
                 for i in range(n_pairs)]
        (path / f"{colour}{t:07d}.json").write_text(json.dumps(pairs))
    return str(path)


def test_episodes_are_drawn_from_sources_in_proportion_to_their_weights(tmp_path, vocab):
    config = importlib.import_module("configs.train_base_model").get_config()
    config.augment.color_swap = False
    config.data.buckets = (256,)
    # Colours 7 and 8 (not in a header or a row number of these small grids) tell them apart.
    a = _write_pool_source(tmp_path / "a", 7, 2, 6)
    b = _write_pool_source(tmp_path / "b", 8, 5, 12)
    config.data.train = ((a, 1.0), (b, 3.0))
    settings.check(config)
    cfg = settings.pipeline_config(config)
    data = finetune.load_training_data(config, vocab, cfg.fmt)
    share = {s: sum(sp.weight for sp in data.subpools if sp.source == s) for s in (a, b)}
    assert share[a] == pytest.approx(0.25) and share[b] == pytest.approx(0.75)
    assert data.report["sources"][b]["episode_share"] == pytest.approx(0.75)
    [(bucket, members)] = data.bucket_members().items()
    probs = np.asarray([data.subpools[i].weight for i in members])
    make = functools.partial(
        finetune._pool_batch, vocab=vocab, cfg=cfg, seq_len=bucket, batch_size=300,
        max_pool=int(data.pools.count.max()), context_pairs=(1, 2), mesh=None)
    batch = jax.jit(make)(jax.random.key(0), (data.pools, jnp.asarray(members),
                                              jnp.asarray(probs / probs.sum())))
    seven, eight = vocab.digits[7], vocab.digits[8]
    rows = np.asarray(batch.tokens)
    from_b = np.mean([(row == eight).any() for row in rows])
    assert not np.any([(row == seven).any() and (row == eight).any() for row in rows])
    assert abs(from_b - 0.75) < 0.08  # 300 rows: 3.2 standard deviations


def _tiny_pool_config(tmp_path):
    """Base-model training shrunk to a tiny scratch model, 3 training tasks from
    kaggle2024/training and a small RE-ARC pool source, 2 rows per step."""
    config = importlib.import_module("configs.train_base_model").get_config()
    config.data.train = (("kaggle2024/training", 1.0), (_re_arc_dir(tmp_path), 2.0))
    config.data.max_tasks = 3
    config.train.batch_size = 2
    config.model.scratch.update(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64))
    return config


def test_tiny_finetune_run_on_a_pool_source(tmp_path):
    config = _tiny_pool_config(tmp_path)
    config.data.task_ids = ("66e6c45b", "be03b35f")  # two small evaluation tasks
    config.data.buckets = (512,)
    config.train.steps = 2
    config.train.warmup_steps = 1
    config.train.checkpoint_every = 1
    config.eval.n_augmentations = 1
    config.eval.max_new_tokens = 8
    workdir = tmp_path / "run"
    overall = run.train_and_evaluate(config, str(workdir))
    assert overall is not None and overall["n_tasks"] == 2
    report = json.loads((workdir / "training_data.json").read_text())
    pools = report["sources"][config.data.train[1][0]]
    assert pools["used_tasks"] == 3 and pools["excluded_ids"] == {"holdout": ["007bbfb7"]}
    assert report["sources"]["kaggle2024/training"]["episode_share"] == pytest.approx(1 / 3)
    assert len(report["holdout"]["ids"]) == 50
    assert os.path.isdir(workdir / "checkpoints" / "finetune" / "2")
    heldout = json.loads((workdir / "heldout.json").read_text())  # the last step's point
    assert [c["step"] for c in heldout["curve"]] == [2] and heldout["tasks"]
    assert set(heldout["tasks"]) <= set(report["holdout"]["ids"])
    assert np.isfinite(heldout["curve"][0]["val_loss"])
    model, _ = load_pretrained(workdir / "model")
    assert model.config.num_hidden_layers == 2


def test_tokens_seen_replays_the_training_batches(tmp_path):
    """`finetune.tokens_seen` (the model card's count) equals the tokens the training steps
    report, over two buckets and two micro-batches per step."""
    config = _tiny_pool_config(tmp_path)
    config.data.buckets = (512, 1024)
    config.data.max_seq_len = 1024
    config.train.steps = 4
    config.train.grad_accum = 2
    setup = run.load_setup(config, str(tmp_path / "run"))
    data = finetune.load_training_data(config, setup.vocab, setup.pipeline.fmt)
    data_key = setup.stream(run.DATA)
    state, step_fn = finetune.make_training(setup, data, init_key=setup.stream(run.INIT),
                                            data_key=data_key,
                                            dropout_key=setup.stream(run.DROPOUT))
    tokens = loss_tokens = 0
    for s in range(config.train.steps):
        state, metrics = step_fn(state, s)
        tokens += int(metrics["tokens"])
        loss_tokens += int(metrics["loss_tokens"])
    seen = finetune.tokens_seen(setup, data, data_key, config.train.steps)
    assert len(set(finetune.bucket_schedule(data.bucket_weights(), 4, config.seed))) == 2
    assert (seen["tokens"], seen["loss_tokens"]) == (tokens, loss_tokens)
    assert seen["rows"] == 16 and 0 < seen["tokens"] < seen["padded_tokens"]
