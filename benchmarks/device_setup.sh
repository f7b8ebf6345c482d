# Source on the GPU machine (../shared/DEVICE.md): MLX's CUDA build, mlx-lm and
# this plugin on PYTHONPATH, the plugin's shim active in every Python process
# (the .pth line can't be installed there: no build backend, no index).
set -e
# a second call on the same (warm) machine finds MLX unpacked already
[ -d /tmp/site/mlx ] || . .dev/b/install.sh
cat > /tmp/site/sitecustomize.py <<'PY'
try:
    import mlx_lm_optiq._startup as s
    s.install()
except Exception:
    pass
PY
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p /tmp/models
if [ -f .dev/g3/gguf_part ] && [ ! -d /tmp/models/smollm2 ]; then
    cat /root/stash/gguf_1 /root/stash/gguf_2 .dev/g3/gguf_part > /tmp/models/smollm2.gguf
    DTYPE=bfloat16 python3 .dev/g3/gguf_to_mlx.py /tmp/models/smollm2.gguf /tmp/models/smollm2 bfloat16
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
