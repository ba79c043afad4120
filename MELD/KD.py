"""Stages 5-6 - distil the text teacher into the audio or video student on MELD (docs/METHOD.md §3).

    python MELD/KD.py --student audio --teacher text        # then --student video

Reads   datasets/MELD/{train,dev,test}_meld_emo.csv; save_model/text.bin (teacher);
        audio: the mp4 clips and save_model/audio.bin (student init); video: the stored frames
        (the video student starts from the pretrained TimeSformer, not video.bin)
Writes  MELD/MELD/save_model/text_KD_audio.bin or text_KD_video.bin, and its .json
        (<name> = text_KD_audio / text_KD_video), <name>_curves.png, <name>_confusion.png;
        --seeds S1 S2 ...: those per seed (<name>_seed<S>.*), the best dev seed's also under the
        names above, and <name>_seeds.json/.md (mean ± std over seeds)
Caches  audio students: each clip's decoded 16 kHz samples in MELD/feature/audio_cache/ (read back by later epochs
        and stages; --audio_cache_dir DIR elsewhere, --audio_cache False: decode every time)
        every student: the text teacher's outputs for every training utterance, computed once, in
        save_model/text_teacher_outputs.pt (keyed by text.bin, the prompt, the precision and the data;
        --teacher_cache False: the teacher runs in every step instead)

MELD objective: CE + 0.1 L_logit + L_feat (--logit_weight 0.1, --feature_weight 1).
"""

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import (checkpoints, cli, dataset, engine, loaders, losses, pretrained, results, runtime,  # noqa: E402
                    schedule, teacher_cache, utils)
from magtkd.artifacts import StageFiles, SubstitutionReport, kd_name  # noqa: E402

# Flags: the reference's names, MELD's defaults; the objective CE + 0.1 L_logit + L_feat (docs/METHOD.md §3)
DEFAULTS = dict(epochs=10, batch_size=4, learning_rate=1e-5)
KD_WEIGHTS = dict(logit_weight=0.1, feature_weight=1.0)


def objective(student, batch: dict, *, teacher, logit_weight: float, feature_weight: float,
              tau: float) -> torch.Tensor:
    """CE + logit_weight * L_logit(student, teacher) + feature_weight * L_feat(student, teacher)
    (docs/METHOD.md §3). The teacher is frozen and sees the same samples (``teacher``: the text model, or
    its outputs computed once, `magtkd.teacher_cache`). CE is over this process's samples; the two
    distillation terms relate the samples of every process's micro-batch (`runtime.gather_rows`), so N
    processes of batch b compute what one process of batch N*b computes."""
    s_rep, s_logits = student.encode(batch)
    with torch.no_grad():
        t_rep, t_logits = teacher.encode(batch)
    s_logits, t_logits = s_logits.float(), t_logits.float()
    loss = F.cross_entropy(s_logits, batch["labels"])
    gather = runtime.gather_rows
    loss = loss + logit_weight * losses.logit_kd_loss(gather(s_logits), gather(t_logits), tau=tau)
    if feature_weight:
        loss = loss + feature_weight * losses.feature_kd_loss(gather(s_rep.float()), gather(t_rep.float()))
    return loss


def parser():
    """The flags: the reference's names with MELD's defaults, and the distillation's own."""
    parser = cli.training_parser(MELD, HERE, __doc__, **DEFAULTS, kd=True)
    parser.add_argument("--student", choices=("audio", "video"), required=True,
                        help="the modality distilled: audio (starts from audio.bin) or video (starts from the "
                             "pretrained TimeSformer)")
    parser.add_argument("--teacher", choices=("text",), default="text", help="the frozen teacher (text.bin)")
    parser.add_argument("--logit_weight", type=float, default=KD_WEIGHTS["logit_weight"],
                        help="weight of the correlation logit loss")
    parser.add_argument("--feature_weight", type=float, default=KD_WEIGHTS["feature_weight"],
                        help="weight of the relational feature loss")
    parser.add_argument("--tau", type=utils.positive_float, default=2.0, help="logit-loss temperature")
    cli.add_audio_cache_flags(parser)
    return cli.add_prompt_flag(parser)  # the teacher's prompt: text.json's


