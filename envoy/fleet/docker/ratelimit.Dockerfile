# The fleet's rate-limit service (envoy/fleet/docker-compose.yaml): keygate-ratelimit, built
# on the host (`cargo build --release --bins`), on the minimal base made from the host's
# libraries (envoy/docker/build-images.sh --fleet, which builds this image offline as
# keygate-local/ratelimit:latest).
#
# The build context is a staging directory whose root/ is copied over the base's root:
# usr/local/bin/keygate-ratelimit, and in usr/lib/x86_64-linux-gnu the shared libraries
# `ldd` lists for it that the base lacks (often none). One COPY: the classic builder fails
# on a COPY that adds nothing.
ARG BASE_IMAGE=keygate-local/base:latest
FROM ${BASE_IMAGE}
COPY root/ /
RUN ["/usr/local/bin/keygate-ratelimit", "--version"]
# The key store it reads is the keygate tool's, owner-only (0600): docker-compose runs the
# service as the store's owner (KEYGATE_STORE_USER); this default reads nothing of it.
USER 65534:65534
EXPOSE 8089
ENTRYPOINT ["/usr/local/bin/keygate-ratelimit"]
CMD ["--store", "/etc/keygate/store/keygate.json", "--redis", "redis://redis:6379", "--listen", "0.0.0.0:8089"]
