#!/usr/bin/env bash
# Syntax-check torch glue files (csrc/torch/*.cpp) without building the extension:
#   scripts/check_cpp.sh csrc/torch/sparse_attn.cpp [more.cpp ...]
# Same include paths as setup.py (torch, CUDA toolkit, the torch wheel's nvidia/cu*/include,
# csrc/include). Takes ~30-60 s per file here instead of a full pip build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
CUDA_HOME=${CUDA_HOME:-$("$PY" -c 'import setup; print(setup.find_cuda_home() or "")')}
mapfile -t INC < <("$PY" - <<'PYEOF'
import torch.utils.cpp_extension as c, setup
for d in c.include_paths() + setup.nvidia_include_dirs():
    print(d)
PYEOF
)
flags=(-std=c++20 -fsyntax-only -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
       -Icsrc/include -I"$CUDA_HOME/include" -I"$CUDA_HOME/include/cccl")
for d in "${INC[@]}"; do flags+=(-I"$d"); done
for f in "$@"; do
  echo "check_cpp: $f"
  "${CXX:-g++}" "${flags[@]}" "$f"
done