def frozen_teacher(args, device):
    """The teacher from <teacher>.bin with the prompt its record names, in eval mode, without gradients."""
    prompt = pretrained.text_prompt(args.save_dir / f"{args.teacher}.json", args.prompt)
    teacher, field = pretrained.load_encoder(args.teacher, args.pretrained_dir, MELD.num_classes, prompt=prompt)
    checkpoints.load_checkpoint(teacher, args.save_dir / f"{args.teacher}.bin", f"MELD/{args.teacher}.py",
                                MELD.name)
    return teacher.to(device).eval().requires_grad_(False), field


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    seeds = cli.seed_list(args.seed, args.seeds, args.train)
    name, stage = kd_name(args.teacher, args.student), f"MELD KD {args.teacher}->{args.student}"
    usual = StageFiles.first_stage(args.save_dir, name)
    audio_cache = cli.audio_cache_dir(args.audio_cache, args.audio_cache_dir, args.feature_dir)

    # Data: one dialogue-prefix sample per utterance, in CSV order (read once for all seeds)
    samples = dataset.load_samples(MELD, args.data_dir)
    runtime.log_start(stage, vars(args), device, {s: len(v) for s, v in samples.items()})
    report = SubstitutionReport()
    # The samples the relational KD terms relate: one micro-batch of every process (docs/METHOD.md §3)
    relational = losses.relational_batch(args.batch_size, runtime.world_size(), args.grad_accum) if args.train \
        else None

    runs, files = {}, {}
    for seed in seeds:
        # Models: the student (audio from audio.bin; video from the pretrained TimeSformer) and, for
        # training only, the frozen text teacher from text.bin (built again per seed, so that each seed
        # draws its random numbers exactly as a run with that single seed)
        runtime.set_seed(seed, args.deterministic)
        student, s_field = pretrained.load_encoder(args.student, args.pretrained_dir, MELD.num_classes,
                                                   args.feature_dir, audio_cache)
        if args.train:
            teacher, t_field = frozen_teacher(args, device)
            if args.student == "audio":
                checkpoints.load_checkpoint(student, args.save_dir / "audio.bin", "MELD/audio.py", MELD.name)
        student.to(device)
        # Dev/test batches carry the student's input only; training batches also the teacher's prompts
        # when it runs in every step (--teacher_cache False)
        batches = loaders.split_loaders(samples, [s_field], args.batch_size, args.num_workers, seed,
                                        ("dev", "test"), device=device, eval_batch_size=args.eval_batch_size)
        if args.train:
            batches.update(loaders.split_loaders(samples, [s_field] if args.teacher_cache else [t_field, s_field],
                                                 args.batch_size, args.num_workers, seed, ("train",), device=device))
        data = loaders.SampleBatches(batches, device, report)
        files[seed] = StageFiles.first_stage(args.save_dir, name, cli.seed_tag(seed, seeds))
        # fp16 autocast with a gradient scaler, as the authors (docs/METHOD.md §3)
        config = engine.FitConfig.from_flags(vars(args), seed=seed, stage=stage,
                                             script=f"MELD/KD.py --student {args.student}", dataset=MELD.name,
                                             labels=MELD.labels, files=files[seed], width=student.width,
                                             authors_batch=4, amp_dtype=torch.float16,
                                             clip_scaled=args.reference_kd_clip,
                                             sizes={"relational_batch": relational})
        if not args.train:
            result = engine.evaluate_checkpoint(student, data, config)
            if args.student == "audio":
                report.write(usual.eval_substitutions)
            return result
        if args.teacher_cache:
            # The frozen teacher's outputs for every training utterance, computed once (or read from
            # <save_dir>/text_teacher_outputs.pt): the steps read them instead of running it
            teacher = teacher_cache.teacher_outputs(teacher, t_field, samples["train"],
                                                    args.save_dir / f"{args.teacher}.bin", data, config)

        # Optimizer, schedule and gradient scaler: AdamW; the authors' curve over epochs
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.learning_rate)
        scheduler = schedule.reference_schedule(optimizer, data, config)
        scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
        loss = functools.partial(objective, teacher=teacher, logit_weight=args.logit_weight,
                                 feature_weight=args.feature_weight, tau=args.tau)
        runs[seed] = engine.fit(student, loss, data, optimizer, scheduler, config, scaler)

    # Artifacts: the substitution report of audio students; with several seeds <name>_seeds.json/.md and
    # the best dev seed's files also as {teacher}_KD_{student}.bin/.json
    if args.student == "audio":
        report.write(usual.substitutions)
    return results.finish_seeds(runs, files, usual, MELD.labels)


if __name__ == "__main__":
    utils.run(main)
