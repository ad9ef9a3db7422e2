//! goim's protobuf messages and gRPC services, generated at build time.
//! Package, service and method names and field numbers are goim v2's.

/// `goim.protocol`: the frame as it travels inside gRPC.
pub mod protocol {
    tonic::include_proto!("goim.protocol");
}

/// `goim.comet`: the service comets serve to job.
pub mod comet {
    tonic::include_proto!("goim.comet");
}

/// `goim.logic`: the service logic serves to comets, and `PushMsg`.
pub mod logic {
    tonic::include_proto!("goim.logic");
}

use crate::protocol::Frame;

impl From<&Frame> for protocol::Proto {
    fn from(frame: &Frame) -> Self {
        protocol::Proto {
            ver: i32::from(frame.ver),
            op: frame.op,
            seq: frame.seq,
            body: frame.body.clone(),
        }
    }
}

impl From<Frame> for protocol::Proto {
    fn from(frame: Frame) -> Self {
        protocol::Proto {
            ver: i32::from(frame.ver),
            op: frame.op,
            seq: frame.seq,
            body: frame.body,
        }
    }
}

impl From<protocol::Proto> for Frame {
    fn from(proto: protocol::Proto) -> Self {
        Frame {
            // The header field is 16 bits; goim truncates the same way.
            ver: proto.ver as i16,
            op: proto.op,
            seq: proto.seq,
            body: proto.body,
        }
    }
}
