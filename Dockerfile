# syntax=docker/dockerfile:1
#
# Two images.
#
# The whole test suite in one container, beside PostgreSQL, MariaDB and a real Faktory (the
# last stage, built by default):
#
#     docker build -t tests . && docker run --rm tests
#
# Arguments after the image name go to `cargo test`, e.g. `docker run --rm tests --test rocket`.
#
# The worker of examples/rocket_worker.rs, as it is deployed (README: Deploying the worker):
#
#     docker build --target worker -t dtb-worker .
#     docker run --rm -e DATABASE_URL=postgres://... -e FAKTORY_URL=tcp://... -p 9100:9100 dtb-worker
#
# For local development without these images, see docker-compose.yml.

# Faktory's image holds a single static binary, /faktory (see the Dockerfile of
# contribsys/faktory). It needs redis-server on the PATH, which the test stage installs.
FROM contribsys/faktory:1.9.3 AS faktory

# The worker's binary: the example, in release mode, with the metrics feature.
FROM rust:1.95-bookworm AS worker-build

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libpq-dev \
        pkg-config \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .
RUN cargo build --release --locked --features metrics --example rocket_worker \
    && install -m 0755 target/release/examples/rocket_worker /usr/local/bin/rocket_worker

# The worker: that binary, libpq and a user of its own. `docker stop` sends SIGTERM and the
# worker drains within DTB_SHUTDOWN_TIMEOUT (20 s): give it longer than that before SIGKILL
# (`docker stop -t 30`, compose's stop_grace_period, Kubernetes' terminationGracePeriodSeconds).
FROM debian:bookworm-slim AS worker

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libpq5 \
        ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 worker \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin worker

COPY --from=worker-build /usr/local/bin/rocket_worker /usr/local/bin/rocket_worker
USER 10001:10001
ENV DTB_HTTP_ADDR=0.0.0.0:9100 \
    RUST_LOG=info
EXPOSE 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s \
    CMD ["/usr/local/bin/rocket_worker", "health"]
ENTRYPOINT ["/usr/local/bin/rocket_worker"]

# The test suite.
FROM rust:1.95-bookworm AS tests

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        postgresql \
        mariadb-server \
        redis-server \
        libpq-dev \
        default-libmysqlclient-dev \
        libsqlite3-dev \
        pkg-config \
    && rm -rf /var/lib/apt/lists/*

COPY --from=faktory /faktory /usr/local/bin/faktory

# The tests connect as postgres without a password, as on a developer's machine.
RUN sed -ri 's/(peer|scram-sha-256|md5)$/trust/' /etc/postgresql/*/main/pg_hba.conf

WORKDIR /src
COPY . .
RUN cargo test --all-features --locked --no-run

ENV PG_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \
    MYSQL_DATABASE_URL=mysql://root@127.0.0.1:3306/test \
    FAKTORY_URL=tcp://127.0.0.1:7419

# Starts the three servers, then runs `cargo test --all-features` with the given arguments.
ENTRYPOINT ["/src/.ci/docker-entrypoint.sh"]
CMD []
