"""Training-step rows: the full ESPnet ASR model of a recipe's config pair.

Each model is built by ``ASRTask.build_model`` from the recipe's training config,
read at run time, with the arguments ``asr.sh`` adds (token list, global MVN
statistics, ``fs``), and trained as ESPnet's ``Trainer`` does: frontend,
SpecAugment, normalization, encoder, decoder and CTC forward, backward, gradient
clipping, optimizer and scheduler step. Three models, timed interleaved in one
process on the same batches:

- ``conformer``: the Conformer config (``train_conformer.yaml``);
- ``fusionformer``: the FusionFormer config (``train_fusionformer.yaml``);
- ``layernorm``: the FusionFormer config with ``encoder_conf.normalization:
  layernorm`` (the same code as a pre-LN Conformer).

The batches are the recipe's own: the dump's ``wav.scp`` and ``text`` through
ESPnet's batch sampler (``batch_type``/``batch_bins`` of the config), data set,
preprocessor and collate function, as ``asr_train`` builds them. Without a dump,
synthetic padded batches of the same shape statistics are used instead.
"""

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from espnet_fusionformer.bench.cases import (
    CONFORMER,
    FUSIONFORMER,
    LAYERNORM,
    MODELS,
    parameters,
)
from espnet_fusionformer.bench.timing import finish_row, summarize, time_interleaved

RECIPE = Path("egs2") / "espeak" / "asr1"
CONFIGS = {
    False: ("conf/train_fusionformer.yaml", "conf/train_conformer.yaml"),
    True: ("conf/train_smoke_fusionformer.yaml", "conf/train_smoke_conformer.yaml"),
}
CHARS = list("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")


def find_recipe(path: Optional[str] = None) -> Optional[Path]:
    """The recipe directory: ``path``, else ``egs2/espeak/asr1`` under the current
    directory or the repository this package sits in; ``None`` if none exists."""
    if path is not None:
        recipe = Path(path)
        if not (recipe / "conf").is_dir():
            raise FileNotFoundError(f"{recipe}: not a recipe directory (no conf/)")
        return recipe.resolve()
    repo = Path(__file__).resolve().parents[2]
    for candidate in (Path.cwd() / RECIPE, repo / RECIPE):
        if (candidate / "conf").is_dir():
            return candidate
    return None


def _first(recipe: Path, pattern: str) -> Optional[Path]:
    found = sorted(recipe.glob(pattern))
    return found[0] if found else None


def recipe_inputs(
    recipe: Optional[Path], dump: Optional[str], workdir: Path, use_dump: bool = True
) -> Dict:
    """What ``asr.sh`` would pass ``asr_train`` besides the config: the dump, the
    shape files, the token list and the feature statistics (written into
    ``workdir`` where the recipe has not made them). ``dump`` is ``None`` when no
    ``<dump>/wav.scp`` and ``<dump>/text`` exist or ``use_dump`` is off
    (synthetic batches)."""
    dump_dir = Path(dump) if dump else (recipe / "dump/raw/train" if recipe else None)
    if not use_dump:
        dump_dir = None
    if dump_dir is not None and not (
        (dump_dir / "wav.scp").is_file() and (dump_dir / "text").is_file()
    ):
        if dump:
            raise FileNotFoundError(f"{dump_dir}: no wav.scp and text")
        dump_dir = None
    stats = _first(recipe, "exp/asr_stats_raw_*_char/train") if recipe else None
    tokens = _first(recipe, "data/*token_list/char/tokens.txt") if recipe else None
    texts = {}
    if dump_dir is not None:
        for line in (dump_dir / "text").read_text().splitlines():
            utt, _, text = line.partition(" ")
            texts[utt] = text
    if tokens is None:  # asr.sh's char token list: blank, unk, space, chars, sos/eos
        chars = sorted({c for t in texts.values() for c in t} - {" "}) or CHARS
        tokens = workdir / "tokens.txt"
        tokens.write_text("\n".join(["<blank>", "<unk>", "<space>", *chars]) + "\n")
        tokens.write_text(tokens.read_text() + "<sos/eos>\n")
    info = dict(dump=dump_dir, tokens=tokens, stats=None, shapes=None)
    if stats is not None and (stats / "feats_stats.npz").is_file():
        info["stats"] = stats / "feats_stats.npz"
    if dump_dir is None:
        return info
    if (
        stats is not None
        and dump_dir.resolve() == (recipe / "dump/raw/train").resolve()
        and (stats / "speech_shape").is_file()
    ):
        info["shapes"] = [stats / "speech_shape", stats / "text_shape.char"]
        return info
    # shapes as ESPnet's collect_stats writes them: samples; tokens,vocab
    import soundfile

    vocab = len(tokens.read_text().split())
    samples = {}
    utt2num = dump_dir / "utt2num_samples"
    if utt2num.is_file():
        for line in utt2num.read_text().splitlines():
            utt, n = line.split()
            samples[utt] = int(n)
    root = recipe if recipe is not None else Path.cwd()
    for line in (dump_dir / "wav.scp").read_text().splitlines():
        utt, audio = line.split(maxsplit=1)
        if utt not in samples:
            path = Path(audio) if Path(audio).exists() else root / audio
            samples[utt] = soundfile.info(str(path)).frames
    speech = workdir / "speech_shape"
    speech.write_text("".join(f"{u} {n}\n" for u, n in samples.items()))
    text = workdir / "text_shape.char"
    text.write_text(
        "".join(f"{u} {len(t)},{vocab}\n" for u, t in texts.items() if u in samples)
    )
    info["shapes"] = [speech, text]
    return info


