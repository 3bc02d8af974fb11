"""Train an experiment: ``python -m experiments.train --config experiments/configs/NAME.py --workdir DIR
[--config.key=value ...]``. Running it again on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/configs/NAME.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for config.json, metrics.jsonl, checkpoints and plots")
flags.DEFINE_bool("progress", True, "show a progress bar per epoch")


def main(argv):
    del argv
    from cnnjax.train.loop import fit

    fit(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    sys.exit(cli.run(main))
