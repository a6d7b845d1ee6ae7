"""arc_jax: test-time fine-tuning of language models on ARC, in JAX/Flax."""

from arc_jax.convert import CheckpointError, load_pretrained, save_pretrained
from arc_jax.data import BUNDLES, Pair, Task, TaskError, load_tasks
from arc_jax.encode import EncodedExample, check_device_encoding, encode_episode
from arc_jax.formats import GRID_FORMATS, PromptTemplate, grid_to_text, text_to_grid
from arc_jax.lora import LoraConfig, init_lora, merge_lora
from arc_jax.model import Phi3, Phi3Config
from arc_jax.peft_io import load_peft, save_peft
from arc_jax.pipeline import PipelineConfig, eval_batch, train_batch
from arc_jax.task_arrays import TaskArrays, pad_tasks, unpad
from arc_jax.tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "BUNDLES", "check_device_encoding", "CheckpointError", "encode_episode", "EncodedExample",
    "eval_batch", "GRID_FORMATS", "grid_to_text", "init_lora", "load_peft", "load_pretrained",
    "load_tasks", "load_tokenizer", "LoraConfig", "merge_lora", "pad_tasks", "Pair", "Phi3",
    "Phi3Config", "PipelineConfig", "PromptTemplate", "save_peft", "save_pretrained", "Task",
    "TaskArrays", "TaskError", "text_to_grid", "TokenizerError", "train_batch", "unpad",
]
