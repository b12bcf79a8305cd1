#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU (no cargo there),
# in order of priority: device detection; each fused op's CUDA forward
# against its CPU forward on every SD 1.5 layer shape (`sdgen dev
# ops-check`, f32 and f16); the diffusers parity cases on CUDA in f32 and
# f16; SD 1.5-shaped speed against diffusers fp16 on the same card; then, if
# SDXL=1, SDXL-shaped speed at 1024²; a table last, and a per-kernel profile
# when ncu is installed. See README, "Building with CUDA".
#
#   scripts/gpu-check.sh SDGEN [SDGEN ...]
# Each SDGEN is a `--features cuda` or `cudnn` build (or one compressed as
# NAME.xz), labelled by its file name; the first gets the full parity run.
# Run from the repository root; diffusers must be importable for the
# comparison. Env: OUT_DIR (logs and results; default /tmp/sdgen-gpu-check),
# STEPS (20), SIZE (512), BATCHES ("1 4"), SUITES (sd1,samplers),
# LIMIT (first N parity cases per suite; 0 = all), OPS (0 skips the op
# check), SPEED (0 skips the speed part), SDXL (1 adds SDXL 1024² batch 1).
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: scripts/gpu-check.sh SDGEN [SDGEN ...]" >&2; exit 2; }
out=${OUT_DIR:-/tmp/sdgen-gpu-check}
steps=${STEPS:-20}; size=${SIZE:-512}; batches=${BATCHES:-1 4}; suites=${SUITES:-sd1,samplers}; limit=${LIMIT:-0}
mkdir -p "$out"
exec > >(tee "$out/gpu-check.log") 2>&1
py=${PYTHON:-python3}
results="$out/results.jsonl"
: >"$results"
record() { echo "$1" >>"$results"; }

echo "== machine"
date -u +%FT%TZ
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

# Builds link cuBLAS/cuRAND/NVRTC/cudart 13 (and cuDNN 9) dynamically: take
# them from the Python packages' lib folders unless the loader finds them.
libs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcudnn.so.9; do
    ldconfig -p | grep -q "$lib" && continue
    found=$(find / -xdev -name "$lib" -path '*nvidia*' 2>/dev/null | head -n 1)
    [ -n "$found" ] && libs="$libs:$(dirname "$found")"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

builds=()
for b in "$@"; do
    name=$(basename "${b%.xz}")
    if [[ "$b" == *.xz ]]; then xz -dc "$b" >"/tmp/$name" && chmod +x "/tmp/$name" && b="/tmp/$name"; fi
    echo "== build $name"
    ldd "$b" | grep -E "cuda|cublas|curand|nvrtc|cudnn"
    "$b" --version
    echo "device detection (--device auto):"
    "$b" dev matmul-peak --device auto --size 1024 --repeat 1
    builds+=("$b")
done

if [ "${OPS:-1}" != 0 ]; then
    for dtype in f32 f16; do
        echo "== ops: CUDA forwards against the CPU ones, every SD 1.5 layer shape at ${size}², $dtype"
        line=$("${builds[0]}" dev ops-check --device cuda --dtype "$dtype" --size "$size" 2>"$out/ops-$dtype.txt" | tail -n 1)
        grep -c "relative error" "$out/ops-$dtype.txt" | sed 's/^/cases run: /'
        echo "worst three:"
        grep "relative error" "$out/ops-$dtype.txt" | awk '{print $NF, $0}' | sort -g | tail -n 3 | cut -d' ' -f2-
        echo "${line:-failed: $(tail -n 1 "$out/ops-$dtype.txt")}"
        record "{\"ops\": \"$dtype\", \"summary\": ${line:-null}}"
    done
fi

parity() { # build dtype max mean suites
    local name; name=$(basename "$1")
    echo "== parity: $name on CUDA, $2 (tolerance max $3 / mean $4 levels)"
    $py scripts/gpu_parity.py "$1" cuda "$2" "$3" "$4" --suites "$5" --limit "$limit" | tee "$out/parity-$name-$2.txt"
    local last; last=$(tail -n 1 "$out/parity-$name-$2.txt")
    record "{\"build\": \"$name\", \"parity\": ${last:-null}}"
}
for i in "${!builds[@]}"; do
    # f32: the CPU tests' tolerance; f16: the bar is an average mean ≤ 0.74 levels.
    if [ "$i" = 0 ]; then parity "${builds[$i]}" f32 3 0.5 "$suites"; else parity "${builds[$i]}" f32 3 0.5 sd1; fi
    parity "${builds[$i]}" f16 255 2 sd1
done
echo "== the baseline: diffusers' own drift from its f32 CPU references on this card (same cases)"
for dtype in f32 f16; do
    $py scripts/diffusers_drift.py cuda $dtype 2>/dev/null | tee "$out/diffusers-drift-$dtype.txt"
    last=$(tail -n 1 "$out/diffusers-drift-$dtype.txt")
    record "{\"build\": \"diffusers\", \"parity\": ${last:-null}}"
done

echo "== f16 matrix-multiply rate, 8192³ (cuBLAS through torch, then through each build)"
record "{\"torch_matmul\": $($py scripts/torch_matmul_peak.py 8192 cuda f16 8 | tee /dev/stderr)}"
for b in "${builds[@]}"; do
    m=$("$b" dev matmul-peak --device cuda --dtype f16 --size 8192 --repeat 10 | tail -n 1)
    echo "$(basename "$b"): $m"
    record "{\"build\": \"$(basename "$b")\", \"matmul\": ${m:-null}}"
done

