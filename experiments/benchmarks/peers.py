"""Shared set-up of the arc_jax-vs-PyTorch benchmarks: one random Phi-3, one LoRA, one ARC batch.

The parent process writes a random transformers Phi-3 (`write_model`) and a batch of real
evaluation episodes encoded by arc_jax (`write_batch`) to a work directory; each side then runs in
its own fresh process (`run_side`), so peak RSS is that side's alone. The PyTorch side gets the
same token ids, attention mask and labels (-100 outside the loss mask).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

SIZES = {  # name -> transformers.Phi3Config kwargs
    "d512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=8),
    "d1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=16),
}
LORA = dict(r=32, alpha=64.0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))


def write_model(path: str, size: str, seed: int = 0) -> None:
    """A random fp32 transformers Phi-3 of `SIZES[size]` (vocab 32064) saved under `path`."""
    import torch
    import transformers

    if os.path.exists(os.path.join(path, "config.json")):
        return
    torch.manual_seed(seed)
    config = transformers.Phi3Config(
        vocab_size=32064, max_position_embeddings=8192, original_max_position_embeddings=8192,
        bos_token_id=1, eos_token_id=32000, pad_token_id=32000, **SIZES[size])
    transformers.Phi3ForCausalLM(config).float().save_pretrained(path)


def write_batch(path: str, seq_len: int, batch: int, seed: int = 0) -> dict:
    """n-1 training episodes of the first `batch` evaluation tasks of bucket `seq_len`, as numpy
    `[B, T]` arrays (tokens, loss_mask, attention_mask, positions, length) in `path` (.npz)."""
    import jax
    import jax.numpy as jnp

    from arc_jax.data.arrays import pad_tasks
    from arc_jax.data.encode import check_device_encoding
    from arc_jax.data.pipeline import PipelineConfig, assign_buckets, max_train_length, train_batch
    from arc_jax.data.tasks import load_tasks
    from arc_jax.data.tokenizer import load_tokenizer

    tasks = list(load_tasks("kaggle2024/evaluation").values())
    cfg = PipelineConfig()
    vocab = check_device_encoding(load_tokenizer(), cfg.fmt)
    lengths = [max_train_length(vocab, cfg.fmt, np.asarray(
        [[p.input.shape, p.output.shape] for p in t.train])) for t in tasks]
    groups = assign_buckets([t.task_id for t in tasks], lengths, cfg)
    members = np.resize(np.asarray(groups[seq_len], np.int32), batch)
    out = train_batch(jax.random.key(seed), pad_tasks(tasks), jnp.asarray(members),
                      vocab=vocab, cfg=cfg, seq_len=seq_len)
    fields = ("tokens", "loss_mask", "attention_mask", "positions", "length", "prompt_length")
    arrays = {k: np.asarray(getattr(out, k)) for k in fields}
    np.savez(path, **arrays, task_ids=np.asarray([tasks[i].task_id for i in members]))
    return arrays


def load_batch(path: str) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def torch_labels(batch: dict) -> np.ndarray:
    """transformers labels `[B, T]`: the token where the loss mask is set, else -100."""
    mask = batch["loss_mask"].copy()
    mask[:, 0] = False
    return np.where(mask, batch["tokens"], -100).astype(np.int64)


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which blocks on its own outputs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def emit(result: dict) -> None:
    """A side process's result: one JSON line on stdout, tagged so the parent finds it."""
    print("RESULT " + json.dumps(result), flush=True)


def run_side(module: str, args: list[str], threads: int) -> dict:
    """Runs `python -m module args` in a fresh process and returns its `emit`ted result.

    OpenMP threads sleep when idle (OMP_WAIT_POLICY=PASSIVE), so PyTorch's pool does not spin on
    the cores while XLA's runs in the same process.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu",
               OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", module, *args], env=env, text=True,
                          capture_output=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{module} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


def add_side_args(parser) -> None:
    """The arguments every parent/side benchmark takes: threads, work directory, and the model
    and batch files the parent hands its sides."""
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--workdir", default="")
    parser.add_argument("--model", default="")
    parser.add_argument("--batch-file", default="")


def dispatch(args, parent, sides: dict) -> None:
    """`parent(args)` for `--side parent`, else the named side's result, emitted for the parent."""
    if args.side == "parent":
        parent(args)
    else:
        emit(sides[args.side](args))


def peft_train_model(model_path: str, threads: int):
    """The PyTorch peer: the saved Phi-3 with PEFT LoRA (`LORA`) on, in train mode, and its
    trainable parameters."""
    import peft
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.Phi3ForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
        target_modules=list(LORA["targets"])))
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]
