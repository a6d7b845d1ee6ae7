"""Trains the project's own small Phi-3-architecture model from scratch (full fine-tuning of the
tiny random model, no LoRA) on the kaggle2024 training tasks with the augmentations; the exported
`workdirs/train_base_model/model` is a transformers directory usable as `model.path`.

    python -m arc_jax.main --config=configs/train_base_model.py
    python -m arc_jax.main --config=configs/train_base_model.py --config.train.steps=20 \
        --config.data.max_tasks=8      # a quick run

Not a row of the research log: it makes the baseline model the log's rows start from.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.name = "train_base_model"
    c.mode = "finetune"
    c.lora.enabled = False
    c.data.train = "kaggle2024/training"
    c.augment.geometric = True
    c.augment.color_swap = True
    c.train.steps = 2000
    c.train.batch_size = 8
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 100
    c.train.weight_decay = 0.01
    c.train.checkpoint_every = 200
    return c
