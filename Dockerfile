# lstm-hpo: one image for the server and the workers.
#   CPU (default):  docker build -t lstm-hpo .
#   CUDA:           docker build -t lstm-hpo:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
ARG BASE=python:3.12-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSTM_HPO_DATA_DIR=/data LSTM_HPO_HOST=0.0.0.0

# CUDA base images ship no Python; the slim image already has it.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# torch first, from the index that matches the base (CPU wheels by default): the project's
# own install then finds it satisfied and pulls no CUDA packages into a CPU image.
RUN pip install torch --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
COPY search_spaces ./search_spaces
# A regular install: the wheel carries the migrations (service/migrations).
RUN pip install ".[postgres,datasets]"

RUN useradd --create-home --uid 10001 lstm && mkdir -p /data && chown lstm /data
USER lstm
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health')" || exit 1
ENTRYPOINT ["lstm-hpo"]
CMD ["serve", "--workers", "0"]
