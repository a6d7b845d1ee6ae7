"""Every knob of arc_jax with its default. Experiment configs import `get_config` from here and
change only what their experiment changes.

The defaults are the main command's budget (README, "Time and memory of the main job"): the
shipped model (`arc_jax/assets/arc_phi3_small`), per-task TTFT of 3 batch-1 steps at lr 1e-3,
bfloat16 matmuls, buckets up to its 4096-token training length, then 8 views per test input,
each decoding at most its task's answer cap, voted. Steps and learning rate were chosen on the
50 held-out training tasks (`data.holdout`), never on evaluation outputs.

    python -m arc_jax.main --config=configs/base.py --config.data.max_tasks=2 --config.train.steps=4

Every experiment config also comes in a full-scale variant for a real Phi-3 checkpoint on an
accelerator (`full_scale`: bfloat16, sequences up to 4096 tokens), named after a colon:

    python -m arc_jax.main --config=configs/color_swap.py:phi3 --config.model.path=/path/to/phi3
"""

import ml_collections

DEFAULT_MODEL = "arc_jax/assets/arc_phi3_small"  # the project's trained model (its README.md)


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    """The defaults; `variant` "phi3" = `full_scale` of them."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; variants: "
                         f"{', '.join(repr(v) for v in VARIANTS)}")
    return VARIANTS[variant](_defaults())


def full_scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The research log's setting on an accelerator: a published Phi-3-mini checkpoint (a
    transformers directory; give its path as `model.path`), bfloat16 weights and activations,
    episodes up to 4096 tokens, LoRA rank 32 on every projection (as the log), per-task TTFT of
    32 steps of 4 rows at lr 1e-4, cuDNN's fused attention, a 60 GiB memory budget (an 80 GB
    GPU), 8 views. What it needs: about 7.6 GB for the bfloat16 base (3.8 B parameters), shared
    by every task's adapter (50 M parameters each at rank 32 on all four projections: about
    0.8 GB with its float32 gradient and Adam state), plus the activations of the tasks stepped
    at once, which `memory_gb` sizes."""
    c.model.path = "phi3"  # e.g. huggingface-cli download microsoft/Phi-3-mini-4k-instruct
    c.model.dtype = "bfloat16"
    c.model.compute_dtype = "bfloat16"
    c.model.attention = "dot_product"
    c.model.remat = True
    c.data.buckets = (512, 1024, 2048, 4096)
    c.data.max_seq_len = 4096
    c.memory_gb = 60.0
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.train.steps = 32
    c.train.batch_size = 4
    c.train.learning_rate = 1e-4
    c.train.warmup_steps = 4
    return c


