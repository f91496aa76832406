"""End-to-end runtime benchmark (``dsv4 bench``) in gpu_check's quick form.

Usage: python bench/bench_e2e.py [dsv4 bench arguments]

Default: 2 layers at V4-Flash width (one CSA, one HCA; 64 experts; bf16 weights; bf16 head),
prefill 1x2048, 8x2048, 64x512, decode batch 1/8/64 at 4096 context, each row beside its floor
(bytes / 4.22 TB/s, FLOPs / 767 TFLOP/s) and peak memory; transformers'
DeepseekV4ForCausalLM on the same config when it is importable. JSON and PNG go to $OUT
(default /tmp/dsv4_out): bench_e2e.json, bench_e2e.png. Pass e.g. ``--kv-cache fp8
--indexer-cache fp8`` for the release's FP8 cache layouts (head_dim 512, sm_90).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from dsv4.runtime.bench import main

if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp/dsv4_out")
    os.makedirs(out, exist_ok=True)
    argv = sys.argv[1:] or ["--steps", "16"]
    if "--json" not in argv:
        argv += ["--json", os.path.join(out, "bench_e2e.json")]
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode")
    e2e = mode.parse_known_args(argv)[0].mode != "1m"
    if "--plot" not in argv and e2e:        # (--mode 1m has no plot and no transformers row)
        argv += ["--plot", os.path.join(out, "bench_e2e.png")]
    if "--compare" not in argv and e2e and importlib.util.find_spec("transformers") is not None:
        argv += ["--compare", "hf"]
    raise SystemExit(main(argv))
