#!/usr/bin/env bash
# Run in the project root on the development machine before a GPU is lent (about 15 s, needs the package
# registry). Writes .whl/ (wheels for the H200 image, which has torch, triton, transformers and peft but no
# deepspeed, pydantic or hjson) and .gpu/py (pycocoevalcap's .py files, without its 100 MB of jars, so that
# ptscale.eval imports). Both are git-ignored and travel with the checkout as the device call's carry.
# .whl/alt/ holds transformers 5.23 + peft for a run that should not use the image's transformers
# (PTSCALE_TRANSFORMERS=wheel for launchers/gpu_run.sh); by default the image's own (5.17) is used.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
rm -rf .whl .gpu
mkdir -p .whl/alt .gpu/py
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
# shellcheck disable=SC2086
python3 -m pip download -q $P -d .whl hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0
# shellcheck disable=SC2086
python3 -m pip download -q $P -d .whl/alt transformers==5.23.0 peft==0.21.2
# deepspeed has no wheel on PyPI (sdist only): a pure-Python one, no ops (none are needed on CUDA here).
python3 -m pip download -q --no-deps --no-binary=:all: -d "$T" deepspeed==0.19.8
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps -w .whl "$T"/deepspeed-0.19.8.tar.gz
python3 -m pip download -q --no-deps -d "$T" pycocoevalcap==1.2
unzip -q "$T"/pycocoevalcap-1.2-py3-none-any.whl -x '*.jar' '*.gz' -d .gpu/py
ls -la .whl .whl/alt
du -sh .whl .gpu
