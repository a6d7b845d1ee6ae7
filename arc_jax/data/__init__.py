"""ARC tasks in, device batches out: tasks → arrays → (sample, augment, encode) → buckets.

    tasks      load and validate ARC tasks (bundles, directories, Kaggle files)
    arrays     padded grid arrays of a task list
    formats    grid text formats and the prompt template
    tokenizer  the shipped ARC tokenizer and the bridge from HF tokenizers
    augment    dihedral and colour augmentations and their exact inverses
    sample     leave-k-out episodes of a task's pairs
    encode     episodes to token ids on device
    pipeline   the jitted sample → augment → encode step per bucket, host-side lengths
"""

from arc_jax.data.tasks import (
    BUNDLES,
    MAX_SIDE,
    NUM_COLORS,
    Pair,
    Task,
    TaskError,
    load_tasks,
)

__all__ = ["BUNDLES", "load_tasks", "MAX_SIDE", "NUM_COLORS", "Pair", "Task", "TaskError"]
