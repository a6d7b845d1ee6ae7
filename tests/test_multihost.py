"""Multi-host soundness: the per-task job in 2 `jax.distributed` processes on localhost CPU (2
simulated devices each, gloo collectives) gives the adapters and the answers of one process.

The test spawns this file twice as a script (`python tests/test_multihost.py worker ...`): each
process joins a local coordinator and runs the same tiny job over the global 4-device mesh, in
one shared workdir: per-task TTFT (`run.train_per_task`, adapters gathered by `ttft.gather`),
then evaluation (`run.evaluate_and_write`). Each writes the adapters it holds and the metrics it
returns to the test's directory. The reference is the same job in the test process (one process,
4 simulated devices, see conftest.py), run while the workers run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_PROCESSES = 2
LOCAL_DEVICES = 2
TASKS = ("66e6c45b", "be03b35f", "00576224", "4cd1b7b2")  # short ones: bucket 512


def tiny_config():
    """n-1 per-task TTFT shrunk to seconds (as tests/test_engine.py `tiny`)."""
    from configs import base

    c = base.get_config()
    c.name = "multihost"
    c.model.path = os.path.join(ROOT, "arc_jax/assets/tiny_phi3")  # the random tiny model
    c.model.matmul_dtype = "compute"  # float32 products, as the engine tests
    c.mode = "ttft"
    c.ttft.mode = "per_task"
    c.data.task_ids = TASKS
    c.data.buckets = (512,)  # one bucket: one program each for training, val loss, decoding
    c.train.steps = 2
    c.train.batch_size = 2
    c.train.warmup_steps = 1
    c.train.log_every = 1  # every step's metrics are fetched across the processes
    c.ttft.tasks_per_device = 1  # one unit: the 4 tasks over the 4 global devices
    c.lora.rank = 4
    c.eval.n_augmentations = 2
    c.eval.max_new_tokens = 16
    c.compilation_cache = ""  # the test session's cache (conftest.py), if any
    return c


def _save_adapters(path: str, adapters) -> None:
    from flax.traverse_util import flatten_dict

    np.savez(path, **{f"{i}|{'/'.join(k)}": np.asarray(v) for i, tree in adapters.items()
                      for k, v in flatten_dict(tree).items()})


def _load_adapters(path: str) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as f:
        for key in f.files:
            i, name = key.split("|", 1)
            out.setdefault(int(i), {})[name] = f[key]
    return out


def run_job(workdir: str, out: str, name: str) -> None:
    """The tiny job in `workdir`: writes `<out>/<name>_adapters.npz` after TTFT and
    `<out>/<name>_overall.json` after evaluation."""
    from arc_jax import run
    from arc_jax.data.arrays import pad_tasks

    setup = run.load_setup(tiny_config(), workdir)
    try:
        tasks = run.load_task_list(setup.config.data.eval, "", 0, setup.config.data.task_ids)
        adapters, done = run.train_per_task(setup, tasks, pad_tasks(tasks))
        assert done
        _save_adapters(os.path.join(out, f"{name}_adapters.npz"), adapters)
        overall = run.evaluate_and_write(setup, tasks, adapters, setup.params)
    finally:
        setup.job.close()
        setup.writer.close()
    with open(os.path.join(out, f"{name}_overall.json"), "w") as f:
        json.dump(overall, f, sort_keys=True)


def worker(process_id: int, port: int, workdir: str, out: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                               num_processes=N_PROCESSES, process_id=process_id,
                               initialization_timeout=120)
    assert jax.process_count() == N_PROCESSES
    assert jax.device_count() == N_PROCESSES * LOCAL_DEVICES, jax.devices()
    run_job(workdir, out, f"process{process_id}")
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_adapters_and_answers_of_one(tmp_path):
    import jax

    assert jax.device_count() == N_PROCESSES * LOCAL_DEVICES
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "worker", str(p), str(port),
         str(tmp_path / "multi"), str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in range(N_PROCESSES)]
    try:
        run_job(str(tmp_path / "single"), str(tmp_path), "single")  # while the workers run
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    single = _load_adapters(str(tmp_path / "single_adapters.npz"))
    assert sorted(single) == list(range(len(TASKS)))
    for process in range(N_PROCESSES):
        path = tmp_path / f"process{process}_adapters.npz"
        assert path.exists(), f"process {process} failed in TTFT:\n{logs[process][-4000:]}"
        multi = _load_adapters(str(path))
        assert sorted(multi) == sorted(single), process
        for i in single:
            assert sorted(multi[i]) == sorted(single[i])
            for name, value in single[i].items():
                np.testing.assert_allclose(multi[i][name], value, rtol=0, atol=1e-5,
                                           err_msg=f"process {process}, task {i}, {name}")
    # every adapter was saved once, by process 0, into the shared workdir
    assert sorted(os.listdir(tmp_path / "multi" / "ttft_adapters")) == sorted(
        f"{t}.npz" for t in TASKS)

    with open(tmp_path / "single_overall.json") as f:
        expected = json.load(f)
    for process in range(N_PROCESSES):
        assert procs[process].returncode == 0, (
            f"process {process} failed in evaluation:\n{logs[process][-4000:]}")
        with open(tmp_path / f"process{process}_overall.json") as f:
            got = json.load(f)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, float):
                np.testing.assert_allclose(got[key], value, rtol=1e-5, err_msg=key)
            else:
                assert got[key] == value, key
    for name in ("submission.json",):
        with open(tmp_path / "multi" / name) as f, open(tmp_path / "single" / name) as g:
            assert json.load(f) == json.load(g), name


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    sys.path.insert(0, ROOT)
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
