# The ImageFinder API on CPU.
#
#   docker build -t imagefinder .
#   docker run -p 127.0.0.1:8000:8000 -v imagefinder-data:/data imagefinder
#
# or `docker compose up` (compose.yaml: the API with PostgreSQL + pgvector).
# The index (a SQLite file, unless IMAGEFINDER_DB names a PostgreSQL database), the
# catalogue images and the thumbnail cache live under /data.

# Any Debian-like image with python3 (3.10+) and its venv module; CI builds on a local one.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Build-time pip settings, for networks that need them (a mirror, a proxy's CA bundle).
# Unset unless given; none of them reaches the final image.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT

ENV VIRTUAL_ENV=/opt/imagefinder \
    PATH=/opt/imagefinder/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN python3 -m venv /opt/imagefinder

# torch first, on a layer of its own: it is most of the image and changes least.
# PyTorch's CPU index has torch 2.14.1 built for CPU only; the Linux wheel of the same
# version on the default index is the CUDA build, which brings several GB of NVIDIA
# libraries and triton that a CPU server never loads (see README, Container). An empty
# TORCH_INDEX means pip's configured index (the project's CI, where PyTorch's is out of
# reach, builds so).
# The pins are pyproject.toml's (tests/test_container.py checks they agree).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (hadolint takes the optional --index-url for a package name: the versions are pinned.)
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} \
        torch==2.14.1 torchvision==0.29.1

# The other dependencies, from pyproject.toml alone, so a code change reuses this layer.
WORKDIR /opt/imagefinder/src
COPY pyproject.toml README.md ./
RUN python3 -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
print("\n".join(p["dependencies"] + p["optional-dependencies"]["postgres"]))' > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

COPY imagefinder ./imagefinder
COPY main.py download_images.py extract_image_features.py ./
# The 40 sample photos, to try the image without a catalogue of one's own:
#   docker exec <container> imagefinder extract --folder /opt/imagefinder/demo --model efficientnet-lite2
COPY assets/demo /opt/imagefinder/demo
RUN pip install --no-cache-dir --no-deps . \
    && groupadd --system --gid 10001 imagefinder \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home imagefinder \
    && mkdir -p /data \
    && chown imagefinder:imagefinder /data

USER 10001:10001
WORKDIR /data
# Model weights downloaded at run time (resnet50) and converted models are cached in the
# volume too, so a new container does not fetch them again.
ENV HOME=/data \
    TORCH_HOME=/data/.cache/torch \
    IMAGEFINDER_DB=/data/imagefinder.db \
    IMAGEFINDER_IMAGES_DIR=/data/images
VOLUME ["/data"]
EXPOSE 8000

# /health answers 200 whenever the server is up (its body says whether the index is ready).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request as r; r.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["imagefinder", "serve", "--host", "0.0.0.0", "--port", "8000"]
