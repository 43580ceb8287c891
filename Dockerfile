# NCF for PyTorch on an NGC PyTorch image (PyTorch, CUDA, NCCL and cuDNN come with the base).
#   docker build -t ncf .
#   docker run --gpus all --ipc=host -it --rm -v /path/to/data:/data ncf
#   ./prepare_dataset.sh                  # ml-20m into /data/cache/ml-20m (the recipe's ./prepare_dataset.sh ml-20m /data too)
#   torchrun --standalone --nproc_per_node=8 ncf.py --data /data/cache/ml-20m
ARG FROM_IMAGE_NAME=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${FROM_IMAGE_NAME}

# unzip for download_dataset.sh, as the recipe's image installs it (the script falls back to python's zipfile).
RUN apt-get update && \
    apt-get install -y --no-install-recommends unzip && \
    rm -rf /var/lib/apt/lists/*

ENV DATA_DIR=/data
WORKDIR /workspace/ncf

# requirements.txt asks for torch>=2.4, which the base image's build satisfies: nothing is replaced.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .
RUN chmod +x prepare_dataset.sh download_dataset.sh verify_dataset.sh
