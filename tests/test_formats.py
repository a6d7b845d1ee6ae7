"""Grid text formats, prompt pieces and the shipped tokenizer."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arc_jax.data.formats import (
    GRID_FORMATS,
    PromptTemplate,
    answer_text,
    get_grid_format,
    grid_to_text,
    parse_answer,
    prompt_text,
    text_to_grid,
)
from arc_jax.data.tokenizer import (
    SHIPPED_TOKENIZER_DIR,
    TokenizerError,
    build_arc_tokenizer,
    load_tokenizer,
    token_vocab,
)

grids = hnp.arrays(
    np.int8,
    st.tuples(st.integers(1, 30), st.integers(1, 30)),
    elements=st.integers(0, 9),
)


@settings(max_examples=60, deadline=None)
@given(grid=grids, name=st.sampled_from(sorted(GRID_FORMATS)))
def test_text_round_trip(grid, name):
    fmt = GRID_FORMATS[name]
    parsed = text_to_grid(grid_to_text(grid, fmt), fmt)
    assert parsed.ok, parsed.error
    np.testing.assert_array_equal(parsed.grid, grid)


def test_format_spellings():
    grid = np.arange(6).reshape(2, 3)
    assert grid_to_text(grid, GRID_FORMATS["minimal"]) == "012\n345\n"
    assert grid_to_text(grid, GRID_FORMATS["shape"]) == "2x3\n012\n345\n"
    assert grid_to_text(grid, GRID_FORMATS["numbered"]) == "1 012\n2 345\n"
    assert grid_to_text(grid, GRID_FORMATS["shape_numbered"]) == "2x3\n1 012\n2 345\n"
    with pytest.raises(ValueError, match="unknown grid format 'fancy'"):
        get_grid_format("fancy")


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("minimal", "", "empty output"),
        ("minimal", "012\n34\n", "different widths"),
        ("minimal", "01a\n", "not a row of colours"),
        ("minimal", "0" * 31 + "\n", "outside 1..30"),
        ("minimal", "\n".join(["0"] * 31), "outside 1..30"),
        ("shape", "2y3\n012\n345\n", "bad shape header"),
        ("shape", "3x3\n012\n345\n", "header says 3x3 but grid is 2x3"),
        ("numbered", "1 012\n3 345\n", "expected row number prefix '2 '"),
        ("numbered", "012\n", "expected row number prefix '1 '"),
    ],
)
def test_parse_errors_say_why(name, text, reason):
    parsed = text_to_grid(text, GRID_FORMATS[name])
    assert not parsed.ok
    assert reason in parsed.error


def test_prompt_and_answer_text():
    fmt = GRID_FORMATS["minimal"]
    a, b, q, ans = ([[1]], [[2]], [[3]], [[4, 5]])
    prompt = prompt_text([(a, b)], q, fmt)
    assert prompt == "<|user|>\ninput:\n1\noutput:\n2\ninput:\n3\n<|end|>\n<|assistant|>\n"
    answer = answer_text(np.asarray(ans), fmt)
    assert answer == "45\n<|end|>"
    assert parse_answer(answer + "trailing", fmt).grid.tolist() == ans


def test_shipped_tokenizer_is_the_built_one():
    with open(os.path.join(SHIPPED_TOKENIZER_DIR, "tokenizer.json")) as f:
        shipped = json.load(f)
    built = json.loads(build_arc_tokenizer().backend_tokenizer.to_str())
    assert shipped["model"] == built["model"]
    assert shipped["added_tokens"] == built["added_tokens"]
    tok = load_tokenizer()
    assert len(tok) <= 64
    text = prompt_text([([[1, 2]], [[3]])], [[4]], GRID_FORMATS["shape_numbered"])
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == text
    assert tok.unk_token_id not in ids


def test_chat_template_matches_prompt_template():
    tok = load_tokenizer()
    t = PromptTemplate()
    content = "input:\n1\n"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    assert chat == t.prefix + content + t.query_suffix


def test_bridge_refuses_a_tokenizer_that_merges_digits():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|end|>"])
    raw.train_from_iterator(["0123 4567 89 " * 50, "input output 00 11 22 33"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(TokenizerError):
        token_vocab(tok)


def test_load_tokenizer_names_a_bad_path(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
