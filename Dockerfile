# pyproxy's image: Debian with Python and the kernel tools the executors drive.
# lab/images.py builds the same image without a container engine for the real-node lab, reading
# the base, the package list and the CMD from this file (tests/unit/test_images.py checks it):
# keep one `apt-get install -y --no-install-recommends` line and exec-form CMD and ENTRYPOINT.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip nftables iptables conntrack iproute2 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pyproxy ./pyproxy
RUN pip install --no-cache-dir --break-system-packages . && rm -rf /src
WORKDIR /
ENTRYPOINT []
CMD ["pyproxy", "run", "--help"]
