#!/usr/bin/env bash
# The procedure for the lent GPU machine (no package index there, at most
# 64 MiB per call, warm ~30 s between calls; see ../shared/DEVICE.md).
#
# Here:   benchmarks/device.sh pack DATA_DIR QWEN_SLICES_DIR SMOLLM2_GGUF
#           -> .dev/c01 ... .dev/cNN, each under 63 MiB: A (MLX CUDA, wheels,
#              SmolLM2 GGUF, GSM8K, converter) first, then B (the Qwen slices)
# There, one call per chunk, back to back:
#         bash benchmarks/device.sh stash .dev/cNN
#         bash benchmarks/device.sh setup        # once A is stashed: MLX + SmolLM2
#         bash benchmarks/device.sh start NAME CMD...   # a job that outlives the call
#         bash benchmarks/device.sh wait NAME SECONDS   # until it ends, or SECONDS
#         bash benchmarks/device.sh qwen         # once B is stashed: the 1.5B model
#         bash benchmarks/device.sh collect FILE...     # copies into $OUT
# The studies of benchmarks/README.md, each started as a job:
#         bash benchmarks/device.sh start smollm2 bash benchmarks/device.sh study-smollm2
#         bash benchmarks/device.sh start qwen bash benchmarks/device.sh study-qwen
#         bash benchmarks/device.sh start step bash benchmarks/device.sh study-step
#         bash benchmarks/device.sh start sens bash benchmarks/device.sh study-sensitivity
#         bash benchmarks/device.sh start long bash benchmarks/device.sh study-long
#         bash benchmarks/device.sh start q4 bash benchmarks/device.sh study-quantized
#         bash benchmarks/device.sh start signal bash benchmarks/device.sh study-signal-smollm2
#           (then study-signal-qwen, once signal_smollm2-135m.json is committed)
#           (needs MLX and SmolLM2 only: setup's A without the Qwen slices)
#           (needs only MLX: ../shared/tools/mlx-cuda-parts.sh's .dev/a, then
#            . .dev/b/install.sh in the call that starts it)
set -euo pipefail
CHUNK=$((63 * 1024 * 1024))
W=${DEVICE_WORK:-/root/w}
STASH=${DEVICE_STASH:-/root/stash}
cmd=${1:?usage: device.sh pack|stash|setup|start|wait|qwen|collect}
shift

