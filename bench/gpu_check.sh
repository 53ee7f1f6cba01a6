#!/usr/bin/env bash
# Issue 15's GPU figures in one run, for a session that is lent a GPU (at most $BUDGET s, default 560): a check that
# compiled training's gradients equal eager's there, the 1B preset compiled and eager, with attention masked to
# documents and without, then the 7B preset with activation checkpointing where the GPU holds it. Each run's output
# goes to $OUT (else ./gpu_check_out), and the table rows of bench/README.md are printed at the end. Exits 1 when the
# check or a run failed or there is no GPU.
#
#   bash bench/gpu_check.sh              # on the GPU machine
#   RUNS="1b_eager 7b_checkpointed" bash bench/gpu_check.sh   # only these (a second call for what the first skipped)
#   SMOKE=1 bash bench/gpu_check.sh      # the same sequence with a tiny model on the CPU: checks the script only
#
# The steps, in order of what the CPU cannot show: check (compiled against eager), 1b_compiled,
# 1b_documents_compiled (FlexAttention), 1b_eager, 1b_documents_eager, 7b_checkpointed; RUNS names a subset.
#
# Needs torch with CUDA and requirements.txt's packages; those missing there (zstandard on the device machines lent
# here) travel as wheels in .whl/ (bench/README.md, "gpu_mfu.py"), installed into /tmp/site first.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
rm -f "$out"/*.txt  # no rows of an earlier run in this one's table
export PYTHONUNBUFFERED=1
smoke=()
[ "${SMOKE:-0}" = 1 ] && smoke=(--smoke)
read -r gib version < <(python3 -c "import torch; c = torch.cuda.is_available()
print(torch.cuda.get_device_properties(0).total_memory >> 30 if c else 0, torch.__version__)")  # one torch import
echo "torch $version, GPU memory ${gib} GiB" | tee "$out/gpu.txt"
if [ ${#smoke[@]} -eq 0 ]; then
    if [ "$gib" -eq 0 ]; then
        echo "no CUDA device: nothing measured (SMOKE=1 checks the script on the CPU)"
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/gpu.txt"
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
fi

budget=${BUDGET:-560}  # seconds for the whole script (the device tool allows 600 a command)
runs=" ${RUNS:-check 1b_compiled 1b_documents_compiled 1b_eager 1b_documents_eager 7b_checkpointed} "
wanted() { [[ "$runs" == *" $1 "* ]]; }
failed=0
check_rc=0

# first, correctness: the compiled model's loss and gradients against eager's on this GPU (skipped on the CPU), and
# the compiled autograd functions' forwards free of in-place ops (torch 2.11's pytorch/pytorch#180642)
check=tests/unit/test_compiled_functions.py  # pytest is in the lent machines' image
if wanted check; then
    limit=$((budget / 3 < 180 ? budget / 3 : 180))
    echo "== compiled against eager ($check, at most ${limit}s)"
    timeout -k 10 "$limit" python3 -m pytest -q -p no:cacheprovider "$check" >"$out/compiled_check.log" 2>&1
    check_rc=$?
    [ "$check_rc" -eq 0 ] || failed=1
    echo "exit $check_rc (output: $out/compiled_check.log)"
    tail -n 1 "$out/compiled_check.log"
fi

run() {  # name, seconds allowed, gpu_mfu.py arguments
    # a run gets at most what is left of the budget (less 30 s for start-up); with under 90 s left it is skipped.
    # gpu_mfu.py stops the training at its --timeout and reports the steps logged by then
    local name=$1 limit=$2 left=$((budget - SECONDS))
    shift 2
    wanted "$name" || return 0
    if [ "$left" -lt 90 ]; then
        echo "== $name skipped: ${left}s of the ${budget}s budget left"
        return
    fi
    [ "$limit" -gt $((left - 30)) ] && limit=$((left - 30))
    echo "== $name (at most ${limit}s)"
    timeout -k 10 $((limit + 30)) python3 bench/gpu_mfu.py "${smoke[@]}" --timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed=1
    echo "exit $rc (output: $out/$name.txt)"
    grep -E '^[A-Za-z].*tokens/s|^error' "$out/$name.txt" | tail -n 2
}

run 1b_compiled 200 --steps 12 --skip 4 train.compile=true
run 1b_documents_compiled 200 --steps 12 --skip 4 --documents train.compile=true
run 1b_eager 100 --steps 12 --skip 4
run 1b_documents_eager 100 --steps 12 --skip 4 --documents

# 7B: fp32 master weights, gradients and AdamW's two moments are 16 bytes a parameter (about 110 GB): an H200 only
if [ ${#smoke[@]} -eq 1 ] || [ "$gib" -ge 130 ]; then
    run 7b_checkpointed 180 --steps 6 --skip 3 --micro-batch 1 model.preset=7b train.activation_checkpointing=true
elif wanted 7b_checkpointed; then
    echo "== 7b_checkpointed skipped: ${gib} GiB of GPU memory, the 7B preset needs about 130"
fi

echo "== table rows"
grep -h '^| ' "$out"/*.txt
[ "$check_rc" -eq 0 ] || echo "compiled against eager FAILED (exit $check_rc): see $out/compiled_check.log"
exit "$failed"