if [ "${SPEED:-1}" = 0 ]; then exit 0; fi
echo "== speed: SD 1.5-shaped random weights, ${size}², $steps steps, cfg 7.5, euler, f16"
model=/tmp/sd15-random
[ -d "$model" ] || "${builds[0]}" dev random-model --family sd15 --out "$model" --seed 0
record "{\"flops\": $($py scripts/flops.py "$model" "$size")}"
# Peak device memory as nvidia-smi sees it: the same measure for both tools.
watch_memory() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 >"$out/mem-$1.txt" &
    echo $!
}
speed_row() { # tool batch log-file-with-json-last model-label
    local line; line=$(tail -n 1 "$3")
    [[ "$line" == "{"* ]] || line=null
    record "{\"tool\": \"$1\", \"model\": \"$4\", \"batch\": $2, \"peak_smi_mb\": $(sort -n "$out/mem-$1-$2.txt" | tail -n 1), \"timings\": $line}"
}
speed() { # label model size batch
    local label=$1 model=$2 side=$3 batch=$4
    for b in "${builds[@]}"; do
        name=$(basename "$b")
        w=$(watch_memory "$name-$batch")
        "$b" --model "$model" -p "a photo of a cat" -s 1 --steps "$steps" -W "$side" -H "$side" --sampler euler \
            --device cuda --dtype f16 --batch-size "$batch" --batch-count "$batch" --timings -q --offline \
            -o "$out/$label-$name-b$batch.png" 2>"$out/$label-$name-b$batch.err"
        kill "$w"
        tail -n 3 "$out/$label-$name-b$batch.err"
        speed_row "$name" "$batch" "$out/$label-$name-b$batch.err" "$label"
    done
    w=$(watch_memory "diffusers-$batch")
    $py scripts/bench_diffusers.py "$model" tests/fixtures/tiny-sd1/tokenizer "$side" "$steps" 8 \
        --device cuda --dtype f16 --batch "$batch" >"$out/$label-diffusers-b$batch.out" 2>"$out/$label-diffusers-b$batch.err"
    kill "$w"
    tail -n 1 "$out/$label-diffusers-b$batch.out"
    speed_row diffusers "$batch" "$out/$label-diffusers-b$batch.out" "$label"
}
for batch in $batches; do
    speed sd15 "$model" "$size" "$batch"
done
if [ "${SDXL:-0}" = 1 ]; then
    echo "== speed: SDXL-shaped random weights, 1024², $steps steps, batch 1, f16"
    xl=/tmp/sdxl-random
    [ -d "$xl" ] || "${builds[0]}" dev random-model --family sdxl --out "$xl" --seed 0
    speed sdxl "$xl" 1024 1
fi

echo "== table"
$py - "$results" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:
        print("(unreadable result line)", line.strip()[:200])
for r in rows:
    if "ops" in r:
        s = r["summary"]
        print(f"ops {r['ops']}: " + ("failed" if not s else f"{s['cases']} cases, worst " + ", ".join(
            f"{k} {v['error']:.1e}" for k, v in s["worst"].items())))
for r in rows:
    p = r.get("parity")
    if p:
        print(f"parity {r['build']:<14} {p['dtype']}: {p['cases']} cases, worst max {p['worst_max_levels']}, "
              f"worst mean {p['worst_mean_levels']}, average mean {p['average_mean_levels']}, failures {len(p.get('failures', []))}")
peak = next((r["torch_matmul"]["gflops"] / 1e3 for r in rows if "torch_matmul" in r), None)
print(f"f16 GEMM 8192³: torch {peak and round(peak)} TFLOP/s; " + ", ".join(
    f"{r['build']} {r['matmul']['gflops'] / 1e3:.0f}" for r in rows if r.get("matmul")))
unet = next((r["flops"]["unet_gflop"]["total"] for r in rows if "flops" in r), None)
if unet:
    print(f"UNet pass: {unet} GFLOP per image (analytic)")
print(f"{'model':<6}{'tool':<14}{'batch':>6}{'load s':>8}{'s/image':>9}{'UNet it/s':>11}{'TFLOP/s':>9}{'% GEMM':>8}{'decode s':>10}{'peak MiB':>10}")
for r in rows:
    if "tool" not in r:
        continue
    t, b = r["timings"], r["batch"]
    if not t:
        print(f"{r['model']:<6}{r['tool']:<14}{b:>6}  failed")
        continue
    step = sorted(t["unet_steps_s"])[len(t["unet_steps_s"]) // 2]
    # Two UNet passes per image and step (CFG); the analytic count is SD 1.5's.
    tflops = unet / 1e3 * 2 * b / step if unet and r["model"] == "sd15" else 0
    pct = f"{100 * tflops / peak:.0f}" if peak else "-"
    per_image = (t["total_s"] - t["load_s"]) / b
    print(f"{r['model']:<6}{r['tool']:<14}{b:>6}{t['load_s']:>8.2f}{per_image:>9.3f}{1 / step:>11.2f}{tflops:>9.1f}{pct:>8}"
          f"{t['vae_decode_s']:>10.3f}{r['peak_smi_mb']:>10}")
PY

if command -v ncu >/dev/null; then
    echo "== per-kernel profile (ncu): one 2-step SD 1.5 ${size}² batch-1 run of ${builds[0]}"
    ncu --print-summary per-kernel --csv "${builds[0]}" --model "$model" -p "a photo of a cat" -s 1 --steps 2 \
        -W "$size" -H "$size" --device cuda --dtype f16 -q --offline -o "$out/ncu.png" >"$out/ncu.csv" 2>&1
    echo "ncu summary in $out/ncu.csv ($(wc -l <"$out/ncu.csv") lines)"
else
    echo "== no ncu on this machine: no per-kernel profile"
fi
