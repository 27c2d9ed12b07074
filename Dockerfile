# gptforge on the CPU:
#   docker build -t gptforge .
#   docker run --rm -v "$PWD:/work" gptforge train corpus.txt --max-time 10m --out run
# GPU: the same file with a CUDA build of torch (docs/guide.md, "Docker"):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t gptforge:gpu .
#   docker run --rm --gpus all -v "$PWD:/work" gptforge:gpu train corpus.txt --max-time 10m --out run
FROM python:3.12-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=plot,hub,data,yaml

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# torch first, from the index that matches the hardware (the CPU wheels are a tenth of the CUDA ones)
RUN pip install "torch>=2.6,<3" --index-url "$TORCH_INDEX"

WORKDIR /opt/gptforge
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[$EXTRAS]"

# runs as an ordinary user, in the mounted folder
RUN useradd --create-home gptforge
USER gptforge
WORKDIR /work
ENTRYPOINT ["gptforge"]
CMD ["--help"]
