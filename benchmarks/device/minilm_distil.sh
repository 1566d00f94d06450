# Call: distil MiniLM at ratio 4 with the README's command (bring the student back), then deploy rows on CUDA
T0=$SECONDS
source benchmarks/device/setup.sh
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
timeout 400 sttp-compress --arch hf:.carry/minilm16 --ratio 4 --include '*' --data text:.data/text/distill.txt --steps 12400 --batch-size 1024 --output /tmp/o/minilm4.sttp.safetensors --json > /tmp/logs/minilm.json 2> /tmp/logs/minilm.err
echo "distil rc $? at $((SECONDS-T0)) s"; tail -3 /tmp/logs/minilm.err
R=$((575-SECONDS+T0)); [ $R -gt 40 ] && timeout $R python3 benchmarks/bench_deploy.py --device cuda --models minilm stack --minilm .carry/minilm16 > /tmp/logs/deploy.log 2>&1; echo "deploy rc $? at $((SECONDS-T0)) s"
tar czf $OUT/back.tgz benchmarks/results /tmp/logs 2>/dev/null
[ -f /tmp/o/minilm4.sttp.safetensors ] && split -b 15M /tmp/o/minilm4.sttp.safetensors $OUT/student.part.
ls -la $OUT
