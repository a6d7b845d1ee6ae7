"""The published Phi-3 tokenizer through the bridge: accepted in every grid format, on-device
encoding equal to its own on every kaggle2024 evaluation task, loaded beside a legacy
Phi-3-128k `config.json`, and a run of `arc_jax.main` on a random Phi-3 that ships it.

The tokenizer files are those of microsoft/Phi-3-mini-4k-instruct, in the shared fixtures beside
the repository (`../shared/fixtures/phi-3-mini-4k-instruct`, see its SOURCE.md)."""

import functools
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from encode_check import assert_device_equals_tokenizer

from arc_jax.data.encode import check_device_encoding, episode_text
from arc_jax.data.formats import GRID_FORMATS, PromptTemplate
from arc_jax.data.tasks import load_tasks
from arc_jax.data.tokenizer import PIECES, TokenizerError, encode_text, load_tokenizer
from arc_jax.model.convert import read_config, save_pretrained
from arc_jax.model.phi3 import Phi3, Phi3Config

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parents[2] / "shared" / "fixtures" / "phi-3-mini-4k-instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
pytestmark = pytest.mark.skipif(
    not FIXTURE.is_dir(),
    reason=f"the published Phi-3 tokenizer is not at {FIXTURE} (the shared fixtures, "
           "../shared/fixtures relative to the repository)")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FIXTURE)


@functools.cache
def _vocab(tokenizer, fmt_name):
    return check_device_encoding(tokenizer, GRID_FORMATS[fmt_name])


def _piece(vocab, name):
    i = PIECES.index(name)
    return vocab.pieces[i, : vocab.piece_lens[i]].tolist()


def _legacy_128k_config(**changes) -> dict:
    """The fixture's config as Phi-3-mini-128k-instruct's April-2024 config.json has it: rope
    type "su" with 48 short and 48 long factors, original_max_position_embeddings at top level
    only (factors of the published range, not its values)."""
    config = json.loads((FIXTURE / "config.json").read_text())
    config.update(max_position_embeddings=131072, sliding_window=262144, rope_scaling={
        "type": "su",
        "short_factor": [round(1.0 + 0.025 * i, 4) for i in range(48)],
        "long_factor": [round(1.03 * 1.09 ** i, 4) for i in range(48)]})
    config.update(changes)
    return config


