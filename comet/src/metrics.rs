//! Prometheus metrics of a comet. Labels are bounded: transports, kinds and
//! reasons, never a key, mid, room or client-chosen op.

use crate::limits::Limit;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

#[derive(Clone)]
pub struct CometMetrics {
    pub connections: IntGaugeVec,
    pub connects: IntCounterVec,
    pub handshake_failures: IntCounterVec,
    pub disconnects: IntCounterVec,
    pub bad_frames: IntCounterVec,
    pub frames_before_auth: IntCounter,
    pub upstream_frames: IntCounterVec,
    pub pushes: IntCounterVec,
    pub delivered: IntCounterVec,
    pub dropped: IntCounterVec,
    pub keys_not_found: IntCounter,
    pub duplicates: IntCounterVec,
    pub stale_owners: IntCounter,
    pub replayed: IntCounter,
    pub gaps: IntCounterVec,
    pub direct_gaps: IntCounter,
    pub room_joins: IntCounterVec,
    pub upstream_messages: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub write_batch_frames: Histogram,
    pub delivery_latency: Histogram,
    pub rooms: IntGauge,
    pub online_reports: IntCounterVec,
    pub accept_errors: IntCounterVec,
    pub limited: IntCounterVec,
}

impl CometMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = CometMetrics {
            connections: IntGaugeVec::new(
                Opts::new(
                    "pushcluster_comet_connections",
                    "Authenticated client connections by transport (tcp, websocket).",
                ),
                &["transport"],
            )?,
            limited: counter(
                "pushcluster_comet_limited_total",
                "Connections refused at accept or closed by a comet.limits limit, by transport and limit.",
                &["transport", "limit"],
            )?,
            connects: counter(
                "pushcluster_comet_connects_total",
                "Connections that authenticated, by transport.",
                &["transport"],
            )?,
            handshake_failures: counter(
                "pushcluster_comet_handshake_failures_total",
                "Connections closed before authenticating, by transport and reason.",
                &["transport", "reason"],
            )?,
            disconnects: counter(
                "pushcluster_comet_disconnects_total",
                "Authenticated connections closed, by transport and reason.",
                &["transport", "reason"],
            )?,
            bad_frames: counter(
                "pushcluster_comet_bad_frames_total",
                "Malformed client input that closed its connection, by transport and reason.",
                &["transport", "reason"],
            )?,
            frames_before_auth: IntCounter::new(
                "pushcluster_comet_frames_before_auth_total",
                "Client frames ignored because they came before the auth frame (op 7).",
            )?,
            upstream_frames: counter(
                "pushcluster_comet_upstream_frames_total",
                "Client frames after auth, by kind (heartbeat, change_room, sub, unsub, other).",
                &["kind"],
            )?,
            pushes: counter(
                "pushcluster_comet_pushes_total",
                "Push requests received from job, by kind (keys, room, broadcast).",
                &["kind"],
            )?,
            delivered: counter(
                "pushcluster_comet_messages_sent_total",
                "Pushed messages queued to client connections, by kind (keys, room, broadcast).",
                &["kind"],
            )?,
            dropped: counter(
                "pushcluster_comet_messages_dropped_total",
                "Messages for a client that were not written, by reason (slow_consumer: its queue was full and it was closed; connection_closed: it closed first).",
                &["reason"],
            )?,
            keys_not_found: IntCounter::new(
                "pushcluster_comet_push_keys_not_found_total",
                "Keys in a push that have no connection on this comet (the client left).",
            )?,
            duplicates: counter(
                "pushcluster_comet_duplicates_dropped_total",
                "Redelivered messages this comet had already delivered, left out, by kind (keys, room, broadcast).",
                &["kind"],
            )?,
            gaps: counter(
                "pushcluster_comet_room_gaps_total",
                "Room pushes that showed this comet had missed earlier messages of the room, by outcome: filled (from history, before the push) or unfilled (members with positions closed to resync).",
                &["outcome"],
            )?,
            direct_gaps: IntCounter::new(
                "pushcluster_comet_direct_gaps_total",
                "Direct pushes that showed a connection with positions had missed earlier messages of its user's or key's stream (job's calls here failed meanwhile); each resumes the stream from history.",
            )?,
            room_joins: counter(
                "pushcluster_comet_room_joins_total",
                "Rooms connections asked to enter (auth, op 12, op 22), by result: ok, already (in it), limit (comet.limits.rooms_per_connection), forbidden (not in the token's rooms), invalid (empty or overlong id).",
                &["result"],
            )?,
            upstream_messages: counter(
                "pushcluster_comet_upstream_messages_total",
                "Client messages (op 4) for the backend, by answer: accepted (stored; op 5 with its id), too_large, rate_limited, unavailable (op 5 with the error).",
                &["result"],
            )?,
            replayed: IntCounter::new(
                "pushcluster_comet_replayed_messages_total",
                "History messages written to resuming connections (positions opted in).",
            )?,
            stale_owners: IntCounter::new(
                "pushcluster_comet_stale_owner_rejected_total",
                "Pushes refused because a newer job owner of their stream partition had delivered (fencing).",
            )?,
            sent_bytes: counter(
                "pushcluster_comet_sent_bytes_total",
                "Bytes written to client sockets, by transport.",
                &["transport"],
            )?,
            write_batch_frames: Histogram::with_opts(
                HistogramOpts::new(
                    "pushcluster_comet_write_batch_messages",
                    "Queued messages written to one client socket in one go.",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )?,
            delivery_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "pushcluster_comet_delivery_latency_seconds",
                    "End to end: from publish (logic) to written to the client socket; one observation per write, from its oldest pushed message.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ]),
            )?,
            rooms: IntGauge::new(
                "pushcluster_comet_rooms",
                "Rooms with at least one member on this comet.",
            )?,
            online_reports: counter(
                "pushcluster_comet_online_reports_total",
                "Room-count reports (RenewOnline) to logic, by result (ok, error).",
                &["result"],
            )?,
            accept_errors: counter(
                "pushcluster_comet_accept_errors_total",
                "Errors accepting client sockets (for example, out of file descriptors), by transport.",
                &["transport"],
            )?,
        };
        metrics.init_series();
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.connects.clone()))?;
        registry.register(Box::new(metrics.handshake_failures.clone()))?;
        registry.register(Box::new(metrics.limited.clone()))?;
        registry.register(Box::new(metrics.disconnects.clone()))?;
        registry.register(Box::new(metrics.bad_frames.clone()))?;
        registry.register(Box::new(metrics.frames_before_auth.clone()))?;
        registry.register(Box::new(metrics.upstream_frames.clone()))?;
        registry.register(Box::new(metrics.pushes.clone()))?;
        registry.register(Box::new(metrics.delivered.clone()))?;
        registry.register(Box::new(metrics.dropped.clone()))?;
        registry.register(Box::new(metrics.keys_not_found.clone()))?;
        registry.register(Box::new(metrics.duplicates.clone()))?;
        registry.register(Box::new(metrics.stale_owners.clone()))?;
        registry.register(Box::new(metrics.replayed.clone()))?;
        registry.register(Box::new(metrics.gaps.clone()))?;
        registry.register(Box::new(metrics.direct_gaps.clone()))?;
        registry.register(Box::new(metrics.room_joins.clone()))?;
        registry.register(Box::new(metrics.upstream_messages.clone()))?;
        registry.register(Box::new(metrics.sent_bytes.clone()))?;
        registry.register(Box::new(metrics.write_batch_frames.clone()))?;
        registry.register(Box::new(metrics.delivery_latency.clone()))?;
        registry.register(Box::new(metrics.rooms.clone()))?;
        registry.register(Box::new(metrics.online_reports.clone()))?;
        registry.register(Box::new(metrics.accept_errors.clone()))?;
        Ok(metrics)
    }

    /// Creates every known series at 0, so dashboards and alerts see them
    /// before the first event.
    fn init_series(&self) {
        const TRANSPORTS: [&str; 2] = ["tcp", "websocket"];
        const KINDS: [&str; 3] = ["keys", "room", "broadcast"];
        for transport in TRANSPORTS {
            self.connections.with_label_values(&[transport]);
            self.connects.with_label_values(&[transport]);
            self.sent_bytes.with_label_values(&[transport]);
            self.accept_errors.with_label_values(&[transport]);
            for reason in [
                "client_closed",
                "heartbeat_timeout",
                "slow_consumer",
                "replaced",
                "bad_frame",
                "io_error",
                "drain",
                "frame_rate",
                "resync",
            ] {
                self.disconnects.with_label_values(&[transport, reason]);
            }
            for limit in [
                Limit::Connections,
                Limit::ConnectionsPerIp,
                Limit::NewConnectionsPerIp,
                Limit::FramesPerConnection,
            ] {
                self.limited.with_label_values(&[transport, limit.label()]);
            }
            for reason in [
                "timeout",
                "client_closed",
                "bad_frame",
                "io_error",
                "auth_rejected",
                "logic_unavailable",
                "drain",
                "frame_rate",
            ] {
                self.handshake_failures
                    .with_label_values(&[transport, reason]);
            }
            for reason in [
                "pack_len_too_large",
                "pack_len_too_small",
                "bad_header_len",
                "payload_mismatch",
                "truncated",
                "websocket_protocol",
            ] {
                self.bad_frames.with_label_values(&[transport, reason]);
            }
        }
        self.handshake_failures
            .with_label_values(&["websocket", "upgrade_failed"]);
        self.handshake_failures
            .with_label_values(&["websocket", "tls_failed"]);
        for kind in KINDS {
            self.pushes.with_label_values(&[kind]);
            self.delivered.with_label_values(&[kind]);
            self.duplicates.with_label_values(&[kind]);
        }
        for reason in ["slow_consumer", "connection_closed"] {
            self.dropped.with_label_values(&[reason]);
        }
        for kind in ["heartbeat", "change_room", "sub", "unsub", "other"] {
            self.upstream_frames.with_label_values(&[kind]);
        }
        for result in ["ok", "error"] {
            self.online_reports.with_label_values(&[result]);
        }
    }
}
