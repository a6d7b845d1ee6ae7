"""Tokenizers: the shipped ARC-native tokenizer, and the bridge from any HF tokenizer to the ids
that `arc_jax.data.encode` writes on device.

On device a prompt is a concatenation of fixed template pieces and per-cell grid ids. The bridge
derives every piece *in the context it has in a prompt*, from the tokenizer's own behaviour: it
encodes the piece between the text that precedes it and each way a grid can begin, and keeps what
the tokenizer writes there. That captures what published tokenizers do around their special
tokens: Phi-3's `<|user|>`, `<|assistant|>` and `<|end|>` strip the newline after them
(`rstrip`), its Llama normalizer prefixes `▁` to the text after a special token and at the start
(`input` after `<|user|>` is `▁input`, and the answer grid after `<|assistant|>` starts with a
lone `▁`), and `add_bos_token` decides whether `<s>` comes first. A text piece's spelling can
depend on what precedes it, so the first `input:` label (right after the prefix) is derived
separately from the later ones; tokens a piece makes the tokenizer put in front of the grid that
follows belong to that piece (the prompt then ends with them: a model continues with grid tokens).

`arc_jax.data.encode.check_device_encoding` then proves on sample prompts that the on-device
encoding equals the tokenizer's own; a tokenizer for which that fails (e.g. one that merges runs
of digits) is refused with the first differing piece named.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from arc_jax.data.formats import MAX_SIDE, PromptTemplate

log = logging.getLogger(__name__)

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
    """The tokenizer cannot be loaded or bridged to on-device encoding."""


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


# --- loading --------------------------------------------------------------------------------------

MODEL_CONFIG = "config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def load_tokenizer(path: str | os.PathLike | None = None):
    """Loads an HF tokenizer from a model or tokenizer directory (default: the shipped one).

    It never depends on transformers accepting the directory's `config.json`: AutoTokenizer reads
    only the model type from it, so when it rejects the file (e.g. an April-2024 Phi-3-128k config
    with `rope_scaling.type` "su" and `original_max_position_embeddings` at top level only), the
    tokenizer is loaded with a default config of the same `model_type`, and failing that from
    `tokenizer.json` alone with `tokenizer_config.json`'s special tokens. (Not from a directory of
    the tokenizer files alone: transformers then builds the `LlamaTokenizer` that
    `tokenizer_config.json` names, which re-spells text after special tokens; with a phi3
    config it uses `tokenizer.json` as published.)
    """
    from transformers import AutoTokenizer

    path = os.fspath(path or SHIPPED_TOKENIZER_DIR)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # noqa: BLE001  (transformers raises KeyError, ValueError, OSError…)
        first = err
    config_file = os.path.join(path, MODEL_CONFIG)
    if not os.path.isfile(config_file):
        raise TokenizerError(
            f"cannot load a tokenizer from {path!r}: {type(first).__name__}: {first}") from first
    problem = f"transformers rejects {config_file} ({type(first).__name__}: {first})"
    try:
        tokenizer = _load_without_model_config(path, config_file)
    except Exception as err:  # noqa: BLE001
        raise TokenizerError(
            f"cannot load a tokenizer from {path!r}: {problem}, and loading its tokenizer files "
            f"alone failed too ({type(err).__name__}: {err})") from err
    log.warning("%s; loaded the tokenizer without it", problem)
    return tokenizer


def _load_without_model_config(path: str, config_file: str):
    from transformers import AutoConfig, AutoTokenizer

    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type:
        try:
            config = AutoConfig.for_model(model_type)
        except (KeyError, ValueError):  # a model type this transformers does not know
            config = None
        if config is not None:
            return AutoTokenizer.from_pretrained(path, config=config)
    return _load_tokenizer_json(path)


def _load_tokenizer_json(path: str):
    """`tokenizer.json` as published, with `tokenizer_config.json`'s special tokens."""
    from transformers import PreTrainedTokenizerFast

    file = os.path.join(path, TOKENIZER_JSON)
    if not os.path.isfile(file):
        raise TokenizerError(f"{file} not found")
    settings: dict = {}
    config_file = os.path.join(path, TOKENIZER_CONFIG)
    if os.path.isfile(config_file):
        try:
            with open(config_file) as f:
                settings = json.load(f)
        except ValueError as err:
            raise TokenizerError(f"{config_file} is not valid JSON ({err})") from err
    content = lambda v: v.get("content") if isinstance(v, dict) else v
    special = {key: content(settings[key]) for key in (
        "bos_token", "eos_token", "unk_token", "pad_token") if settings.get(key)}
    return PreTrainedTokenizerFast(
        tokenizer_file=file, chat_template=settings.get("chat_template"), **special)


