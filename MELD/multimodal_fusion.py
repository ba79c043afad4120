"""Stage 8 - the multi-modal anchor gated transformer on MELD (docs/METHOD.md §5).

    python MELD/multimodal_fusion.py                    # train, select the epoch on dev
    python MELD/multimodal_fusion.py --train False      # evaluate the saved checkpoint on test
    python MELD/multimodal_fusion.py --train False --model_dir DIR   # ... a model folder's (magtkd.hub)
    python MELD/multimodal_fusion.py --paper_attention True --padding_speaker authors --selection test
        # the authors' May-2025 release, draw for draw: their attention, padding row and epoch kept on test

Reads   MELD/feature/first_stage_{train,dev,test}_features.pkl (--train False: test only, and the .bin);
        the dev/test CSVs in datasets/MELD/ for the predictions CSVs' speaker names and texts, when there
Writes  MELD/MELD/save_model/multimodal_fusion_best.bin, multimodal_fusion_best.json (test labels
        and predictions), multimodal_fusion_metrics.json (arguments, per-epoch curve, selection),
        multimodal_fusion_curves.png and multimodal_fusion_confusion.png, and every dev/test prediction
        as a row: multimodal_fusion_predictions_{dev,test}.csv, multimodal_fusion_attention_{dev,test}.npz;
        --seeds S1 S2 ...: those files per seed (multimodal_fusion_best_seed<S>.bin, ...), the best dev
        seed's also under the names above, and multimodal_fusion_seeds.json/.md (mean ± std over seeds)

MELD: A = audio_kd, V = video_kd, alpha 0.01, beta 0.08, no L_feat; 304 speakers (speaker2id.json),
with their own padding row (the reference padded with Joey's id 2).
"""

import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from MELD.config import MELD  # noqa: E402
from magtkd import cli, engine, fusion_data, hub, losses, results, runtime, schedule, utils  # noqa: E402
from magtkd.artifacts import StageFiles  # noqa: E402
from magtkd.fusion_settings import FusionRequest  # noqa: E402
from magtkd.model import FusionOutput  # noqa: E402

# Flags: the reference's names with MELD's distillation defaults (docs/METHOD.md §5)
DEFAULTS = dict(audio_feature="audio_kd", video_feature="video_kd", alpha=0.01, beta=0.08, feature_loss=False)


def anchor_kd(logits: torch.Tensor, feat: torch.Tensor, t_logits: torch.Tensor, t_feat: torch.Tensor,
              target: torch.Tensor, feature_loss: bool) -> torch.Tensor:
    """KD(X') = CE(W_x X') + L_logit(W_x X', W_t T') [+ L_feat(X', T')]; the text side is not detached."""
    loss = F.cross_entropy(logits, target) + losses.logit_kd_loss(logits, t_logits)
    if feature_loss:
        loss = loss + losses.feature_kd_loss(feat, t_feat)
    return loss


def objective(out: FusionOutput, target: torch.Tensor, *, alpha: float, beta: float,
              feature_loss: bool) -> torch.Tensor:
    """CE(W_t T') + alpha KD(A') + beta KD(V') over the real utterances (docs/METHOD.md §5). An ablation
    variant keeps the terms of the anchors it has: T' is then the predicting anchor (A' without T, V' alone)
    and an anchor that is absent or predicts has no KD term (A+V: CE(W_a A') + beta KD(V'); T: CE(W_t T'))."""
    t_logits, t_feat = out.t_logits, out.t_feat
    # Terms built in the authors' order (the KD terms, then CE), so that autograd sums the gradients in their
    # order: their updates bit for bit (docs/METHOD.md §5, "The authors' run, draw for draw")
    kd_a = None if out.a_logits is None else anchor_kd(out.a_logits, out.a_feat, t_logits, t_feat, target,
                                                       feature_loss)
    kd_v = None if out.v_logits is None else anchor_kd(out.v_logits, out.v_feat, t_logits, t_feat, target,
                                                       feature_loss)
    loss = F.cross_entropy(t_logits, target)
    if kd_a is not None:
        loss = loss + alpha * kd_a
    if kd_v is not None:
        loss = loss + beta * kd_v
    return loss


def main(argv=None) -> dict:
    args = cli.fusion_parser(MELD, HERE, __doc__, **DEFAULTS).parse_args(argv)
    runtime.setup_logging()
    device = runtime.resolve_device(args.device, args.dist_timeout)
    seeds = cli.seed_list(args.seed, args.seeds, args.train)
    # The model the flags ask for: unset, the paper's model on this dataset's feature keys (training) or
    # what the checkpoint and its metrics document say (--train False; a contradicting flag is an error)
    request = FusionRequest.from_flags(vars(args), (DEFAULTS["audio_feature"], DEFAULTS["video_feature"]))
    if args.model_dir is not None and args.train:
        raise utils.UserError("--model_dir gives a trained model: evaluate it with --train False")
    if not args.train:
        # The trained model from --save_dir, or from a model folder (--model_dir, checked: its dataset, every file)
        run = fusion_data.Evaluation(args.save_dir, args.feature_dir, args.data_dir, args.clsNum, args.batch_size,
                                     args.packed, args.seed, vars(args),
                                     hub.model_source(MELD, args.model_dir, args.save_dir))
        return fusion_data.evaluate_fusion(MELD, run, request, device)
    stage = "MELD multimodal_fusion"

    # Data: the three feature pickles as per-dialogue tensors on the device (read once for all seeds),
    # and the settings of the model they train (width, speakers, heads, variant, feature keys)
    splits, settings, sizes = fusion_data.fusion_training_data(MELD, args.feature_dir, request, args.clsNum,
                                                               device, args.data_dir)
    flags = {**vars(args), **settings.flags()}  # recorded as resolved (the metrics document's args)
    runtime.log_start(stage, flags, device, sizes)
    data = fusion_data.DialogueBatches(splits, args.batch_size, args.packed)
    names = fusion_data.fusion_label_names(MELD, args.clsNum)
    loss = functools.partial(objective, alpha=args.alpha, beta=args.beta, feature_loss=args.feature_loss)

    runs, files = {}, {}
    for seed in seeds:
        # Model: audio, video and text anchors over the dialogue (or the ablation variant asked for); the seed
        # then drives every draw in the authors' order: the weights, each epoch's loaders, shuffle and dropout
        runtime.set_seed(seed, args.deterministic)
        fusion = settings.build(args.dropout).to(device)
        files[seed] = StageFiles.fusion(args.save_dir, cli.seed_tag(seed, seeds))
        config = engine.FitConfig.from_flags(flags, seed=seed, stage=stage, script="MELD/multimodal_fusion.py",
                                             dataset=MELD.name, labels=names, files=files[seed],
                                             test_every_epoch=True, width=settings.hidden, sizes=sizes,
                                             authors_batch=16)

        # Optimizer and schedule: AdamW as the authors build it (PyTorch's default implementation: the fused
        # one rounds differently, docs/METHOD.md §5); their warmup counted in dialogues, stepped per update
        optimizer = torch.optim.AdamW(fusion.parameters(), lr=args.lr, weight_decay=args.l2)
        scheduler = schedule.reference_schedule(optimizer, data, config)
        runs[seed] = engine.fit(fusion, loss, data, optimizer, scheduler, config)

    # Several seeds: multimodal_fusion_seeds.json/.md; the best dev seed's files also under the usual names
    return results.finish_seeds(runs, files, StageFiles.fusion(args.save_dir), names)


if __name__ == "__main__":
    utils.run(main)
