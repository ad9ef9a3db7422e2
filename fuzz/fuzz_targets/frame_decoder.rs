//! Feeds arbitrary bytes to the goim frame decoders, the way a hostile
//! client would send them over TCP (as a stream, in arbitrary chunks) and
//! over WebSocket (as whole messages). Neither may panic, and every frame
//! they accept must re-encode to the bytes it came from.
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use pushcluster_api::protocol::{MAX_CLIENT_FRAME, decode_stream, decode_ws_message};

fuzz_target!(|data: &[u8]| {
    // TCP: the first byte picks a chunk size, the rest is the stream.
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut buf = BytesMut::new();
    let mut consumed = Vec::new();
    'stream: for piece in stream.chunks(chunk) {
        buf.put_slice(piece);
        loop {
            match decode_stream(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.encoded_len() <= MAX_CLIENT_FRAME);
                    consumed.extend_from_slice(&frame.encode());
                }
                Ok(None) => break,
                Err(_) => break 'stream,
            }
        }
    }
    assert!(stream.starts_with(&consumed), "decoded frames re-encode to their bytes");

    // WebSocket: the whole input is one message.
    if let Ok(frame) = decode_ws_message(Bytes::copy_from_slice(data)) {
        assert_eq!(&frame.encode()[..], data);
    }
});