case "$cmd" in
pack)
    data=${1:?DATA_DIR}; slices=${2:?QWEN_SLICES_DIR (- for none)}; smol=${3:?SMOLLM2_GGUF}
    here=$(cd "$(dirname "$0")/.." && pwd)
    grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
    [ -f .dev/a/part_aa ] || bash ../shared/tools/mlx-cuda-parts.sh
    stage=$(mktemp -d)
    mkdir -p "$stage/A/wheels" "$stage/A/mlx" "$stage/B"
    cp .dev/a/part_aa .dev/b/part_ab "$stage/A/mlx/"
    cp .dev/b/*.whl "$stage/A/wheels/"
    python3 -m pip download -q --no-deps --only-binary=:all: gguf==0.19.0 -d "$stage/A/wheels"
    python3 -c "from hatchling.build import build_wheel; build_wheel('$stage/A/wheels')"
    cp -r "$data" "$stage/A/gsm8k"
    cp "$smol" "$stage/A/smollm2.gguf"
    cp ../shared/tools/gguf_to_mlx.py "$stage/A/"
    [ "$slices" = - ] || cp "$slices"/part*.bin "$stage/B/"
    rm -rf .dev/c[0-9]*
    (cd "$stage/A" && tar cf - .) | split -b $CHUNK -d -a 2 - "$stage/A_"
    [ "$slices" = - ] || (cd "$stage/B" && tar cf - .) | split -b $CHUNK -d -a 2 - "$stage/B_"
    n=0
    for part in "$stage"/A_* "$stage"/B_*; do
        [ -e "$part" ] || continue
        n=$((n + 1)); d=$(printf '.dev/c%02d' $n); mkdir -p "$d"; mv "$part" "$d/"
    done
    rm -rf "$stage"
    du -sh .dev/c* | tr '\n' ' '; echo
    ;;
stash)
    mkdir -p $STASH && cp "${1:?CHUNK_DIR}"/* $STASH/ && ls $STASH | tr '\n' ' '
    ;;
setup)
    mkdir -p $W/A
    if [ ! -d /tmp/site/mlx ]; then
        cat $STASH/A_* | tar xf - -C $W/A
        mkdir -p /tmp/site
        cat $W/A/mlx/part_aa $W/A/mlx/part_ab | tar xJf - -C /tmp/site
        for w in $W/A/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/site; done
        # .pth files (the plugin's start-up hook) are read in site dirs only
        echo 'import site; site.addsitedir("/tmp/site")' > /tmp/site/sitecustomize.py
    fi
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    if [ ! -d $W/smollm2 ]; then
        python3 $W/A/gguf_to_mlx.py $W/A/smollm2.gguf $W/smollm2 bfloat16 > $W/convert_smollm2.log 2>&1
    fi
    python3 -c "import mlx.core as mx, mlx_lm, mlx_lm_optiq.shim as s; print('mlx', mx.__version__, mx.default_device(), 'mlx-lm', mlx_lm.__version__)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    ;;
start)
    name=${1:?NAME}; shift
    mkdir -p $W
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    # a new session: it runs on after this call returns, until the machine goes back
    setsid nohup bash -c "$* ; echo \$? > $W/$name.rc" > $W/$name.log 2>&1 < /dev/null &
    echo "started $name"
    ;;
wait)
    name=${1:?NAME}; limit=${2:-540}; t=0
    while [ ! -f $W/$name.rc ] && [ $t -lt "$limit" ]; do sleep 5; t=$((t + 5)); done
    tail -n 25 $W/$name.log
    [ -f $W/$name.rc ] && echo "$name exited $(cat $W/$name.rc)" || echo "$name still running"
    ;;
qwen)
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/B
    [ -f $W/B/part22.bin ] || cat $STASH/B_* | tar xf - -C $W/B
    [ -d $W/qwen ] || python3 benchmarks/convert_gguf.py "$W/B/part*.bin" $W/qwen --dtype bfloat16
    ;;
study-smollm2)
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    python3 benchmarks/allocation.py --model $W/smollm2 --data $W/A/gsm8k \
        --name smollm2-135m --bases q50,q40 --reference --seeds 4 --jobs "${JOBS:-8}" \
        --work $W/smollm2_work --out-dir $W/results
    ;;
study-qwen)
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    bash "$0" qwen
    common=(--model $W/qwen --data $W/A/gsm8k --name qwen2.5-coder-1.5b --bases q50
            --seeds 4 --jobs "${JOBS:-4}" --sensitivity-samples 16
            --work $W/qwen_work --out-dir $W/results)
    # the rows that need no winner first, while the SmolLM2 study may still run
    python3 benchmarks/allocation.py "${common[@]}" --rows default,constant_all
    while [ ! -f $W/smollm2.rc ]; do sleep 5; done
    python3 benchmarks/allocation.py "${common[@]}" --rows default,constant_all,winner \
        --winner-from $W/results/allocation_smollm2-135m.json --gsm8k 219
    ;;
study-step)
    # the training step on one H200: its pieces (MLX vs PyTorch), then the map
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/results
    python3 benchmarks/layer_speed.py --size 1B --batch 4 --length 2048 \
        --out $W/results/layer_speed_1B.json
    python3 benchmarks/layer_speed.py --size 8B --batch 1 --length 8192 \
        --out $W/results/layer_speed_8B.json
    python3 benchmarks/step_speed.py --plans speed,memory --sizes 1B,8B,3B \
        --budget-seconds "${BUDGET:-1020}" --out $W/results/step_speed.json
    ;;
study-long)
    # issue 22's open rows. 2026-12-02 found the out-of-memory in MLX's fused
    # attention backward (one call of 2^28 elements, sdpa_long.py), and the
    # plugin's pieces still failing at 8B x 65,536; the CPU then showed why:
    # with --grad-checkpoint the backward was each block's second, whole,
    # attention (mended). Does a head slice of mlx-lm's layout need its copy?
    # Then the plugin's series past the 2^28 lengths (the shorter ones are
    # committed and unchanged: below 2^27 elements there are no pieces), the
    # 8B first, then the 1B, (study-quantized: the step on a 4-bit base)
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/results
    python3 benchmarks/sdpa_long.py --layout model --out $W/results/sdpa_long_8B_model_layout.json \
        --rows backward:heads:2:65536,backward:heads-copied:2:65536,backward:heads-copied:8:131072
    python3 benchmarks/step_speed.py --plans memory --sizes 8B --memory-variants plugin \
        --start 65536 --max-length 262144 --budget-seconds "${BUDGET8:-600}" \
        --out $W/results/step_memory_8B_long.json
    python3 benchmarks/step_speed.py --plans memory --sizes 1B --memory-variants plugin \
        --start 131072 --max-length 262144 --budget-seconds "${BUDGET1:-360}" \
        --out $W/results/step_memory_1B_long.json
    ;;
study-quantized)
    # the step on a 4-bit base: the plugin as it runs (auto: float copies of
    # the base on the GPU), with --base-compute quantized, and stock mlx-lm
    # (aligned), beside the bf16 rows and PEFT of the same process plan
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/results
    python3 benchmarks/step_speed.py --plans speed --sizes 1B,8B --base-bits 4 \
        --budget-seconds "${BUDGET:-560}" --out $W/results/step_speed_q4.json
    ;;
study-signal-smollm2)
    # issue 25's study, first model: every arm at 3 learning rates, 4 seeds, both
    # bases; resumable: put an earlier runs.jsonl in $W/signal_work first. The
    # KL pass of the first session's run is committed: the same bases again
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/signal_work
    [ -f $W/signal_work/sensitivity.json ] || cp benchmarks/results/signal_smollm2-135m_sensitivity.json $W/signal_work/sensitivity.json
    python3 benchmarks/signal_study.py --model $W/smollm2 --data $W/A/gsm8k \
        --name smollm2-135m --bases q50,q40 --seeds 4 --jobs "${JOBS:-12}" \
        --budget-seconds "${BUDGET:-1200}" --work $W/signal_work --out-dir $W/results
    ;;
study-signal-qwen)
    # the second model at each arm's SmolLM2 best: the window, the baseline, the best 3
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    bash "$0" qwen
    python3 benchmarks/signal_study.py --model $W/qwen --data $W/A/gsm8k \
        --name qwen2.5-coder-1.5b --bases q50 --arms default,constant_all,best3 \
        --lrs-from benchmarks/results/signal_smollm2-135m.json --seeds 4 --jobs "${JOBS:-4}" \
        --sensitivity-samples 16 --gsm8k 219 --budget-seconds "${BUDGET:-1200}" \
        --work $W/signal_qwen_work --out-dir $W/results
    ;;
study-sensitivity)
    # the sensitivity pass from cached block inputs against whole-model trials,
    # SmolLM2 in bf16: the benchmark's default rows, then the command's defaults
    export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
    mkdir -p $W/results
    python3 benchmarks/sensitivity_speed.py --model $W/smollm2 --data $W/A/gsm8k \
        --out $W/results/sensitivity_speed_h200.json
    python3 benchmarks/sensitivity_speed.py --model $W/smollm2 --data $W/A/gsm8k \
        --samples 16 --max-seq-length 128 --out $W/results/sensitivity_speed_h200_16x128.json
    ;;
collect)
    mkdir -p "$OUT"
    for f in "$@"; do [ -e "$f" ] && cp -r "$f" "$OUT/" || echo "no $f"; done
    ;;
*)
    echo "unknown command $cmd" >&2; exit 2
    ;;
esac
