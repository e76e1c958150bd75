# Source this on the lent GPU machine, from the repo root: it installs what that image lacks
# from wheels carried in .whl/ (DeepSpeed as an sdist, built without ops: they JIT-build),
# then exports the paths the harness and the benchmarks need. See bench/RESULTS.md.
# One pip call: a second one into the same --target skips bin/ (and with it the `deepspeed` launcher).
if [ ! -x /tmp/site/bin/deepspeed ]; then
  DS_BUILD_OPS=0 python3 -m pip install -q --upgrade --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl .whl/deepspeed-*.tar.gz || return 1
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch-ext WANDB_MODE=disabled PYTHONUNBUFFERED=1
python3 -c "
import importlib
for name in ('torch', 'deepspeed', 'transformers', 'tokenizers', 'datasets', 'pydantic', 'pydantic_core', 'hjson', 'dill', 'multiprocess', 'yaml', 'safetensors', 'pyarrow', 'tqdm', 'rich', 'cpuinfo', 'msgpack', 'ninja'):
    m = importlib.import_module(name); print(name, getattr(m, '__version__', '?'))
import harness.worker.train, harness.orchestrator; print('harness imports ok')
" || return 1
# Optional: liger-kernel (fast: {liger: true}); the GPU image's torch brings triton. Without it, liger falls back with a warning.
python3 -c "import liger_kernel.transformers; print('liger-kernel ok')" 2>/dev/null || echo "liger-kernel not carried: fast liger falls back"
