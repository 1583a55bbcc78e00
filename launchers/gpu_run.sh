#!/usr/bin/env bash
# On the device machine, in the project root, with $OUT naming the output folder; .whl/ and .gpu/ from
# launchers/gpu_prepare.sh carried with the checkout. Runs the named steps of launchers/gpu_check.py in order
# (kernels, tune, training; bench = launchers/bench_prefix_attention.py --check --quick), each under its own
# time limit, logging to $OUT/<step>.log next to $OUT/<step>.json. Never `pip install -e .` there: the torch
# pin would try to fetch torch; the project runs from source through PYTHONPATH.
#   bash launchers/gpu_run.sh kernels tune        # first call
#   bash launchers/gpu_run.sh training            # second call
set -uo pipefail
: "${OUT:?set OUT to the output folder}"
[ $# -gt 0 ] || { echo "usage: $0 kernels|tune|training|bench ..." >&2; exit 2; }
rm -rf /tmp/site
wheels=(.whl/*.whl)
[ "${PTSCALE_TRANSFORMERS:-image}" = wheel ] && wheels+=(.whl/alt/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" || exit 3
export PYTHONPATH=/tmp/site:$PWD/.gpu/py:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda TRITON_CACHE_DIR=/tmp/tcache
{
    date -u +%FT%TZ
    git log -1 --format='commit %H %s' 2>/dev/null || true
    nvidia-smi
    python3 -c "import torch, triton, transformers, deepspeed, peft; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'deepspeed', \
deepspeed.__version__, 'peft', peft.__version__)"
} 2>&1 | tee -a "$OUT/env.txt"
status=0
for step in "$@"; do
    case $step in
        kernels) timeout 240 python3 launchers/gpu_check.py kernels --out "$OUT/kernels.json" ;;
        tune) timeout 150 python3 launchers/gpu_check.py tune --out "$OUT/tune.json" ;;
        training) timeout 330 python3 launchers/gpu_check.py training --out "$OUT/training.json" --steps 20 \
            --warmup 6 model.preset=blip2-opt-2.7b model.dtype=bf16 data.train_size=256 data.eval_size=16 ;;
        bench) timeout 150 python3 launchers/bench_prefix_attention.py --check --quick --out "$OUT/bench" ;;
        *) echo "unknown step $step" >&2; false ;;
    esac 2>&1 | tee "$OUT/$step.log"
    rc=${PIPESTATUS[0]}
    echo "step $step: exit $rc" | tee -a "$OUT/env.txt"
    [ "$rc" -eq 0 ] || status=1
done
nvidia-smi --query-gpu=memory.used,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$OUT/env.txt"
exit $status
