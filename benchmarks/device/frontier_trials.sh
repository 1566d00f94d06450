# Call: (re)train teachers, then frontier rows (bench_frontier.py, a process each) and MobileNetV2 recipe trials at ratio 10.
# Env: TEACHERS to train, side by side with the runs whose teacher was carried (default "mobilenetv2 resnet18"; empty: none, the weights carried in .carry/teachers*);
# RUNS, frontier rows as MODEL:METHOD:RATIO[:DTYPE[:SEED]] (float32 and seed 0 unless given; MODEL:anchor:BITS for a weight-only
# quantization anchor), one bench_frontier process each, in
# that order (default: ResNet-18's sttp/svdp/svd at 10, 20, 50); TRIALS, MobileNetV2 recipe trials named in the table
# below, after the runs (default all); END, seconds by which everything is ended (default 560); JOBS, processes at once
# (default 4: on 2026-12-07 ten side by side, each decoding CIFAR-10 on the CPU, finished none in 280 s).
T0=$SECONDS
TEACHERS=${TEACHERS-"mobilenetv2 resnet18"}; END=${END:-560}; JOBS=${JOBS:-4}
TRIALS=${TRIALS-"zs10bn r10 r10bn r10lr r10free r10slr r10sgd r10dw r10sens r10sensbn"}; RUNS=${RUNS-"$(for r in 10 20 50; do printf 'resnet18:%s:%s ' sttp $r svdp $r svd $r; done)"}
source benchmarks/device/setup.sh
# cores / JOBS threads a process: with the default (every core each), JOBS processes side by side stall in OpenMP
# barriers on the conversion's small LAPACK calls (2026-12-07: four ResNet-18 runs at 16 threads each on 16 cores
# finished none in 300 s)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
M="--mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616"
A=benchmarks/cifar_teachers.py
DW="--exclude features.3.conv.0 --exclude features.[4-9].conv.3 --exclude features.1[0-9].conv.3"
declare -A F=(
  [zs10bn]="--ratio 10 --epochs 0 --bn-recalibrate 100"
  [r10]="--ratio 10 --epochs 10"
  [r10bn]="--ratio 10 --epochs 10 --bn-recalibrate 100"
  [r10lr]="--ratio 10 --epochs 10 --lr 3e-3"
  [r10free]="--ratio 10 --epochs 10 --free-cores"
  [r10slr]="--ratio 10 --epochs 10 --spectrum-lr 10"
  [r10sgd]="--ratio 10 --epochs 10 --optimizer sgd"
  [r10dw]="--ratio 10 --epochs 10 $DW"
  [r10sens]="--ratio 10 --epochs 10 --allocation sensitivity"
  [r10sensbn]="--ratio 10 --epochs 10 --allocation sensitivity --bn-recalibrate 100"
  [r10s1]="--ratio 10 --epochs 10 --seed 1"
  [r10senss1]="--ratio 10 --epochs 10 --allocation sensitivity --seed 1"
)
# a run waits only for its own model's teacher: runs of carried teachers start while others train
declare -A TP=()
for a in $TEACHERS; do timeout 300 python3 benchmarks/train_teacher.py --arch $a --data /tmp/cifar --out .teachers > /tmp/logs/train_$a.log 2>&1 & TP[$a]=$!; done
teacher() { [ -n "${TP[$1]}" ] && { wait ${TP[$1]}; echo "teacher $1 done (rc $?) at $((SECONDS-T0)) s"; ls -la .teachers; unset "TP[$1]"; }; }
slot() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; L=$((END-SECONDS+T0)); }
# MODEL:anchor:BITS is weight-only quantization of the dense teacher at BITS, zero-shot and fine-tuned (--anchors)
run_args() { if [ "$1" = anchor ]; then echo "--methods --anchors $2"; else echo "--methods $1 --ratios $2 --dtypes ${3:-float32} --seeds ${4:-0}"; fi; }
for x in $RUNS; do IFS=: read -r m me r d sd <<< "$x"; teacher $m; slot; echo "start $x at $((SECONDS-T0)) s"; timeout $L python3 benchmarks/bench_frontier.py --teachers .teachers --data /tmp/cifar --models $m $(run_args $me $r $d $sd) --no-dense > /tmp/logs/fr_${m}_${me}_${r}_${d:-float32}_s${sd:-0}.log 2>&1 & done
for n in $TRIALS; do teacher mobilenetv2; slot; echo "start $n at $((SECONDS-T0)) s"; timeout $L sttp-compress .teachers/mobilenetv2.pt --arch $A:mobilenetv2 --data /tmp/cifar $M --output /tmp/o/$n.sttp.safetensors --json ${F[$n]} > /tmp/logs/mb_$n.json 2> /tmp/logs/mb_$n.err & done
wait; echo "trials done at $((SECONDS-T0)) s"
source benchmarks/device/pack.sh
