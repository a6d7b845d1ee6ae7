"""On-device encoding equals the HF tokenizer's encoding of the same text; the bridge accepts
tokenizers whose special tokens strip whitespace inside a template piece and refuses those for
which no fixed-piece encoding exists, naming the piece."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from encode_check import assert_device_equals_tokenizer, identity

from arc_jax.data.arrays import pad_tasks
from arc_jax.data.encode import (
    check_device_encoding,
    device_layout,
    encode_episode,
    episode_text,
)
from arc_jax.data.formats import GRID_FORMATS, PromptTemplate
from arc_jax.data.pipeline import PipelineConfig, eval_batch
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import (
    ARC_CHARACTERS,
    ARC_SPECIAL_TOKENS,
    PIECES,
    TokenizerError,
    encode_text,
    load_tokenizer,
    token_vocab,
)

TEMPLATE = PromptTemplate()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def eval_tasks():
    return list(load_tasks("kaggle2024/evaluation").values())


@functools.cache
def _vocab(tokenizer, fmt_name):
    return check_device_encoding(tokenizer, GRID_FORMATS[fmt_name])


def _host_ids(tokenizer, task, test_index, fmt, with_answer=True):
    context = [(p.input, p.output) for p in task.train]
    test = task.test[test_index]
    prompt, answer = episode_text(
        context, test.input, test.output if with_answer else None, fmt, TEMPLATE)
    return encode_text(tokenizer, prompt, answer)


@pytest.mark.parametrize("fmt_name", ["minimal", "shape_numbered"])
def test_device_encoding_equals_tokenizer_on_all_evaluation_tasks(tokenizer, eval_tasks, fmt_name):
    vocab = _vocab(tokenizer, fmt_name)
    assert assert_device_equals_tokenizer(tokenizer, vocab, fmt_name, eval_tasks) == 419


def test_shipped_tokenizer_pieces(tokenizer):
    vocab = token_vocab(tokenizer)
    piece = lambda name: tokenizer.decode(
        vocab.pieces[PIECES.index(name), : vocab.piece_lens[PIECES.index(name)]].tolist())
    assert piece("bos") == "<s>" and piece("prefix") == "<|user|>\n"
    assert piece("first_input_label") == piece("input_label") == "input:\n"
    assert piece("query_suffix") == "<|end|>\n<|assistant|>\n"


@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_device_layout_is_the_host_twin(tokenizer, eval_tasks, fmt_name):
    # The spans that name a differing piece in check_device_encoding's refusal.
    fmt = GRID_FORMATS[fmt_name]
    vocab = token_vocab(tokenizer)
    for task, n_context in ((eval_tasks[0], 2), (eval_tasks[1], 0)):
        context = [(p.input, p.output) for p in task.train[:n_context]]
        test = task.test[0]
        spans = device_layout(vocab, fmt, context, test.input, test.output)
        ids = [i for _, span in spans for i in span]
        assert ids == encode_text(tokenizer, *episode_text(context, test.input, test.output,
                                                           fmt, TEMPLATE))


def test_loss_mask_covers_exactly_the_answer(tokenizer, eval_tasks):
    cfg = PipelineConfig(grid_format="shape_numbered")
    vocab = _vocab(tokenizer, "shape_numbered")
    task = eval_tasks[0]
    arrays = pad_tasks([task])
    encode = jax.jit(functools.partial(eval_batch, vocab=vocab, cfg=cfg, seq_len=2048),
                     static_argnames="with_answer")
    args = (arrays, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), identity(1))
    out = encode(*args)
    tokens, mask = np.asarray(out.tokens[0]), np.asarray(out.loss_mask[0])
    prompt_len, length = int(out.prompt_length[0]), int(out.length[0])
    assert not mask[:prompt_len].any() and mask[prompt_len:length].all()
    assert not mask[length:].any()
    _, answer = episode_text([], task.test[0].input, task.test[0].output, cfg.fmt, TEMPLATE)
    assert tokenizer.decode(tokens[mask].tolist()) == answer
    np.testing.assert_array_equal(out.positions[0, :length], np.arange(length))
    assert out.attention_mask[0].sum() == length

    prompt_only = encode(*args, with_answer=False)
    assert int(prompt_only.length[0]) == prompt_len
    np.testing.assert_array_equal(prompt_only.tokens[0, :prompt_len], tokens[:prompt_len])
    assert not prompt_only.loss_mask.any()


def test_all_outputs_loss_covers_context_outputs(tokenizer, eval_tasks):
    fmt = GRID_FORMATS["minimal"]
    vocab = _vocab(tokenizer, "minimal")
    task = eval_tasks[1]
    arrays = pad_tasks([task])
    encode = jax.jit(functools.partial(encode_episode, vocab, fmt, seq_len=4096,
                                       loss_on="all_outputs"))
    out = encode(arrays.train[0], arrays.train_shapes[0], arrays.n_train[0], arrays.test[0, 0],
                 arrays.test_shapes[0, 0])
    n_out_tokens = sum(p.output.size + p.output.shape[0] for p in task.train)
    answer = task.test[0].output
    assert int(out.loss_mask.sum()) == n_out_tokens + answer.size + answer.shape[0] + 1


def test_truncation_drops_context_pairs_and_reports_overflow(tokenizer, eval_tasks):
    task = max(eval_tasks, key=lambda t: len(t.train))
    arrays = pad_tasks([task])
    args = (arrays, jnp.zeros(1, jnp.int32), jnp.zeros(1, jnp.int32), identity(1))
    full = _host_ids(tokenizer, task, 0, GRID_FORMATS["minimal"])
    seq_len = len(full) - 1
    vocab = _vocab(tokenizer, "minimal")
    encode = lambda overflow: jax.jit(functools.partial(
        eval_batch, vocab=vocab, seq_len=seq_len,
        cfg=PipelineConfig(grid_format="minimal", overflow=overflow)))(*args)
    cut = encode("truncate")
    assert not cut.fits[0] and int(cut.n_context[0]) < len(task.train)
    assert int(cut.length[0]) <= seq_len
    kept = int(cut.n_context[0])
    context = [(p.input, p.output) for p in task.train[:kept]]
    prompt, answer = episode_text(context, task.test[0].input, task.test[0].output,
                                  GRID_FORMATS["minimal"], TEMPLATE)
    assert cut.tokens[0, : cut.length[0]].tolist() == encode_text(tokenizer, prompt, answer)

    skip = encode("skip")
    assert not skip.fits[0] and int(skip.n_context[0]) == len(task.train)


# --- synthetic tokenizers: what the bridge accepts and what it refuses --------------------------

def _char_tokenizer(stripping: dict | None = None, merge_digit_newline: bool = False):
    """The shipped ARC tokenizer's vocabulary, one token per character, special tokens with the
    given `{token: {"lstrip": ..., "rstrip": ...}}`; `merge_digit_newline`: a BPE whose one merge
    spells '1\\n' as a single token."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(ARC_SPECIAL_TOKENS + ARC_CHARACTERS)}
    if merge_digit_newline:
        vocab["1\n"] = len(vocab)
        tok = Tokenizer(models.BPE(vocab, [("1", "\n")], unk_token="<unk>"))
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False,
                                       **(stripping or {}).get(t, {}))
                            for t in ARC_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|endoftext|>")


