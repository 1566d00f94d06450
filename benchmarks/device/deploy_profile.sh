# Call: the GPU-marked tests (the two files that hold them: the others import packages the machine lacks), where the frozen MiniLM's time goes (profile_deploy.py), then the deploy rows of
# MiniLM and the Linear stack on CUDA (PROFILE=0 skips the profile). Carry .whl .carry/minilm16 (the shared ResNet-18 does not fit beside it).
T0=$SECONDS
source benchmarks/device/setup.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider tests/train/test_stepgraph.py tests/io/test_export.py > /tmp/logs/gpu_tests.log 2>&1; echo "gpu tests rc $? at $((SECONDS-T0)) s"; tail -3 /tmp/logs/gpu_tests.log
[ "${PROFILE:-1}" = 1 ] && timeout 150 python3 benchmarks/experiments/profile_deploy.py --device cuda --minilm .carry/minilm16 > /tmp/logs/profile_deploy.log 2>&1; echo "profile rc $? at $((SECONDS-T0)) s"
timeout 120 python3 benchmarks/experiments/probe_lookup_graph.py --device cuda --minilm .carry/minilm16 > /tmp/logs/probe_lookup_graph.log 2>&1; echo "lookup probe rc $? at $((SECONDS-T0)) s"; grep -v Warning /tmp/logs/probe_lookup_graph.log | tail -8
R=$((560-SECONDS+T0)); [ $R -gt 60 ] && timeout $R python3 benchmarks/bench_deploy.py --device cuda --models minilm stack --minilm .carry/minilm16 > /tmp/logs/deploy.log 2>&1; echo "deploy rc $? at $((SECONDS-T0)) s"
tar czf $OUT/back.tgz benchmarks/results /tmp/logs 2>/dev/null
ls -la $OUT
