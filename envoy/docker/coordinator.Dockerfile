# The sample upstream ("coordinator"): keygate-echo answers every request with a JSON echo
# of the method, path and headers it received.
#
# The binary is built on the host (`make build`) and copied in; the build context is the
# directory that holds it (target/release for docker-compose, a small staging directory
# for build-images.sh). It is linked against glibc: the default base is Debian 12, the
# distribution the project builds on; the offline test passes its own minimal base.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
COPY keygate-echo /usr/local/bin/keygate-echo
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keygate-echo"]
CMD ["--listen", "0.0.0.0:8080"]
