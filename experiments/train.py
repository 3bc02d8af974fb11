"""Train an experiment: ``python -m experiments.train --config experiments/configs/NAME.py --workdir DIR
[--config.key=value ...]``. Running it again on the same workdir resumes from the latest checkpoint.
With ``config.ensemble_members = K > 1`` it trains K members in WORKDIR/member_k and scores their ensemble
(:mod:`cnnjax.train.ensemble`).

Exit status: 0 finished; 75 stopped by SIGTERM / Ctrl-C / --stop_after_steps with a checkpoint saved
(run the same command again to resume); 2 a user error (one ``error:`` line); anything else a crash.

Multi-process: ``python -m experiments.launch --num_processes=N -- python -m experiments.train ...`` on one
machine, or one process per host with --coordinator_address/--num_processes/--process_id (or
--distributed_auto under SLURM / on TPU pods); see the README's "Scaling out".
"""

from __future__ import annotations

# ruff: noqa: E402  (the program's first steps below come before its imports)
if __name__ == "__main__":  # first: SIGTERM / Ctrl-C is one line and status 75 from here on (experiments.startup)
    from experiments import startup

    startup.begin()  # the signal handler, then the process settings (cnnjax.cpu.process)

import os
import sys

from absl import flags
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/configs/NAME.py)",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "directory for config.json, metrics.jsonl, checkpoints and plots")
flags.DEFINE_bool("progress", True, "show a progress bar per epoch")
flags.DEFINE_bool("tensorboard", False, "also write TensorBoard event files to WORKDIR/tensorboard (tensorboardX)")
flags.DEFINE_integer("stop_after_steps", None, "checkpoint and stop after this many steps of this call, as SIGTERM "
                     "would (time-boxed jobs; run again to resume)")
flags.DEFINE_bool("compile_stats", False, "at the end, print the seconds JAX spent tracing, lowering and compiling "
                  "this run's programs, or loading them from its compilation cache (cnnjax.compile_cache)")
cli.define_distributed_flags()


def main(argv):
    del argv
    if FLAGS.config.get("deterministic", False):  # before JAX starts its backend (cnnjax.train.checks)
        from cnnjax.train.checks import with_deterministic_flag

        os.environ["XLA_FLAGS"] = with_deterministic_flag(os.environ.get("XLA_FLAGS", ""))
    cli.join_cluster()
    from cnnjax import compile_cache
    from cnnjax.train.ensemble import fit_ensemble
    from cnnjax.train.loop import fit

    train = fit_ensemble if FLAGS.config.get("ensemble_members", 1) > 1 else fit
    stages = compile_cache.record_stages() if FLAGS.compile_stats else None
    result = train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress, tensorboard=FLAGS.tensorboard,
                   stop_after_steps=FLAGS.stop_after_steps)
    if stages is not None:
        print(compile_cache.describe_stages(stages), flush=True)
    if result.get("interrupted"):
        raise SystemExit(cli.EXIT_INTERRUPTED)  # checkpoint saved, run not finished: schedulers must not see 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    sys.exit(cli.run(main))
