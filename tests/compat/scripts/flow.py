"""Runs the three scripts here one after another in one process, each into its own
$OPENAI_LOGDIR under OUT, as a user runs the reference's scripts in turn (setup_dist is
idempotent, so the process keeps one group): train to step 2, run the same training again
with --lr_anneal_steps 3 (the folder holds the run: it resumes), once more (nothing left to
train), then sample and bits/dim with step 3's weights.

    python flow.py OUT DATA_DIR [model flags ...]        (or under torchrun)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nll_script  # noqa: E402
import sample_script  # noqa: E402
import train_script  # noqa: E402


def run(out, data_dir, model_flags):
    def log_into(name):
        os.environ["OPENAI_LOGDIR"] = os.path.join(out, name)

    log_into("train")
    train = ["--data_dir", data_dir, "--batch_size", "2", "--lr", "1e-3", "--log_interval", "1"]
    train += ["--save_interval", "2", *model_flags]
    train_script.main([*train, "--lr_anneal_steps", "2"])
    train_script.main([*train, "--lr_anneal_steps", "3"])  # resumes at step 2
    train_script.main([*train, "--lr_anneal_steps", "3"])  # at step 3 already: nothing to do
    weights = os.path.join(out, "train", "model000003.safetensors")
    log_into("sample")
    sample_script.main(["--model_path", weights, "--num_samples", "5", "--batch_size", "2", *model_flags])
    log_into("nll")
    nll = ["--model_path", weights, "--data_dir", data_dir, "--num_samples", "4", "--batch_size", "2"]
    nll_script.main([*nll, *model_flags])


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3:])
