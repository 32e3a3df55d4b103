# The bridge. CPU by default; for CUDA build with
#   --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    BRIDGE_HOST=0.0.0.0 BRIDGE_PORT=8080 BRIDGE_STORE=sqlite:////var/lib/bridge/bridge.db \
    BRIDGE_CACHE_DIR=/var/lib/bridge/cache HF_HOME=/var/lib/bridge/hf
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
 && python3 -m venv /opt/bridge
ENV PATH=/opt/bridge/bin:$PATH
WORKDIR /app
# torch first, pinned, from the chosen index (CPU or CUDA).
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY engine ./engine
COPY adapters ./adapters
RUN pip install . && useradd --system --home /var/lib/bridge bridge \
 && mkdir -p /var/lib/bridge && chown bridge /var/lib/bridge
USER bridge
VOLUME ["/var/lib/bridge"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
  CMD python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)" || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["bridge", "serve"]