def train_args(config: Path, inputs: Dict, workdir: Path, extra: Sequence[str] = ()):
    """``asr_train``'s arguments: the config plus what ``asr.sh`` adds."""
    from espnet2.tasks.asr import ASRTask

    argv = [
        "--config",
        str(config),
        "--token_type",
        "char",
        "--token_list",
        str(inputs["tokens"]),
        "--use_preprocessor",
        "true",
        "--frontend_conf",
        "fs=16k",
        "--output_dir",
        str(workdir / "exp"),
        "--ngpu",
        "0",
    ]
    if inputs["stats"] is not None:
        argv += ["--normalize", "global_mvn"]
        argv += ["--normalize_conf", f"stats_file={inputs['stats']}"]
    if inputs["dump"] is not None:
        for name, kind in (("wav.scp", "speech,sound"), ("text", "text,text")):
            argv += ["--train_data_path_and_name_and_type"]
            argv += [f"{inputs['dump'] / name},{kind}"]
        for shape in inputs["shapes"]:
            argv += ["--train_shape_file", str(shape)]
    return ASRTask.get_parser().parse_args(argv + list(extra))


def build_trainee(args: argparse.Namespace) -> Dict:
    """Model, optimizers and schedulers as ESPnet's ``main_worker`` builds them."""
    from espnet2.schedulers.abs_scheduler import AbsBatchStepScheduler
    from espnet2.tasks.abs_task import scheduler_classes
    from espnet2.tasks.asr import ASRTask
    from espnet2.torch_utils.set_all_random_seed import set_all_random_seed

    set_all_random_seed(args.seed)
    model = ASRTask.build_model(args).train()
    optimizers = ASRTask.build_optimizers(args, model=model)
    schedulers = []
    for i, optim in enumerate(optimizers, 1):
        suffix = "" if i == 1 else str(i)
        name = getattr(args, f"scheduler{suffix}")
        scheduler = None
        if name is not None:
            scheduler = scheduler_classes[name](
                optim, **getattr(args, f"scheduler{suffix}_conf")
            )
        schedulers.append(
            scheduler if isinstance(scheduler, AbsBatchStepScheduler) else None
        )
    return dict(
        model=model,
        optimizers=optimizers,
        schedulers=schedulers,
        grad_clip=args.grad_clip,
        grad_clip_type=args.grad_clip_type,
    )


def recipe_batches(args: argparse.Namespace, count: int, recipe: Path) -> List[Dict]:
    """The first ``count`` training batches of epoch 1, from ESPnet's iterator
    (batch sampler, data set, preprocessor, collate), as ``asr_train`` builds it."""
    import os

    from espnet2.tasks.asr import ASRTask
    from espnet2.train.distributed_utils import DistributedOption

    args = copy.copy(args)
    args.num_workers = 0  # read here, in this process
    cwd = os.getcwd()
    os.chdir(recipe)  # wav.scp paths are relative to the recipe
    try:
        factory = ASRTask.build_iter_factory(
            args=args, distributed_option=DistributedOption(), mode="train"
        )
        batches = []
        for _, batch in factory.build_iter(1):
            batches.append(batch)
            if len(batches) >= count:
                break
    finally:
        os.chdir(cwd)
    return batches


def synthetic_batches(
    args: argparse.Namespace, count: int, seed: int, fs: int = 16000
) -> List[Dict]:
    """Padded batches shaped like the espeak recipe's (2.2-4.5 s utterances,
    ~12 characters a second), sized by ``batch_bins`` as the numel sampler does
    (padded speech samples + text tokens per batch); random audio and tokens."""
    gen = torch.Generator().manual_seed(seed)
    vocab = len(args.token_list)
    batches = []
    for _ in range(count):
        lengths: List[int] = []
        while True:
            n = int(fs * (2.2 + 2.3 * torch.rand(1, generator=gen).item()))
            new = max(lengths + [n]) * (len(lengths) + 1)
            if lengths and new > args.batch_bins:
                break
            lengths.append(n)
            if len(lengths) >= 200:
                break
        lengths.sort(reverse=True)
        speech = torch.zeros(len(lengths), lengths[0])
        for i, n in enumerate(lengths):
            speech[i, :n] = 0.1 * torch.randn(n, generator=gen)
        text_lens = [max(1, int(12 * n / fs)) for n in lengths]
        text = torch.full((len(lengths), max(text_lens)), -1, dtype=torch.long)
        for i, n in enumerate(text_lens):
            text[i, :n] = torch.randint(1, vocab - 1, (n,), generator=gen)
        batches.append(
            dict(
                speech=speech,
                speech_lengths=torch.tensor(lengths),
                text=text,
                text_lengths=torch.tensor(text_lens),
            )
        )
    return batches


