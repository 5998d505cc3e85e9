r"""The multitask recipe: SigLIP + LocCa captioning + masked video modelling.

Runs (every field can be overridden, e.g. ``--config.total_steps=1000``):

  # The CPU demo on synthetic studies (generated and prepared on first use):
  python launch.py --config configs/multitask.py:runlocal --workdir runs/demo

  # Your prepared data, ViViT-B on one GPU, bf16:
  python launch.py --config configs/multitask.py:size=base,data=/data/prepared \
      --workdir /runs/vivit_b --config.model.dtype=bfloat16

  # Start the text tower from a local PubMedBERT folder (config.json + weights):
  python launch.py --config configs/multitask.py:size=base,data=/data/prepared \
      --workdir /runs/vivit_b_pubmedbert --config.text_init=/models/pubmedbert

  # Start the video encoder (and MVM decoder) from a local VideoMAE folder:
  python launch.py --config configs/multitask.py:size=base,data=/data/prepared \
      --workdir /runs/from_videomae --config.video_init=/models/videomae-base \
      --config.video_init_include=encoder+decoder --config.optim.layer_decay=0.75

Arguments (after the colon, comma-separated): ``size`` = mu|tiny|small|base|large
(the model), ``data`` = a prepared dataset folder (default: the synthetic set in
``~/.cache/deepcoro_jax``), ``runlocal`` (small and fast, for a CPU).

Durations may be given in steps, examples or epochs (``total_steps``,
``total_examples``, ``total_epochs``), and the warmup the same way or in percent
of training (``optim.schedule.warmup_{steps,examples,epochs,percent}``). When
several are set the first in that order wins, so ``--config.total_steps=N``
overrides the recipe's ``total_epochs``. Epochs count videos of the train
split, so they are not defined for study-level input (``input.study_videos``).
"""

import os

import ml_collections
from ml_collections import config_dict

SIZES = ("mu", "tiny", "small", "base", "large")
SYNTHETIC_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "deepcoro_jax")
BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'size=base,runlocal' -> ConfigDict(size='base', runlocal=True, ...), typed by defaults.

    A bare name sets a bool argument to True; bools also take true/false/yes/no/1/0.
    An unknown name or a value of the wrong type is a ValueError naming it.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if sep and value.lower() not in BOOLS:
                raise ValueError(f"config argument {key}={value!r}: give one of {sorted(BOOLS)}")
            parsed[key] = BOOLS[value.lower()] if sep else True
        elif not sep:
            raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(
                    f"config argument {key}={value!r}: not a {type(default).__name__}"
                ) from e
    return parsed


