"""Entry point: `python -m arc_jax.main --config=configs/<experiment>.py [--workdir=DIR]
[--config.key=value ...]`. Everything else is importable (`arc_jax.run.train_and_evaluate`)."""

import logging
import os

from absl import app, flags
from ml_collections import config_flags

from arc_jax import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: workdirs/<name>).")
flags.mark_flags_as_required(["config"])


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Drops orbax's and JAX's own info lines (per-save chatter), keeps their warnings."""
    noisy = f"{os.sep}orbax{os.sep}" in record.pathname or "xla_bridge" in record.pathname
    return record.levelno >= logging.WARNING or not noisy


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
        handler.addFilter(_quiet_libraries)
    config = _CONFIG.value
    workdir = _WORKDIR.value or config.workdir or os.path.join("workdirs", config.name)
    overall = run.train_and_evaluate(config, workdir)
    if overall is not None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in overall.items())
        logging.info("%s: %s (results in %s)", config.name, shown, workdir)


if __name__ == "__main__":
    app.run(main)
