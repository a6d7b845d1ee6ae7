"""Tokenizers: the shipped ARC-native tokenizer, and the bridge from any HF tokenizer to the ids
that `arc_jax.data.encode` writes on device.

The bridge derives the ids of digits, newline, row-number and shape-header pieces and the prompt
template pieces *in context* (each piece as it reads at the start of a line), then
`check_device_encoding` proves on a sample prompt that concatenating them equals the tokenizer's
own encoding; a tokenizer for which that fails (e.g. one that merges runs of digits) is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from arc_jax.data.formats import MAX_SIDE, PromptTemplate

ASSETS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
SHIPPED_TOKENIZER_DIR = os.path.join(ASSETS, "arc_tokenizer")

ARC_SPECIAL_TOKENS = (
    "<pad>", "<unk>", "<s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|system|>",
)
ARC_CHARACTERS = tuple("0123456789") + ("\n", " ", ":", "x") + tuple("abcdefghijklmnopqrstuvwyz")
# Phi-3's chat template, so `apply_chat_template` writes the same turns as `PromptTemplate`.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TokenizerError(ValueError):
    """The tokenizer cannot be bridged to on-device encoding."""


def build_arc_tokenizer():
    """A character-level tokenizer (47 tokens) for ARC prompts: chat special tokens, digits,
    newline, space, ':', 'x' and lower-case letters; prepends `<s>` like Phi-3's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(ARC_SPECIAL_TOKENS + ARC_CHARACTERS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(ARC_SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<unk>", chat_template=PHI3_CHAT_TEMPLATE,
    )


def save_arc_tokenizer(path: str = SHIPPED_TOKENIZER_DIR) -> None:
    """Writes the ARC tokenizer as tokenizer.json + tokenizer_config.json (how the shipped copy
    in `arc_jax/assets/arc_tokenizer` was made: `python -m arc_jax.data.tokenizer`)."""
    tok = build_arc_tokenizer()
    tok.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    # Readable by transformers 4.x as well as 5.x.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config["model_max_length"] = 16384
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def load_tokenizer(path: str | None = None):
    """Loads an HF tokenizer from a model or tokenizer directory (default: the shipped one)."""
    from transformers import AutoTokenizer

    path = path or SHIPPED_TOKENIZER_DIR
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {path!r}: {e}") from e


class TokenVocab(NamedTuple):
    """Token ids the device encoder concatenates. Variable-length pieces are right-padded with
    -1 and come with their lengths.

    digits: [10]            ids of '0'..'9' inside a row
    newline: scalar         id of '\\n' ending a row
    numbers: [31, 3]        ids of the row number / header number n (0..30) at a line start
    number_lens: [31]
    x: scalar               the 'x' in a '{h}x{w}' header (after a number)
    space: scalar           the ' ' after a row number
    pieces: [6, L]          prefix, input_label, output_label, query_suffix, answer_suffix, bos
    piece_lens: [6]
    pad: scalar             id written past the end of a sequence
    end: scalar             id that ends the answer (last token of answer_suffix)
    """

    digits: np.ndarray
    newline: np.ndarray
    numbers: np.ndarray
    number_lens: np.ndarray
    x: np.ndarray
    space: np.ndarray
    pieces: np.ndarray
    piece_lens: np.ndarray
    pad: np.ndarray
    end: np.ndarray


PIECES = ("prefix", "input_label", "output_label", "query_suffix", "answer_suffix", "bos")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _ids_after(tokenizer, context: str, text: str) -> list[int]:
    """Ids of `text` as it is tokenized right after `context` (e.g. at a line start)."""
    base = _encode(tokenizer, context)
    full = _encode(tokenizer, context + text)
    if full[: len(base)] != base:
        raise TokenizerError(
            f"tokenizer merges {text!r} with the preceding {context!r}; "
            "on-device encoding needs pieces that tokenize independently"
        )
    return full[len(base):]


def _single(tokenizer, context: str, text: str) -> int:
    ids = _ids_after(tokenizer, context, text)
    if len(ids) != 1:
        raise TokenizerError(
            f"tokenizer spells {text!r} (after {context!r}) as {len(ids)} tokens {ids}; "
            "on-device encoding needs one token per digit, newline, space and 'x'"
        )
    return ids[0]


def _padded(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.asarray([len(r) for r in rows], np.int32)


def token_vocab(tokenizer, template: PromptTemplate = PromptTemplate()) -> TokenVocab:
    """Derives the on-device encoding ids from an HF tokenizer (see `check_device_encoding`)."""
    digits = [_single(tokenizer, "\n0", str(d)) for d in range(10)]
    newline = _single(tokenizer, "\n0", "\n")
    numbers = [_ids_after(tokenizer, "0\n", str(n)) for n in range(MAX_SIDE + 1)]
    x = _single(tokenizer, "\n3", "x")
    space = _single(tokenizer, "\n3", " ")
    bos = _encode_special_prefix(tokenizer)
    texts = template.pieces()
    pieces = [_encode(tokenizer, texts["prefix"])]
    pieces += [_ids_after(tokenizer, "0\n", texts[name]) for name in PIECES[1:5]]
    pieces.append(bos)
    pieces_arr, piece_lens = _padded(pieces)
    numbers_arr, number_lens = _padded(numbers)
    answer_suffix = pieces[PIECES.index("answer_suffix")]
    if not answer_suffix:
        raise TokenizerError("the template's answer_suffix must encode to at least one token")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return TokenVocab(
        digits=np.asarray(digits, np.int32), newline=np.int32(newline), numbers=numbers_arr,
        number_lens=number_lens, x=np.int32(x), space=np.int32(space), pieces=pieces_arr,
        piece_lens=piece_lens, pad=np.int32(pad), end=np.int32(answer_suffix[-1]),
    )


def _encode_special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text by itself (Phi-3: `<s>`)."""
    with_special = list(tokenizer("0", add_special_tokens=True)["input_ids"])
    plain = _encode(tokenizer, "0")
    if with_special[len(with_special) - len(plain):] != plain:
        raise TokenizerError("tokenizer's special tokens are not a plain prefix/suffix")
    return with_special[: len(with_special) - len(plain)]


def encode_text(tokenizer, prompt: str, answer: str = "") -> list[int]:
    """The host reference: the HF tokenizer's ids for prompt + answer, with its special prefix."""
    return list(tokenizer(prompt + answer, add_special_tokens=True)["input_ids"])


if __name__ == "__main__":
    save_arc_tokenizer()
    print(f"wrote {SHIPPED_TOKENIZER_DIR}")
