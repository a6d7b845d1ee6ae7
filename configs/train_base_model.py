"""Trains the project's own small Phi-3-architecture model from scratch (a random model of
`model.scratch`'s size, all weights trained, no LoRA) on the kaggle2024 training tasks plus
RE-ARC pools of generated pairs for the same tasks, with the augmentations; the exported
`workdirs/train_base_model/model` is a transformers directory usable as `model.path`. This config
trained the shipped `arc_jax/assets/arc_phi3_small` (its README.md is the model card), in
resumable chunks of `train.stop_after_minutes`:

    python -m arc_jax.main --config=configs/train_base_model.py \
        --workdir=$HOME/arc_runs/base_model --config.train.stop_after_minutes=100
    python -m experiments.base_model.ship --workdir $HOME/arc_runs/base_model  # card + assets
    python -m arc_jax.main --config=configs/train_base_model.py --config.train.steps=20 \
        --config.data.max_tasks=8      # a quick run
    python -m arc_jax.main --config=configs/train_base_model.py \
        --config.data.train=kaggle2024/training      # without RE-ARC data

Evaluation tasks and pairs never enter training, nor do the held-out training tasks
(`data.holdout`, every 8th kaggle2024/training id); `<workdir>/training_data.json` lists what was
excluded and used.

Not a row of the research log: it makes the baseline model the log's rows start from.
"""

from configs import base

RE_ARC = "../shared/data/re_arc/tasks"


def get_config(variant: str = ""):
    c = base.get_config(variant)
    c.name = "train_base_model"
    c.mode = "finetune"
    c.lora.enabled = False
    # RE-ARC pairs for the 400 training tasks (../shared/data/re_arc, or generate your own: see
    # the README); three quarters of the episodes come from them.
    c.data.train = (("kaggle2024/training", 1.0), (RE_ARC, 3.0))
    # Every output grid of an episode is a prediction target (each given the pairs before it):
    # several times the supervised tokens of `target` at the same cost.
    c.data.loss_on = "all_outputs"
    c.augment.geometric = True
    c.augment.color_swap = True
    # From scratch: 4 layers, hidden 192, 6 query / 2 key-value heads (1.6 M parameters).
    c.model.scratch.update(dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                                num_key_value_heads=2, intermediate_size=512))
    c.model.matmul_dtype = "bfloat16"
    c.data.max_seq_len = 4096
    c.train.steps = 500
    c.train.batch_size = 8
    c.train.learning_rate = 1.5e-3
    c.train.warmup_steps = 50
    c.train.weight_decay = 0.01
    c.train.checkpoint_every = 50
    c.train.heldout_every = 100  # the held-out curve of the model card
    return c
