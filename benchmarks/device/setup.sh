# sourced at the start of every device call: wheels, the sttp-compress/sttp-eval commands, CIFAR-10 in /tmp/cifar
# (when .carry/data was carried), the carried teachers in .teachers
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/bin:$PATH STTP_SHARED=$PWD/.carry/shared
mkdir -p /tmp/bin /tmp/logs /tmp/o
printf '#!/bin/sh\nexec python3 -c "from sttp_compress.cli import compress_main; compress_main()" "$@"\n' > /tmp/bin/sttp-compress
printf '#!/bin/sh\nexec python3 -c "from sttp_compress.cli import eval_main; eval_main()" "$@"\n' > /tmp/bin/sttp-eval
chmod +x /tmp/bin/*
[ -d /tmp/cifar/train ] || [ ! -f .carry/data/cifar10-jpg.tar.xz ] || { mkdir -p /tmp/cifar && tar xJf .carry/data/cifar10-jpg.tar.xz -C /tmp/cifar; }
mkdir -p .teachers && cp -n .carry/teachers*/* .teachers/ 2>/dev/null
nvidia-smi -L; python3 -c "import torch, typer; print(torch.__version__, typer.__version__)"