def _model_dir(path: Path, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(FIXTURE / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_published_tokenizer_is_accepted(tokenizer, fmt_name):
    vocab = _vocab(tokenizer, fmt_name)
    # What the tokenizer writes, derived from it: <|user|> swallows its newline, and the label
    # after it reads "▁input"; <|end|> and <|assistant|> swallow theirs, and the answer grid after
    # <|assistant|> starts with a lone "▁"; no <s> (add_bos_token false).
    tokens = lambda name: tokenizer.convert_ids_to_tokens(_piece(vocab, name))
    assert tokens("bos") == [] and tokens("prefix") == ["<|user|>"]
    assert tokens("first_input_label") == ["▁input", ":", "<0x0A>"]
    assert tokens("input_label") == ["input", ":", "<0x0A>"]
    assert tokens("output_label") == ["output", ":", "<0x0A>"]
    assert tokens("query_suffix") == ["<|end|>", "<|assistant|>", "▁"]
    assert tokens("answer_suffix") == ["<|end|>"] and int(vocab.end) == 32007
    assert tokenizer.convert_ids_to_tokens(vocab.digits.tolist()) == list("0123456789")


@pytest.mark.parametrize("fmt_name", sorted(GRID_FORMATS))
def test_device_encoding_equals_published_tokenizer_on_every_evaluation_task(tokenizer,
                                                                             fmt_name):
    tasks = list(load_tasks("kaggle2024/evaluation").values())
    assert assert_device_equals_tokenizer(tokenizer, _vocab(tokenizer, fmt_name), fmt_name,
                                          tasks) == 419


def test_generated_answer_decodes_to_the_grid(tokenizer):
    # Decoding continues after the prompt's trailing "▁": the answer tokens decode to the grid.
    fmt = GRID_FORMATS["shape_numbered"]
    task = load_tasks("kaggle2024/evaluation")["00576224"]
    prompt, answer = episode_text([], task.test[0].input, task.test[0].output, fmt,
                                  PromptTemplate())
    ids = encode_text(tokenizer, prompt, answer)
    vocab = _vocab(tokenizer, "shape_numbered")
    n_prompt = len(encode_text(tokenizer, prompt)) + 1  # + the "▁" before the answer grid
    assert ids[n_prompt - 1] == _piece(vocab, "query_suffix")[-1]
    assert tokenizer.decode(ids[n_prompt:]) == answer


def test_legacy_128k_config_loads_tokenizer_and_model_config(tmp_path, tokenizer, caplog):
    legacy = _legacy_128k_config()
    path = _model_dir(tmp_path / "phi3-128k", legacy)
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(path)
    assert str(path / "config.json") in caplog.text
    assert "original_max_position_embeddings" in caplog.text
    text = "<|user|>\ninput:\n1 23\n<|end|>\n<|assistant|>\n4x5\n<|end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    config = read_config(path)
    assert (config.rope_type, config.original_max_position_embeddings) == ("longrope", 4096)
    assert len(config.short_factor) == len(config.long_factor) == 48
    assert config.max_position_embeddings == 131072
    longrope = _legacy_128k_config(rope_scaling={**legacy["rope_scaling"], "type": "longrope"})
    assert Phi3Config.from_hf(longrope) == config


def test_tokenizer_json_alone_when_config_json_is_unreadable(tmp_path, tokenizer, caplog):
    path = _model_dir(tmp_path / "truncated", {})
    (path / "config.json").write_text(json.dumps(_legacy_128k_config())[:200])
    with caplog.at_level(logging.WARNING):
        loaded = load_tokenizer(path)
    assert str(path / "config.json") in caplog.text
    text = "<|user|>\ninput:\n0\n<|end|>\n<|assistant|>\n7\n<|end|>"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.eos_token, loaded.pad_token) == ("<|endoftext|>", "<|endoftext|>")


def test_unloadable_directory_names_the_files_and_the_key(tmp_path):
    path = tmp_path / "config_only"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(_legacy_128k_config()))
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(path)
    message = str(err.value)
    assert str(path / "config.json") in message
    assert "original_max_position_embeddings" in message
    assert "tokenizer files alone failed" in message


def test_legacy_config_errors_name_the_key():
    bad_type = _legacy_128k_config(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"config.json: rope_scaling.type 'dynamic'"):
        Phi3Config.from_hf(bad_type, source="config.json")
    short = _legacy_128k_config()
    short["rope_scaling"]["short_factor"] = short["rope_scaling"]["short_factor"][:47]
    with pytest.raises(ValueError, match=r"rope_scaling.short_factor has 47 .* 48"):
        Phi3Config.from_hf(short)


def test_main_runs_on_a_random_phi3_with_the_published_tokenizer(tmp_path):
    """A model directory as published (legacy 128k-style config.json, the published tokenizer
    files) with a small random Phi-3 of vocab 32064: the baseline run starts, evaluates two
    tasks and writes a submission."""
    config = Phi3Config(
        vocab_size=32064, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_type="longrope",
        short_factor=(1.0,) * 8, long_factor=(4.0,) * 8)
    model = Phi3(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    path = tmp_path / "phi3"
    save_pretrained(path, model, params)
    hf_config = json.loads((path / "config.json").read_text())
    hf_config.update(_legacy_128k_config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))
    hf_config.pop("rope_parameters")
    hf_config["rope_scaling"] = {"type": "su", "short_factor": [1.0] * 8,
                                 "long_factor": [4.0] * 8}
    _model_dir(path, hf_config)
    workdir = tmp_path / "work"
    done = subprocess.run(
        [sys.executable, "-m", "arc_jax.main", "--config=configs/baseline.py",
         f"--config.model.path={path}", "--config.data.max_tasks=2", f"--workdir={workdir}",
         "--config.eval.n_augmentations=1", "--config.eval.max_new_tokens=8",
         "--config.data.buckets=(4096,)", "--config.data.max_seq_len=4096"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    submission = json.loads((workdir / "submission.json").read_text())
    assert sorted(submission) == sorted(load_tasks("kaggle2024/evaluation"))[:2]
