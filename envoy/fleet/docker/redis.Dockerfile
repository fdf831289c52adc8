# Redis for the fleet's shared counts (envoy/fleet/docker-compose.yaml), built offline by
# envoy/docker/build-images.sh --fleet as keygate-local/redis:latest: the host's
# redis-server and redis-cli (Debian's redis-server and redis-tools packages) on the
# minimal base made from the host's libraries. With a registry, the official image
# (REDIS_IMAGE=redis:7.0) is started the same way.
#
# The build context is a staging directory whose root/ is copied over the base's root:
# usr/local/bin/redis-server and redis-cli, and in usr/lib/x86_64-linux-gnu the shared
# libraries `ldd` lists for them that the base lacks (jemalloc, lzf, OpenSSL, ...).
ARG BASE_IMAGE=keygate-local/base:latest
FROM ${BASE_IMAGE}
COPY root/ /
RUN ["/usr/local/bin/redis-server", "--version"]
RUN ["/usr/local/bin/redis-cli", "--version"]
USER 65534:65534
WORKDIR /tmp
EXPOSE 6379
ENTRYPOINT []
# Counts only, nothing kept on disk: every count is at most one window long, so a restart
# costs the fleet at most that window's counts (keygate's own buckets still cap each key).
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/tmp"]
