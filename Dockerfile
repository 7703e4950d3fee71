# The hrx node image: the hrx command (node, replication worker, adapters, auditor) and gunicorn.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --system --create-home --home-dir /home/hrx hrx \
    && mkdir -p /srv/hrx/consortium /srv/hrx/hosp-a /srv/hrx/hosp-b /srv/hrx/hosp-c \
    && chown -R hrx:hrx /srv/hrx
WORKDIR /app
COPY pyproject.toml README.md ./
COPY consent consent
COPY exchange exchange
COPY fhir_adapters fhir_adapters
COPY ledger ledger
COPY node node
COPY deploy deploy
RUN pip install --no-cache-dir '.[fast-bls]'
USER hrx
VOLUME ["/srv/hrx"]
EXPOSE 8080 2575
CMD ["hrx", "--help"]
