# One image for the operator and every fleet process:
#   pushcluster operator | comet | logic | job | standalone
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# protoc comes vendored (protoc-bin-vendored); ring needs only the C compiler here.
RUN cargo build --release --locked --bin pushcluster \
 && cp target/release/pushcluster /pushcluster

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /pushcluster /usr/local/bin/pushcluster
USER 65532:65532
EXPOSE 3101 3102 3103 3109 3111 3119 3190
ENTRYPOINT ["/usr/local/bin/pushcluster"]
CMD ["standalone"]
