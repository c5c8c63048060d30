# pyproxy's image: slim Python plus the kernel tools the executors drive.
FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyproxy ./pyproxy
RUN pip install --no-cache-dir . && rm -rf /src
ENTRYPOINT []
CMD ["pyproxy", "run", "--help"]
