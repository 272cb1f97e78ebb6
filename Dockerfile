# lstm-hpo: one image for the server and the workers.
#   CPU (default):  docker build -t lstm-hpo .
#   CUDA:           docker build -t lstm-hpo:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   torch from a wheel file in the build context (no PyTorch index needed; the wheel's tag must
#   match the base's Python):
#                   mkdir -p .whl && cp /path/to/torch-*.whl .whl/
#                   docker build -t lstm-hpo --build-arg TORCH=.whl/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl .
# Two stages: the builder makes /opt/venv (pip, the build tools and anything a source build
# needs stay there); the runtime stage gets only the venv, runs as the fixed non-root UID
# 10001 (the Kubernetes manifests' runAsUser) and holds no compiler, source tree or tests.
# deploy/check-image.sh builds this file for real (podman) and runs a study inside it.
ARG BASE=python:3.12-slim

FROM ${BASE} AS builder
# A requirement pip understands: `torch`, `torch==2.13.0`, or a wheel path in the build context.
ARG TORCH=torch
# The index for a torch given by name (CPU wheels by default); a wheel file needs none.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PREFER_BINARY=1

# CUDA base images ship no Python; the slim image already has it.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# .whl/ holds wheels for TORCH (see the top; the repository keeps only its README there).
COPY .whl/ ./.whl/
# torch first, from the index that matches the base (or the given wheel), then pinned to what
# was installed: the project's own install finds it satisfied and can never swap it for
# PyPI's torch with its ~3 GB of CUDA packages.
RUN if [ -f "$TORCH" ]; then pip install "$TORCH"; \
    else pip install "$TORCH" --index-url "$TORCH_INDEX"; fi \
    && python3 -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
       > /tmp/torch-pin.txt
# The dependencies before the sources, so that a change to the code does not download them again.
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
      extras = [r for e in ('postgres', 'datasets') for r in p['optional-dependencies'][e]]; \
      print('\n'.join(p['dependencies'] + extras))" > /tmp/requirements.txt \
    && pip install -c /tmp/torch-pin.txt -r /tmp/requirements.txt
COPY README.md ./
COPY service ./service
COPY migrations ./migrations
# A regular install: the wheel carries the migrations (service/migrations).
RUN pip install -c /tmp/torch-pin.txt ".[postgres,datasets]"

FROM ${BASE}
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LSTM_HPO_DATA_DIR=/data LSTM_HPO_HOST=0.0.0.0

# The venv's python links to the base's python3: the same base, so the same path.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 lstm \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin lstm \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
# The shipped specs, for `lstm-hpo submit search_spaces/synthetic.yaml` inside the container.
COPY search_spaces ./search_spaces

# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8000
# For the server; compose turns it off for the workers, which listen on no port.
HEALTHCHECK --interval=30s --timeout=5s CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v1/health')" || exit 1
ENTRYPOINT ["lstm-hpo"]
CMD ["serve", "--workers", "0"]