def _component(pattern: str, lr_mult: float = 1.0, wd_mult: float = 1.0) -> dict:
    """An optimizer component: parameters matching `pattern`; freeze with frozen=True."""
    return dict(pattern=pattern, lr_mult=lr_mult, wd_mult=wd_mult, frozen=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = parse_arg(arg, size="small", data="", runlocal=False)
    if arg.size not in SIZES:
        raise ValueError(f"config argument size={arg.size!r}; choose one of {SIZES}")
    size = "mu" if arg.runlocal else arg.size
    config = ml_collections.ConfigDict()
    config.seed = 0

    # ------------------------------------------------------------------ durations
    config.total_steps = config_dict.placeholder(int)
    config.total_epochs = config_dict.placeholder(float)
    config.total_examples = config_dict.placeholder(int)
    if arg.runlocal:
        config.total_steps = 900
    else:
        config.total_epochs = 30.0
    config.log_training_steps = 10 if arg.runlocal else 50
    config.ckpt_steps = 100 if arg.runlocal else 1000
    config.keep_ckpts = 2 if arg.runlocal else 3
    config.best_metric = ""  # e.g. 'val_retrieval/v2t_recall@5:max'; '' keeps only the last ones
    config.keep_best = 1  # with best_metric: also keep this many of the best checkpoints

    # ---------------------------------------------------------------------- input
    num_frames, image_size = (8, 64) if arg.runlocal else (16, 224)
    stored_size = 80 if arg.runlocal else 256
    config.input = ml_collections.ConfigDict()
    config.input.data_dir = arg.data
    config.input.synthetic = dict(
        cache_dir=SYNTHETIC_CACHE,
        num_studies=600 if arg.runlocal else 300,  # runlocal: 60 val studies to rank
        size=stored_size,
        num_frames=(24, 40) if arg.runlocal else (32, 64),
        seed=0,
        # About one full view in three is followed by a magnified one (2x or 3x, centred
        # on a landmark of its system), and each video is paired with the report of
        # what its view shows ('study': the whole study's report for every video).
        magnified_fraction=0.3,
        magnifications=(2, 3),
        report_scope="view",
    )
    config.input.split = "train"
    config.input.batch_size = 16 if arg.runlocal else 256
    config.input.study_videos = config_dict.placeholder(int)  # N: study-level examples
    config.input.text_tokenizer = "dataset"  # or 'wordpiece:/path' (set by text_init)
    config.input.caption_tokenizer = "dataset"
    config.input.text_max_len = 128
    config.input.caption_max_len = 128
    # The crop, zoom and rotation in one bilinear warp (1.3-1.5x the clips per CPU-second of
    # the crop and scale_rotate_jitter apart: docs/data.md). runlocal keeps the two ops, with
    # which its documented demo numbers were measured.
    crop = (
        "random_resized_crop({s}, scale=(0.7, 1.0))|scale_rotate_jitter(0.05, 5.0)"
        if arg.runlocal
        else "random_resized_crop({s}, scale=(0.7, 1.0), max_scale=0.05, max_degrees=5.0)"
    )
    config.input.video_pp = (
        f"decode_sample_frames({num_frames}, stride=2, train=True)|"
        + crop.format(s=image_size)
        + "|intensity_jitter(0.1, 0.1, 0.1)|value_range(-1, 1)"
    )
    # Evaluation and inference: a deterministic clip (centred in time), the whole frame.
    config.input.eval_video_pp = (
        f"decode_sample_frames({num_frames}, stride=2)|resize({image_size})|value_range(-1, 1)"
    )

    # ---------------------------------------------------------------------- model
    config.model = ml_collections.ConfigDict()
    config.model.size = size
    config.model.num_frames = num_frames
    config.model.image_size = image_size
    # runlocal: one tubelet spans the clip's 8 frames (16 tokens per clip), embedded by
    # the conv stem below: the cheapest encoder that sees lesions at 64 px.
    config.model.patch_size = (8, 16, 16) if arg.runlocal else (2, 16, 16)
    config.model.embed_dim = config_dict.placeholder(int)  # default: the encoder width
    config.model.contrastive_tokens = "full"  # or 'masked' (FLIP-style, one encoder pass)
    config.model.mask_type = "tube"
    config.model.mask_ratio = 0.9
    config.model.normalize_mvm_target = True
    # The contrastive logit scale and bias at init (SigLIP's 10 and -10). In short
    # small-batch runs the bias barely moves from -10 and the embeddings collapse to
    # reach the chance-level logit; a bias near -log(batch size) avoids that.
    config.model.init_temperature = 10.0
    config.model.init_bias = -3.0 if arg.runlocal else -10.0
    config.model.dropout = 0.0
    config.model.dtype = "float32"  # 'bfloat16' on accelerators
    # 'auto': cuDNN's fused attention on NVIDIA GPUs in bfloat16/float16, XLA's elsewhere;
    # or 'xla' / 'cudnn' (deepcoro_jax/models/common.py, resolve_attention).
    config.model.attention_impl = "auto"
    # stem='conv' embeds tubelets with a small CNN (vivit.ConvStem; 2**len(stem_features)
    # must equal the patch's ph and pw); docs/training.md says when it is worth its cost
    # and what it needs with it (pool_type='max', a lower lr). remat: what each encoder
    # block keeps for the backward pass, 'none', 'dots_no_batch', 'dots' or 'full'
    # (vivit.REMAT_POLICIES), in the first remat_blocks blocks (-1: all).
    config.model.encoder_overrides = dict(
        attention_type="joint", pool_type="map", stem="linear", stem_features=(16, 32, 64, 64),
        remat="none", remat_blocks=-1,
    )
    if arg.runlocal:
        config.model.encoder_overrides.update(
            pool_type="max", stem="conv", stem_features=(8, 16, 32, 32))
    config.model.caption_decoder_overrides = dict(parallel_fraction=0.0)
    config.model.mvm_decoder_overrides = dict()  # MVMDecoder attributes (set by video_init)
    # LocCa's location vocabulary (deepcoro_jax/domain/locations.py): coordinate bins per
    # axis appended to the caption tokenizer with the clip's frame-time tokens; 0: none.
    # runlocal: a bin is a pixel of the 64-pixel clip (its lesion boxes are about 5 pixels
    # wide: at 32 bins, quantising alone would miss IoU 0.5 for 6% of them).
    config.model.location_bins = 64 if arg.runlocal else 256
    # Report embedding: the mean of the text tower's token states. A from-scratch
    # tower's [CLS] state is nearly the same for every report at init (cosine
    # ~0.99999), which stalls the contrastive loss for its first hundreds of steps.
    config.model.text_overrides = dict(pool_type="mean")
    config.text_init = ""  # a local Hugging Face BERT folder (e.g. PubMedBERT)
    # A local Hugging Face VideoMAE or ViViT folder: the encoder takes its architecture
    # and weights ('encoder+decoder': VideoMAE's pretraining decoder as the MVM decoder
    # too); docs/training.md, "Pretrained video weights".
    config.video_init = ""
    config.video_init_include = "encoder"

    # ----------------------------------------------------------------------- loss
    config.loss = ml_collections.ConfigDict()
    config.loss.contrastive = "sigmoid"  # or 'softmax'
    # Pairs whose reports state the same findings (in any words) are positives, not
    # negatives; 'same_report': identical text only; 'diagonal': the paired report only.
    config.loss.positives = "same_findings"
    config.loss.sharded_contrastive = False  # the ring-sharded sigmoid loss (large batches)
    # With grad_accum_steps > 1: 'micro' compares each video with its micro-batch's
    # reports only; 'cached' (GradCache) with the whole batch's, exactly, for one more
    # forward pass.
    config.loss.contrastive_accumulation = "micro"
    config.loss.label_smoothing = 0.1
    # LocCa's tasks for the caption decoder, drawn per example with these weights: 'cap'
    # writes the report; 'aref' a lesion's box from its phrase; 'gcap' a box, then its
    # phrase (docs/training.md, "Location tasks"). 'aref' and 'gcap' need
    # model.location_bins and prepared data with lesion boxes (prepare --boxes).
    # Data without boxes is captioned only (one warning).
    config.loss.locca_tasks = ml_collections.ConfigDict(dict(cap=0.5, aref=0.25, gcap=0.25))
    config.loss.weights = ml_collections.ConfigDict(
        dict(contrastive=1.0, caption=1.0, mvm=1.0, distill=0.0)
    )
    config.loss.distill_temperature = 1.0
    config.loss.ema_decay = 0.999

    # ------------------------------------------------------------------ optimizer
    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adamw"
    config.optim.lr = 1e-3 if arg.runlocal else 5e-4
    config.optim.wd = 0.05
    config.optim.b2 = 0.95
    config.optim.grad_clip_norm = 1.0
    # Layer-wise lr decay of the encoder (BEiT/VideoMAE fine-tuning): block i of L gets
    # lr * layer_decay**(L - i), the embeddings layer_decay**(L + 1); 1.0: off.
    config.optim.layer_decay = 1.0
    config.optim.schedule = ml_collections.ConfigDict(dict(decay_type="cosine", end_lr_frac=0.0))
    # The warmup (percent: of the training length); steps > examples > epochs > percent.
    config.optim.schedule.warmup_steps = config_dict.placeholder(int)
    config.optim.schedule.warmup_epochs = config_dict.placeholder(float)
    config.optim.schedule.warmup_examples = config_dict.placeholder(int)
    config.optim.schedule.warmup_percent = config_dict.placeholder(float)
    if arg.runlocal:
        config.optim.schedule.warmup_steps = 20
    else:
        config.optim.schedule.warmup_percent = 5.0
    config.optim.components = ml_collections.ConfigDict(
        dict(
            # runlocal: the conv stem's encoder learns best at a third of the lr.
            video_encoder=_component("encoder/.*|video_projection/.*",
                                     lr_mult=0.3 if arg.runlocal else 1.0),
            text_encoder=_component("text/.*|text_projection/.*"),
            caption_decoder=_component("caption_decoder/.*"),
            mvm_decoder=_component("mvm_decoder/.*"),
            temperature_bias=_component("log_temperature|bias", wd_mult=0.0),
        )
    )
    config.grad_accum_steps = 1

    # ---------------------------------------------------------- mesh and sharding
    config.mesh = (("data", -1), ("fsdp", 1))
    config.sharding_rules = ((".*", "fsdp"),)  # fsdp axis of size 1 = replicated

    # ----------------------------------------------------------------- evaluators
    # {name: dict(type, log_steps, split, at_start, **options)}; logged as <name>/<metric>.
    # runlocal evaluates at step 0 and at the end, so the demo shows what was learned.
    eval_steps = config.total_steps if arg.runlocal else 5000
    eval_batch = 16 if arg.runlocal else 64
    config.evals = ml_collections.ConfigDict()
    config.evals.val_retrieval = dict(
        type="retrieval",
        log_steps=eval_steps,
        at_start=arg.runlocal,
        split="val",
        batch_size=eval_batch,
        level="video",
        # A report that states the same findings in other words is the same answer.
        relevance="findings",
    )
    config.evals.val_captioning = dict(
        type="captioning",
        log_steps=eval_steps,
        at_start=arg.runlocal,
        split="val",
        batch_size=eval_batch,
        strategy="greedy",
    )
    config.evals.val_mvm = dict(
        type="mvm", log_steps=eval_steps, split="val", batch_size=eval_batch, num_images=4
    )
    # Linear probes of the frozen encoder, fitted on the train split: on the synthetic
    # set, what each view shows (dominance, a CTO, a lesion of 70% or more); on your
    # data, every numeric label column prepare carried (or name them in `labels`).
    config.evals.val_probe = dict(
        type="linear_probe",
        log_steps=eval_steps,
        split="val",
        train_split="train",
        batch_size=eval_batch,
    )
    if not arg.data:
        config.evals.val_probe.labels = ("right_dominant", "view_cto", "view_severe")

    # LocCa's location tasks (AREF, GCAP) beside their anatomy prior and chance; left out
    # (one warning) where the data has no lesion boxes or the model no location tokens.
    config.evals.val_grounding = dict(
        type="grounding", log_steps=eval_steps, split="val", batch_size=eval_batch
    )

    # ------------------------------------------------------ init from another run
    config.init = ml_collections.ConfigDict(dict(workdir="", include="encoder/.*", step=-1))
    return config
