#!/usr/bin/env bash
# The GPU checks of the open issues in one prepared run (for a lent CUDA machine; see /work/.library/device).
#
#   part A (~6 min on an H100/H200): backbone (#2), GEO-Bench features (#5), curation + its CUDA test (#8),
#                                    canopy mapping vs transformers (#4)
#   part B (~5 min):                 pretraining step MFU, ViT-S/16 and ViT-L/16, eager and --compile (#3)
#
#   bash bench/gpu_checks.sh A|B|all         # writes one log per bench under $OUT (default ./gpu_out)
#
# The device image has torch, timm, transformers, h5py, sklearn, pandas, pyarrow, psutil, tqdm but not rasterio or
# omegaconf: carry their wheels in `.whl/` (git-ignored), fetched here with
#   pip download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
#       --platform manylinux_2_28_x86_64 --no-deps -d .whl rasterio affine omegaconf
# and pass carry=[".whl"] to the device run. Every step has its own timeout; a failing step does not stop the rest.
set -u
PART="${1:-all}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT" build
SITE="$PWD/build/gpu_site"
if [ -d .whl ] && [ ! -d "$SITE/rasterio" ]; then
    python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$OUT/pip.txt" 2>&1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt" 2>&1

step() {  # step NAME SECONDS CMD...
    local name=$1 secs=$2
    shift 2
    local t0=$SECONDS
    timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
}

if [ "$PART" = A ] || [ "$PART" = all ]; then
    step backbone 150 python3 bench/backbone.py --device cuda --json "$OUT/backbone.json"
    step geobench_features 90 python3 bench/geobench_features.py --device cuda
    step curation 120 python3 bench/curation.py --device cuda --embed-batches 20 --backbone dinov3_vitl16
    step curation_cuda_test 60 python3 -m pytest -q -p no:cacheprovider tests/test_curation_clustering.py -k cuda
    step chm_predict 150 python3 bench/chm_predict.py --device cuda --json "$OUT/chm_predict.json"
fi
if [ "$PART" = B ] || [ "$PART" = all ]; then
    step pretrain_eager 120 python3 bench/pretrain_step.py --device cuda --models vits16,vitl16
    step pretrain_compile 200 python3 bench/pretrain_step.py --device cuda --models vitl16 --batch 64 --compile \
        --json "$OUT/pretrain_compile.json"
fi
cat "$OUT/steps.txt"
