# The hrx node image: the hrx command (node, replication worker, adapters, auditor) and gunicorn.
# It runs as the user hrx, uid and gid 10001: a node directory bind-mounted from the host
# (deploy/hospital/docker-compose.yml) must belong to 10001:10001.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 hrx \
    && useradd --system --uid 10001 --gid hrx --create-home --home-dir /home/hrx hrx \
    && mkdir -p /srv/hrx/node /srv/hrx/consortium /srv/hrx/hosp-a /srv/hrx/hosp-b /srv/hrx/hosp-c \
    && chown -R hrx:hrx /srv/hrx \
    && chmod 750 /srv/hrx/node /srv/hrx/consortium /srv/hrx/hosp-a /srv/hrx/hosp-b /srv/hrx/hosp-c
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY consent consent
COPY exchange exchange
COPY fhir_adapters fhir_adapters
COPY ledger ledger
COPY node node
COPY deploy deploy
# gcc and OpenSSL's headers build the verifier's compiled part (ledger/_speedups.c), then go.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev \
    && pip install --no-cache-dir '.[fast-bls]' \
    && python -c 'import ledger._speedups' \
    && apt-get purge -y --auto-remove gcc libc6-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
USER hrx
EXPOSE 8080 2575
CMD ["hrx", "--help"]
