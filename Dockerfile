# gptforge on the CPU:
#   docker build -t gptforge .
#   docker run --rm --user "$(id -u):$(id -g)" -v "$PWD:/work" -v gptforge-cache:/cache \
#       gptforge train corpus.txt --max-time 10m --out run
#   docker run --rm -it gptforge bash            # a shell in the image
# GPU: the same file with a CUDA build of torch (docs/guide.md, "Docker"):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t gptforge:gpu .
#   docker run --rm --gpus all -v "$PWD:/work" gptforge:gpu train corpus.txt --max-time 10m --out run
FROM python:3.12-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=hub,data,yaml,serve

# the decoding kernel is compiled on first use, for the processor it runs on: the image needs a C compiler
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# the compiled kernel, its calibration and the hub's downloads go to /cache: a volume keeps them between runs,
# whatever user the container runs as (--user)
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 GPTFORGE_CACHE=/cache HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/cache/matplotlib
# torch first, from the index that matches the hardware (the CPU wheels are a tenth of the CUDA ones)
RUN pip install "torch>=2.6,<3" --index-url "$TORCH_INDEX"

WORKDIR /opt/gptforge
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[$EXTRAS]"

COPY docker-entrypoint.sh /usr/local/bin/
# runs as an ordinary user, in the mounted folder; /cache and /work are writable for any user (--user UID:GID)
RUN useradd --create-home gptforge && mkdir -p /cache /work && chmod 1777 /cache /work
USER gptforge
WORKDIR /work
VOLUME ["/cache"]
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["--help"]
