# The gateway alone: no torch, no weights (the local backend runs elsewhere and is reached
# through LOCAL_BASE_URL). docker-compose.yml builds this image and runs it beside Redis.
FROM python:3.11-slim

# The source tree under /app is what runs (it carries local_backend/formats/tokenizer_data/ and
# pricing.yaml, the default catalog, which gateway/pricing.yaml links to; GATEWAY_CONFIG points
# elsewhere, e.g. a mounted file).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Dependencies first: this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY pricing.yaml ./
COPY gateway ./gateway
COPY providers ./providers
COPY local_backend ./local_backend
# The `gateway` command; the code itself is imported from /app (PYTHONPATH).
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --no-create-home gateway

USER gateway
EXPOSE 8000
# The one healthcheck (docker-compose.yml does not override it).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"
CMD ["gateway", "serve", "--host", "0.0.0.0", "--port", "8000"]
