"""Training: the pure step, test-time fine-tuning units across devices, checkpoints, logging.

    step         loss, optimizer, `train_step`
    ttft         per-task (shard_map over a tasks axis + vmap) and joint fine-tuning
    checkpoint   orbax checkpoints with resume
    tensorboard  tensorboardX scalars and ARC-palette images
"""
