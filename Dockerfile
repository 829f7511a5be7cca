# syntax=docker/dockerfile:1
#
# The whole test suite in one container, beside PostgreSQL, MariaDB and a real Faktory:
#
#     docker build -t tests . && docker run --rm tests
#
# Arguments after the image name go to `cargo test`, e.g. `docker run --rm tests --test rocket`.
# For local development without this image, see docker-compose.yml.

# Faktory's image holds a single static binary, /faktory (see the Dockerfile of
# contribsys/faktory). It needs redis-server on the PATH, which the test stage installs.
FROM contribsys/faktory:1.9.3 AS faktory

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
