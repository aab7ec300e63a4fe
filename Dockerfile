# GPU training image: docker build -t unirec . && docker run --gpus all -v $PWD/runs:/job/runs unirec trainer.max_steps=2000
# Hydra overrides pass straight through to `python -m unirec.train`.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /opt/unirec
COPY pyproject.toml README.md ./
COPY unirec unirec
COPY conf conf
# The base image's torch satisfies the declared range, so pip keeps it and adds the rest.
RUN python -m pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 unirec \
    && mkdir -p /job /data && chown unirec:unirec /job /data

USER unirec
WORKDIR /job
ENV UNIREC_CACHE=/data/cache
ENTRYPOINT ["python", "-m", "unirec.train"]
