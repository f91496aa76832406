"""``dsv4 train``: train a DeepSeek-V4 model on real text with the V4 recipe.

::

    dsv4 train --config small --steps 600 --out runs/small          # stdlib .py corpus
    dsv4 train --resume runs/small --steps 800                       # continue (same schedule
                                                                     # if --steps is unchanged)
    dsv4 generate --model runs/small --prompt "def read_file(path):"

Writes into ``--out``: ``config.json`` + ``model.safetensors`` (official format),
``trainer_state.pt`` (optimizer, routing, step), ``metrics.jsonl``, ``run.json`` (corpus and
settings), ``curves.png`` (training and validation loss against the corpus unigram entropy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from ..argtypes import int_at_least, resolve_device, seed_arg
from .data import SEED_LIMIT

__all__ = ["add_train_parser", "small_config", "CONFIGS"]

CONFIGS = ("tiny", "small")


def small_config(**overrides):
    """The CPU-trainable V4 of the evidence runs (docs/training.md): every layer type (SWA, CSA
    with indexer, HCA, hash-routed and learned MoE, mHC, one MTP block) at dim 64, with the
    real 129,280-token vocabulary. 1.77M parameters outside the embedding and head (16.5M in
    them; 18.3M in all). Window 64 and HCA ratio 16 so that 128-token training windows
    exercise both."""
    from ..config import ModelConfig
    base = dict(dim=64, moe_inter_dim=128, n_layers=4, n_hash_layers=2, n_mtp_layers=1,
                n_heads=4, n_routed_experts=8, n_activated_experts=2, q_lora_rank=64,
                head_dim=128, rope_head_dim=64, o_groups=2, o_lora_rank=64, window_size=64,
                compress_ratios=(0, 4, 16, 4, 0), index_n_heads=4, index_head_dim=64,
                index_topk=16)
    base.update(overrides)
    return ModelConfig.tiny(**base)


def _float_pos(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s}")
    return v


def _float_nonneg(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v




def _ranges(s: str):
    """'all' or 'A:B[,C:D...]' (step ranges [A, B))."""
    from .trainer import step_ranges
    if s == "all":
        return "all"
    out = []
    for part in s.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 'all' or step ranges START:END[,START:END...], got {s!r}") from None
        try:
            out += step_ranges([[a, b]])          # TrainConfig's rule
        except ValueError:
            raise argparse.ArgumentTypeError(f"range {part!r}: need 0 <= START < END") from None
    return out


def add_train_parser(sub) -> None:
    """Register ``dsv4 train`` on the ``dsv4`` subparsers object ``sub``."""
    t = sub.add_parser(
        "train", help="train a V4 model on text (Muon, loss-free balancing, MTP)",
        description="Train a DeepSeek-V4 model with the V4 recipe (Muon with hybrid "
        "Newton-Schulz, AdamW for embedding/head/norms/mHC biases, auxiliary-loss-free "
        "balancing, sequence-wise balance loss, MTP loss 0.3 then 0.1, optional anticipatory "
        "routing) on text tokenised with the V4 tokenizer. Default corpus: the .py files of "
        "this Python's standard library. Writes an official-format checkpoint that "
        "`dsv4 generate --model OUT` loads, metrics.jsonl and curves.png.")
    t.add_argument("--config", default=None, metavar="tiny|small|FILE",
                   help="model: 'tiny' (ModelConfig.tiny()), 'small' (the CPU evidence model, "
                   "dim 64) or a config.json (default: small; with --resume: the run's)")
    t.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="files and directories (directories give their *.py files); default: "
                   "the standard library of this Python")
    t.add_argument("--steps", type=int_at_least(1), default=None, metavar="N",
                   help="optimizer steps of the whole run (the schedules span them); required "
                   "unless --resume")
    t.add_argument("--batch", type=int_at_least(1), default=None, metavar="B",
                   help=f"sequences per step (default {_RUN_DEFAULTS['batch']})")
    t.add_argument("--seq-len", type=int_at_least(1), default=None, metavar="S",
                   help=f"tokens per sequence (default {_RUN_DEFAULTS['seq_len']})")
    t.add_argument("--lr", type=_float_pos, default=None, metavar="LR",
                   help=f"peak learning rate of all groups (default {_RUN_DEFAULTS['lr']:g})")
    t.add_argument("--optimizer", choices=("muon", "adamw"), default=None,
                   help="muon: V4's partition (Muon + AdamW groups); adamw: AdamW everywhere "
                   f"(default {_RUN_DEFAULTS['optimizer']})")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default runs/dsv4-train; with --resume: that DIR)")
    t.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run saved in DIR with its saved settings (bit-identical "
                   "on CPU with the same --steps and thread count); only --steps, --out, "
                   "--device, --threads, --save-every, --stop-after and --overwrite may be "
                   "given with it")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter / activation dtype (bf16 keeps fp32 master weights in the "
                   f"optimizer; default {_RUN_DEFAULTS['dtype']})")
    t.add_argument("--device", default="cpu", help="torch device (default cpu)")
    t.add_argument("--threads", type=int_at_least(1), default=None, metavar="N",
                   help="torch CPU threads (use 1 on a shared machine)")
    t.add_argument("--seed", type=seed_arg(SEED_LIMIT), default=None,
                   help="model init and data order, in [0, 2**32) "
                   f"(default {_RUN_DEFAULTS['seed']})")
    t.add_argument("--weight-decay", type=_float_nonneg, default=None,
                   help=f"(default {_RUN_DEFAULTS['weight_decay']})")
    t.add_argument("--warmup", type=int_at_least(0), default=None, metavar="N",
                   help="warm-up steps (default 5%% of --steps)")
    t.add_argument("--decay-start", type=_float_nonneg, default=None, metavar="F",
                   help="fraction of the run after which the cosine decay and the MTP weight "
                   f"0.1 start (default {_RUN_DEFAULTS['decay_start']})")
    t.add_argument("--no-mtp", action="store_true", default=None,
                   help="do not train the MTP block")
    t.add_argument("--balance-alpha", type=_float_nonneg, default=None,
                   help=f"α of the sequence-wise balance loss "
                   f"(default {_RUN_DEFAULTS['balance_alpha']:g})")
    t.add_argument("--bias-speed", type=_float_nonneg, default=None,
                   help=f"γ of the loss-free bias update "
                   f"(default {_RUN_DEFAULTS['bias_speed']:g})")
    t.add_argument("--anticipatory", type=_ranges, default=None, metavar="all|A:B,...",
                   help="anticipatory routing: on for the whole run or in step ranges [A, B)")
    t.add_argument("--anticipatory-delta", type=int_at_least(0), default=None, metavar="DT",
                   help=f"Δt of anticipatory routing in steps "
                   f"(default {_RUN_DEFAULTS['anticipatory_delta']})")
    t.add_argument("--grad-clip", type=_float_nonneg, default=None,
                   help=f"global gradient-norm clip, 0 = off "
                   f"(default {_RUN_DEFAULTS['grad_clip']})")
    t.add_argument("--eval-every", type=int_at_least(1), default=None, metavar="N",
                   help=f"evaluate every N steps (default {_RUN_DEFAULTS['eval_every']})")
    t.add_argument("--eval-windows", type=int_at_least(1), default=None, metavar="N",
                   help=f"validation windows of seq-len + 2 tokens "
                   f"(default {_RUN_DEFAULTS['eval_windows']})")
    t.add_argument("--save-every", type=int_at_least(1), default=None, metavar="N",
                   help="also checkpoint every N steps (default: at the end)")
    t.add_argument("--stop-after", type=int_at_least(1), default=None, metavar="K",
                   help="save and exit after K steps of this invocation (resume later)")
    t.add_argument("--val-fraction", type=_float_pos, default=None,
                   help=f"share of files held out for validation "
                   f"(default {_RUN_DEFAULTS['val_fraction']})")
    t.add_argument("--max-files", type=int_at_least(2), default=None, metavar="N",
                   help="use only the first N files (quick runs)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run files already in --out (without --resume, or with "
                   "--resume and another --out)")
    t.set_defaults(func=_cmd_train, subparser=t)


#: Options that define a run: fixed when it starts, refused with --resume (they were ignored).
#: Their argparse default is None, so that "given" never depends on the value given.
_RUN_SETTINGS = ("config", "data", "batch", "seq_len", "lr", "optimizer", "dtype", "seed",
                 "weight_decay", "warmup", "decay_start", "no_mtp", "balance_alpha", "bias_speed",
                 "anticipatory", "anticipatory_delta", "grad_clip", "eval_every", "eval_windows",
                 "val_fraction", "max_files")

#: The values of the run settings not given to a new run (those absent here stay None).
_RUN_DEFAULTS = dict(batch=8, seq_len=128, lr=2e-3, optimizer="muon", dtype="float32", seed=0,
                     weight_decay=0.1, decay_start=0.8, no_mtp=False, balance_alpha=1e-4,
                     bias_speed=1e-3, anticipatory_delta=1, grad_clip=1.0, eval_every=100,
                     eval_windows=32, val_fraction=0.02)

#: The files a run writes into its directory (``--out`` refuses to replace them).
_RUN_FILES = ("config.json", "model.safetensors", "trainer_state.pt", "metrics.jsonl",
              "run.json", "curves.png")


def _model_config(spec: str):
    from ..config import ModelConfig
    if spec == "tiny":
        return ModelConfig.tiny()
    if spec == "small":
        return small_config()
    return ModelConfig.from_json(spec)


def _read_run_info(path: Path) -> dict:
    """The ``run.json`` of a run to resume, with the fields a resume uses type-checked.

    Raises ValueError naming the file (and the field) when it is unreadable or malformed."""
    try:
        info = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    lacking = [k for k in ("dtype", "data", "val_fraction", "unigram_entropy") if k not in info]
    if lacking:
        raise ValueError(f"{path} lacks {', '.join(lacking)}")

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def bad(field, expected):
        return ValueError(f"{path}: field {field!r}: expected {expected}, got {info[field]!r}")

    if info["dtype"] not in ("float32", "bfloat16"):
        raise bad("dtype", "'float32' or 'bfloat16'")
    data = info["data"]
    if data is not None and not (isinstance(data, list) and data
                                 and all(isinstance(d, str) for d in data)):
        raise bad("data", "null (the standard library) or a non-empty list of paths")
    mf = info.get("max_files")
    if mf is not None and not (isinstance(mf, int) and not isinstance(mf, bool) and mf >= 2):
        raise bad("max_files", "null or an integer >= 2")
    if not (number(info["val_fraction"]) and 0 < info["val_fraction"] <= 0.5):
        raise bad("val_fraction", "a number in (0, 0.5]")
    if not (number(info["unigram_entropy"]) and math.isfinite(info["unigram_entropy"])):
        raise bad("unigram_entropy", "a finite number")
    return info


def _check_same_corpus(info: dict, path: Path, files, corpus) -> None:
    """Raise ValueError naming ``path`` when the corpus a resume found differs from the one the
    run recorded (its number of files and training tokens, where ``run.json`` holds them): a
    relative ``data`` path read from another directory, files changed or removed since."""
    found = {"files": len(files), "train_tokens": int(len(corpus.train))}
    differ = [f"{k} {info[k]!r} recorded, {v} found" for k, v in found.items()
              if k in info and info[k] != v]
    if differ:
        raise ValueError(f"{path}: the training data {info['data'] or '(the standard library)'} "
                         f"is not the corpus of the run ({'; '.join(differ)}); resume from "
                         "the directory the run was started in, or restore its files")


def _cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    if args.resume is None and args.steps is None:
        parser.error("argument --steps is required (unless --resume)")
    if args.config not in (None, *CONFIGS) and not os.path.exists(args.config):
        parser.error(f"argument --config: expected tiny, small or a config.json, got "
                     f"{args.config!r}")
    if args.resume is not None and not (Path(args.resume) / "trainer_state.pt").is_file():
        parser.error(f"argument --resume: {args.resume!r} has no trainer_state.pt")
    if args.resume is not None:
        for dest in _RUN_SETTINGS:
            if getattr(args, dest) is not None:
                parser.error(f"argument --{dest.replace('_', '-')}: a resumed run keeps its own "
                             f"settings (saved in {args.resume}); only --steps, --out, "
                             "--device, --threads, --save-every, --stop-after and --overwrite "
                             "apply. Start a new run (--out) to change it")
    else:
        for dest, value in _RUN_DEFAULTS.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
    device = resolve_device(parser, args.device)
    out_dir = Path(args.out or args.resume or "runs/dsv4-train")
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"argument --out: {str(out_dir)!r} exists and is not a directory")
    resumed_here = args.resume is not None and out_dir.resolve() == Path(args.resume).resolve()
    held = [f for f in _RUN_FILES if (out_dir / f).exists()] if out_dir.is_dir() else []
    if held and not resumed_here and not args.overwrite:
        parser.error(f"argument --out: {str(out_dir)!r} already holds a run ({', '.join(held)}); "
                     f"continue it with `dsv4 train --resume {out_dir}`, or pass --overwrite to "
                     "replace its files")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..model import Model
    from ..tokenizer import load_tokenizer
    from .data import Corpus, collect_files, stdlib_files, unigram_entropy
    from .trainer import TrainConfig, Trainer

    out = out_dir
    run_info: dict = {}
    try:
        if args.resume:
            run_info = _read_run_info(Path(args.resume) / "run.json")
            state = Trainer.read_state(args.resume)
            cfg_d = dict(state["config"])
            saved_step = int(state["step"])
            if (args.steps if args.steps is not None else cfg_d["steps"]) <= saved_step:
                raise ValueError(
                    f"the run was saved at step {saved_step}"
                    + (f" of its {saved_step} steps: it is complete" if args.steps is None
                       else f"; --steps {args.steps} leaves nothing to do")
                    + f"; give --steps greater than {saved_step} to continue it")
            if args.steps is not None and args.steps != cfg_d["steps"]:
                print(f"dsv4 train: --steps {args.steps} differs from the run's "
                      f"{cfg_d['steps']}: the schedules are laid out anew", file=sys.stderr)
                cfg_d["steps"] = args.steps
            try:
                cfg = TrainConfig(**cfg_d)
            except TypeError as e:      # keys of another version / a tampered file
                raise ValueError(f"{Path(args.resume) / 'trainer_state.pt'}: its config does "
                                 f"not fit TrainConfig ({e})") from None
            model = Model.from_pretrained(args.resume, device=device,
                                          dtype=getattr(torch, run_info["dtype"]),
                                          progress=False)
            data = run_info["data"]
        else:
            config = _model_config(args.config or "small")
            torch.manual_seed(args.seed)
            model = Model(config).to(device=device, dtype=getattr(torch, args.dtype))
            cfg = TrainConfig(
                steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                optimizer=args.optimizer, weight_decay=args.weight_decay, warmup=args.warmup,
                decay_start=args.decay_start, mtp=not args.no_mtp,
                balance_alpha=args.balance_alpha, bias_update_speed=args.bias_speed,
                anticipatory_delta=args.anticipatory_delta, anticipatory=args.anticipatory,
                grad_clip=args.grad_clip, seed=args.seed, eval_every=args.eval_every,
                eval_windows=args.eval_windows)
            # absolute: a resume from another directory reads the same files
            data = [str(Path(d).resolve()) for d in args.data] if args.data else None
        files = collect_files(data) if data else stdlib_files()
        if args.max_files or run_info.get("max_files"):      # (no --max-files with --resume)
            files = files[:args.max_files or run_info["max_files"]]
        tokenizer = load_tokenizer()
        t0 = time.perf_counter()
        corpus = Corpus.from_files(files, tokenizer, args.val_fraction
                                   if not run_info else run_info["val_fraction"],
                                   model.config.bos_token_id)
        if run_info:
            _check_same_corpus(run_info, Path(args.resume) / "run.json", files, corpus)
        trainer = Trainer(model, corpus, cfg)
        if args.resume:
            trainer.load_state(args.resume, state)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as e:
        what = f"cannot resume from {args.resume}: " if args.resume else ""
        print(f"dsv4 train: error: {what}{e}", file=sys.stderr)
        return 1
    n_body = sum(p.numel() for n, p in model.named_parameters()
                 if n not in ("embed.weight", "head.weight"))
    n_all = sum(p.numel() for p in model.parameters())
    if not run_info:
        run_info = {"data": data, "max_files": args.max_files, "val_fraction": args.val_fraction,
                    "dtype": args.dtype, "files": len(files),
                    "train_tokens": int(len(corpus.train)), "val_tokens": int(len(corpus.val)),
                    "unigram_entropy": unigram_entropy(corpus.train),
                    "parameters": n_all, "parameters_without_embed_head": n_body,
                    "model_config": dataclasses.asdict(model.config)}
    print(f"dsv4 train: {len(files)} files ({corpus.n_train_files} train, {corpus.n_val_files} "
          f"validation), {len(corpus.train):,} + {len(corpus.val):,} tokens (tokenised in "
          f"{time.perf_counter() - t0:.0f} s), unigram entropy "
          f"{run_info['unigram_entropy']:.3f} nats; model {n_all / 1e6:.2f}M parameters "
          f"({n_body / 1e6:.2f}M without embedding and head), {cfg.optimizer}, "
          f"{run_info['dtype']} on {device}; steps {trainer.step} -> {cfg.steps}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(run_info, indent=1, default=str))
    return _loop(trainer, out, args, run_info["unigram_entropy"])


def _loop(trainer, out: Path, args, unigram: float) -> int:
    from tqdm import tqdm

    from .plot import plot_runs
    cfg = trainer.cfg

    def save():
        trainer.save(out)
        try:
            plot_runs([(out.name, trainer.history)], out / "curves.png", unigram,
                      title=f"dsv4 train ({cfg.optimizer}, lr {cfg.lr:g})")
        except ImportError:
            print("dsv4 train: matplotlib is not installed: no curves.png", file=sys.stderr)

    done_here = 0
    ema = None
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="train", unit="step",
               dynamic_ncols=True, file=sys.stderr)
    try:
        while trainer.step < cfg.steps:
            m = trainer.train_step()
            done_here += 1
            ema = m["loss"] if ema is None else 0.95 * ema + 0.05 * m["loss"]
            post = dict(loss=f"{ema:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                        load=f"{m['load_max_over_mean']:.2f}", lr=f"{m['lr']:.2e}")
            last = trainer.step == cfg.steps
            if trainer.step % cfg.eval_every == 0 or last:
                v = trainer.evaluate()
                post["val"] = f"{v['val_loss']:.3f}"
                bar.write(f"step {trainer.step}: train {ema:.3f}, validation "
                          f"{v['val_loss']:.3f} nats (unigram entropy {unigram:.3f})")
            bar.set_postfix(post, refresh=False)
            bar.update(1)
            if last or (args.save_every and trainer.step % args.save_every == 0):
                save()
            if args.stop_after and done_here >= args.stop_after and not last:
                save()
                bar.write(f"stopped after {done_here} steps; continue with "
                          f"`dsv4 train --resume {out}`")
                break
    except KeyboardInterrupt:
        bar.close()
        save()
        print(f"dsv4 train: interrupted at step {trainer.step}; saved to {out}", file=sys.stderr)
        return 130
    except FloatingPointError as e:     # non-finite gradients: the step was not taken
        bar.close()
        save()
        print(f"dsv4 train: error: {e}. The run up to step {trainer.step} is saved to {out} "
              f"(`dsv4 train --resume {out}` continues it)", file=sys.stderr)
        return 1
    bar.close()
    print(f"dsv4 train: step {trainer.step}/{cfg.steps}; checkpoint in {out} "
          f"(`dsv4 generate --model {out} --prompt ...`)", file=sys.stderr)
    return 0
