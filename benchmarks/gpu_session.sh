#!/usr/bin/env bash
# One GPU session in one call: build the CUDA extension against the machine's torch, run the
# GPU tests, then every benchmark, with logs and tables under ${OUT:-gpu_out}.
#   OUT=/path bash benchmarks/gpu_session.sh
set -uo pipefail
# OFFICIAL: a bytedance/1d-tokenizer checkout to benchmark against (default: shared/peer/1d-tokenizer
# beside the repository, or inside it as the device machines carry it)
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
for d in ../shared/peer/1d-tokenizer shared/peer/1d-tokenizer; do
  if [ -z "${OFFICIAL:-}" ] && [ -d "$d" ]; then OFFICIAL=$d; fi
done
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
export TATITOK_FAST_TARGET=cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=${MAX_JOBS:-16}
export NVCC_THREADS=${NVCC_THREADS:-4}
pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
# issue 19's GPU-only checks first (short): FP8 steps that count their converted layers (TE
# where it imports, torchao's real _scaled_mm at batch 6), CUDA-graph capture on the model's
# device and the graph key's ops mode, the VQ kernels (tensor-core path vs its twin)
python -m pytest -q -p no:cacheprovider -rs tests/training/test_fp8.py tests/models/test_graph_key_device.py \
  tests/models/test_graph_runner.py tests/ops/test_vq_nearest_code.py tests/ops/test_vq_mma_ref.py \
  tests/ops/test_fake_strides.py > "$OUT/issue19_tests.log" 2>&1; echo "issue19 tests rc=$?" >> "$OUT/issue19_tests.log"
tail -8 "$OUT/issue19_tests.log"
python - > "$OUT/issue19_fp8.log" 2>&1 <<'PY'
# one bf16 + FP8 training step of the tiny MaskGen-VQ at batch 6 per backend, on the GPU
import torch
from pathlib import Path
from tatitok_fast.benchmarks.train import Step
from tatitok_fast.training import fp8
from tatitok_fast.training.config import FP8
for backend in ("torchao", "te"):
    try:
        step = Step(Path("training/recipes/maskgen_vq_tiny.toml"), "cuda", 6, quick=False, loss=False)
        model = step.model.cuda()
        plan = fp8.apply_fp8(model, FP8(backend=backend, min_features=step.cfg.fp8.min_features), False,
                             torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16), plan.autocast():
            loss = step.recipe.forward_loss(model, step.batch, 1).loss
        loss.backward()
        frozen = sum(not p.requires_grad for p in model.parameters())
        print(f"{backend}: {plan.summary()}; loss {loss.item():.4f}; frozen params kept {frozen}")
    except Exception as exc:  # TE not installed on the image: say so, keep going
        print(f"{backend}: not run ({type(exc).__name__}: {exc})")
PY
cat "$OUT/issue19_fp8.log"
python -m pytest -q tests/ops tests/models -x -p no:cacheprovider > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log"
tail -5 "$OUT/tests.log"
run() {  # name, then the bench arguments
  local name=$1; shift
  tatitok-fast bench "$@" --device cuda --no-progress --json "$OUT/$name.json" --markdown "$OUT/$name.md" \
    > "$OUT/$name.log" 2>&1 || echo "$name failed (see $name.log)"
  cat "$OUT/$name.md" 2>/dev/null
}
run ops ops
# inference: ours next to the official fp32 eager and autocast-bf16 paths when OFFICIAL is set
run tokenizer_bl32_vae tokenizer --preset tatitok_bl32_vae --batch 64 ${OFFICIAL:+--official "$OFFICIAL"}
run tokenizer_bl128_vq tokenizer --preset tatitok_bl128_vq --batch 64 ${OFFICIAL:+--official "$OFFICIAL"}
run generate_vq_xl generate --generator maskgen_vq_xl --batch 64 --steps 16 ${OFFICIAL:+--official "$OFFICIAL"}
run generate_kl_xl generate --generator maskgen_kl_xl --batch 32 ${OFFICIAL:+--official "$OFFICIAL"}
# TiTok (issue 16): the tokenizers, then class-to-image (MaskGIT ids -> TiTok decode -> pixels), the
# GPU goal's unit: TiTok-L-32 at batch 256 bf16 (goal >= 1000 images/s; the official ImageBert needs
# transformers); ours with the CUDA-graph loop (class-to-image) and without (class-to-image eager loop)
run tokenizer_titok_l32 tokenizer --model titok_l32 --batch 64 ${OFFICIAL:+--official "$OFFICIAL"}
run tokenizer_titok_bl128 tokenizer --model titok_bl128_vq8k --batch 64 ${OFFICIAL:+--official "$OFFICIAL"}
run generate_titok_l32 generate --generator titok_l32 --batch 256 --dtype bf16 ${OFFICIAL:+--official "$OFFICIAL"}
# training: the engine's GPU paths, then one step of ours (bf16, torchao FP8, TE FP8 where installed)
# vs the official training step when OFFICIAL points at a 1d-tokenizer checkout
python -m pytest -q tests/training -x -p no:cacheprovider > "$OUT/train_tests.log" 2>&1; echo "rc=$?" >> "$OUT/train_tests.log"
tail -3 "$OUT/train_tests.log"
run train_vq_xl train --recipe maskgen_vq_xl_stage1 --batch 128 ${OFFICIAL:+--official "$OFFICIAL"}
run train_kl_xl train --recipe maskgen_kl_xl_stage1 --batch 32 ${OFFICIAL:+--official "$OFFICIAL"}
run train_tok_vq train --recipe tatitok_bl128_vq --batch 32 ${OFFICIAL:+--official "$OFFICIAL"}