def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"  # names the default workdir: workdirs/<name>
    c.mode = "ttft"  # finetune | ttft | evaluate
    c.workdir = ""  # "" = workdirs/<name>
    c.seed = 0  # the one seed: params, data, dropout and decoding keys derive from it
    c.memory_gb = 8.0  # memory budget of the job: sizes TTFT units (XLA's estimate of the step)
    c.deadline_minutes = 0.0  # > 0: stop training in time to evaluate and write a submission
    c.compilation_cache = "~/.cache/arc_jax/xla"  # JAX's persistent compilation cache; "" = off

    c.model = ml_collections.ConfigDict()
    c.model.path = DEFAULT_MODEL  # a transformers Phi-3 directory (config.json + safetensors)
    c.model.tokenizer = ""  # "" = the tokenizer in model.path, else the shipped ARC tokenizer
    c.model.dtype = "float32"  # parameter dtype of the frozen base: float32 | bfloat16
    c.model.compute_dtype = "float32"  # activations: float32 | bfloat16
    c.model.matmul_dtype = "bfloat16"  # linear layers' operands: compute (= compute_dtype) |
    # bfloat16 (accumulated in float32; 2-4x faster GEMMs on AMX CPUs, see arc_jax.model.matmul)
    c.model.quantize = "none"  # weight-only frozen base: none | int8 | int4 (LoRA only)
    c.model.attention = "blocked"  # blocked | xla | dot_product (cuDNN's fused kernel on GPU)
    c.model.attention_block = 128  # query rows per block of "blocked"
    c.model.remat = False  # recompute each layer's activations in the backward pass
    # finetune from scratch: hidden_size > 0 makes a random Phi-3 of this size for the shipped
    # ARC tokenizer (seeded by `seed`) instead of loading model.path
    c.model.scratch = ml_collections.ConfigDict(dict(
        hidden_size=0, num_hidden_layers=0, num_attention_heads=0, num_key_value_heads=0,
        intermediate_size=0))

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = True  # False = full fine-tuning (finetune mode only)
    c.lora.rank = 32
    c.lora.alpha = 64.0
    c.lora.dropout = 0.0
    c.lora.targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    c.data = ml_collections.ConfigDict()
    # finetune mode: what to train on. A source (bundle name, directory of ARC task files or of
    # RE-ARC pools `<task_id>.json` = [{"input", "output"}, ...], challenges file) or a tuple of
    # (source, weight): episodes are drawn from sources in proportion to their weights.
    c.data.train = ml_collections.FieldReference("kaggle2024/training", field_type=object)
    # finetune: tasks held out of base training (for tuning), RE-ARC pools included: "every:N[:K]"
    # = every N-th sorted kaggle2024/training id from the K-th, "id1,id2,...", or "none".
    # The default holds out 50 tasks: 007bbfb7, 06df4c85, ... (arc_jax.data.pools.holdout_ids).
    c.data.holdout = "every:8"
    c.data.context_pairs = (2, 4)  # finetune episodes: context pairs drawn from min..max per row
    c.data.eval = "kaggle2024/evaluation"  # ttft/evaluate: bundle name, dir or challenges file
    c.data.eval_solutions = ""  # Kaggle solutions file for a challenges data.eval
    c.data.max_tasks = 0  # 0 = all; N = the first N task ids in sorted order
    c.data.task_ids = ()  # only these tasks (before max_tasks); () = all
    # then a fixed subset by rule, as data.holdout: "every:4" = every 4th sorted id (100 tasks)
    c.data.subset = ""
    c.data.grid_format = "shape_numbered"  # minimal | shape | numbered | shape_numbered
    c.data.loss_on = "target"  # target | all_outputs
    c.data.buckets = (512, 1024, 2048, 4096)
    # buckets above this are dropped; longer tasks follow data.overflow. 4096: the shipped
    # model's training length (26 of the 400 evaluation tasks' n-1 rows are longer; at 8192, 4)
    c.data.max_seq_len = 4096
    c.data.overflow = "truncate"  # longer tasks: truncate (drop train pairs) | skip

    c.augment = ml_collections.ConfigDict()
    c.augment.n_leave_out = 1  # k of leave-k-out: 1 = the log's "n-1", 2 = "n-2"
    c.augment.shuffle_pairs = True
    c.augment.geometric = False  # the 8 dihedral transforms
    c.augment.color_swap = False  # random colour permutation
    c.augment.keep_background = True  # colour swap permutes 1..9 and keeps 0
    c.augment.preserve_color = False  # keep some samples in the original colours ...
    c.augment.preserve_color_prob = 0.5  # ... with this probability

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3
    c.train.batch_size = 1  # rows per step (per task in per_task mode)
    c.train.grad_accum = 1
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"  # cosine | linear | constant
    c.train.warmup_steps = 0
    c.train.weight_decay = 0.0
    c.train.max_grad_norm = 1.0
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    c.train.heldout_every = 0  # finetune: >0: val loss of the held-out training tasks every N steps
    c.train.stop_after_steps = 0  # >0: stop this process after N updates; rerun to resume
    c.train.stop_after_minutes = 0.0  # >0: pause after this long (checkpointed); rerun to resume

    c.ttft = ml_collections.ConfigDict()
    c.ttft.mode = "per_task"  # joint (one adapter for all tasks) | per_task (one adapter each)
    c.ttft.tasks_per_device = 0  # per_task: adapters vmapped per device; 0 = from memory_gb
    c.ttft.export_adapters = False  # per_task: also write <workdir>/adapters/<task_id>/ (PEFT)

    c.eval = ml_collections.ConfigDict()
    c.eval.n_augmentations = 8  # decoded views per test input (dihedral x colour), voted
    c.eval.temperature = 0.0  # 0 = greedy
    c.eval.top_k = 0
    c.eval.max_new_tokens = 0  # 0 = enough for a 30x30 grid in the format
    # vote decoding: any = every view may decode max_new_tokens; task = a view stops after the
    # answer tokens its task allows (the inference.answer_token_cap rule, from the train pairs)
    c.eval.answer_cap = "task"
    # grid: each token is chosen among those that keep the answer a well-formed grid in the
    # format (arc_jax.infer.grammar), for vote and dfs alike | none: the model's own choice
    c.eval.grammar = "grid"
    c.eval.strategy = "vote"  # vote: one decoded answer per view | dfs: all above dfs_min_prob
    c.eval.dfs_min_prob = 0.1  # dfs: keep every completion with probability >= this, per view
    c.eval.dfs_max_candidates = 8  # dfs: at most this many completions per view
    c.eval.dfs_max_steps = 0  # dfs: at most this many expanded tokens per view; 0 = no cap
    c.eval.scoring = "vote"  # vote (count) | poe (sum of log p over score_views) | count_logprob
    c.eval.score_views = 8  # poe: augmented views each distinct candidate is scored under
    c.eval.adapters_from = ""  # evaluate mode: a finished per-task TTFT workdir whose
    # ttft_adapters/<task_id>.npz are evaluated (under its lora config); "" = none
    c.eval.images = 4  # tasks rendered to TensorBoard
    c.eval.reserve_minutes = 0.0  # kept for evaluation before deadline_minutes; 0 = a quarter

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # jax.distributed.initialize() (or ARC_JAX_DISTRIBUTED=1)
    return c


VARIANTS = {"": lambda c: c, "phi3": full_scale}