def test_accepts_special_tokens_that_strip_inside_a_piece():
    # `<|assistant|>` swallows the newlines on both sides: query_suffix is two tokens, and the
    # device encoding still equals the tokenizer's.
    tok = _char_tokenizer({"<|assistant|>": {"lstrip": True, "rstrip": True}})
    for fmt in GRID_FORMATS.values():
        vocab = check_device_encoding(tok, fmt)
    i = PIECES.index("query_suffix")
    query_suffix = vocab.pieces[i, : vocab.piece_lens[i]]
    assert tok.convert_ids_to_tokens(query_suffix.tolist()) == ["<|end|>", "<|assistant|>"]


def test_refuses_a_special_token_that_strips_the_grid_newline():
    tok = _char_tokenizer({"<|end|>": {"lstrip": True}})
    with pytest.raises(TokenizerError, match="query_suffix .* removes the newline"):
        token_vocab(tok)


def test_refuses_a_tokenizer_that_merges_a_digit_with_the_newline_naming_the_row():
    # Every piece derives cleanly ('1' and '\n' are single tokens on their own), but a row that
    # ends in 1 is spelled with the merged token: only the whole-prompt check can see that.
    tok = _char_tokenizer(merge_digit_newline=True)
    token_vocab(tok)
    with pytest.raises(TokenizerError, match=r"at token \d+, in .* grid, row \d+ "):
        check_device_encoding(tok, GRID_FORMATS["minimal"])
