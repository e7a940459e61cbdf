# o2o in a container: the CPU image by default, a CUDA image with one build argument.
#
# CI does not build this image (the development machines have no Docker engine). Its install step is
# the one .ci/run performs (a .venv, then `pip install -r requirements.txt`), so the image holds what
# CI tests; its default command is CI's test command.
#
#   docker build -t o2o .                                    # CPU: torch 2.13.0+cpu from PyTorch's CPU index
#   docker build -t o2o:cuda --build-arg TORCH_INDEX= .      # CUDA: PyPI's torch 2.13.0 (the CUDA build)
#   docker run --rm o2o                                      # the test suite
#   docker run --rm -v ~/.minari/datasets:/data/minari -v "$PWD/runs:/workspace/runs" o2o \
#       python algorithms/iql_famo2o.py --env o2o/hopper/medium-replay-v0
#   docker run --rm --gpus all -v ~/.minari/datasets:/data/minari -v "$PWD/runs:/workspace/runs" o2o:cuda \
#       python scripts/benchmark.py --matrix configs/benchmark/paper_gpu.yaml --device cuda --workers 4
#
# The CUDA image needs no CUDA base image: PyPI's torch wheel brings the CUDA runtime libraries
# (nvidia-* packages); the host needs the NVIDIA driver and the NVIDIA Container Toolkit (--gpus).
FROM python:3.11-slim

# requirements.txt pins torch==2.13.0. From the CPU index that resolves to 2.13.0+cpu, the wheel CI and
# the development machines use; an empty TORCH_INDEX leaves PyPI alone, whose Linux wheel is the CUDA one.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MINARI_DATASETS_PATH=/data/minari \
    PATH=/workspace/.venv/bin:$PATH

# git: scripts/benchmark.py records the commit of every run (provenance.json); .git is in the build context.
RUN apt-get update && apt-get install -y --no-install-recommends git && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
# Dependencies first (cached while only the code changes), installed exactly as .ci/run does.
COPY requirements.txt .
RUN python3 -m venv .venv \
    && . .venv/bin/activate \
    && if [ -n "$TORCH_INDEX" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX"; fi \
    && pip install -r requirements.txt

COPY . .

# Minari datasets (build them with scripts/make_datasets.py, or mount an existing store) and run outputs.
VOLUME ["/data/minari", "/workspace/runs"]

CMD ["python", "-m", "pytest", "tests", "-q"]
