# Call: retrain mobilenetv2 + resnet18 side by side, then mobilenetv2 recipe trials and resnet18 frontier rows.
# TEACHERS=mobilenetv2 END=480 bash benchmarks/device/frontier_trials.sh: train MobileNetV2 alone, everything ended by 480 s;
# TEACHERS= (empty) trains none (weights carried in .carry/teachers). JOBS runs at once (default 4): on 2026-12-07 ten
# side by side (7 MobileNetV2 runs, 3 bench_frontier) each decoding CIFAR-10 on the CPU finished none in 280 s.
T0=$SECONDS
TEACHERS=${TEACHERS-"mobilenetv2 resnet18"}; END=${END:-560}; JOBS=${JOBS:-4}
source benchmarks/device/setup.sh
M="--mean 0.4914,0.4822,0.4465 --std 0.2470,0.2435,0.2616"
A=benchmarks/cifar_teachers.py
DW="--exclude features.3.conv.0 --exclude features.[4-9].conv.3 --exclude features.1[0-9].conv.3"
for a in $TEACHERS; do timeout 300 python3 benchmarks/train_teacher.py --arch $a --data /tmp/cifar --out .teachers > /tmp/logs/train_$a.log 2>&1 & done
wait; ls -la .teachers; echo "teachers done at $((SECONDS-T0)) s"
run() { while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; L=$((END-SECONDS+T0)); n=$1; shift; timeout $L sttp-compress .teachers/mobilenetv2.pt --arch $A:mobilenetv2 --data /tmp/cifar $M --output /tmp/o/$n.sttp.pt --json "$@" > /tmp/logs/mb_$n.json 2> /tmp/logs/mb_$n.err & }
run zs10bn --ratio 10 --epochs 0 --bn-recalibrate 100
run r10 --ratio 10 --epochs 10
run r10dw --ratio 10 --epochs 10 $DW
run r10lr --ratio 10 --epochs 10 --lr 3e-3
run r10free --ratio 10 --epochs 10 --free-cores
run r10slr --ratio 10 --epochs 10 --spectrum-lr 10
run r10sgd --ratio 10 --epochs 10 --optimizer sgd
[[ " $TEACHERS " == *" resnet18 "* ]] && for r in 10 20 50; do while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done; L=$((END-SECONDS+T0)); timeout $L python3 benchmarks/bench_frontier.py --teachers .teachers --data /tmp/cifar --models resnet18 --methods sttp svdp svd --ratios $r --no-dense > /tmp/logs/fr_r18_$r.log 2>&1 & done
wait; echo "trials done at $((SECONDS-T0)) s"
source benchmarks/device/pack.sh
