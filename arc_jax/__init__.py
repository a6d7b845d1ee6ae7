"""arc_jax: test-time fine-tuning of language models on ARC, in JAX/Flax."""

from arc_jax.data.arrays import TaskArrays, pad_tasks, unpad
from arc_jax.data.encode import EncodedExample, check_device_encoding, encode_episode
from arc_jax.data.formats import GRID_FORMATS, PromptTemplate, grid_to_text, text_to_grid
from arc_jax.data.pipeline import PipelineConfig, eval_batch, train_batch
from arc_jax.data.tasks import BUNDLES, Pair, Task, TaskError, load_tasks
from arc_jax.data.tokenizer import TokenizerError, load_tokenizer
from arc_jax.model.convert import CheckpointError, load_pretrained, save_pretrained
from arc_jax.model.lora import LoraConfig, init_lora, merge_lora
from arc_jax.model.peft_io import load_peft, save_peft
from arc_jax.model.phi3 import Phi3, Phi3Config

__all__ = [
    "BUNDLES", "check_device_encoding", "CheckpointError", "encode_episode", "EncodedExample",
    "eval_batch", "GRID_FORMATS", "grid_to_text", "init_lora", "load_peft", "load_pretrained",
    "load_tasks", "load_tokenizer", "LoraConfig", "merge_lora", "pad_tasks", "Pair", "Phi3",
    "Phi3Config", "PipelineConfig", "PromptTemplate", "save_peft", "save_pretrained", "Task",
    "TaskArrays", "TaskError", "text_to_grid", "TokenizerError", "train_batch", "unpad",
]