# --- the bridge -----------------------------------------------------------------------------------

class TokenVocab(NamedTuple):
    """Token ids the device encoder concatenates. Variable-length pieces are right-padded with
    -1 and come with their lengths.

    digits: [10]            ids of '0'..'9' inside a row
    newline: scalar         id of '\\n' ending a row
    numbers: [31, 3]        ids of the row number / header number n (0..30) at a line start
    number_lens: [31]
    x: scalar               the 'x' in a '{h}x{w}' header (after a number)
    space: scalar           the ' ' after a row number
    pieces: [7, L]          `PIECES`, each as it is tokenized in its place in a prompt
    piece_lens: [7]         (first_input_label has input_label's length)
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


# prefix: the start of the user turn; input_label: before an input grid that follows a grid;
# first_input_label: the input label right after the prefix; query_suffix: after the query grid,
# up to the answer grid; answer_suffix: after the answer grid; bos: what the tokenizer adds first.
PIECES = ("prefix", "input_label", "output_label", "query_suffix", "answer_suffix", "bos",
          "first_input_label")
# Every way a grid's text can begin: a cell (minimal), row number 1 (numbered), a shape header.
GRID_STARTS = tuple("0123456789") + ("1 0",) + tuple(f"{n}x1" for n in range(1, MAX_SIDE + 1))
LINE = "0\n"  # a grid line: the context of anything at the start of a line inside a prompt


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


def piece_in_context(tokenizer, name: str, before: str, text: str, grid_follows: bool
                     ) -> list[int]:
    """Ids the tokenizer writes for template piece `text` between `before` (the prompt text in
    front of it, "" at the start) and a grid (`grid_follows`) or the end of the text.

    Tokens the piece makes the tokenizer put in front of the grid (a normalizer's `▁` after a
    special token) are the piece's; they must be the same for every way a grid can begin
    (`GRID_STARTS`), and the grid itself must be spelled as at any line start.
    """
    base = _encode(tokenizer, before)
    found: dict[tuple[int, ...], str] = {}
    for start in GRID_STARTS if grid_follows else ("",):
        grid = start + "\n" if start else ""
        full = _encode(tokenizer, before + text + grid)
        if full[: len(base)] != base:
            stripped = full[: len(base) - 1] == base[:-1] and before.endswith("\n")
            raise TokenizerError(
                f"the template's {name} {text!r} "
                + ("removes the newline that ends the grid before it (a special token with "
                   "lstrip?); on-device encoding keeps every row's newline" if stripped else
                   f"merges with the text before it ({before[-12:]!r})"))
        rest = full[len(base):]
        if grid:
            own = _ids_after(tokenizer, LINE, grid)
            if rest[len(rest) - len(own):] != own:
                raise TokenizerError(
                    f"the template's {name} {text!r} changes how the grid after it is spelled "
                    f"(grid {grid!r}: {rest} does not end with {own}, its ids at a line start)")
            rest = rest[: len(rest) - len(own)]
        found.setdefault(tuple(rest), grid)
    if len(found) > 1:
        variants = "; ".join(f"{list(ids)} before {grid!r}" for ids, grid in found.items())
        raise TokenizerError(
            f"the template's {name} {text!r} is spelled differently depending on the grid "
            f"after it ({variants}); on-device encoding needs fixed pieces")
    return list(next(iter(found)))


def token_vocab(tokenizer, template: PromptTemplate = PromptTemplate()) -> TokenVocab:
    """Derives the on-device encoding ids from an HF tokenizer (see `check_device_encoding`)."""
    digits = [_single(tokenizer, "\n0", str(d)) for d in range(10)]
    newline = _single(tokenizer, "\n0", "\n")
    numbers = [_ids_after(tokenizer, LINE, str(n)) for n in range(MAX_SIDE + 1)]
    x = _single(tokenizer, "\n3", "x")
    space = _single(tokenizer, "\n3", " ")
    t = template.pieces()
    head_text = t["prefix"] + t["input_label"]
    after_grid = head_text + LINE  # any piece but the head follows a grid
    head = piece_in_context(tokenizer, "prefix + input_label", "", head_text, True)
    input_label = piece_in_context(tokenizer, "input_label", after_grid, t["input_label"], True)
    output_label = piece_in_context(tokenizer, "output_label", after_grid, t["output_label"],
                                    True)
    query_suffix = piece_in_context(tokenizer, "query_suffix", after_grid, t["query_suffix"],
                                    True)
    answer_suffix = piece_in_context(tokenizer, "answer_suffix", after_grid, t["answer_suffix"],
                                     False)
    if len(head) < len(input_label):
        raise TokenizerError(
            f"prefix + input_label {head_text!r} encode to {head}, shorter than a later "
            f"input_label {input_label}; on-device encoding needs the first label as long")
    split = len(head) - len(input_label)
    prefix, first_input_label = head[:split], head[split:]
    if not answer_suffix:
        raise TokenizerError("the template's answer_suffix must encode to at least one token")
    bos = _special_prefix(tokenizer, head_text + LINE)
    by_name = dict(prefix=prefix, input_label=input_label, output_label=output_label,
                   query_suffix=query_suffix, answer_suffix=answer_suffix, bos=bos,
                   first_input_label=first_input_label)
    pieces_arr, piece_lens = _padded([by_name[name] for name in PIECES])
    numbers_arr, number_lens = _padded(numbers)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return TokenVocab(
        digits=np.asarray(digits, np.int32), newline=np.int32(newline), numbers=numbers_arr,
        number_lens=number_lens, x=np.int32(x), space=np.int32(space), pieces=pieces_arr,
        piece_lens=piece_lens, pad=np.int32(pad), end=np.int32(answer_suffix[-1]),
    )


def _special_prefix(tokenizer, text: str) -> list[int]:
    """The ids the tokenizer puts before `text` by itself (`add_bos_token`; the shipped ARC
    tokenizer: `<s>`, Phi-3-mini-instruct's: none)."""
    with_special = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    plain = _encode(tokenizer, text)
    if with_special[len(with_special) - len(plain):] != plain:
        raise TokenizerError(
            f"tokenizer's special tokens are not a plain prefix: {text!r} encodes to {plain}, "
            f"with special tokens to {with_special}")
    return with_special[: len(with_special) - len(plain)]


def encode_text(tokenizer, prompt: str, answer: str = "") -> list[int]:
    """The host reference: the HF tokenizer's ids for prompt + answer, with its special prefix.

    On device a prompt ends where the answer grid's own tokens begin: with tokens the tokenizer
    writes only when an answer follows (Phi-3's `▁` after `<|assistant|>`), so the prompt's ids
    are those of the whole text up to `prompt_length`, not always `encode_text(prompt)`.
    """
    return list(tokenizer(prompt + answer, add_special_tokens=True)["input_ids"])


if __name__ == "__main__":
    save_arc_tokenizer()
    print(f"wrote {SHIPPED_TOKENIZER_DIR}")
