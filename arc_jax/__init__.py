"""arc_jax: test-time fine-tuning of language models on ARC, in JAX/Flax."""

from arc_jax.data import BUNDLES, Pair, Task, TaskError, load_tasks
from arc_jax.encode import EncodedExample, check_device_encoding, encode_episode
from arc_jax.formats import GRID_FORMATS, PromptTemplate, grid_to_text, text_to_grid
from arc_jax.pipeline import PipelineConfig, eval_batch, train_batch
from arc_jax.task_arrays import TaskArrays, pad_tasks, unpad
from arc_jax.tokenizer import TokenizerError, load_tokenizer

__all__ = [
    "BUNDLES", "GRID_FORMATS", "EncodedExample", "Pair", "PipelineConfig", "PromptTemplate",
    "Task", "TaskArrays", "TaskError", "TokenizerError", "check_device_encoding",
    "encode_episode", "eval_batch", "grid_to_text", "load_tasks", "load_tokenizer", "pad_tasks",
    "text_to_grid", "train_batch", "unpad",
]
