"""Stage 8 - the multi-modal anchor gated transformer on MELD (docs/METHOD.md §5).

    python MELD/multimodal_fusion.py                    # train, select the epoch on dev
    python MELD/multimodal_fusion.py --train False      # evaluate the saved checkpoint on test

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl (--train False: test only, and the .bin)
Writes  MELD/MELD/save_model/multimodal_fusion_best.bin, multimodal_fusion_best.json (test labels
        and predictions), multimodal_fusion_metrics.json (arguments, per-epoch curve, selection),
        multimodal_fusion_curves.png and multimodal_fusion_confusion.png;
        --seeds S1 S2 ...: those files per seed (multimodal_fusion_best_seed<S>.bin, ...), the best dev
        seed's also under the names above, and multimodal_fusion_seeds.json/.md (mean ± std over seeds)

MELD: A = audio_kd, V = video_kd, alpha 0.01, beta 0.08, no L_feat; 304 speakers (speaker2id.json),
with their own padding row (the reference padded with Joey's id 2).
"""

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import dataset, model, utils  # noqa: E402

log = logging.getLogger("magtkd")


def parse_args(argv=None) -> argparse.Namespace:
    """The reference's flags with MELD's defaults, plus ours."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    p.add_argument("--lr", type=utils.positive_float, default=1e-4, help="AdamW learning rate (peak of the schedule)")
    p.add_argument("--l2", type=utils.nonnegative_float, default=1e-6, help="AdamW weight decay")
    p.add_argument("--batch_size", type=utils.positive_int, default=16, help="dialogues per batch")
    p.add_argument("--seed", type=int, default=2024, help="seeds the model and the per-epoch shuffle")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train one model per seed (multimodal_fusion_best_seed<S>.bin; the best dev one also as "
                        "multimodal_fusion_best.bin) and write multimodal_fusion_seeds.json/.md; default: --seed")
    p.add_argument("--epochs", type=utils.positive_int, default=30, help="training epochs")
    p.add_argument("--dropout", type=float, default=0.5, help="dropout everywhere in the model")
    p.add_argument("--hidden_dim", type=utils.positive_int, default=None, help="default: the features' width")
    p.add_argument("--n_head", type=utils.positive_int, default=8, help="attention heads (not stored in checkpoints)")
    p.add_argument("--clsNum", type=int, default=MELD.num_classes, help="number of classes")
    p.add_argument("--train", type=utils.str2bool, default=True,
                   help="True: train; False: evaluate the saved checkpoint on test")
    p.add_argument("--feature_dir", type=Path, default=MELD.default_feature_dir(HERE),
                   help="folder of first_stage_{train,dev,test}_features.pkl")
    p.add_argument("--save_dir", type=Path, default=MELD.default_save_dir(HERE),
                   help="folder of multimodal_fusion_best.{bin,json}")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu; None = CUDA when available, else CPU")
    p.add_argument("--audio_feature", choices=("audio", "audio_kd"), default="audio_kd",
                   help="feature key feeding the audio stream A")
    p.add_argument("--video_feature", choices=("video", "video_kd"), default="video_kd",
                   help="feature key feeding the video stream V")
    p.add_argument("--alpha", type=float, default=0.01, help="weight of KD(A')")
    p.add_argument("--beta", type=float, default=0.08, help="weight of KD(V')")
    p.add_argument("--feature_loss", type=utils.str2bool, default=False, help="add L_feat(X', T') to KD(X')")
    p.add_argument("--separate_text_blocks", type=utils.str2bool, nargs="?", const=True, default=False,
                   help="text-anchor paths use their own a_t/v_t blocks and gates (the reference shares t_t)")
    p.add_argument("--packed", type=utils.str2bool, nargs="?", const=True, default=None,
                   help="per-utterance layers on the real utterances only (True) or on the padded (dialogues x "
                        "longest) grid as the authors' code (False); the same results. Default: packed for batches "
                        "large enough to gain (docs/METHOD.md §5, Speed)")
    p.add_argument("--per_batch_schedule", type=utils.str2bool, nargs="?", const=True, default=False,
                   help="count warmup/total steps in batches instead of the reference's dialogues")
    p.add_argument("--n_speaker", type=int, default=None,
                   help=f"speaker embedding rows without padding (default: {MELD.n_speaker} or the largest id + 1 "
                        "in the data, whichever is larger; "
                        "with --train False: from the checkpoint)")
    utils.add_determinism_flag(p)
    utils.add_loop_flags(p, checkpointing=False)  # --grad_accum, --resume
    return utils.add_debug_flag(p).parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    utils.setup_logging()
    device = utils.resolve_device(args.device)
    seeds = utils.seed_list(args)
    if not args.train:
        return evaluate(args, device)
    stage = "MELD multimodal_fusion"

    # Data: the three feature pickles as per-dialogue tensors on the device (read once for all seeds)
    data = {split: dataset.load_dialogues(dataset.feature_path(args.feature_dir, split), args.audio_feature,
                                          args.video_feature, device) for split in dataset.SPLITS}
    width = model.fusion_width(args.hidden_dim, args.n_head, data["train"].width, str(data["train"].path))
    for split in ("dev", "test"):
        if data[split].width != width:
            raise SystemExit(f"{data[split].path} has width {data[split].width}, {data['train'].path} has {width}")
    # Global speaker ids: 304 on the real data, or more if the pickles hold larger ids
    largest = max(int(s.max()) for split in dataset.SPLITS for s in data[split].speakers)
    n_speaker = args.n_speaker if args.n_speaker is not None else max(MELD.n_speaker, largest + 1)
    for split in dataset.SPLITS:
        data[split].check_ids("speakers", n_speaker, f"n_speaker {n_speaker}; see --n_speaker")
        data[split].check_ids("labels", args.clsNum, f"{args.clsNum} classes; see --clsNum")
    sizes = {"hidden": width, "n_speaker": n_speaker, "n_classes": args.clsNum,
             **{f"{s}_dialogues": len(data[s]) for s in dataset.SPLITS},
             **{f"{s}_utterances": data[s].n_utterances for s in dataset.SPLITS}}
    utils.log_start(stage, args, device, sizes)

    # Objective over real utterances: CE(W_t T') + alpha KD(A') + beta KD(V'), where
    # KD(X') = CE(W_x X') + L_logit(W_x X', W_t T') [+ L_feat(X', T')]; the text side is not detached
    def anchor_kd(logits, feat, t_logits, t_feat, target):
        loss = F.cross_entropy(logits, target) + model.logit_kd_loss(logits, t_logits)
        if args.feature_loss:
            loss = loss + model.feature_kd_loss(feat, t_feat)
        return loss

    def objective(out: model.FusionOutput, target: torch.Tensor) -> torch.Tensor:
        t_logits, t_feat = out.t_logits, out.t_feat
        # Terms built in this order (CE first), so gradients accumulate exactly as in the reference
        ce_t = F.cross_entropy(t_logits, target)
        kd_a = anchor_kd(out.a_logits, out.a_feat, t_logits, t_feat, target)
        kd_v = anchor_kd(out.v_logits, out.v_feat, t_logits, t_feat, target)
        return ce_t + args.alpha * kd_a + args.beta * kd_v

    # Per seed: a fresh model, then the loop with dev selection; checkpoint + test predictions at each best,
    # metrics every epoch, plots at the end (multimodal_fusion_best_seed<S>.bin, ... with several seeds)
    names = list(MELD.labels) if args.clsNum == MELD.num_classes else [str(i) for i in range(args.clsNum)]
    results = {}
    for seed in seeds:
        # Model: audio, video and text anchors over the dialogue
        utils.set_seed(seed, args.deterministic)
        fusion = model.AnchorGatedTransformer(width, args.clsNum, n_speaker, args.n_head, args.dropout,
                                              args.separate_text_blocks).to(device)
        results[seed] = utils.fit_fusion(stage=stage, model=fusion, objective=objective, data=data,
                                         args=utils.seed_args(args, seed), sizes=sizes, label_names=names,
                                         save_dir=args.save_dir, tag=utils.seed_tag(seed, seeds))

    # Artifacts of several seeds: multimodal_fusion_seeds.json/.md (dev-selected and test-selected scores);
    # the best dev seed's files also under the usual names
    return utils.finish_fusion_seeds(results, args.save_dir, names)


def evaluate(args: argparse.Namespace, device: torch.device) -> dict:
    """``--train False``: only the test pickle and the checkpoint are read; sizes come from the checkpoint."""
    stage = "MELD multimodal_fusion (evaluation)"
    checkpoint = args.save_dir / utils.FUSION_CHECKPOINT
    record = utils.check_fusion_record(args.save_dir, MELD.name, checkpoint)
    sizes = model.infer_sizes_from_checkpoint(model.read_fusion_state(checkpoint))
    if int(sizes["n_classes"]) != args.clsNum:
        raise utils.UserError(f"checkpoint {checkpoint} predicts {sizes['n_classes']} classes"
                              f"{' (' + str(record['dataset']) + ')' if record else ''} but this run has "
                              f"{args.clsNum} (MELD, --clsNum); use the checkpoint MELD/multimodal_fusion.py writes")
    test = dataset.load_dialogues(dataset.feature_path(args.feature_dir, "test"), args.audio_feature,
                                  args.video_feature, device)
    width = model.fusion_width(args.hidden_dim, args.n_head, test.width, str(test.path))
    if sizes["hidden"] != width:
        raise SystemExit(f"checkpoint {checkpoint} has width {sizes['hidden']} but the features in "
                         f"{test.path} have width {width}")
    n_speaker, n_classes = int(sizes["n_speaker"]), int(sizes["n_classes"])
    test.check_ids("speakers", n_speaker, f"the checkpoint {checkpoint} has {n_speaker} speakers")
    test.check_ids("labels", n_classes, f"the checkpoint {checkpoint} has {n_classes} classes")
    separate = bool(args.separate_text_blocks or sizes["separate_text_blocks"])
    utils.log_start(stage, args, device, {"hidden": width, "n_speaker": n_speaker, "n_classes": n_classes,
                                          "separate_text_blocks": separate, "test_dialogues": len(test),
                                          "test_utterances": test.n_utterances})

    fusion = model.AnchorGatedTransformer(width, n_classes, n_speaker, args.n_head, args.dropout, separate)
    model.load_fusion_checkpoint(fusion, checkpoint)
    fusion.to(device)
    labels, preds = test.flat_labels(), utils.predict_dialogues(fusion, test, args.batch_size, args.packed)
    scores = utils.summary(labels, preds)
    names = list(MELD.labels) if n_classes == MELD.num_classes else [str(i) for i in range(n_classes)]
    report = utils.report_text(labels, preds, names)
    log.info("%s: test accuracy %.4f, weighted F1 %.4f\n%s", stage, scores["accuracy"], scores["weighted_f1"], report)
    utils.write_json(args.save_dir / utils.FUSION_PREDICTIONS, {"labels": labels, "preds": preds})
    return {"stage": stage, "test": scores, "report": report, "labels": labels, "preds": preds,
            "paths": {"predictions": str(args.save_dir / utils.FUSION_PREDICTIONS)}}


if __name__ == "__main__":
    utils.run(main)
