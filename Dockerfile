# fusenorm on a CUDA 13 devel image; torch from PyPI is a CUDA 13 build, matching the toolkit.
#   docker build -t fusenorm . && docker run --gpus all fusenorm        (runs make bench)
FROM nvidia/cuda:13.0.1-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-dev git make \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip install --no-cache-dir "torch>=2.9" ninja pytest numpy matplotlib onnx onnxscript onnxruntime

WORKDIR /opt/fusenorm
COPY . .
# No GPU is visible at build time: compile for Ampere and Hopper (override with --build-arg).
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN make build

CMD ["make", "bench"]
