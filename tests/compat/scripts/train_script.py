"""A training script that uses the library the way improved-diffusion's scripts/image_train.py
uses its own (written here, not copied): the flags from the defaults dicts through
script_util.add_dict_to_argparser, setup_dist, logger.configure (the folder comes from
$OPENAI_LOGDIR), create_model_and_diffusion, load_data and TrainLoop(...).run_loop() with the
reference's keywords. Training stops at --lr_anneal_steps, as the reference's does."""

import argparse

from iddpm_ext import dist_util, logger
from iddpm_ext.cli.flags import TRAIN_DEFAULTS  # the reference script's flags and defaults
from iddpm_ext.image_datasets import load_data
from iddpm_ext.resample import create_named_schedule_sampler
from iddpm_ext.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from iddpm_ext.train_util import TrainLoop


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, {**TRAIN_DEFAULTS, **model_and_diffusion_defaults()})
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    dist_util.setup_dist()
    logger.configure()

    logger.log("model and diffusion")
    model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()))
    model.to(dist_util.dev())
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("data")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
    )

    logger.log("training")
    loop = TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
    )
    loop.run_loop()


if __name__ == "__main__":
    main()
