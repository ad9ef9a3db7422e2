# One image for the operator and every fleet process:
#   pushcluster operator | comet | logic | job | standalone
#
# With registry access (the default) it builds from source:
#   docker build -t pushcluster .
#
# Without a registry (CI, air-gapped build hosts) the same definition takes a
# binary built on the host and the C libraries it links, staged under rootfs/
# by deploy/image/build-offline.sh, on an empty base:
#   deploy/image/build-offline.sh --binary target/release/pushcluster --tag localhost/pushcluster:dev
# which runs
#   podman build --build-arg BINARY=prebuilt --build-arg BASE=scratch CONTEXT
# Only the stages the chosen arguments name are built.
ARG BINARY=source
ARG BASE=gcr.io/distroless/cc-debian12:nonroot

FROM rust:1-bookworm AS binary-source
WORKDIR /src
COPY . .
# protoc comes vendored (protoc-bin-vendored); ring needs only the C compiler here.
RUN cargo build --release --locked --bin pushcluster \
 && mkdir -p /rootfs/usr/local/bin \
 && cp target/release/pushcluster /rootfs/usr/local/bin/pushcluster

FROM scratch AS binary-prebuilt
# usr/local/bin/pushcluster and the libraries `ldd` lists, at their paths.
COPY rootfs/ /rootfs/

FROM binary-${BINARY} AS binary

FROM ${BASE}
COPY --from=binary /rootfs/ /
# Non-root by number, so it holds on a base without /etc/passwd (scratch).
USER 65532:65532
EXPOSE 3101 3102 3103 3109 3111 3119 3190
ENTRYPOINT ["/usr/local/bin/pushcluster"]
CMD ["standalone"]