def step_fn(trainee: Dict, batches: List[Dict]):
    """One training step per call, cycling through ``batches`` (ESPnet's
    ``Trainer.train_one_epoch``: forward, backward, clip, step, zero_grad)."""
    model = trainee["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    state = dict(i=0)

    def step():
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        loss, _, _ = model(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(
            params, trainee["grad_clip"], norm_type=trainee["grad_clip_type"]
        )
        for optim, scheduler in zip(trainee["optimizers"], trainee["schedulers"]):
            optim.step()
            optim.zero_grad()
            if scheduler is not None:
                scheduler.step()
        return loss

    return step


def check_encoders(trainees: Dict[str, Dict]) -> None:
    """Each config built what it names (the LayerNorm twin really is one)."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder

    from espnet_fusionformer import FusionFormerEncoder

    enc = {name: t["model"].encoder for name, t in trainees.items()}
    if not isinstance(enc[CONFORMER], ConformerEncoder):
        raise ValueError(
            f"the Conformer config built a {type(enc[CONFORMER]).__name__} encoder"
        )
    for name, norm in ((FUSIONFORMER, "fusion"), (LAYERNORM, "layernorm")):
        if not isinstance(enc[name], FusionFormerEncoder):
            raise ValueError(f"the {name} config built {type(enc[name]).__name__}")
        if enc[name].normalization != norm:
            raise ValueError(
                f"the {name} model has normalization={enc[name].normalization!r}"
            )


def run_train(conf: Dict, log) -> Tuple[List[Dict], Dict]:
    """Interleaved training steps of the three full ASR models."""
    recipe = find_recipe(conf.get("recipe"))
    ff_conf, conformer_conf = conf.get("train_configs") or [None, None]
    defaults = CONFIGS[bool(conf["quick"])]
    if ff_conf is None or conformer_conf is None:
        if recipe is None:
            raise FileNotFoundError(
                "no recipe found (egs2/espeak/asr1): pass --recipe or --train-configs"
            )
        ff_conf = ff_conf or recipe / defaults[0]
        conformer_conf = conformer_conf or recipe / defaults[1]
    threads = conf["train_threads"]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fusionformer-train-") as tmp:
        workdir = Path(tmp)
        inputs = recipe_inputs(
            recipe, conf.get("dump"), workdir, conf.get("use_dump", True)
        )
        configs = {
            CONFORMER: (Path(conformer_conf), []),
            LAYERNORM: (Path(ff_conf), ["--encoder_conf", "normalization=layernorm"]),
            FUSIONFORMER: (Path(ff_conf), []),
        }
        common = []
        if conf.get("train_batch_bins"):
            common = ["--batch_bins", str(conf["train_batch_bins"])]
        args = {
            name: train_args(path, inputs, workdir, common + extra)
            for name, (path, extra) in configs.items()
        }
        trainees = {name: build_trainee(a) for name, a in args.items()}
        check_encoders(trainees)
        count = conf["train_batches"]
        started = time.perf_counter()
        if inputs["dump"] is not None:
            source = "recipe"
            batches = recipe_batches(args[FUSIONFORMER], count, recipe or Path.cwd())
        else:
            source = "synthetic"
            batches = synthetic_batches(args[FUSIONFORMER], count, conf["seed"])
        load_s = time.perf_counter() - started
        calls = {name: step_fn(trainees[name], batches) for name in MODELS}
        times = time_interleaved(calls, conf, {name: 1 for name in MODELS})
    sizes = [len(b["speech_lengths"]) for b in batches]
    lengths = torch.cat([b["speech_lengths"] for b in batches]).float()
    padded = sum(b["speech"].numel() for b in batches)
    row = dict(
        section="train",
        label=f"train step, full ASR model, {source} batches",
        frames=None,
        audio_s=round(float(lengths.sum()) / 16000, 1),
        threads=threads,
        batch=round(sum(sizes) / len(sizes), 1),
        engine="train",
        variant="fused",  # the row the target applies to
    )
    for name in MODELS:
        row[name] = summarize(times[name])
    info = dict(
        source=source,
        recipe=str(recipe) if recipe else None,
        dump=str(inputs["dump"]) if inputs["dump"] else None,
        configs={
            name: str(path) + (" + " + " ".join(extra) if extra else "")
            for name, (path, extra) in configs.items()
        },
        batch_type=args[FUSIONFORMER].batch_type,
        batch_bins=args[FUSIONFORMER].batch_bins,
        batches=len(batches),
        batch_sizes=sizes,
        padding=round(1 - float(lengths.sum()) / padded, 3),
        normalize=args[FUSIONFORMER].normalize,
        threads=threads,
        load_s=round(load_s, 1),
        params={name: parameters(t["model"]) for name, t in trainees.items()},
        encoder_params={
            name: parameters(t["model"].encoder) for name, t in trainees.items()
        },
        encoder_conf={name: args[name].encoder_conf for name in MODELS},
    )
    return [finish_row(row)], info
